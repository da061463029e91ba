"""Load clients written in C (bench/*.c): compiled with gcc on first use into ~/.cache/zypher-bench/
(ZYPHER_BENCH_CACHE moves it), and again whenever the source or the flags change (the binary's name
carries their digest). Plain C and libc: gcc is all they need."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCES = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("ZYPHER_BENCH_CACHE", Path.home() / ".cache" / "zypher-bench"))
FLAGS = ("-O2", "-std=c11", "-Wall", "-Wextra", "-Werror")


class NoCompiler(RuntimeError):
    """gcc is not installed, so the C clients cannot be built."""


def binary(name: str) -> Path:
    """The executable of bench/`name`.c, built if this source has not been built yet.

    Raises NoCompiler without gcc, RuntimeError (with gcc's message) when it does not compile."""
    source = SOURCES / f"{name}.c"
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join(FLAGS).encode()).hexdigest()[:16]
    built = CACHE / f"{name}-{digest}"
    if built.is_file():
        return built
    gcc = shutil.which("gcc")
    if gcc is None:
        raise NoCompiler(f"gcc is not installed: the C load client ({source.name}) cannot be built")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = built.with_name(f"{built.name}.{os.getpid()}.partial")  # two runs building at once do not clash
    done = subprocess.run([gcc, *FLAGS, "-o", str(partial), str(source)], capture_output=True, text=True)
    if done.returncode:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"gcc could not build {source.name}:\n{done.stderr[-3000:]}")
    os.replace(partial, built)
    for stale in CACHE.glob(f"{name}-*"):  # builds of older sources
        if stale != built and not stale.name.endswith(".partial"):
            stale.unlink(missing_ok=True)
    return built
