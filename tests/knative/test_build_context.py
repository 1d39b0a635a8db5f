""".dockerignore sends the images' builds what they are built from, and nothing else.

The patterns are read and matched as Docker and BuildKit do, through moby/patternmatcher
(``ignorefile/ignorefile.go`` ``ReadAll``; ``patternmatcher.go`` ``New``, ``compile``,
``match`` and ``MatchesOrParentMatches``, the check fsutil runs on every path of the context):
a path is left out when the last pattern that matches it, or one of its parent directories,
is not a ``!`` exception.
"""

from __future__ import annotations

import http.server
import os
import posixpath
import re
import shutil
import socketserver
import subprocess
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO

# What the images need from the build context: each is let in, and nothing else is.
CONTEXT_PATHS = ("pyproject.toml", "README.md", "LICENSE", "imagegen", "plugins", "functions")
# Made by local runs beside what is let in: never sent.
LOCAL_ARTEFACTS = ("__pycache__", ".pyc", ".egg-info")


@dataclass(frozen=True)
class Pattern:
    """One compiled pattern of moby/patternmatcher (``Pattern``)."""

    text: str
    exclusion: bool
    kind: str  # exact, prefix, suffix or regexp, as compile() decides
    regexp: re.Pattern[str] | None

    @classmethod
    def compile(cls, line: str) -> Pattern:
        exclusion = line.startswith("!")
        text = posixpath.normpath(line[1:] if exclusion else line)
        regex, kind, i = "^", "exact", 0
        while i < len(text):
            char = text[i]
            if text.startswith("**", i):
                first = i == 0  # the first token: a suffix match, whatever follows
                i += 2
                if text.startswith("/", i):
                    i += 1
                if i == len(text):
                    if kind == "exact":
                        kind = "prefix"
                    else:
                        regex, kind = regex + ".*", "regexp"
                else:
                    regex, kind = regex + "(.*/)?", "regexp"
                if first:
                    kind = "suffix"
                continue
            if char == "*":
                regex, kind = regex + "[^/]*", "regexp"
            elif char == "?":
                regex, kind = regex + "[^/]", "regexp"
            elif char in ".+()|{}$":
                regex += "\\" + char
            elif char == "\\" and i + 1 < len(text):
                i += 1
                regex, kind = regex + "\\" + text[i], "regexp"
            elif char in "[]":
                regex, kind = regex + char, "regexp"
            else:
                regex += char
            i += 1
        compiled = re.compile(regex + "$") if kind == "regexp" else None
        return cls(text, exclusion, kind, compiled)

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regexp is not None
        return self.regexp.match(path) is not None


def read_patterns(text: str) -> list[Pattern]:
    """ignorefile.ReadAll: comments and blank lines dropped, each line cleaned."""
    lines = (line.strip() for line in text.splitlines() if not line.startswith("#"))
    patterns = []
    for line in lines:
        if not line:
            continue
        exclusion = line.startswith("!")
        pattern = line[1:].strip() if exclusion else line
        pattern = posixpath.normpath(pattern).removeprefix("/") or "/"
        patterns.append(Pattern.compile(("!" if exclusion else "") + pattern))
    return patterns


def ignored(path: str, patterns: list[Pattern]) -> bool:
    """MatchesOrParentMatches: whether ``path`` (relative, with /) is left out."""
    matched = False
    parents = posixpath.dirname(path).split("/") if "/" in path else []
    for pattern in patterns:
        if pattern.exclusion != matched:
            continue
        match = pattern.match(path) or any(
            pattern.match("/".join(parents[: i + 1])) for i in range(len(parents))
        )
        if match:
            matched = not pattern.exclusion
    return matched


def sent(root: Path, patterns: list[Pattern]) -> list[str]:
    """The files of ``root`` that go into the build context.

    A directory left out is not walked unless an exception could let in something below it
    (one naming a path inside it, or one with a wildcard), as fsutil walks.
    """
    exceptions = [p.text for p in patterns if p.exclusion]
    files = []
    for directory, dirs, names in os.walk(root):
        relative = Path(directory).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        dirs[:] = [
            d
            for d in dirs
            if not ignored(prefix + d, patterns)
            or any(e.startswith(prefix + d + "/") or re.search(r"[*?\[]", e) for e in exceptions)
        ]
        files += [prefix + n for n in names if not ignored(prefix + n, patterns)]
    return files


def _patterns() -> list[Pattern]:
    return read_patterns((REPO / ".dockerignore").read_text())


def test_only_what_the_images_are_built_from_is_sent() -> None:
    files = sent(REPO, _patterns())
    tops = {path.split("/")[0] for path in files}
    assert tops <= set(CONTEXT_PATHS), sorted(tops - set(CONTEXT_PATHS))
    assert set(CONTEXT_PATHS) <= tops, sorted(set(CONTEXT_PATHS) - tops)
    leftovers = [path for path in files if any(a in path for a in LOCAL_ARTEFACTS)]
    assert not leftovers, leftovers[:5]


def test_every_source_file_is_sent() -> None:
    files = set(sent(REPO, _patterns()))
    for top in ("imagegen", "plugins", "functions"):
        sources = {
            path.relative_to(REPO).as_posix()
            for path in (REPO / top).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        }
        assert sources and sources <= files, sorted(sources - files)[:5]


@pytest.mark.parametrize(
    ("lines", "path", "left_out"),
    [
        # What the patterns of .dockerignore rely on.
        (["*"], "Makefile", True),
        (["*", "!imagegen"], "imagegen/cli/_app.py", False),
        (["*", "!imagegen"], "imagegen.egg-info/PKG-INFO", True),
        (["*", "!imagegen", "**/__pycache__"], "imagegen/cli/__pycache__/x.pyc", True),
        (["**/*.pyc"], "functions/a.pyc", True),
        (["**/*.pyc"], "a.pyc", True),
        (["docs"], "docs/deploy.md", True),
        (["docs", "!docs/deploy.md"], "docs/deploy.md", False),
        (["a/**"], "a/b/c", True),
        ([".hypothesis"], ".hypothesis/examples/x", True),
    ],
)
def test_patterns_match_as_docker_matches_them(lines: list[str], path: str, left_out: bool) -> None:
    assert ignored(path, read_patterns("\n".join(lines))) is left_out


def test_a_path_left_in_by_mistake_is_reported(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "Makefile", ".ci/run", "imagegen/a.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert sorted(sent(tmp_path, read_patterns(".git\n.venv\n"))) == [
        ".ci/run",
        "Makefile",
        "imagegen/a.py",
        "pyproject.toml",
    ]
    assert sorted(sent(tmp_path, _patterns())) == ["imagegen/a.py", "pyproject.toml"]


class _Daemon(http.server.BaseHTTPRequestHandler):
    """Just enough of the Docker Engine API for ``docker build`` to send its context: the
    ping, then ``POST /build`` with the context as a tar, kept in ``server.context``."""

    protocol_version = "HTTP/1.1"

    def _answer(self, body: bytes = b"OK") -> None:
        self.send_response(200)
        self.send_header("Api-Version", "1.47")
        self.send_header("Ostype", "linux")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        body = bytearray()
        if self.headers.get("Transfer-Encoding") == "chunked":
            while size := int(self.rfile.readline().strip(), 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body += self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if "/build" in self.path:
            self.server.context = bytes(body)  # type: ignore[attr-defined]
        self._answer(b'{"stream": "received"}\n')

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")
def test_the_docker_cli_sends_what_the_patterns_let_in(tmp_path: Path) -> None:
    """The context the Docker CLI itself builds (its classic builder tars it on the client
    side), received by a stand-in daemon on a Unix socket."""
    socket = tmp_path / "docker.sock"
    server = socketserver.ThreadingUnixStreamServer(str(socket), _Daemon)
    server.context = b""  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "DOCKER_HOST": f"unix://{socket}",
            "DOCKER_BUILDKIT": "0",
        }
        done = subprocess.run(
            ["docker", "build", "-f", "Dockerfile.cpu", "."],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
        server.server_close()
    context: bytes = server.context  # type: ignore[attr-defined]
    if not context:
        pytest.skip(f"this docker CLI sent no context: {done.stderr.strip()[-300:]}")
    (tmp_path / "context.tar").write_bytes(context)
    with tarfile.open(tmp_path / "context.tar") as archive:
        names = {m.name for m in archive.getmembers() if m.isfile()}
    # The classic builder adds the Dockerfile and .dockerignore whatever the patterns say.
    names -= {"Dockerfile.cpu", ".dockerignore"}
    assert names == set(sent(REPO, _patterns()))
    assert {name.split("/")[0] for name in names} == set(CONTEXT_PATHS)
