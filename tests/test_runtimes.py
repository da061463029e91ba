"""The runtimes on real model files: scikit-learn estimators saved with joblib, skl2onnx exports and
hand-made ONNX graphs, all made here from the data sets scikit-learn ships."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from onnx import TensorProto, helper
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from model_files import save_add, save_graph, save_identity, save_joblib, save_onnx
from zypher_ws.errors import InvalidInput
from zypher_ws.models import (
    DigitsModel,
    MissingExtra,
    MockModel,
    Model,
    ModelConfigError,
    ModelLoadError,
    TensorSpec,
    build,
    parse_model_option,
    tensor_metadata,
)
from zypher_ws.validation import InputValidator

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def split(loader: Any) -> Split:
    X, y = loader(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    return X_train, X_test, y_train, y_test


def served(option: str) -> Any:
    """The model a `--model` option names, built by its runtime and loaded."""
    model = build(parse_model_option(option))
    assert isinstance(model, Model)
    model.load()
    return model


def check_outputs(model: Any, outputs: list[Any]) -> None:
    for output in outputs:
        jsonschema.validate(output, model.output_schema)


@pytest.fixture(scope="module")
def iris() -> Split:
    return split(load_iris)


@pytest.fixture(scope="module")
def iris_classifier(iris: Split) -> LogisticRegression:
    X_train, _, y_train, _ = iris
    return LogisticRegression(max_iter=1000).fit(X_train, y_train)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


# -- sklearn ---------------------------------------------------------------------------------------------


def test_sklearn_classifier_answers_as_the_estimator_does(
    files: Path, iris: Split, iris_classifier: LogisticRegression
) -> None:
    path = save_joblib(files / "iris.joblib", iris_classifier)
    model = served(f"iris=sklearn:{path}")
    _, X_test, _, y_test = iris
    outputs = model.predict_batch(X_test.tolist())
    labels = [o["label"] for o in outputs]
    assert labels == iris_classifier.predict(X_test).tolist()
    assert np.mean(np.array(labels) == y_test) >= 0.9
    expected = iris_classifier.predict_proba(X_test)
    for output, row in zip(outputs, expected, strict=True):
        assert list(output["probabilities"]) == ["0", "1", "2"]
        assert np.allclose(list(output["probabilities"].values()), row)
    check_outputs(model, outputs)
    assert model.input_schema["minItems"] == model.input_schema["maxItems"] == 4
    assert (model.name, model.version) == ("iris", "1")


def test_sklearn_pipeline_on_breast_cancer(files: Path) -> None:
    X_train, X_test, y_train, y_test = split(load_breast_cancer)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X_train, y_train)
    model = served(f"cancer=sklearn:{save_joblib(files / 'cancer.pkl', pipeline)}")
    outputs = model.predict_batch(X_test.tolist())
    assert [o["label"] for o in outputs] == pipeline.predict(X_test).tolist()
    assert np.mean(pipeline.predict(X_test) == y_test) >= 0.9
    assert model.input_schema["maxItems"] == 30


def test_sklearn_string_classes_and_a_regressor(files: Path, iris: Split) -> None:
    X_train, X_test, y_train, _ = iris
    names = np.array(["setosa", "versicolor", "virginica"])
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(X_train, names[y_train])
    model = served(f"flowers=sklearn:{save_joblib(files / 'flowers.joblib', forest)}")
    outputs = model.predict_batch(X_test[:10].tolist())
    assert [o["label"] for o in outputs] == forest.predict(X_test[:10]).tolist()
    assert set(outputs[0]["probabilities"]) == set(names)
    assert model.output_schema["properties"]["label"]["enum"] == names.tolist()
    check_outputs(model, outputs)

    X_train, X_test, y_train, _ = train_test_split(*load_diabetes(return_X_y=True), random_state=0)
    regressor = LinearRegression().fit(X_train, y_train)
    model = served(f"diabetes=sklearn:{save_joblib(files / 'diabetes.joblib', regressor)}")
    outputs = model.predict_batch(X_test[:5].tolist())
    assert [o["label"] for o in outputs] == pytest.approx(regressor.predict(X_test[:5]).tolist())
    assert all(set(o) == {"label"} for o in outputs)
    check_outputs(model, outputs)
    assert tensor_metadata(model).outputs == (TensorSpec("label", "FP64", ()),)


FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def check_named_features(model: Any, X_test: np.ndarray, expected: list[Any]) -> None:
    by_name = [dict(zip(FEATURES, row, strict=True)) for row in X_test.tolist()]
    outputs = model.predict_batch(by_name)  # filterwarnings=error: sklearn's warnings would fail this
    assert [o["label"] for o in outputs] == expected
    assert outputs == model.predict_batch(X_test.tolist())
    validate = InputValidator(model.input_schema)
    validate(by_name[0])
    validate(X_test[0].tolist())
    with pytest.raises(InvalidInput, match="petal_width"):
        validate({name: 1.0 for name in FEATURES[:3]})
    with pytest.raises(InvalidInput, match="input: has 3 items, fewer than the minimum of 4"):
        validate([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="petal_width"):
        model.predict_batch([{name: 1.0 for name in FEATURES[:3]}])


def test_sklearn_takes_features_by_name_without_pandas(files: Path, iris: Split) -> None:
    # An estimator with feature names as fitting on a data frame gives it, made without pandas; and the
    # runtime told there is no pandas, so it orders the named features itself.
    X_train, X_test, y_train, _ = iris
    estimator = LogisticRegression(max_iter=1000).fit(X_train, y_train)
    expected = estimator.predict(X_test).tolist()
    estimator.feature_names_in_ = np.asarray(FEATURES, dtype=object)
    model = served(f"named=sklearn:{save_joblib(files / 'named.joblib', estimator)}")
    model._pandas = None
    assert "oneOf" in model.input_schema
    check_named_features(model, X_test, expected)


def test_sklearn_takes_features_by_name_from_a_data_frame_fit(files: Path, iris: Split) -> None:
    import pandas

    X_train, X_test, y_train, _ = iris
    estimator = LogisticRegression(max_iter=1000).fit(pandas.DataFrame(X_train, columns=FEATURES), y_train)
    model = served(f"frame=sklearn:{save_joblib(files / 'frame.joblib', estimator)}")
    expected = estimator.predict(pandas.DataFrame(X_test, columns=FEATURES)).tolist()
    check_named_features(model, X_test, expected)


# -- onnx ------------------------------------------------------------------------------------------------


class CountingSession:
    """Wraps an onnxruntime session to count its runs and the batch sizes it was given."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


def counted(model: Any) -> CountingSession:
    model._session = CountingSession(model._session)
    return model._session


def test_onnx_classifier_with_zipmap_answers_as_the_estimator(
    files: Path, iris: Split, iris_classifier: LogisticRegression
) -> None:
    X_train, X_test, _, _ = iris
    model = served(f"iris-onnx=onnx:{save_onnx(files / 'iris.onnx', iris_classifier, X_train)}")
    outputs = model.predict_batch(X_test.tolist())
    assert [o["label"] for o in outputs] == iris_classifier.predict(X_test).tolist()
    expected = iris_classifier.predict_proba(X_test)
    for output, row in zip(outputs, expected, strict=True):
        assert set(output) == {"label", "probabilities"}
        assert list(output["probabilities"]) == ["0", "1", "2"]
        assert np.allclose(list(output["probabilities"].values()), row, atol=1e-5)
    check_outputs(model, outputs)
    assert tensor_metadata(model).inputs == (TensorSpec("X", "FP32", (4,)),)
    assert tensor_metadata(model).outputs == (
        TensorSpec("label", "INT64", ()),
        TensorSpec("probabilities", "FP32", (-1,)),
    )


def test_onnx_classifier_without_zipmap_gives_plain_tensors(
    files: Path, iris: Split, iris_classifier: LogisticRegression
) -> None:
    X_train, X_test, _, _ = iris
    path = save_onnx(files / "iris-plain.onnx", iris_classifier, X_train, zipmap=False)
    model = served(f"iris-plain=onnx:{path}")
    outputs = model.predict_batch(X_test.tolist())
    assert [o["label"] for o in outputs] == iris_classifier.predict(X_test).tolist()
    assert np.allclose([o["probabilities"] for o in outputs], iris_classifier.predict_proba(X_test), atol=1e-5)
    check_outputs(model, outputs)
    assert model.output_schema["properties"]["probabilities"]["maxItems"] == 3


def test_onnx_string_classes_keep_their_names(files: Path, iris: Split) -> None:
    X_train, X_test, y_train, _ = iris
    names = np.array(["setosa", "versicolor", "virginica"])
    estimator = LogisticRegression(max_iter=1000).fit(X_train, names[y_train])
    model = served(f"flowers-onnx=onnx:{save_onnx(files / 'flowers.onnx', estimator, X_train)}")
    outputs = model.predict_batch(X_test[:10].tolist())
    assert [o["label"] for o in outputs] == estimator.predict(X_test[:10]).tolist()
    assert list(outputs[0]["probabilities"]) == names.tolist()


@pytest.fixture(scope="module")
def digits_onnx(files: Path) -> tuple[Any, np.ndarray, Any]:
    X_train, X_test, y_train, y_test = split(load_digits)
    estimator = LogisticRegression(max_iter=2000).fit(X_train, y_train)
    model = served(f"digits-onnx=onnx:{save_onnx(files / 'digits.onnx', estimator, X_train)}")
    assert np.mean(estimator.predict(X_test) == y_test) >= 0.9
    return model, X_test, estimator


def test_onnx_batch_is_one_run_with_the_answers_of_single_calls(digits_onnx: tuple[Any, np.ndarray, Any]) -> None:
    model, X_test, estimator = digits_onnx
    rows = X_test[:17].tolist()
    session = counted(model)
    try:
        batch = model.predict_batch(rows)
        single = [model.predict_batch([row])[0] for row in rows]
    finally:
        model._session = session.session
    assert session.batches == [17] + [1] * 17
    assert [b["label"] for b in batch] == [s["label"] for s in single] == estimator.predict(X_test[:17]).tolist()
    for b, s in zip(batch, single, strict=True):
        # float32 sums in another order (one batched GEMM): equal to a few units in the sixth place
        assert b["probabilities"] == pytest.approx(s["probabilities"], abs=1e-5)


def test_onnx_inputs_are_validated_naming_the_field(digits_onnx: tuple[Any, np.ndarray, Any]) -> None:
    model, X_test, _ = digits_onnx
    validate = InputValidator(model.input_schema)
    validate(X_test[0].tolist())
    with pytest.raises(InvalidInput, match="input: has 63 items, fewer than the minimum of 64"):
        validate(X_test[0].tolist()[:63])
    with pytest.raises(InvalidInput, match=r"input\[3\]: expected number, got string"):
        validate([0, 1, 2, "x", *X_test[0].tolist()[4:]])
    with pytest.raises(InvalidInput, match="input: expected array, got object"):
        validate({"X": X_test[0].tolist()})
    with pytest.raises(ValueError, match="shape"):
        model.predict_batch([X_test[0].tolist()[:63]])  # unvalidated, the model still says what is wrong


def test_onnx_multi_input_graph_takes_an_object_of_tensors(files: Path) -> None:
    model = served(f"add=onnx:{save_add(files / 'add.onnx')}")
    assert model.predict_batch([{"A": [1, 2, 3], "B": [10, 20, 30]}, {"A": [0, 0, 1], "B": [0.5, 0, 0]}]) == [
        {"C": [11.0, 22.0, 33.0]},
        {"C": [0.5, 0.0, 1.0]},
    ]
    validate = InputValidator(model.input_schema)
    validate({"A": [1, 2, 3], "B": [4, 5, 6]})
    with pytest.raises(InvalidInput, match='input: missing the required property "B"'):
        validate({"A": [1, 2, 3]})
    with pytest.raises(InvalidInput, match=r"input\.B: has 2 items, fewer than the minimum of 3"):
        validate({"A": [1, 2, 3], "B": [4, 5]})
    with pytest.raises(InvalidInput, match=r"input\.A\[0\]: expected number, got string"):
        validate({"A": ["1", 2, 3], "B": [4, 5, 6]})
    with pytest.raises(InvalidInput, match='input: has the property "D", which the schema does not allow'):
        validate({"A": [1, 2, 3], "B": [4, 5, 6], "D": [0, 0, 0]})
    assert [t.name for t in tensor_metadata(model).inputs] == ["A", "B"]
    assert tensor_metadata(model).outputs == (TensorSpec("C", "FP32", (3,)),)


def test_onnx_fixed_batch_runs_one_by_one(files: Path) -> None:
    model = served(f"fixed=onnx:{save_add(files / 'fixed.onnx', batch=1)}")
    session = counted(model)
    rows = [{"A": [i, i, i], "B": [1, 2, 3]} for i in range(4)]
    assert model.predict_batch(rows) == [{"C": [i + 1.0, i + 2.0, i + 3.0]} for i in range(4)]
    assert session.batches == [1, 1, 1, 1]
    assert model.input_schema["properties"]["A"]["maxItems"] == 3


def test_onnx_without_batch_axis_takes_the_whole_tensor(files: Path) -> None:
    model = served(f"whole=onnx:{save_add(files / 'whole.onnx', batch=2, width=2)}")
    row = {"A": [[1, 2], [3, 4]], "B": [[1, 1], [1, 1]]}
    assert model.predict_batch([row, row]) == [{"C": [[2.0, 3.0], [4.0, 5.0]]}] * 2
    assert tensor_metadata(model).inputs[0] == TensorSpec("A", "FP32", (2, 2))


def test_onnx_element_types_and_ragged_rows(files: Path) -> None:
    strings = served(f"strings=onnx:{save_identity(files / 'strings.onnx', TensorProto.STRING, ['n'])}")
    assert strings.input_schema == {"type": "string", "description": "tensor X (BYTES)"}
    assert strings.predict_batch(["a", "bé"]) == [{"Y": "a"}, {"Y": "bé"}]
    ints = served(f"ints=onnx:{save_identity(files / 'ints.onnx', TensorProto.INT8, [None, 'width'])}")
    assert ints.input_schema["items"] == {"type": "integer", "minimum": -128, "maximum": 127}
    session = counted(ints)
    # Rows of different widths cannot be stacked: each runs alone.
    assert ints.predict_batch([[1, 2], [3], [-4, 5, 6]]) == [{"Y": [1, 2]}, {"Y": [3]}, {"Y": [-4, 5, 6]}]
    assert session.batches == [1, 1, 1]
    flags = served(f"flags=onnx:{save_identity(files / 'flags.onnx', TensorProto.BOOL, [None, 2])}")
    assert flags.predict_batch([[True, False]]) == [{"Y": [True, False]}]
    assert tensor_metadata(flags).inputs == (TensorSpec("X", "BOOL", (2,)),)


def test_onnx_output_without_batch_axis_runs_one_by_one(files: Path) -> None:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", 3])
    total = helper.make_tensor_value_info("S", TensorProto.FLOAT, [])
    reduce = helper.make_node("ReduceSum", ["X"], ["S"], keepdims=0)  # sums the whole batch: no rows
    model = served(f"sum=onnx:{save_graph(files / 'sum.onnx', [reduce], [x], [total])}")
    session = counted(model)
    assert model.predict_batch([[1, 2, 3], [4, 5, 6]]) == [{"S": 6.0}, {"S": 15.0}]
    assert session.batches == [2, 1, 1]  # the batched run's answer cannot be split, so each runs alone


def test_onnx_options(files: Path, iris: Split, iris_classifier: LogisticRegression) -> None:
    path = save_onnx(files / "options.onnx", iris_classifier, iris[0])
    with pytest.raises(ModelConfigError, match="unknown onnx option 'threads'"):
        build(_with_options(parse_model_option(f"m=onnx:{path}"), {"threads": 2}))
    with pytest.raises(ModelConfigError, match="intra_op_threads"):
        build(_with_options(parse_model_option(f"m=onnx:{path}"), {"intra_op_threads": -1}))
    model = build(_with_options(parse_model_option(f"m=onnx:{path}"), {"providers": ["NoSuchExecutionProvider"]}))
    with pytest.raises(ModelLoadError, match=r"NoSuchExecutionProvider is not available.*CPUExecutionProvider"):
        model.load()
    model = build(_with_options(parse_model_option(f"m=onnx:{path}"), {"intra_op_threads": 1}))
    model.load()
    assert model.predict_batch([iris[1][0].tolist()])[0]["label"] == iris_classifier.predict(iris[1][:1])[0]


def _with_options(spec: Any, options: dict[str, Any]) -> Any:
    import dataclasses

    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, options=options))


# -- failures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime, name", [("onnx", "model.onnx"), ("sklearn", "model.joblib")])
def test_a_corrupt_file_fails_to_load_naming_it(tmp_path: Path, runtime: str, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"this is not a model\n" * 10)
    model = build(parse_model_option(f"broken={runtime}:{path}"))
    with pytest.raises(ModelLoadError, match=str(path)):
        model.load()


def test_sklearn_refuses_an_object_that_is_no_estimator(tmp_path: Path) -> None:
    model = build(parse_model_option(f"dict=sklearn:{save_joblib(tmp_path / 'dict.joblib', {'a': 1})}"))
    with pytest.raises(ModelLoadError, match="holds a dict, which has no predict"):
        model.load()


def test_a_file_removed_after_startup_fails_to_load_naming_it(tmp_path: Path) -> None:
    path = save_add(tmp_path / "gone.onnx")
    model = build(parse_model_option(f"gone=onnx:{path}"))
    path.unlink()
    with pytest.raises(ModelLoadError, match=f"{path}: no such file"):
        model.load()


BLOCKED = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
from zypher_ws.models import MissingExtra, build, parse_model_option  # the package imports without them
try:
    build(parse_model_option(sys.argv[1]))
except MissingExtra as exc:
    print("MissingExtra:", exc)
else:
    print("built")
from zypher_ws.cli import main
try:
    main(["serve", "--store", "memory://", "--port", "0", "--model", sys.argv[1]])
except SystemExit as exc:
    print("SystemExit:", exc)
"""


@pytest.mark.parametrize(
    "runtime, blocked, extra",
    [
        ("onnx", ("onnxruntime",), "onnx"),
        ("sklearn", ("sklearn", "joblib"), "sklearn"),
        ("sklearn", ("joblib",), "sklearn"),
    ],
)
def test_a_missing_extra_is_a_clear_error_with_the_pip_line(
    tmp_path: Path, runtime: str, blocked: tuple[str, ...], extra: str
) -> None:
    path = tmp_path / "model.file"
    path.write_bytes(b"")
    code = textwrap.dedent(BLOCKED.format(blocked=set(blocked)))
    done = subprocess.run(
        [sys.executable, "-c", code, f"m={runtime}:{path}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    raised, exited = done.stdout.splitlines()
    assert raised.startswith(f"MissingExtra: the {runtime} runtime needs "), done.stdout
    assert raised.endswith(f'which is not installed: pip install "zypher-ws[{extra}]"')
    assert exited == f"SystemExit: zypher-ws: {raised.removeprefix('MissingExtra: ')}"  # one line, no traceback


def test_a_missing_model_file_stops_the_service_with_one_line(tmp_path: Path) -> None:
    # A file that is there but cannot be loaded fails that model only (test_serving.py): the others serve.
    path = tmp_path / "model.joblib"
    option = f"m=sklearn:{path}"
    done = subprocess.run(
        [sys.executable, "-m", "zypher_ws", "serve", "--store", "memory://", "--port", "0", "--model", option],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    expected = f"--model {option}: no such file {path}"
    assert done.stderr.strip().splitlines()[-1].startswith(f"zypher-ws: {expected}"), done.stderr


def test_missing_extra_is_also_raised_by_load() -> None:
    exc = MissingExtra("onnx", "onnxruntime", "onnx")
    assert exc.pip_line == 'pip install "zypher-ws[onnx]"'
    assert isinstance(exc, ImportError)
    assert str(exc) == 'the onnx runtime needs onnxruntime, which is not installed: pip install "zypher-ws[onnx]"'


# -- tensor metadata of models that do not describe their tensors ---------------------------------------


def test_tensor_metadata_is_derived_for_the_built_ins() -> None:
    digits = tensor_metadata(DigitsModel())
    assert digits.inputs == (TensorSpec("input", "FP64", (64,)),)
    assert digits.outputs == (TensorSpec("label", "INT64", ()), TensorSpec("probabilities", "FP64", (10,)))
    mock = tensor_metadata(MockModel())
    assert mock.inputs == (TensorSpec("input", "BYTES", ()),)
    assert mock.outputs == (TensorSpec("prediction", "FP64", ()), TensorSpec("digest", "BYTES", ()))
    assert TensorSpec("x", "FP32", (-1, 3)).to_dict() == {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
    with pytest.raises(ValueError, match="FLOAT"):
        TensorSpec("x", "FLOAT", ())
