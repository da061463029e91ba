"""What models to serve: `--model` options and `--model-repository` folders, parsed into ModelSpecs.

Nothing here imports a runtime's packages or loads a model; the runtimes (runtimes.py) turn a spec into
a model. Every error is a ModelConfigError whose message names the option, folder or file at fault.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..queue_policy import QueuePolicy
from .errors import ModelConfigError, ModelLoadError
from .runtimes import RUNTIMES

CONFIG_FILE = "config.json"
BUILTINS = {"digits": "zypher_ws.models.digits:DigitsModel", "mock": "zypher_ws.models.mock:from_spec"}
FORMS = "digits, mock, NAME=RUNTIME:PATH, NAME=python:package.module:factory or package.module:factory"

# A model's name appears in URLs: letters, digits, and . _ - after the first.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_VERSION = re.compile(r"[0-9]{1,9}")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One model's settings: the keys of its config.json. None means "use the global setting"."""

    runtime: str | None = None
    """onnx, sklearn or python; None: inferred from the model file's name."""
    factory: str | None = None
    """python runtime: `package.module:factory`."""
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    workers: int | None = None
    executor: str | None = None
    max_queue: int | None = None
    labels: dict[str, str] | None = field(default=None, hash=False)
    """Names of class outputs, keyed by the class as a string (a list in config.json names 0, 1, ...)."""
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    """The runtime's own options (onnx: providers, intra_op_threads, inter_op_threads)."""
    # The queue policy, with Triton's names (queue_policy.py has the rules).
    priority_levels: int = 0
    """0: priorities off; else requests' parameters.priority is 1 (highest) to this."""
    default_priority_level: int | None = None
    """The level of a request that names none; None: the lowest (priority_levels)."""
    default_timeout_us: int = 0
    """How long (µs) a request may wait in the queue before it ends deadline_exceeded; 0: for ever."""
    allow_timeout_override: bool = True
    """Whether a request's parameters.timeout may set a timeout or shorten this one (never lengthen it)."""

    # The keys that override the service's settings of the same name (Settings.max_batch_size, ...).
    SERVING_KEYS: ClassVar[tuple[str, ...]] = (
        "max_batch_size",
        "max_batch_delay_ms",
        "workers",
        "executor",
        "max_queue",
    )

    def __post_init__(self) -> None:
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ModelConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        if self.runtime == "python" and self.factory is None:
            raise ModelConfigError('the python runtime needs "factory": "package.module:factory"')
        if self.factory is not None:
            if self.runtime not in (None, "python"):
                raise ModelConfigError(f"factory is for the python runtime, not {self.runtime}")
            check_factory(self.factory)
        for key in ("max_batch_size", "workers", "max_queue"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise ModelConfigError(f"{key} must be a whole number of at least 1, not {value!r}")
        delay = self.max_batch_delay_ms
        if delay is not None and (not _is_number(delay) or delay < 0):
            raise ModelConfigError(f"max_batch_delay_ms must be a number of at least 0, not {delay!r}")
        if self.executor not in (None, "thread", "process"):
            raise ModelConfigError(f"executor must be thread or process, not {self.executor!r}")
        if self.labels is not None and not (
            isinstance(self.labels, dict) and all(isinstance(v, str) for v in self.labels.values())
        ):
            raise ModelConfigError("labels must be a list of names, or an object of names keyed by class")
        if not isinstance(self.options, dict):
            raise ModelConfigError(f"options must be an object, not {self.options!r}")
        for key in ("priority_levels", "default_timeout_us"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise ModelConfigError(f"{key} must be a whole number of at least 0, not {value!r}")
        level = self.default_priority_level
        if level is not None:
            if not self.priority_levels:
                raise ModelConfigError("default_priority_level needs priority_levels (0: priorities are off)")
            if not _is_int(level) or not 1 <= level <= self.priority_levels:
                raise ModelConfigError(
                    f"default_priority_level must be 1 to priority_levels ({self.priority_levels}), not {level!r}"
                )
        if not isinstance(self.allow_timeout_override, bool):
            raise ModelConfigError(f"allow_timeout_override must be true or false, not {self.allow_timeout_override!r}")

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> ModelConfig:
        """Validate a decoded config.json; `source` (its path) starts every error message."""
        if not isinstance(data, dict):
            raise ModelConfigError(f"{source}: must be a JSON object, not {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ModelConfigError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
        values = dict(data)
        for key in ("runtime", "factory", "executor"):
            if key in values and not isinstance(values[key], str):
                raise ModelConfigError(f"{source}: {key} must be a string, not {values[key]!r}")
        labels = values.get("labels")
        if isinstance(labels, list):
            if not all(isinstance(label, str) for label in labels):
                raise ModelConfigError(f"{source}: labels must be strings")
            values["labels"] = {str(i): label for i, label in enumerate(labels)}
        elif labels is not None and not isinstance(labels, dict):
            raise ModelConfigError(f"{source}: labels must be a list or an object, not {labels!r}")
        try:
            return cls(**values)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{source}: {exc}") from None

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelConfigError(f"{path}: cannot be read: {exc}") from None
        except ValueError as exc:
            raise ModelConfigError(f"{path}: not valid JSON: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def overrides(self) -> dict[str, Any]:
        """The serving settings this model sets, for `dataclasses.replace(settings, **overrides())`."""
        return {key: getattr(self, key) for key in self.SERVING_KEYS if getattr(self, key) is not None}

    def queue_policy(self) -> QueuePolicy:
        return QueuePolicy(
            priority_levels=self.priority_levels,
            default_priority_level=self.default_priority_level or 0,
            default_timeout_us=self.default_timeout_us,
            allow_timeout_override=self.allow_timeout_override,
        )

    def label(self, value: Any) -> Any:
        """A class's name from `labels`, or the class itself."""
        if self.labels is None:
            return value
        return self.labels.get(str(value), value)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One servable model version, as configured; runtimes.build(spec) makes the model (not loaded)."""

    name: str | None
    """None only for a bare `package.module:factory`: the model's own name, known once it is built."""
    version: str | None
    """A repository's version folder ("1", "2"); "1" for a `--model NAME=RUNTIME:PATH` file; None for
    a Python model named on the command line: the model's own version."""
    runtime: str
    path: Path | None = None
    """The model file (onnx, sklearn); a Python model's version folder in a repository; else None."""
    factory: str | None = None
    """python runtime: `package.module:factory`."""
    root: Path | None = None
    """Where the file must lie (the repository, or the file `--model` names): nothing outside it is loaded."""
    config: ModelConfig = field(default_factory=ModelConfig)
    is_default: bool = False
    """The model version a request that names none is given."""
    source: str = ""
    """Where it was declared, for messages: `--model ...` or the version folder."""

    @property
    def options(self) -> dict[str, Any]:
        return self.config.options

    @property
    def display_name(self) -> str:
        name = self.name or self.factory or "model"
        return name if self.version is None else f"{name} version {self.version}"

    def model_file(self) -> Path:
        """The model file, resolved, after checking it lies within `root` and is a file."""
        if self.path is None:
            raise ModelConfigError(f"{self.display_name}: the {self.runtime} runtime needs a model file")
        resolved = self.path.resolve()
        root = (self.root or self.path).resolve()
        if not resolved.is_relative_to(root):
            raise ModelLoadError(f"{self.path}: resolves to {resolved}, outside {root}; not loaded")
        if not resolved.is_file():
            raise ModelLoadError(f"{self.path}: no such file")
        return resolved


def parse_model_option(text: str) -> ModelSpec:
    """One `--model` value: digits, mock, NAME=RUNTIME:PATH, NAME=python:module:factory, module:factory.

    A PATH may name a folder holding the runtime's well-known file (model.onnx, model.joblib, ...).
    """
    text = text.strip()
    source = f"--model {text}"
    if text in BUILTINS:
        return ModelSpec(name=text, version=None, runtime="python", factory=BUILTINS[text], source=source)
    name, equals, rest = text.partition("=")
    if not equals:
        if ":" not in text:
            raise ModelConfigError(f"unknown model {text!r}: use {FORMS}")
        check_factory(text, source)
        return ModelSpec(name=None, version=None, runtime="python", factory=text, source=source)
    check_name(name, source)
    runtime, colon, target = rest.partition(":")
    if runtime not in RUNTIMES:
        raise ModelConfigError(f"{source}: unknown runtime {runtime!r} (runtimes: {', '.join(RUNTIMES)})")
    if not colon or not target:
        raise ModelConfigError(f"{source}: give the {runtime} model as {name}={runtime}:PATH")
    if runtime == "python":
        check_factory(target, source)
        return ModelSpec(
            name=name, version=None, runtime=runtime, factory=target,
            config=ModelConfig(runtime=runtime, factory=target), source=source,
        )  # fmt: skip
    path = _file_for(Path(target), runtime, source).absolute()
    return ModelSpec(
        name=name,
        version="1",
        runtime=runtime,
        path=path,
        root=path,
        config=ModelConfig(runtime=runtime),
        source=source,
    )


def scan_repository(directory: str | Path) -> list[ModelSpec]:
    """Every version of every model in a repository: DIR/NAME/VERSION/model.<ext>, DIR/NAME/config.json.

    A model is a subfolder; its versions are subfolders named by numbers (1, 2, ...). Entries whose
    name starts with `.` or `_` are skipped (hidden folders, __pycache__), and so are plain files
    beside config.json; any other folder whose name is not a number is an error, so a typo (`v2`)
    never hides a version. Versions come in ascending order, per model, models by name.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ModelConfigError(f"--model-repository {root}: no such folder")
    specs = [spec for folder in _entries(root) for spec in _scan_model(root, folder)]
    if not specs:
        raise ModelConfigError(f"--model-repository {root}: no model folders in it")
    return specs


def scan_model(directory: str | Path, name: str) -> list[ModelSpec]:
    """Every version of one model of a repository (its folder read now), as scan_repository reads it."""
    root = Path(directory)
    check_name(name, f"{root}: a model's name")
    folder = root / name
    if not folder.is_dir() or name.startswith((".", "_")):
        raise ModelConfigError(f"--model-repository {root}: no model folder {name}")
    return _scan_model(root, folder)


def _scan_model(root: Path, folder: Path) -> list[ModelSpec]:
    check_name(folder.name, f"{folder}: a model folder's name")
    config_path = folder / CONFIG_FILE
    config = ModelConfig.read(config_path) if config_path.is_file() else ModelConfig()
    versions = [entry for entry in _entries(folder)]
    bad = [v.name for v in versions if not _VERSION.fullmatch(v.name)]
    if bad:
        raise ModelConfigError(f"{folder / bad[0]}: version folders are numbers (1, 2, ...), not {bad[0]!r}")
    if not versions:
        raise ModelConfigError(f"{folder}: no version folder (expected {folder}/1/)")
    by_number: dict[int, Path] = {}
    for version in versions:
        if int(version.name) in by_number:
            raise ModelConfigError(f"{version} and {by_number[int(version.name)]} are the same version")
        by_number[int(version.name)] = version
    specs = []
    for number in sorted(by_number):
        version = by_number[number]
        runtime, path = _find_model(version, config, root)
        specs.append(
            ModelSpec(
                name=folder.name,
                version=version.name,
                runtime=runtime,
                path=path,
                factory=config.factory,
                root=root.resolve(),
                config=config,
                source=str(version),
            )
        )
    return specs


def resolve_default(specs: Sequence[ModelSpec], default_name: str | None = None) -> list[ModelSpec]:
    """The specs with `is_default` set on exactly one: the highest version of `default_name`, or of the
    first model listed when it is None (a repository lists its models by name)."""
    if not specs:
        raise ModelConfigError("no model to serve")
    check_unique(specs)
    if default_name is None:
        chosen = specs[0].name
        if chosen is None:
            return [dataclasses.replace(s, is_default=i == 0) for i, s in enumerate(specs)]
    else:
        chosen = default_name
        names = [s.name for s in specs if s.name is not None]
        if chosen not in names:
            known = ", ".join(dict.fromkeys(names))
            raise ModelConfigError(f"--default-model {chosen}: no such model (models: {known})")
    default = default_version(specs, chosen)
    return [dataclasses.replace(s, is_default=s is default) for s in specs]


def default_version(specs: Iterable[ModelSpec], name: str) -> ModelSpec:
    """The version of `name` served when a request names no version: the highest."""
    versions = versions_of(specs, name)
    if not versions:
        raise ModelConfigError(f"no model {name}")
    return versions[-1]


def versions_of(specs: Iterable[ModelSpec], name: str) -> list[ModelSpec]:
    """The specs of one model, in ascending version order."""
    return sorted((s for s in specs if s.name == name), key=lambda s: _version_number(s.version))


def check_unique(specs: Iterable[ModelSpec]) -> None:
    """No model version is declared twice (a `--model` and a repository folder of the same name, say)."""
    seen: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name is None:
            continue
        earlier = seen.get(spec.name)
        if earlier is not None and (earlier.source.startswith("--model") or spec.source.startswith("--model")):
            raise ModelConfigError(f"model {spec.name} is declared twice: {earlier.source} and {spec.source}")
        seen.setdefault(spec.name, spec)


def check_name(name: str, source: str = "model name") -> None:
    if not _NAME.fullmatch(name):
        raise ModelConfigError(
            f"{source}: {name!r} is not a model name (letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 64)"
        )


def check_factory(factory: str, source: str = "factory") -> None:
    if not _FACTORY.fullmatch(factory):
        raise ModelConfigError(f"{source}: {factory!r} is not package.module:factory")


def _file_for(path: Path, runtime: str, source: str) -> Path:
    if path.is_dir():
        found = [path / name for name in RUNTIMES[runtime].files if (path / name).is_file()]
        if not found:
            raise ModelConfigError(f"{source}: {path} holds no {' or '.join(RUNTIMES[runtime].files)}")
        return found[0]
    if not path.is_file():
        raise ModelConfigError(f"{source}: no such file {path}")
    return path


def _find_model(version: Path, config: ModelConfig, root: Path) -> tuple[str, Path]:
    if config.runtime == "python":
        return "python", version
    candidates = [config.runtime] if config.runtime is not None else list(RUNTIMES)
    found = [(rt, version / name) for rt in candidates for name in RUNTIMES[rt].files if (version / name).is_file()]
    if not found:
        expected = ", ".join(name for rt in candidates for name in RUNTIMES[rt].files)
        hint = "" if config.runtime else f', or a {CONFIG_FILE} with "runtime": "python" and a "factory"'
        raise ModelConfigError(f"{version}: no model file (expected one of {expected}{hint})")
    if len(found) > 1:
        names = ", ".join(path.name for _, path in found)
        raise ModelConfigError(f"{version}: several model files ({names}); keep one, or set runtime in {CONFIG_FILE}")
    runtime, path = found[0]
    if not path.resolve().is_relative_to(root.resolve()):
        raise ModelConfigError(f"{path}: resolves to {path.resolve()}, outside the repository {root}; not loaded")
    return runtime, path.absolute()


def _entries(folder: Path) -> list[Path]:
    return sorted(e for e in folder.iterdir() if e.is_dir() and not e.name.startswith((".", "_")))


def _version_number(version: str | None) -> int:
    return int(version) if version is not None and version.isdigit() else 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
