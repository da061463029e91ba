"""Why a model cannot be set up. Startup errors, not request errors: each message is meant for the
operator and reads well without a traceback (`zypher-ws: <message>`)."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


class ModelSetupError(Exception):
    """A model cannot be set up: a bad option or repository, an unreadable file, a missing extra."""


class ModelConfigError(ModelSetupError, ValueError):
    """A `--model` option, a repository folder or a config.json that is not valid."""


class NotAModel(ModelConfigError, TypeError):
    """A factory that returned something without the model contract."""


class ModelLoadError(ModelSetupError, RuntimeError):
    """A model file that cannot be read (missing, corrupt, of the wrong kind, or outside its folder)."""


class MissingExtra(ModelSetupError, ImportError):
    """A runtime whose package is not installed; the message carries the pip line that installs it."""

    def __init__(self, runtime: str, package: str, extra: str) -> None:
        self.runtime = runtime
        self.package = package
        self.extra = extra
        self.pip_line = f'pip install "zypher-ws[{extra}]"'
        super().__init__(f"the {runtime} runtime needs {package}, which is not installed: {self.pip_line}")


def check_installed(runtime: str, extra: str, *modules: str) -> None:
    """Raise MissingExtra unless every module can be found; imports nothing (a cheap startup check)."""
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a finder that refuses it, or a parent package that is absent
            found = False
        if not found:
            raise MissingExtra(runtime, name, extra)


def import_extra(runtime: str, extra: str, name: str) -> ModuleType:
    """Import one module of an extra, or raise MissingExtra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingExtra(runtime, exc.name or name, extra) from exc
