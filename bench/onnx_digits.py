"""The `digits-onnx` benchmark model: a scikit-learn classifier of the digits data set exported to ONNX
with skl2onnx, served by the onnx runtime as a user's model file would be (no code of ours around it).

The file is made once per machine, in the temporary folder; training takes a few seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

NAME = "digits-onnx"


def model_file() -> Path:
    path = Path(tempfile.gettempdir()) / "zypher-bench" / "digits.onnx"
    if not path.is_file():
        import numpy as np
        from skl2onnx import to_onnx
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        X, y = load_digits(return_X_y=True)
        model = LogisticRegression(max_iter=3000).fit(X, y)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(to_onnx(model, X[:1].astype(np.float32)).SerializeToString())
        partial.replace(path)  # whole or not there: another benchmark process may be reading it
    return path


def model_option() -> str:
    """The `--model` a user would give for it."""
    return f"{NAME}=onnx:{model_file()}"
