"""The layering rule: the core (everything outside zypher_ws.http and the client) imports nothing of
aiohttp; the client (zypher_ws.client, over aiohttp) imports nothing of the server but its error table
and its statuses, and none of the heavy libraries the server loads.

Checked in a fresh interpreter where importing aiohttp fails, so a stray import anywhere in the core,
even a transitive one, fails this test. One core module is the exception: the webhook transport is an
HTTP client, aiohttp's, loaded only where webhooks are delivered; it may use aiohttp's client, never its
server.
"""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import zypher_ws

BLOCKER = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "aiohttp" or name.startswith(("aiohttp.", "aiohttp_swagger3")):
            raise ImportError(f"the core imported {name}")
        return None

sys.meta_path.insert(0, Block())
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print("ok", len(sys.argv) - 1)
"""


WEBHOOK_TRANSPORT = "zypher_ws.webhooks.transport"


def core_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(zypher_ws.__path__, "zypher_ws.")]
    # __main__ runs the command line when imported; it only calls cli.main, which is checked.
    outside = ("zypher_ws.http", "zypher_ws.client")
    inside = [n for n in names if n not in outside and not n.startswith(tuple(f"{o}." for o in outside))]
    # The webhook transport is left out: every other module is imported without it.
    return [n for n in inside if not n.endswith("__main__") and n != WEBHOOK_TRANSPORT]


def test_the_core_imports_no_aiohttp() -> None:
    modules = core_modules()
    # The seams and the pieces named by the layout must be among them, so the walk itself is checked.
    for expected in ("zypher_ws.service", "zypher_ws.workers", "zypher_ws.backends.sqlite", "zypher_ws.models"):
        assert expected in modules
    done = subprocess.run([sys.executable, "-c", BLOCKER, *modules], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {len(modules)}"


def test_the_webhook_transport_uses_aiohttps_client_and_nothing_of_its_server() -> None:
    assert WEBHOOK_TRANSPORT in [m.name for m in pkgutil.walk_packages(zypher_ws.__path__, "zypher_ws.")]
    server = "print(sorted(m for m in sys.modules if m.startswith(('aiohttp.web', 'aiohttp_swagger3'))))"
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, {WEBHOOK_TRANSPORT}; {server}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_blocker_catches_the_http_layer() -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER, "zypher_ws.http.app"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "imported aiohttp" in done.stderr


# What importing the client may load of ours: its own modules, the error table and the statuses.
# zypher_ws.progress: the package exports Progress (a dataclass, for streaming models), so importing any
# part of it loads that small module.
CLIENT_MAY_LOAD = {"zypher_ws", "zypher_ws.errors", "zypher_ws.progress", "zypher_ws.records"}
HEAVY = ("numpy", "orjson", "onnxruntime", "onnx", "sklearn", "joblib", "pandas", "redis", "jsonschema",
         "fastjsonschema", "prometheus_client", "aiohttp_swagger3")  # fmt: skip

LOADED_BY_CLIENT = """
import sys
before = set(sys.modules)
import zypher_ws.client, zypher_ws.client.cli
print("\\n".join(sorted(set(sys.modules) - before)))
"""


def test_the_client_loads_no_numpy_no_model_runtime_and_no_server_module() -> None:
    done = subprocess.run([sys.executable, "-c", LOADED_BY_CLIENT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert {"zypher_ws.client", "zypher_ws.client.cli", "aiohttp"} <= loaded  # the listing itself works
    ours = {m for m in loaded if m.split(".")[0] == "zypher_ws" and not m.startswith("zypher_ws.client")}
    assert ours <= CLIENT_MAY_LOAD, ours - CLIENT_MAY_LOAD
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, heavy


LOADED_BY_PREDICT = """
import contextlib, io, sys
before = set(sys.modules)
from zypher_ws.cli import main  # the `zypher-ws` entry point
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["predict", "--help"])
print("\\n".join(sorted(set(sys.modules) - before)))
"""


def test_zypher_ws_predict_starts_without_numpy_or_the_models() -> None:
    done = subprocess.run([sys.executable, "-c", LOADED_BY_PREDICT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert {"zypher_ws.cli", "zypher_ws.client.cli"} <= loaded  # the listing itself works
    server = ("zypher_ws.models", "zypher_ws.http", "zypher_ws.json_codec")
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY or m.startswith(server))
    assert not heavy, heavy


def test_test_modules_import_helpers_not_each_other() -> None:
    """Fakes live in fakes.py and helpers in helper modules: no test imports conftest or another test module."""
    tests = Path(__file__).parent
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top != "conftest" and not top.startswith("test_"), f"{path.name} imports {name}"


def test_every_package_ships_in_the_wheel() -> None:
    """setup.cfg names its packages one by one: a new one left out installs from a clone and not from a wheel."""
    import configparser

    config = configparser.ConfigParser()
    config.read(Path(zypher_ws.__file__).parent.parent / "setup.cfg")
    listed = {name.strip() for name in config["options"]["packages"].split(",")}
    packages = {"zypher_ws", *(m.name for m in pkgutil.walk_packages(zypher_ws.__path__, "zypher_ws.") if m.ispkg)}
    assert packages - {"zypher_ws.static"} <= listed, sorted(packages - listed)
