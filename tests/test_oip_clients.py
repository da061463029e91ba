"""The Open Inference Protocol with the real clients: tritonclient's HTTP client (sync, in a thread, and
its aiohttp one) and the kserve SDK's REST client, against a live server on a real port serving a
repository of real model files."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from onnx import TensorProto
from sklearn.datasets import load_digits, load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier
from tritonclient.utils import InferenceServerException

from fakes import WAIT, make_settings
from model_files import save_identity, save_joblib, save_onnx, save_simple
from zypher_ws.http.app import create_app
from zypher_ws.http.keys import SERVICE

T = TypeVar("T")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """simple (Triton's example: INT32 add and subtract of two [N, 16] inputs), strings (a BYTES
    identity), longs (an INT64 identity), iris (scikit-learn, FP64 in) and digits-onnx (FP32 in)."""
    root = tmp_path_factory.mktemp("oip") / "models"
    save_simple(root / "simple" / "1" / "model.onnx")
    save_identity(root / "strings" / "1" / "model.onnx", TensorProto.STRING, ["batch", "n"])
    save_identity(root / "longs" / "1" / "model.onnx", TensorProto.INT64, ["batch", 3])
    X, y = load_iris(return_X_y=True)
    save_joblib(root / "iris" / "1" / "model.joblib", LogisticRegression(max_iter=1000).fit(X, y))
    digits_X, digits_y = load_digits(return_X_y=True)
    digits = DecisionTreeClassifier(random_state=0).fit(digits_X, digits_y)  # fits its training rows exactly
    save_onnx(root / "digits-onnx" / "1" / "model.onnx", digits, digits_X, zipmap=False)
    return root


@pytest.fixture
async def url(aiohttp_server: Any, repository: Path) -> str:
    """host:port of a live server (the mock model, and the repository), once every model is loaded."""
    app = create_app(make_settings(model=("mock",), model_repository=str(repository)))
    server = await aiohttp_server(app)
    await asyncio.wait_for(asyncio.gather(*(d.loaded.wait() for d in app[SERVICE].models)), WAIT)
    return f"127.0.0.1:{server.port}"


async def triton(url: str, call: Callable[[httpclient.InferenceServerClient], T]) -> T:
    """Run `call` with tritonclient's (blocking, gevent) HTTP client, in a thread of its own."""

    def run() -> T:
        client = httpclient.InferenceServerClient(url)
        try:
            return call(client)
        finally:
            client.close()

    return await asyncio.wait_for(asyncio.to_thread(run), WAIT)


def simple_inputs(a: np.ndarray, b: np.ndarray, *, binary: bool = True) -> list[httpclient.InferInput]:
    inputs = [
        httpclient.InferInput("INPUT0", list(a.shape), "INT32"),
        httpclient.InferInput("INPUT1", list(b.shape), "INT32"),
    ]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    return inputs


# -- health and metadata ----------------------------------------------------------------------------


async def test_server_live_ready_and_metadata(url: str) -> None:
    def check(client: httpclient.InferenceServerClient) -> dict[str, Any]:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("simple") and client.is_model_ready("iris", "1")
        assert not client.is_model_ready("nothing")
        return {
            "server": client.get_server_metadata(),
            "simple": client.get_model_metadata("simple"),
            "iris": client.get_model_metadata("iris", "1"),
            "mock": client.get_model_metadata("mock"),
        }

    found = await triton(url, check)
    assert found["server"]["name"] == "zypher-ws"
    assert "binary_tensor_data" in found["server"]["extensions"]
    assert found["simple"] == {
        "name": "simple",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]},
            {"name": "INPUT1", "datatype": "INT32", "shape": [-1, 16]},
        ],
        "outputs": [
            {"name": "OUTPUT0", "datatype": "INT32", "shape": [-1, 16]},
            {"name": "OUTPUT1", "datatype": "INT32", "shape": [-1, 16]},
        ],
    }
    # scikit-learn: its feature count; its classes are integers.
    assert found["iris"]["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    assert found["iris"]["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]},
    ]
    # A Python model's tensors come from its JSON Schemas: any JSON in is one BYTES tensor of JSON text.
    assert found["mock"]["inputs"] == [{"name": "input", "datatype": "BYTES", "shape": [-1]}]


async def test_unknown_model_is_an_exception_with_the_servers_message(url: str) -> None:
    def call(client: httpclient.InferenceServerClient) -> None:
        client.get_model_metadata("nothing")

    with pytest.raises(InferenceServerException) as caught:
        await triton(url, call)
    assert caught.value.status() == "404"
    assert caught.value.message().startswith("Request for unknown model: no model 'nothing'")


# -- infer ------------------------------------------------------------------------------------------


async def test_infer_binary_in_and_out_as_the_client_sends_by_default(url: str) -> None:
    a = np.arange(48, dtype=np.int32).reshape(3, 16)
    b = np.full((3, 16), -1, dtype=np.int32)

    result = await triton(url, lambda client: client.infer("simple", simple_inputs(a, b)))
    response = result.get_response()
    assert all("binary_data_size" in out["parameters"] for out in response["outputs"])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0").dtype == np.int32


async def test_infer_json_only(url: str) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=False) for n in ("OUTPUT0", "OUTPUT1")]

    result = await triton(
        url, lambda client: client.infer("simple", simple_inputs(a, b, binary=False), outputs=outputs, request_id="r-1")
    )
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "simple" and response["model_version"] == "1"
    assert response["outputs"][0]["data"] == (a + b).reshape(-1).tolist()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


async def test_mixed_binary_and_json_compressed_as_tritons_example_does(url: str) -> None:
    """One input as JSON, the other binary; one output binary, one JSON; the body gzipped."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), -1, dtype=np.int32)
    inputs = simple_inputs(a, b)
    inputs[0].set_data_from_numpy(a, binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False),
    ]

    result = await triton(
        url,
        lambda client: client.infer(
            "simple", inputs, outputs=outputs, query_params={"test_1": 1}, request_compression_algorithm="gzip"
        ),
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert "data" in result.get_output("OUTPUT1") and "data" not in result.get_output("OUTPUT0")


@pytest.mark.parametrize("binary", [True, False])
async def test_bytes_tensors(url: str, binary: bool) -> None:
    strings = np.array([["héllo", "wo\x00rld"], ["a", ""], ["ß", "z"]], dtype=np.object_)
    sent = np.vectorize(lambda s: s.encode("utf-8"), otypes=[np.object_])(strings)
    tensor = httpclient.InferInput("X", [3, 2], "BYTES")
    tensor.set_data_from_numpy(sent, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("Y", binary_data=binary)]

    result = await triton(url, lambda client: client.infer("strings", [tensor], outputs=outputs))
    got = result.as_numpy("Y")
    assert got.shape == (3, 2)
    decoded = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in got.tolist()]
    assert decoded == strings.tolist()


async def test_int64_tensors(url: str) -> None:
    values = np.array([[2**40, -(2**62), 7], [0, 1, -1]], dtype=np.int64)
    tensor = httpclient.InferInput("X", [2, 3], "INT64")
    tensor.set_data_from_numpy(values)

    result = await triton(url, lambda client: client.infer("longs", [tensor]))
    np.testing.assert_array_equal(result.as_numpy("Y"), values)
    assert result.as_numpy("Y").dtype == np.int64


async def test_fp32_into_onnx_and_fp64_into_scikit_learn(url: str) -> None:
    digits_X, digits_y = load_digits(return_X_y=True)
    pixels = httpclient.InferInput("X", [4, 64], "FP32")
    pixels.set_data_from_numpy(digits_X[:4].astype(np.float32))
    iris_X, _ = load_iris(return_X_y=True)
    flowers = httpclient.InferInput("input", [2, 4], "FP64")
    flowers.set_data_from_numpy(iris_X[[0, 100]])

    def call(client: httpclient.InferenceServerClient) -> tuple[Any, Any]:
        return client.infer("digits-onnx", [pixels]), client.infer("iris", [flowers])

    digits, iris = await triton(url, call)
    np.testing.assert_array_equal(digits.as_numpy("label"), digits_y[:4])
    probabilities = digits.as_numpy("probabilities")
    assert probabilities.shape == (4, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert iris.as_numpy("label").tolist() == [0, 2]
    assert iris.as_numpy("probabilities").shape == (2, 3)


async def test_a_python_model_takes_json_text(url: str) -> None:
    tensor = httpclient.InferInput("input", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b'{"a": 1}', b"[1, 2]"], dtype=np.object_))

    result = await triton(url, lambda client: client.infer("mock", [tensor]))
    assert result.as_numpy("prediction").shape == (2,)
    digests = [d.decode() for d in result.as_numpy("digest").tolist()]
    assert len(digests) == 2 and all(len(d) == 64 for d in digests) and digests[0] != digests[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"shape": [1, 15]}, "input 'INPUT0': shape [1, 15], and the model takes [-1, 16]"),
        ({"datatype": "FP32"}, "input 'INPUT0': datatype FP32, and the model takes INT32"),
        ({"name": "INPUTX"}, "unknown input 'INPUTX' (the model's inputs: INPUT0, INPUT1)"),
    ],
)
async def test_a_bad_request_is_an_exception_with_the_servers_message(
    url: str, change: dict[str, Any], message: str
) -> None:
    shape = change.get("shape", [1, 16])
    datatype = change.get("datatype", "INT32")
    dtype = np.float32 if datatype == "FP32" else np.int32
    first = httpclient.InferInput(change.get("name", "INPUT0"), shape, datatype)
    first.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    second = httpclient.InferInput("INPUT1", [1, 16], "INT32")
    second.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))

    with pytest.raises(InferenceServerException) as caught:
        await triton(url, lambda client: client.infer("simple", [first, second]))
    assert caught.value.status() == "400"
    assert caught.value.message() == message


async def test_the_aio_client(url: str) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.arange(32, dtype=np.int32).reshape(2, 16)
    inputs = [aioclient.InferInput("INPUT0", [2, 16], "INT32"), aioclient.InferInput("INPUT1", [2, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    client = aioclient.InferenceServerClient(url)
    try:
        assert await client.is_server_ready()
        result = await client.infer("simple", inputs)
    finally:
        await client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((2, 16), dtype=np.int32))


async def test_concurrent_requests_share_model_calls_and_each_gets_its_own_rows(url: str) -> None:
    batches = [np.full((n, 16), n, dtype=np.int32) for n in (1, 2, 3, 4, 5, 6)]

    async def one(a: np.ndarray) -> np.ndarray:
        result = await triton(url, lambda client: client.infer("simple", simple_inputs(a, a)))
        return result.as_numpy("OUTPUT0")

    results = await asyncio.gather(*(one(a) for a in batches))
    for a, got in zip(batches, results, strict=True):
        np.testing.assert_array_equal(got, 2 * a)


# -- kserve -----------------------------------------------------------------------------------------


async def test_the_kserve_rest_client_in_protocol_v2(url: str) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    base = f"http://{url}"
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [InferInput("INPUT0", [1, 16], "INT32"), InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a, binary_data=False)
    inputs[1].set_data_from_numpy(a, binary_data=True)
    request = InferRequest(model_name="simple", infer_inputs=inputs, request_id="k-1")
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=WAIT))
    try:
        assert await client.is_server_live(base) and await client.is_server_ready(base)
        assert await client.is_model_ready(base, "simple")
        response = await client.infer(base, request, model_name="simple")
        missing = await _error_of(client.infer(base, request, model_name="nothing"))
    finally:
        await client.close()
    assert response.id == "k-1" and response.model_name == "simple"
    outputs = {out.name: out.as_numpy() for out in response.outputs}
    np.testing.assert_array_equal(outputs["OUTPUT0"], 2 * a)
    np.testing.assert_array_equal(outputs["OUTPUT1"], 0 * a)
    assert "Request for unknown model: no model 'nothing'" in missing


async def _error_of(call: Any) -> str:
    import httpx

    with pytest.raises(httpx.HTTPStatusError) as caught:
        await call
    return str(caught.value)
