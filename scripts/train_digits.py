"""Train the shipped `digits` model and write its weights.

Development only (needs scikit-learn): `pip install -e ".[train]" && python scripts/train_digits.py`.
The service itself runs the network with numpy alone (zypher_ws/models/digits.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

SEED = 0
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "zypher_ws" / "models" / "digits_weights.npz"
HOLDOUT = ROOT / "tests" / "data" / "digits_holdout.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=600, random_state=SEED)
    clf.fit(x_train, y_train)
    accuracy = clf.score(x_test, y_test)
    np.savez_compressed(
        args.out,
        w1=clf.coefs_[0].astype(np.float32),
        b1=clf.intercepts_[0].astype(np.float32),
        w2=clf.coefs_[1].astype(np.float32),
        b2=clf.intercepts_[1].astype(np.float32),
    )
    # The held-out split lets the test suite check the shipped weights without scikit-learn.
    HOLDOUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(HOLDOUT, images=x_test * 16.0, labels=y_test)
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} samples; wrote {args.out}")


if __name__ == "__main__":
    main()
