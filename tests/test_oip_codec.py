"""The Open Inference Protocol's codec without a server: tensors as JSON and as binary data, checked by
Hypothesis against tritonclient's own encoding, and every malformed body refused as a bad request."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import serialize_byte_tensor

from zypher_ws.errors import InvalidInferenceRequest
from zypher_ws.models.tensors import TensorMetadata, TensorSpec
from zypher_ws.oip import encode, parse_request, response, to_input
from zypher_ws.oip.tensors import DTYPES

NUMERIC = [d for d in DTYPES if d != "BYTES"]

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(shapes)
    if datatype == "BYTES":
        count = int(np.prod(shape))
        texts = draw(st.lists(st.text(max_size=8), min_size=count, max_size=count))
        return datatype, np.array(texts, dtype=object).reshape(shape)
    dtype = DTYPES[datatype]
    elements = None
    if dtype.kind == "f":
        elements = st.floats(allow_nan=False, allow_infinity=False, width=dtype.itemsize * 8)
    return datatype, draw(hnp.arrays(dtype, shape, elements=elements))


def binary_body(items: list[tuple[str, np.ndarray]], sizes: list[int] | None = None) -> tuple[bytes, str]:
    """A request as tritonclient packs it: the JSON header, then each tensor's bytes (its encoding)."""
    raws = []
    for datatype, array in items:
        if datatype == "BYTES":
            packed = serialize_byte_tensor(np.vectorize(lambda s: s.encode(), otypes=[object])(array))
            raws.append(packed.item() if packed.size else b"")
        else:
            raws.append(array.tobytes())
    inputs = [
        {
            "name": f"t{i}",
            "datatype": datatype,
            "shape": list(array.shape),
            "parameters": {"binary_data_size": sizes[i] if sizes else len(raw)},
        }
        for i, ((datatype, array), raw) in enumerate(zip(items, raws, strict=True))
    ]
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(raws), str(len(header))


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3))
def test_binary_tensors_decode_to_what_tritonclient_encoded(items: list[tuple[str, np.ndarray]]) -> None:
    body, length = binary_body(items)
    parsed = parse_request(body, length)
    for (datatype, array), tensor in zip(items, parsed.inputs, strict=True):
        assert tensor.datatype == datatype and tensor.array.shape == array.shape
        if datatype == "BYTES":
            assert tensor.array.tolist() == array.tolist()
        else:
            np.testing.assert_array_equal(tensor.array, array)


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_json_tensors_decode_flat_or_nested(item: tuple[str, np.ndarray]) -> None:
    datatype, array = item
    for data in (array.reshape(-1).tolist(), array.tolist() if array.ndim else [array.tolist()]):
        header = {"inputs": [{"name": "x", "datatype": datatype, "shape": list(array.shape), "data": data}]}
        (tensor,) = parse_request(json.dumps(header).encode(), None).inputs
        assert tensor.array.shape == array.shape
        assert tensor.array.tolist() == array.tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.data())
def test_a_wrong_binary_size_is_a_bad_request(items: list[tuple[str, np.ndarray]], data: st.DataObject) -> None:
    body, length = binary_body(items)
    true_sizes = [t["parameters"]["binary_data_size"] for t in json.loads(body[: int(length)])["inputs"]]
    which = data.draw(st.integers(0, len(items) - 1))
    delta = data.draw(st.integers(-true_sizes[which], 64).filter(lambda d: d != 0))
    sizes = list(true_sizes)
    sizes[which] += delta
    wrong, length = binary_body(items, sizes)
    with pytest.raises(InvalidInferenceRequest):
        parse_request(wrong, length)


@settings(max_examples=200, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.data())
def test_a_truncated_body_is_a_bad_request(items: list[tuple[str, np.ndarray]], data: st.DataObject) -> None:
    body, length = binary_body(items)
    if len(body) == int(length):
        return  # every tensor is empty: nothing after the header to cut
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(InvalidInferenceRequest):
        parse_request(body[:cut], length)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.text(max_size=6)))
@example(b"", "²")  # a digit to str.isdigit, not to int()
def test_any_bytes_are_a_request_or_a_bad_request(body: bytes, length: str | None) -> None:
    try:
        parse_request(body, length)
    except InvalidInferenceRequest:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([*NUMERIC, "BYTES", "BF16", "FLOAT", 3]),
    st.one_of(shapes.map(list), json_values),
    json_values,
    st.one_of(st.none(), st.dictionaries(st.sampled_from(["binary_data_size", "x"]), json_values, max_size=2)),
)
def test_any_json_header_is_a_request_or_a_bad_request(datatype: Any, shape: Any, data: Any, parameters: Any) -> None:
    tensor: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": shape, "data": data}
    if parameters is not None:
        tensor["parameters"] = parameters
    try:
        parse_request(json.dumps({"inputs": [tensor]}).encode(), None)
    except InvalidInferenceRequest:
        pass


def test_bytes_elements_are_bounded_by_the_tensors_size() -> None:
    # One element that claims 1000 bytes where 3 follow, within a binary_data_size of 7.
    header = json.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]}
    )
    body = header.encode() + (1000).to_bytes(4, "little") + b"abc" + b"x" * 1000
    with pytest.raises(InvalidInferenceRequest, match="says 1000 bytes, and only 3 are left"):
        parse_request(body[: len(header) + 7], str(len(header)))
    # The bytes after the tensor's own 7 are never read as part of it, though the body holds them.
    with pytest.raises(InvalidInferenceRequest, match="says 1000 bytes, and only 3 are left"):
        parse_request(body, str(len(header)))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"datatype": "INT8", "shape": [2], "data": [1, 300]}, "outside the range of INT8"),
        ({"datatype": "INT32", "shape": [2], "data": [1, 2.5]}, "INT32 data must be whole numbers"),
        ({"datatype": "BOOL", "shape": [1], "data": [1]}, "BOOL data must be true or false"),
        ({"datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}, r"shape \[2, 2\] needs 4 values, data has 3"),
        ({"datatype": "FP32", "shape": [1], "data": [[1, 2]]}, "needs 1 values, data has more than 1"),
        ({"datatype": "BF16", "shape": [1], "data": [1]}, "BF16 is not supported"),
        ({"datatype": "FP32", "shape": [-1], "data": []}, "whole numbers of at least 0"),
        ({"datatype": "FP32", "shape": [1]}, "needs data, or parameters.binary_data_size"),
    ],
)
def test_json_data_must_fit_its_datatype_and_shape(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInferenceRequest, match=message):
        parse_request(json.dumps({"inputs": [{"name": "x", **tensor}]}).encode(), None)


SIMPLE = TensorMetadata(
    inputs=(TensorSpec("A", "FP32", (3,)), TensorSpec("B", "FP32", (3,))),
    outputs=(TensorSpec("C", "FP32", (3,)),),
)


def request_of(**inputs: tuple[str, list[int], list[Any]]) -> Any:
    tensors = [{"name": n, "datatype": d, "shape": s, "data": v} for n, (d, s, v) in inputs.items()]
    return parse_request(json.dumps({"id": "7", "inputs": tensors}).encode(), None)


def test_a_batch_of_n_is_n_rows_in_the_models_form() -> None:
    request = request_of(A=("FP32", [2, 3], [1, 2, 3, 4, 5, 6]), B=("INT64", [2, 3], [0, 0, 0, 1, 1, 1]))
    value = to_input(request, SIMPLE, {"type": "object", "properties": {}}, max_rows=8)
    assert value["rows"] == [{"A": [1, 2, 3], "B": [0, 0, 0]}, {"A": [4, 5, 6], "B": [1, 1, 1]}]
    outputs = [{"C": [1.0, 2.0, 3.0]}, {"C": [5.0, 6.0, 7.0]}]
    answer = response(value, outputs, SIMPLE, model="add", version="1")
    assert answer == {
        "model_name": "add",
        "model_version": "1",
        "id": "7",
        "outputs": [{"name": "C", "datatype": "FP32", "shape": [2, 3], "data": [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]}],
    }
    body, length = encode(answer, {"C"})
    assert length is not None and json.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(np.frombuffer(body[length:], "<f4"), [1, 2, 3, 5, 6, 7])


@pytest.mark.parametrize(
    ("inputs", "max_rows", "message"),
    [
        (
            {"A": ("FP32", [2, 3], [0] * 6), "B": ("FP32", [1, 3], [0] * 3)},
            8,
            "batch of 1, while the other inputs have 2",
        ),
        (
            {"A": ("FP32", [3, 3], [0] * 9), "B": ("FP32", [3, 3], [0] * 9)},
            2,
            "a batch of 3, and this model takes at most 2",
        ),
        ({"A": ("FP32", [0, 3], []), "B": ("FP32", [0, 3], [])}, 2, "the batch is empty"),
        (
            {"A": ("BOOL", [1, 3], [True] * 3), "B": ("FP32", [1, 3], [0] * 3)},
            2,
            "datatype BOOL, and the model takes FP32",
        ),
        ({"A": ("FP32", [1, 3], [0] * 3)}, 2, "missing input 'B'"),
    ],
)
def test_requests_that_do_not_fit_the_models_tensors(inputs: dict[str, Any], max_rows: int, message: str) -> None:
    with pytest.raises(InvalidInferenceRequest, match=message):
        to_input(request_of(**inputs), SIMPLE, {}, max_rows=max_rows)


def test_non_finite_binary_floats_are_refused() -> None:
    header = json.dumps(
        {
            "inputs": [
                {"name": "A", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}},
                {"name": "B", "datatype": "FP32", "shape": [1, 3], "data": [0, 0, 0]},
            ]
        }
    ).encode()
    body = header + np.array([1, np.nan, 2], dtype="<f4").tobytes()
    with pytest.raises(InvalidInferenceRequest, match="NaN or infinity"):
        to_input(parse_request(body, str(len(header))), SIMPLE, {}, max_rows=4)


def test_outputs_that_are_not_one_tensor_fail_the_prediction() -> None:
    value = {"rows": [1, 2], "id": None, "outputs": None}
    with pytest.raises(ValueError, match="is not one FP32 tensor over the rows"):
        response(value, [{"C": [1, 2, 3]}, {"C": [1, 2]}], SIMPLE, model="m", version="1")
    with pytest.raises(ValueError, match="has no 'C'"):
        response(value, [{"D": 1}, {"D": 2}], SIMPLE, model="m", version="1")
