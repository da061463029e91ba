"""The Open Inference Protocol (KServe V2, Triton's REST API), without HTTP: the codec of its tensors
(JSON and the binary tensor data extension), its requests and responses mapped onto a model's rows,
and its metadata. zypher_ws/http/oip.py serves it under /v2."""

from __future__ import annotations

from typing import Any

from ..models.tensors import TensorMetadata, TensorSpec
from .infer import HEADER_LENGTH, PROTOCOL, InferRequest, encode, parse_request, response, rows_of, to_input

__all__ = [
    "EXTENSIONS",
    "HEADER_LENGTH",
    "PLATFORMS",
    "PROTOCOL",
    "InferRequest",
    "encode",
    "model_metadata",
    "parse_request",
    "response",
    "rows_of",
    "statistics",
    "to_input",
]

EXTENSIONS = ("binary_tensor_data", "statistics", "schedule_policy", "model_repository", "async_infer")
"""The extensions `GET /v2` lists: only those implemented here."""
PLATFORMS = {"onnx": "onnxruntime_onnx", "sklearn": "sklearn_joblib", "python": "python"}


def model_metadata(name: str, versions: list[str], runtime: str, tensors: TensorMetadata) -> dict[str, Any]:
    """`GET /v2/models/{name}`: a batch axis (-1) in front of each tensor's own shape."""
    return {
        "name": name,
        "versions": versions,
        "platform": PLATFORMS.get(runtime, runtime),
        "inputs": [_batched(spec) for spec in tensors.inputs],
        "outputs": [_batched(spec) for spec in tensors.outputs],
    }


def _batched(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.shape]}


def statistics(name: str, version: str, figures: dict[str, Any]) -> dict[str, Any]:
    """One model version's entry in the statistics extension's `model_stats`, from Metrics.figures."""

    def duration(pair: tuple[int, float]) -> dict[str, int]:
        return {"count": pair[0], "ns": int(pair[1] * 1e9)}

    end_to_end = figures["end_to_end"]
    last = figures["last_finished"]
    return {
        "name": name,
        "version": version,
        "last_inference": int(last * 1000) if last is not None else 0,
        "inference_count": figures["succeeded"],
        "execution_count": figures["calls"],
        "inference_stats": {
            "success": duration((figures["succeeded"], end_to_end[1])),
            "fail": {"count": figures["failed"], "ns": 0},
            "queue": duration(figures["queue"]),
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": duration(figures["model"]),
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [],
    }
