"""Schemathesis against the live OpenAPI document of a real server: no 5xx, and every response matches
what the document says (status codes, headers, bodies)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from helpers import run_server

pytestmark = pytest.mark.slow  # a real server process, and schemathesis as another
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"


async def test_schemathesis_finds_no_server_error_and_no_undocumented_response(tmp_path: Path) -> None:
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    async with run_server("--store", "memory://") as server:
        proc = await asyncio.create_subprocess_exec(
            binary, "run", f"{server.url}/swagger/swagger.json", "--checks", CHECKS,
            "--max-examples", "25", "--generation-deterministic", "--no-color",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, output.decode()[-6000:]
