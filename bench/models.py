"""The benchmark's models by name, and a sample input for each."""

from __future__ import annotations

from typing import Any

from bench import onnx_digits
from bench.cpu_model import CpuModel, sample_input
from zypher_ws.models import DigitsModel, MockModel, Model, build, parse_model_option

MODELS = ("mock", "mock50", "cpu", "digits", onnx_digits.NAME)
STUCK_MS = 600_000  # "stuck": a mock call of ten minutes, so nothing accepted ever leaves the queue

DIGIT = [0, 0, 2, 14, 13, 3, 0, 0, 0, 0, 13, 13, 9, 11, 0, 0, 0, 0, 16, 7, 0, 12, 0, 0, 0, 3, 16, 5, 0, 10, 5, 0]
DIGIT += [0, 5, 16, 1, 0, 8, 5, 0, 0, 3, 16, 1, 0, 10, 5, 0, 0, 0, 16, 8, 5, 14, 3, 0, 0, 0, 4, 16, 16, 9, 1, 0]


def bench_model(name: str) -> Model:
    if name == "mock":
        return MockModel()
    if name == "mock50":
        return MockModel(latency_ms=50)
    if name == "stuck":
        return MockModel(latency_ms=STUCK_MS)
    if name == "cpu":
        return CpuModel()
    if name == "digits":
        return DigitsModel()
    if name == onnx_digits.NAME:  # the onnx runtime's own model, as `--model` builds it
        return build(parse_model_option(onnx_digits.model_option()))
    raise ValueError(f"unknown benchmark model {name!r}; one of {MODELS}")


# Tuned as a user would: this model's cost per input keeps falling up to batches of 128-256.
CPU_TUNING = ("--max-batch-size", "128")


def serve_args(name: str) -> list[str]:
    """`zypher-ws serve` flags for the same model."""
    if name == onnx_digits.NAME:
        return ["--model", onnx_digits.model_option()]
    return {
        "mock": ["--model", "mock"],
        "mock50": ["--model", "mock", "--mock-latency-ms", "50"],
        "stuck": ["--model", "mock", "--mock-latency-ms", str(STUCK_MS), "--shutdown-timeout", "0"],
        "cpu": ["--model", "bench.cpu_model:CpuModel", *CPU_TUNING],
        "digits": ["--model", "digits"],
    }[name]


def sample(name: str) -> Any:
    if name == "cpu":
        return sample_input()
    if name in ("digits", onnx_digits.NAME):
        return DIGIT
    return {"text": "hello", "n": 1}
