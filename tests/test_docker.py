"""The Dockerfile builds and the image serves: built with buildah from a local Debian base (no Docker
engine or registry here), then run, and asked for /healthz and a prediction."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/zypher-test-base:bookworm"
IMAGE = "localhost/zypher-ws:test"
MIRROR = "http://deb.debian.org/debian"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
# Builds and runs the image; on a new machine it first bootstraps the Debian base (minutes, not seconds).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _buildah(*args: str, timeout: float = 900) -> str:
    return subprocess.run([*BUILDAH, *args], check=True, capture_output=True, text=True, timeout=timeout).stdout


def _base_image(workdir: Path) -> None:
    """A Debian bookworm root file system with python3 and venv, as the local BASE_IMAGE (cached)."""
    if _buildah("images", "--quiet", "--filter", f"reference={BASE}").strip():
        return
    rootfs = workdir / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
         "bookworm", str(rootfs), MIRROR],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    # This machine reaches PyPI through a TLS-inspecting proxy: give the base image the host's CA bundle
    # (an official python image in the open needs nothing of the sort).
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    tarball = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, timeout=300)
    container = _buildah("from", "scratch").strip()
    _buildah("add", container, str(tarball), "/")
    _buildah("commit", "--rm", container, BASE)


def test_image_builds_and_answers_healthz(tmp_path: Path) -> None:
    if not (shutil.which("buildah") and shutil.which("debootstrap")):
        pytest.skip("buildah and debootstrap are not installed (apt-get install buildah debootstrap)")
    _base_image(tmp_path)
    _buildah("bud", "--isolation", "chroot", "--build-arg", f"BASE_IMAGE={BASE}", "-t", IMAGE, str(ROOT))
    config = json.loads(_buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]
    assert config["User"] == "10001:10001" and "8080/tcp" in config["ExposedPorts"]
    assert "/data" in config["Volumes"] and config["Cmd"] == ["zypher-ws", "serve"]
    container = _buildah("from", IMAGE).strip()
    port = free_port()
    # The image's own CMD, on another port (the host's network is shared here).
    server = subprocess.Popen(
        [*BUILDAH, "run", "--isolation", "chroot", "--network", "host", "--env", f"ZYPHER_PORT={port}",
         container, "--", "zypher-ws", "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.monotonic() < deadline, "the container did not answer /healthz in 60 s"
                time.sleep(0.2)  # polling a process in a container until it listens
        body = json.dumps({"input": [0] * 64}).encode()
        request = urllib.request.Request(url + "/predict", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert json.loads(resp.read())["status"] == "succeeded"
    finally:
        server.terminate()
        server.wait(30)
        if server.stderr is not None:
            server.stderr.close()
        _buildah("rm", container)
        _buildah("rmi", IMAGE)  # the base stays cached; the image under test would pile up (vfs copies)
