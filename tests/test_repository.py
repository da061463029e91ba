"""What to serve: every `--model` form, a model repository's folders and config.json, and the default."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from model_files import save_add, save_joblib, save_onnx
from zypher_ws.models import (
    BUILTINS,
    DigitsModel,
    MockModel,
    ModelConfig,
    ModelConfigError,
    ModelLoadError,
    ModelSpec,
    NotAModel,
    build,
    build_model,
    default_version,
    model_specs,
    parse_model_option,
    resolve_default,
    scan_repository,
    versions_of,
)
from zypher_ws.settings import Settings


@pytest.fixture(scope="module")
def iris_models() -> tuple[np.ndarray, LogisticRegression, LogisticRegression]:
    X, y = load_iris(return_X_y=True)
    return X, LogisticRegression(max_iter=1000).fit(X, y), LogisticRegression(C=0.01, max_iter=1000).fit(X, y)


@pytest.fixture
def repository(tmp_path: Path, iris_models: tuple[np.ndarray, Any, Any]) -> Path:
    """iris (two joblib versions and a config.json), digits-onnx (one ONNX version), scaler (Python)."""
    X, first, second = iris_models
    root = tmp_path / "models"
    save_joblib(root / "iris" / "1" / "model.joblib", first)
    save_joblib(root / "iris" / "2" / "model.pkl", second)
    write_config(
        root / "iris",
        {"max_batch_size": 8, "max_batch_delay_ms": 0.5, "labels": ["setosa", "versicolor", "virginica"]},
    )
    save_onnx(root / "digits-onnx" / "1" / "model.onnx", first, X)
    (root / "scaler" / "3").mkdir(parents=True)
    (root / "scaler" / "3" / "factor.txt").write_text("3")
    write_config(root / "scaler", {"runtime": "python", "factory": "configured_model:Scaler", "workers": 1})
    (root / "iris" / "__pycache__").mkdir()  # skipped, like every name starting with . or _
    (root / ".git").mkdir()
    (root / "README.md").write_text("plain files beside the models are skipped")
    return root


def write_config(folder: Path, config: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)


def test_scan_finds_every_version_of_every_model(repository: Path) -> None:
    specs = scan_repository(repository)
    assert [(s.name, s.version, s.runtime) for s in specs] == [
        ("digits-onnx", "1", "onnx"),
        ("iris", "1", "sklearn"),
        ("iris", "2", "sklearn"),
        ("scaler", "3", "python"),
    ]
    iris_2 = specs[2]
    assert iris_2.path == repository / "iris" / "2" / "model.pkl"
    assert iris_2.root == repository.resolve()
    assert iris_2.config.max_batch_size == 8 and iris_2.config.workers is None
    assert iris_2.config.labels == {"0": "setosa", "1": "versicolor", "2": "virginica"}
    assert iris_2.config.overrides() == {"max_batch_size": 8, "max_batch_delay_ms": 0.5}
    scaler = specs[3]
    assert scaler.factory == "configured_model:Scaler" and scaler.path == repository / "scaler" / "3"
    assert not any(s.is_default for s in specs)


def test_every_version_is_servable_and_the_highest_is_the_default(
    repository: Path, iris_models: tuple[np.ndarray, Any, Any]
) -> None:
    X, first, second = iris_models
    specs = resolve_default(scan_repository(repository))
    (default,) = [s for s in specs if s.is_default]
    assert (default.name, default.version) == ("digits-onnx", "1")  # the first model by name
    specs = resolve_default(specs, "iris")
    (default,) = [s for s in specs if s.is_default]
    assert (default.name, default.version) == ("iris", "2")
    assert default_version(specs, "iris") is default
    assert [s.version for s in versions_of(specs, "iris")] == ["1", "2"]

    names = np.array(["setosa", "versicolor", "virginica"])
    for spec, estimator in zip(versions_of(specs, "iris"), (first, second), strict=True):
        model = build(spec)
        model.load()
        assert (model.name, model.version) == ("iris", spec.version)
        outputs = model.predict_batch(X[::10].tolist())
        assert [o["label"] for o in outputs] == names[estimator.predict(X[::10])].tolist()  # labels applied
        assert list(outputs[0]["probabilities"]) == names.tolist()
        assert model.output_schema["properties"]["label"]["enum"] == names.tolist()

    onnx = build(default_version(specs, "digits-onnx"))
    onnx.load()
    assert [o["label"] for o in onnx.predict_batch(X[:3].tolist())] == first.predict(X[:3]).tolist()

    scaler = build(default_version(specs, "scaler"))  # a Python model in the repository, given its spec
    scaler.load()
    assert (scaler.name, scaler.version) == ("scaler", "3")
    assert scaler.predict_batch([2]) == [{"scaled": 6.0}]


def test_per_model_settings_override_the_global_ones(repository: Path) -> None:
    (iris_1, *_) = [s for s in scan_repository(repository) if s.name == "iris"]
    settings = dataclasses.replace(Settings(store="memory://"), **iris_1.config.overrides())
    assert (settings.max_batch_size, settings.max_batch_delay_ms, settings.workers) == (8, 0.5, 2)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_batch_size": 8, "batch": 4}, "unknown key 'batch'"),
        ({"max_batch_size": "8"}, "max_batch_size must be a whole number of at least 1, not '8'"),
        ({"max_batch_size": 0}, "max_batch_size must be a whole number"),
        ({"workers": True}, "workers must be a whole number"),
        ({"max_batch_delay_ms": -1}, "max_batch_delay_ms must be a number of at least 0"),
        ({"executor": "gpu"}, "executor must be thread or process, not 'gpu'"),
        ({"runtime": "tensorflow"}, "runtime must be one of onnx, sklearn, python, not 'tensorflow'"),
        ({"runtime": 3}, "runtime must be a string"),
        ({"runtime": "python"}, 'the python runtime needs "factory"'),
        ({"runtime": "onnx", "factory": "a.b:c"}, "factory is for the python runtime"),
        ({"runtime": "python", "factory": "not a factory"}, "is not package.module:factory"),
        ({"labels": "setosa"}, "labels must be a list or an object"),
        ({"labels": [1, 2]}, "labels must be strings"),
        ({"labels": {"0": 1}}, "labels must be a list of names"),
        ({"options": [1]}, "options must be an object"),
        ([], "must be a JSON object, not list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_config_json_is_an_error_naming_the_file(tmp_path: Path, config: Any, message: str) -> None:
    save_add(tmp_path / "add" / "1" / "model.onnx")
    write_config(tmp_path / "add", config)
    with pytest.raises(ModelConfigError) as caught:
        scan_repository(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'add' / 'config.json'}: ")
    assert message in str(caught.value)


def test_unknown_runtime_options_are_refused_when_built(tmp_path: Path) -> None:
    save_add(tmp_path / "add" / "1" / "model.onnx")
    write_config(tmp_path / "add", {"options": {"gpu": True}})
    (spec,) = scan_repository(tmp_path)
    with pytest.raises(ModelConfigError, match="unknown onnx option 'gpu'"):
        build(spec)


def test_the_runtime_comes_from_the_file_name_or_config(tmp_path: Path) -> None:
    save_add(tmp_path / "a" / "1" / "model.onnx")
    save_joblib(tmp_path / "b" / "1" / "model.pkl", {"not": "used"})
    save_add(tmp_path / "c" / "1" / "model.onnx")
    save_joblib(tmp_path / "c" / "1" / "model.joblib", {"not": "used"})
    write_config(tmp_path / "c", {"runtime": "onnx"})  # two files: config.json picks one
    assert [(s.name, s.runtime, s.path.name if s.path else None) for s in scan_repository(tmp_path)] == [
        ("a", "onnx", "model.onnx"),
        ("b", "sklearn", "model.pkl"),
        ("c", "onnx", "model.onnx"),
    ]


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"m/1/weights.bin": ""}, "m/1: no model file (expected one of model.onnx, model.joblib, model.pkl"),
        ({"m/1/model.onnx": "", "m/1/model.joblib": ""}, "several model files (model.onnx, model.joblib)"),
        ({"m/1/model.onnx": "", "m/v2/model.onnx": ""}, "version folders are numbers (1, 2, ...), not 'v2'"),
        ({"m/1/model.onnx": "", "m/01/model.onnx": ""}, "are the same version"),
        ({"m/config.json": "{}"}, "m: no version folder"),
        ({"my model/1/model.onnx": ""}, "'my model' is not a model name"),
        ({".hidden/1/model.onnx": ""}, "no model folders in it"),
    ],
)
def test_a_bad_repository_is_a_clear_error(tmp_path: Path, layout: dict[str, str], message: str) -> None:
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelConfigError) as caught:
        scan_repository(tmp_path)
    assert message in str(caught.value)


def test_a_repository_folder_that_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="no such folder"):
        scan_repository(tmp_path / "nowhere")


def test_no_file_outside_the_repository_is_loaded(tmp_path: Path, iris_models: tuple[np.ndarray, Any, Any]) -> None:
    outside = save_joblib(tmp_path / "elsewhere" / "model.joblib", iris_models[1])
    root = tmp_path / "models"
    (root / "iris" / "1").mkdir(parents=True)
    (root / "iris" / "1" / "model.joblib").symlink_to(outside)
    with pytest.raises(ModelConfigError, match="outside the repository"):
        scan_repository(root)
    # And a spec pointing out of its root (made by hand, or a link swapped after the scan) is never loaded.
    spec = ModelSpec(name="iris", version="1", runtime="sklearn", path=root / "iris" / "1" / "model.joblib", root=root)
    model = build(spec)
    with pytest.raises(ModelLoadError, match="outside"):
        model.load()


# -- --model ----------------------------------------------------------------------------------------------


def test_every_model_option_form(
    tmp_path: Path, iris_models: tuple[np.ndarray, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    joblib_file = save_joblib(tmp_path / "iris.joblib", iris_models[1])
    onnx_file = save_add(tmp_path / "onnx-folder" / "model.onnx")

    digits = parse_model_option("digits")
    assert (digits.name, digits.runtime, digits.factory) == ("digits", "python", BUILTINS["digits"])
    assert isinstance(build(digits), DigitsModel)
    mock = parse_model_option("mock")
    assert isinstance(build(mock), MockModel) and mock.name == "mock"

    iris = parse_model_option(f"iris=sklearn:{joblib_file}")
    assert (iris.name, iris.version, iris.runtime, iris.path, iris.root) == (
        "iris", "1", "sklearn", joblib_file, joblib_file,
    )  # fmt: skip
    add = parse_model_option(f"digits-onnx=onnx:{onnx_file}")
    assert (add.name, add.runtime, add.path) == ("digits-onnx", "onnx", onnx_file)
    assert parse_model_option(f"add=onnx:{onnx_file.parent}").path == onnx_file  # a folder: its model.onnx

    named = parse_model_option("echo2=python:example_model:EchoModel")
    assert (named.name, named.version, named.factory) == ("echo2", None, "example_model:EchoModel")
    model = build(named)
    assert (model.name, model.version) == ("echo2", "1.0")  # the configured name, the model's own version
    model.load()
    assert model.predict_batch([4]) == [{"echo": 4}]

    bare = parse_model_option("example_model:EchoModel")
    assert (bare.name, bare.version, bare.runtime) == (None, None, "python")
    assert build(bare).name == "echo"

    monkeypatch.chdir(tmp_path)
    relative = parse_model_option("iris=sklearn:iris.joblib")
    assert relative.path == joblib_file  # made absolute, for workers that start elsewhere


def test_a_factory_is_given_its_spec_when_it_asks_for_one() -> None:
    spec = parse_model_option("tripler=python:configured_model:Scaler")
    spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, options={"factor": 3}))
    model = build(spec)
    assert (model.name, model.version) == ("tripler", "0.1")
    assert model.predict_batch([1, 2]) == [{"scaled": 3.0}, {"scaled": 6.0}]


@pytest.mark.parametrize(
    "option, message",
    [
        ("nope", "unknown model 'nope': use digits, mock, NAME=RUNTIME:PATH"),
        ("iris=tensorflow:m.pb", "unknown runtime 'tensorflow' (runtimes: onnx, sklearn, python)"),
        ("iris=sklearn", "give the sklearn model as iris=sklearn:PATH"),
        ("iris=sklearn:", "give the sklearn model as iris=sklearn:PATH"),
        ("iris=sklearn:/no/such/file.joblib", "no such file /no/such/file.joblib"),
        ("bad name=sklearn:x", "'bad name' is not a model name"),
        ("=sklearn:x", "'' is not a model name"),
        ("echo=python:example_model", "'example_model' is not package.module:factory"),
        ("pkg.mod:", "'pkg.mod:' is not package.module:factory"),
    ],
)
def test_bad_model_options(option: str, message: str) -> None:
    with pytest.raises(ModelConfigError) as caught:
        parse_model_option(option)
    assert message in str(caught.value)


def test_a_factory_that_cannot_be_imported_or_is_no_model() -> None:
    with pytest.raises(ModelConfigError, match="cannot import no_such_module"):
        build(parse_model_option("no_such_module:Model"))
    with pytest.raises(ModelConfigError, match="example_model has no Missing"):
        build(parse_model_option("example_model:Missing"))
    with pytest.raises(NotAModel, match="did not produce a model"):
        build(parse_model_option("x=python:example_model:not_a_model"))


# -- many models ------------------------------------------------------------------------------------------


def test_model_specs_puts_the_options_first_and_the_first_is_the_default(repository: Path) -> None:
    specs = model_specs(["mock", "digits"], repository=repository, mock_latency_ms=25)
    assert [(s.name, s.version) for s in specs][:3] == [("mock", None), ("digits", None), ("digits-onnx", "1")]
    assert [s.name for s in specs if s.is_default] == ["mock"]
    mock = build(specs[0])
    assert isinstance(mock, MockModel) and mock.latency == 0.025

    specs = model_specs(["mock"], repository=repository, default_model="iris")
    assert [(s.name, s.version) for s in specs if s.is_default] == [("iris", "2")]
    assert [s.name for s in model_specs([], repository=repository) if s.is_default] == ["digits-onnx"]


def test_a_model_named_twice_or_an_unknown_default(repository: Path, tmp_path: Path) -> None:
    onnx_file = save_add(tmp_path / "add.onnx")
    with pytest.raises(ModelConfigError, match=r"model iris is declared twice: --model iris=onnx:.* and .*iris/1"):
        model_specs([f"iris=onnx:{onnx_file}"], repository=repository)
    with pytest.raises(ModelConfigError, match="model add is declared twice"):
        model_specs([f"add=onnx:{onnx_file}", f"add=onnx:{onnx_file}"])
    with pytest.raises(ModelConfigError, match=r"--default-model nope: no such model \(models: mock, digits\)"):
        model_specs(["mock", "digits"], default_model="nope")
    with pytest.raises(ModelConfigError, match="no model to serve"):
        model_specs([])
    bare = model_specs(["example_model:EchoModel", "mock"])
    assert [s.is_default for s in bare] == [True, False]  # named by the model itself, once built


def test_build_model_serves_the_single_model_option(tmp_path: Path) -> None:
    path = save_add(tmp_path / "add.onnx")
    model = build_model(Settings(model=f"add=onnx:{path}", store="memory://"))
    assert (model.name, model.version) == ("add", "1")
    assert model.predict_batch([{"A": [1, 1, 1], "B": [1, 2, 3]}]) == [{"C": [2.0, 3.0, 4.0]}]


def test_a_config_is_hashable_and_pickles(repository: Path) -> None:
    import pickle

    specs = scan_repository(repository)
    assert pickle.loads(pickle.dumps(specs)) == specs  # specs cross to --executor process workers
    assert len({s.config for s in specs}) == 3
    assert ModelConfig().overrides() == {}


def test_a_model_option_naming_a_repository_model_picks_it(repository: Path) -> None:
    picked = model_specs(["iris"], repository=repository)
    assert [(s.name, s.version, s.is_default) for s in picked] == [("iris", "1", False), ("iris", "2", True)]
    mixed = model_specs(["mock", "scaler"], repository=repository)  # the first --model stays the default
    assert [(s.name, s.is_default) for s in mixed] == [("mock", True), ("scaler", False)]
    first = model_specs(["scaler", "mock"], repository=repository)
    assert [(s.name, s.is_default) for s in first] == [("mock", False), ("scaler", True)]
    with pytest.raises(ModelConfigError, match=r"--model iirs: no such model in --model-repository .* \(digits-onnx"):
        model_specs(["iirs"], repository=repository)
