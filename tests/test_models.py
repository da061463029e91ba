from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from zypher_ws.models import DigitsModel, MockModel, build_model
from zypher_ws.settings import Settings

HOLDOUT = Path(__file__).parent / "data" / "digits_holdout.npz"


@pytest.fixture(scope="module")
def holdout() -> tuple[np.ndarray, np.ndarray]:
    with np.load(HOLDOUT) as data:
        return data["images"], data["labels"]


@pytest.fixture(scope="module")
def digits() -> DigitsModel:
    model = DigitsModel()
    model.load()
    return model


def test_shipped_digits_weights_classify_held_out_samples(digits: DigitsModel, holdout: tuple) -> None:
    images, labels = holdout
    outputs = digits.predict_batch(images.tolist())
    predicted = np.array([o["label"] for o in outputs])
    accuracy = float((predicted == labels).mean())
    assert accuracy >= 0.95, accuracy
    for o in outputs[:20]:
        assert len(o["probabilities"]) == 10
        assert abs(sum(o["probabilities"]) - 1.0) < 1e-3
        assert o["label"] == int(np.argmax(o["probabilities"]))


def test_digits_accepts_eight_rows_of_eight(digits: DigitsModel, holdout: tuple) -> None:
    images, _ = holdout
    flat = images[:5].tolist()
    rows = [np.asarray(img).reshape(8, 8).tolist() for img in flat]
    assert digits.predict_batch(rows) == digits.predict_batch(flat)


def test_digits_batch_equals_one_by_one(digits: DigitsModel, holdout: tuple) -> None:
    images, _ = holdout
    batch = digits.predict_batch(images[:7].tolist())
    single = [digits.predict_batch([img])[0] for img in images[:7].tolist()]
    assert [b["label"] for b in batch] == [s["label"] for s in single]


def test_mock_is_deterministic_and_depends_on_input() -> None:
    model = MockModel()
    a, b, a2 = model.predict_batch([{"k": 1}, {"k": 2}, {"k": 1}])
    assert a == a2 and a != b
    assert a["digest"] == hashlib.sha256(json.dumps({"k": 1}).replace(" ", "").encode()).hexdigest()
    assert 0 <= a["prediction"] < 1


def test_build_model_by_name_and_by_import_path() -> None:
    assert isinstance(build_model(Settings(model="digits")), DigitsModel)
    mock = build_model(Settings(model="mock", mock_latency_ms=50))
    assert isinstance(mock, MockModel) and mock.latency == 0.05
    user = build_model(Settings(model="example_model:EchoModel"))
    assert user.name == "echo"
    user.load()
    assert user.predict_batch([1, 2]) == [{"echo": 1}, {"echo": 2}]


def test_build_model_rejects_unknown_and_non_models() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_model(Settings(model="nope"))
    with pytest.raises(TypeError, match="did not produce a model"):
        build_model(Settings(model="example_model:not_a_model"))
