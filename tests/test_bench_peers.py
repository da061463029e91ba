"""The peers suite's pieces that need no peer installed: its copy of the mock model agrees with ours, and
every server it names has its app and a pinned venv. The peers themselves run only in `python -m bench
peers`, never in the tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.peers import mock_model
from bench.peers.suite import NAMES, PEERS, VENVS
from zypher_ws.models.mock import MockModel

INPUTS = [[1, 2, 3], {"text": "hello", "n": 1}, "x", 0, None, [{"b": 1, "a": [2.5, "é"]}]]


def test_the_peers_copy_of_the_mock_model_gives_the_same_results() -> None:
    assert mock_model.MockModel().predict_batch(INPUTS) == MockModel().predict_batch(INPUTS)


@pytest.mark.parametrize("model", [mock_model.MockModel(latency_ms=30), MockModel(latency_ms=30)])
def test_one_wait_per_batch_whatever_its_size(model: object) -> None:
    started = time.monotonic()
    model.predict_batch(INPUTS * 10)  # type: ignore[attr-defined]
    assert 0.03 <= time.monotonic() - started < 0.3


def test_every_peer_has_its_app_and_a_pinned_venv() -> None:
    here = Path(mock_model.__file__).parent
    assert set(NAMES) == set(VENVS) == {p.venv for p in PEERS if p.venv}
    for venv in VENVS.values():
        assert venv.requirements and all("==" in r for r in venv.requirements), venv
    for key in VENVS:
        assert (here / f"{key}_app.py").is_file(), key
