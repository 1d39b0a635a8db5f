"""The README and the docs pages stay true: their links, tables, commands and examples."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from imagegen.settings import Settings
from tests.conftest import ROOT
from tests.functions.servers import free_port

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _page(name: str) -> str:
    return (DOCS / name).read_text()


def _section(text: str, title: str) -> str:
    start = text.index(title)
    level = title.split(" ", 1)[0]
    end = text.find(f"\n{level} ", start + len(title))
    return text[start : end if end != -1 else None]


def _blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_is_short_and_links_every_page() -> None:
    text = README.read_text()
    assert len(text.encode()) < 8 * 1024, "README.md over 8 KB: move the detail into docs/"
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", text))
    assert linked == {p.name for p in PAGES}, "every docs page is linked from the README, once"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_local_link_resolves(page: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not fetched offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), flags=re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no #{anchor}"


def test_every_setting_is_in_the_configuration_table() -> None:
    table = _page("configuration.md")
    for name in Settings.model_fields:
        assert f"`IMAGEGEN_{name.upper()}`" in table, f"IMAGEGEN_{name.upper()} is not documented"
    documented = set(re.findall(r"^\| `IMAGEGEN_([A-Z0-9_]+)`", table, flags=re.M))
    assert documented == {n.upper() for n in Settings.model_fields}, (
        "the table names unknown settings"
    )


def _cli_lines() -> list[tuple[str, str]]:
    lines = []
    for page in [README, DOCS / "cli.md"]:
        for block in _blocks(page.read_text()):
            for line in block.splitlines():
                if line.startswith("imagegen "):
                    command = line.split("  #", 1)[0].strip()
                    lines.append((page.name, command))
    return lines


@pytest.mark.parametrize(("page", "command"), _cli_lines())
def test_every_documented_command_line_parses(page: str, command: str) -> None:
    """Each ``imagegen ...`` line names a real command with real options and valid values."""
    from typer.main import get_command

    from imagegen.cli import app

    args = shlex.split(command)[1:]
    group = get_command(app)
    if args == ["--help"]:
        return
    ctx = group.make_context("imagegen", [], resilient_parsing=True)
    sub = group.get_command(ctx, args[0])
    assert sub is not None, f"{page}: no command {args[0]!r}"
    sub.make_context(args[0], args[1:], parent=ctx)  # raises on unknown options or bad values


def test_the_documented_error_example_is_what_the_cli_prints(tmp_path: Path) -> None:
    example = re.search(r"\$ (imagegen .+)\n(imagegen: error: .+)\n", _page("cli.md"))
    assert example, "docs/cli.md shows a failing command and its one-line error"
    result = subprocess.run(
        [sys.executable, "-m", "imagegen.cli", *shlex.split(example[1])[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == example[2]


def test_the_kustomize_directories_named_in_the_docs_exist() -> None:
    named = set()
    for page in [README, *PAGES]:
        for block in _blocks(page.read_text()):
            named |= set(re.findall(r"kubectl apply .*?-k (\S+)", block))
    assert {"knative/cluster", "knative/overlays/dev", "knative/overlays/prod"} <= named
    for directory in named:
        assert (ROOT / directory / "kustomization.yaml").is_file(), directory


@pytest.mark.slow
def test_the_local_invoke_commands_work(tmp_path: Path) -> None:
    blocks = _blocks(_section(_page("functions.md"), "## Invoke a function locally"))
    documented = sorted(set(re.findall(r"--port (\d+)", blocks[0])))
    assert len(documented) == 4, blocks[0]
    # `imagegen` and `curl` as a user has them: the project's environment first on PATH.
    env = {
        **os.environ,
        "THREADS": "4",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    servers: list[subprocess.Popen[bytes]] = []
    try:
        # The documented ports, moved to free ones: a port taken on this machine must not fail
        # it. Should one be taken before its server binds it all the same, that server exits
        # and the four start again on other ports.
        for _ in range(3):
            moved = {port: str(free_port()) for port in documented}
            serve, event, plain, direct = (
                re.sub(r"\b(808\d)\b", lambda m: moved.get(m[1], m[1]), block) for block in blocks
            )
            servers = _serve(_serving(serve), tmp_path, env)
            if _all_ready(_serving(serve), servers, tmp_path):
                break
            _stop(servers)
        else:
            raise AssertionError("the servers' ports were taken three times over")

        run = {"cwd": tmp_path, "env": env, "capture_output": True, "text": True, "check": True}
        # The block's wait for readiness, as a user runs it before the requests.
        waits = "\n".join(line for line in serve.splitlines() if "imagegen serve" not in line)
        assert "readyz" in waits, serve
        subprocess.run(["bash", "-c", waits], timeout=60, **run)
        reply = subprocess.run(["bash", "-c", event], **run)
        assert reply.stdout.startswith("HTTP/1.1 200"), reply.stdout
        assert "ce-type: dev.orchestr8.imagegen.prompt.enhanced" in reply.stdout.lower()
        assert "ce-subject: my-first-image" in reply.stdout.lower()

        derived = subprocess.run(["bash", "-c", plain], **run)
        body = json.loads(derived.stdout)
        # Each stage's answer and log, when one of them was an error rather than the next input.
        replies = ("enhanced.json", "rendered.json", "persisted.json")
        logs = sorted(log.name for log in tmp_path.glob("*.log"))
        answers = {f: (tmp_path / f).read_text()[-2000:] for f in (*replies, *logs)}
        assert "key" in body, (body, answers)
        assert (tmp_path / "output" / body["key"]).is_file()
        assert (tmp_path / "output" / body["keys"]["avif:256"]).is_file()
        persisted = json.loads((tmp_path / "persisted.json").read_text())
        assert persisted["sha256"] == body["sha256"]
        assert (tmp_path / "lighthouse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((tmp_path / "enhanced.json").read_text())["seed"] == 7

        subprocess.run(["bash", "-c", direct], **run)  # render from a prompt alone
        assert (tmp_path / "door.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        _stop(servers)


def _serving(block: str) -> str:
    """The lines of ``block`` that start a function (``imagegen serve STAGE ... &``)."""
    return "\n".join(line for line in block.splitlines() if "imagegen serve" in line)


def _serve(block: str, cwd: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """Run each line of ``block`` (``imagegen serve STAGE ... &``), its output in STAGE.log."""
    servers = []
    for line in block.strip().splitlines():
        stage = re.search(r"serve (\w+)", line)
        assert stage, line
        with (cwd / f"{stage[1]}.log").open("wb") as log:
            servers.append(
                subprocess.Popen(
                    ["bash", "-c", line.rstrip("& ").strip()],
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return servers


def _all_ready(block: str, servers: list[subprocess.Popen[bytes]], cwd: Path) -> bool:
    """Whether every server of ``block`` answers ``/readyz`` as its own stage; False when one
    exited because its port was taken meanwhile. Any other exit fails the test."""
    lines = block.strip().splitlines()
    for line, server in zip(lines, servers, strict=True):
        found = re.search(r"serve (\w+) --port (\d+)", line)
        assert found, line
        stage, port = found.groups()
        if not _wait(f"http://localhost:{port}/readyz", stage, server):
            log = (cwd / f"{stage}.log").read_text(errors="replace")
            assert "Address already in use" in log, f"{stage} exited:\n{log[-3000:]}"
            return False
    return True


def _stop(servers: list[subprocess.Popen[bytes]]) -> None:
    for server in servers:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
    for server in servers:
        try:  # gunicorn's graceful stop; a loaded machine may need longer
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)


def _wait(url: str, stage: str, server: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    """Wait until ``url`` answers 200 from ``stage``: True; False if ``server`` exits first.

    Another test's function could answer on the port if this one never bound it."""
    deadline = time.monotonic() + timeout
    # One client for the polls: ``httpx.get`` builds a TLS context each call (~50 ms CPU).
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return False
            try:
                reply = client.get(url)
                if reply.status_code == 200 and reply.json()["stage"] == stage:
                    return True
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.1)
    raise TimeoutError(url)


def test_the_quick_start_commands_exist() -> None:
    quick = _blocks(_section(README.read_text(), "## Quick start"))[0]
    targets = re.findall(r"^make (\w+)", quick, flags=re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert targets == ["demo", "test"]
    for target in targets:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the README's test command
    for target in re.findall(r"^make (\w+)", "\n".join(_blocks(_page("development.md"))), re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_the_quick_start_names_what_the_tests_need() -> None:
    """A fresh machine's `make test` needs what CI installs (.ci/run's Debian packages) and
    what CI only checks for: the README's Quick start names each."""
    quick = " ".join(_section(README.read_text(), "## Quick start").split()).lower()
    run = (ROOT / ".ci" / "run").read_text()
    installed = re.findall(r"apt-get install -y -qq ([\w.-]+)", run)
    required = re.findall(r"ci: (.+?) is required", run)
    assert installed and required, "the packages and commands .ci/run installs and checks"
    for package in installed:  # postgresql-15
        assert package.replace("-", " ") in quick, package
    unpacked = re.findall(r"^\s*export ([A-Z]+)$", run, flags=re.M)  # PROMTOOL
    assert unpacked, "the tools .ci/run unpacks and exports"
    for tool in unpacked:
        assert tool.lower() in quick, tool
    for what in required:  # kubectl (with kustomize v5), Node.js 20 or newer
        assert what.split()[0].lower() in quick, what
        for detail in re.findall(r"\(with ([^)]+)\)", what):
            assert detail.lower() in quick, what


def test_the_events_table_is_the_stage_registrys() -> None:
    """docs/events.md says its table is the registry's: every stage has its row, naming each
    type it consumes and the one it replies with; no row names a stage there is not."""
    from imagegen.stages import all_stages

    text = _page("events.md")
    table = text[text.index("| stage |") :].split("\n\n", 1)[0].splitlines()[2:]
    rows = {
        cells[0]: cells[1:]
        for line in table
        for cells in [[c.strip() for c in line.strip().strip("|").split(" | ")]]
    }
    stages = {stage.name: stage for stage in all_stages()}
    assert set(stages) <= set(rows), f"stages without a row: {set(stages) - set(rows)}"
    for name, (consumes, replies, source) in rows.items():
        stage = stages.get(name)
        if stage is None:
            assert name.startswith("any,"), f"a row for {name!r}, which is no stage"
            continue
        for kind in stage.consumes if stage.emits is not None else ():
            assert f"`{kind}`" in consumes, f"{name}: {kind} is not in its row"
        if stage.emits is None:
            assert replies.startswith("nothing"), f"{name} replies nothing, its row says {replies}"
        else:
            assert replies == f"`{stage.emits}`", name
            assert source == f"`/imagegen/{name}`", name
