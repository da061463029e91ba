"""The documentation is checked like code: README.md and docs/*.md.

- Every relative link points at a file that exists, and every #anchor at a heading of that file (GitHub's slugs).
- Every fenced code block names its language. A shell block is either marked as an example (a second word
  in its info string: "bash example") or listed in COVERED with the place that really runs each of its
  commands, and that place is read to check it does. Python blocks parse and JSON blocks load, unless marked.
- No development history in the pages. The conventions are written down in docs/README.md.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CI_RUN = ROOT / ".ci" / "run"

CONCEPT_PAGES = (
    "api.md",
    "live.md",
    "webhooks.md",
    "client.md",
    "models.md",
    "oip.md",
    "durability.md",
    "scaling.md",
    "operating.md",
    "configuration.md",
    "architecture.md",
    "benchmarks.md",
)
README_MAX_BYTES = 12 * 1024
SHELL = frozenset({"bash", "sh", "shell", "console", "zsh"})
EXAMPLE = "example"  # the marker: the second word of a fence's info string


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- parsing just enough Markdown ------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    language: str
    flags: tuple[str, ...]
    text: str

    @property
    def example(self) -> bool:
        """Shown, not run; or run by test_the_model_file_tutorial_runs_as_written (a `tutorial` block)."""
        return EXAMPLE in self.flags or "tutorial" in self.flags

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.language or 'no language'})"


def split(path: Path) -> tuple[list[tuple[int, str]], list[Block]]:
    """The page's lines outside code fences (numbered), and its fenced blocks (CommonMark's fence rules)."""
    prose: list[tuple[int, str]] = []
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}} *$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        assert j < len(lines), f"{page_id(path)}:{i + 1}: a code fence is never closed"
        words = opening["info"].split()
        language = words[0].lower() if words else ""
        blocks.append(Block(page_id(path), i + 1, language, tuple(words[1:]), "\n".join(body)))
        i = j + 1
    return prose, blocks


def all_blocks() -> list[Block]:
    return [block for path in pages() for block in split(path)[1]]


CODE_SPAN = re.compile(r"(`+).+?\1")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_LINK = re.compile(r"""(?:href|src)=["']([^"']+)["']""")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in split(path)[0]:
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in split(path)[0]:
        bare = CODE_SPAN.sub("", line)
        for pattern in (INLINE_LINK, REFERENCE, HTML_LINK):
            found += [(number, match[1]) for match in pattern.finditer(bare)]
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)) or target.startswith("//")


# -- the pages --------------------------------------------------------------------------------------------


def test_every_concept_has_its_page() -> None:
    missing = [name for name in ("README.md", *CONCEPT_PAGES) if not (DOCS / name).is_file()]
    assert not missing, f"docs/ lacks {missing}"


def test_readme_is_a_short_front_page_linking_every_page() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (at most {README_MAX_BYTES})"
    linked = {(README.parent / unquote(target.split("#")[0])).resolve() for _, target in links(README)}
    unlinked = [name for name in CONCEPT_PAGES if (DOCS / name).resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for number, target in links(path):
        if is_external(target):
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        where = f"{page_id(path)}:{number}: {target}"
        if not destination.is_relative_to(ROOT):
            broken.append(f"{where} leaves the repository")
        elif not destination.exists():
            broken.append(f"{where}: no such file")
        elif anchor and destination.suffix == ".md" and unquote(anchor).lower() not in anchors(destination):
            broken.append(f"{where}: no heading with that anchor in {page_id(destination)}")
        elif anchor and destination.suffix != ".md":
            broken.append(f"{where}: an anchor into a file that is not Markdown cannot be checked")
    assert not broken, "\n".join(broken)


def test_slugs_follow_github() -> None:
    assert slug("Headline: the defaults") == "headline-the-defaults"
    assert slug("WebSocket `GET /ws`") == "websocket-get-ws"
    assert slug("Batching and the executor") == "batching-and-the-executor"
    assert slug("Scale-out on [Redis](https://redis.io)") == "scale-out-on-redis"


HISTORY = re.compile(
    r"\bsession \d|\b(this|last|previous|earlier) session\b|\b(an? )?(earlier|previous|older) runs?\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_no_development_history(path: Path) -> None:
    found = [f"{page_id(path)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)]
    found = [line for line in found if HISTORY.search(line.split(": ", 1)[1])]
    assert not found, "pages describe what is true now; development history belongs in git:\n" + "\n".join(found)


# -- code blocks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Covered:
    """A command block that is no example: where it is, and for each of its commands the text of
    .ci/run that runs it."""

    page: str
    runs: dict[str, str]
    why: str


# What .ci/run lints; `ruff check .` in the README checks the same files (see the test below).
LINTED = ("zypher_ws", "tests", "scripts", "bench")

COVERED = (
    Covered(
        "README.md",
        {
            "python3 -m venv .venv": 'python3 -m venv "$smoke/venv"',
            ". .venv/bin/activate": '"$smoke/venv/bin/pip"',
            "pip install .": '"$smoke/venv/bin/pip" install -q .',
            "zypher-ws serve": '"$smoke/venv/bin/zypher-ws" serve',
        },
        "Quick start, serve: .ci/run's smoke test does this in a fresh venv (calling its pip and zypher-ws "
        "by path instead of activating it), from another directory, then loads the page and predicts",
    ),
    Covered(
        "README.md",
        {
            "python3 -m venv .venv": "python3 -m venv .venv\n",
            ". .venv/bin/activate": ". .venv/bin/activate\n",
            'pip install -e ".[test]"': 'pip install -q -e ".[test,dev]"\n',
            "pytest": "\npytest\n",
        },
        "Quick start, tests: .ci/run creates .venv, installs the project with its test extra (and dev, "
        "for the linters) and runs pytest",
    ),
    Covered(
        "README.md",
        {
            'pip install -e ".[test,dev]"': 'pip install -q -e ".[test,dev]"\n',
            "ruff check .": f"ruff check {' '.join(LINTED)}\n",
            "ruff format --check .": f"ruff format --check {' '.join(LINTED)}\n",
            "mypy zypher_ws": "mypy zypher_ws\n",
            "pytest": "\npytest\n",
        },
        "Development: .ci/run installs, lints, type-checks and tests with these commands",
    ),
)


def commands(block: Block) -> list[str]:
    return [step.strip() for line in block.text.splitlines() for step in line.split("&&") if step.strip()]


def coverage(block: Block) -> Covered | None:
    steps = commands(block)
    return next((c for c in COVERED if c.page == block.page and list(c.runs) == steps), None)


def test_every_block_names_its_language() -> None:
    unnamed = [str(b) for b in all_blocks() if not b.language]
    assert not unnamed, f"name the language of each code block (`text` for diagrams and output): {unnamed}"


def test_command_blocks_are_examples_or_run_by_ci() -> None:
    uncovered = [
        f"{b}:\n{b.text}" for b in all_blocks() if b.language in SHELL and not b.example and coverage(b) is None
    ]
    assert not uncovered, (
        "a command block must be run somewhere (add it to COVERED in tests/test_docs.py with the place "
        "that runs it) or be marked as an example (```bash example):\n" + "\n\n".join(uncovered)
    )


@pytest.mark.parametrize("covered", COVERED, ids=lambda c: c.why.split(":")[0])
def test_covered_commands_really_run_in_ci(covered: Covered) -> None:
    ci = CI_RUN.read_text()
    missing = [f"{command!r}: .ci/run lacks {text!r}" for command, text in covered.runs.items() if text not in ci]
    assert not missing, "\n".join(missing)
    matched = [b for b in all_blocks() if b.language in SHELL and not b.example and coverage(b) is covered]
    assert matched, f"no block in {covered.page} is {list(covered.runs)} any more: update COVERED"


def test_ci_lints_every_file_ruff_check_dot_would() -> None:
    skipped = {"build", "dist", "_build", "buck-out", "node_modules", "site-packages", "venv", "__pypackages__"}
    python: list[Path] = []
    for folder, subfolders, files in os.walk(ROOT):  # ruff's default excludes, pruned (not walked)
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in skipped]
        python += [(Path(folder) / f).relative_to(ROOT) for f in files if f.endswith(".py")]
    outside = [str(p) for p in python if p.parts[0] not in LINTED]
    assert python and not outside, f".ci/run lints only {LINTED}; `ruff check .` would also check {outside}"


def test_python_blocks_parse() -> None:
    for block in all_blocks():
        if block.language in ("python", "py") and not block.example:
            try:
                ast.parse(block.text)
            except SyntaxError as exc:
                pytest.fail(f"{block}: {exc}")


def test_json_blocks_load() -> None:
    for block in all_blocks():
        if block.language == "json" and not block.example:
            try:
                json.loads(block.text)
            except ValueError as exc:
                pytest.fail(f"{block}: {exc}")


def test_the_model_example_is_a_model() -> None:
    from zypher_ws.models.base import Model

    (block,) = [b for b in all_blocks() if b.language == "python" and "class Doubler" in b.text]
    namespace: dict[str, object] = {}
    exec(compile(block.text, str(block), "exec"), namespace)
    model = namespace["Doubler"]()  # type: ignore[operator]
    assert isinstance(model, Model)
    model.load()
    assert model.predict_batch([1, 2.5]) == [{"doubled": 2}, {"doubled": 5.0}]


def test_the_example_digit_is_the_one_ci_sees_classified_as_zero() -> None:
    ci = CI_RUN.read_text()
    posted = re.search(r"-d '(\{\"input\": \[[^']*\})'", ci)
    assert posted is not None and "grep -Eq '\"label\": ?0'" in ci, ".ci/run no longer checks the digit's label"
    expected = json.loads(posted[1])
    examples = [b for b in all_blocks() if "ZERO='" in b.text]
    assert examples
    for block in examples:
        zero = re.search(r"ZERO='([^']*)'", block.text)
        assert zero is not None and json.loads(zero[1]) == expected, f"{block}: not the digit .ci/run predicts"


# -- the model-file tutorial, run as written ---------------------------------------------------------------

TUTORIAL = "tutorial"  # the marker of blocks this test runs: a python script, then shell commands


@pytest.mark.slow  # trains two models and starts the server once per page
@pytest.mark.parametrize("path", [README, DOCS / "models.md"], ids=page_id)
async def test_the_model_file_tutorial_runs_as_written(path: Path, tmp_path: Path) -> None:
    import asyncio
    import shlex
    import subprocess
    import sys

    import aiohttp

    from helpers import free_port, run_server

    blocks = [b for b in split(path)[1] if TUTORIAL in b.flags]
    scripts = [b for b in split(DOCS / "models.md")[1] if TUTORIAL in b.flags and b.language == "python"]
    assert scripts and blocks, f"{page_id(path)}: no tutorial blocks"
    for script in scripts:  # the README's block serves the folder the models page's script fills
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script.text], cwd=tmp_path, capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr.decode()
    steps = [shlex.split(step) for b in blocks if b.language in SHELL for step in commands(b)]
    extras = re.search(r"\[options\.extras_require\](.*?)\n\[", (ROOT / "setup.cfg").read_text(), re.S)
    assert extras is not None
    for step in [s for s in steps if s[0] == "pip"]:  # installed here by the test extra; the extras exist
        named = re.fullmatch(r"\.\[(.*)\]", step[2])
        assert step[1] == "install" and named is not None, step
        assert all(re.search(rf"^{extra} =", extras[1], re.M) for extra in named[1].split(",")), step
    (serve,) = [s for s in steps if s[0] == "zypher-ws"]
    assert serve[1] == "serve"
    port = free_port()
    curls = [s for s in steps if s[0] == "curl"]
    assert curls
    loaded = tuple(f"model {m.name} version 1 loaded and ready" for m in (tmp_path / "models").iterdir())
    async with run_server(*serve[2:], "--store", "memory://", cwd=str(tmp_path), port=port, also=loaded):
        async with aiohttp.ClientSession() as http:
            for curl in curls:
                url = curl[curl.index("-X") + 2].replace("localhost:8080", f"127.0.0.1:{port}")
                headers = dict(h.split(": ", 1) for h in (curl[i + 1] for i, a in enumerate(curl) if a == "-H"))
                body = curl[curl.index("-d") + 1]
                async with http.post("http://" + url, data=body, headers=headers) as resp:
                    record = await resp.json()
                assert resp.status == 200 and record["status"] == "succeeded", record
                assert record["result"]["label"] == 0 and record["result"]["probabilities"]["0"] > 0.9


async def test_the_streaming_example_streams_as_shown(aiohttp_client: Any) -> None:
    """docs/live.md's token model, served, answers a sync request asking for text/event-stream with its
    words as `output` events, their progress, and the record."""
    from fakes import make_settings
    from zypher_ws.http.app import create_app
    from zypher_ws.http.keys import SERVICE

    (block,) = [b for b in all_blocks() if b.language == "python" and "class Tokens" in b.text]
    namespace: dict[str, Any] = {}
    exec(compile(block.text, str(block), "exec"), namespace)
    client = await aiohttp_client(create_app(make_settings(), model=namespace["Tokens"]()))
    await client.app[SERVICE].models.default.loaded.wait()
    sentence = "streams are resumable and durable"
    resp = await client.post("/predict", json={"input": sentence}, headers={"Accept": "text/event-stream"})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    events = []
    for chunk in (await resp.text()).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "data" in fields:
            events.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
    words = [data["chunk"] for kind, _, data in events if kind == "output"]
    assert words == [w + " " for w in sentence.split()]
    assert [i for kind, i, _ in events if kind == "output"] == [str(n) for n in range(5)]
    assert [d["message"] for k, _, d in events if k == "progress"] == [f"{n} of 5 words" for n in range(1, 6)]
    assert events[0][0] == "subscribed" and events[-1][0] == "update"
    assert events[-1][2]["prediction"]["result"] == words
    resp = await client.post("/predict", json={"input": sentence})
    assert (await resp.json())["result"] == sentence
