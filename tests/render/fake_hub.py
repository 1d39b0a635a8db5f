"""A fake Hugging Face Hub on loopback: one model repository, served from a folder, at one
commit, for ``imagegen models pull`` run with ``HF_ENDPOINT`` set to it.

Only what the Hub client (huggingface_hub 2.x) asks of a public repository is answered:

- ``GET /api/models/<repo>`` and ``…/revision/<rev>``: the repository's ``sha`` and its
  ``siblings`` (``hf_api.py``, ``HfApi.model_info``, which diffusers'
  ``DiffusionPipeline.download`` and ``snapshot_download`` read the file list from);
- ``GET /api/models/<repo>/tree/<rev>``: the same files as tree entries (``list_repo_tree``);
- ``HEAD`` and ``GET /<repo>/resolve/<rev>/<file>``: the file, with ``X-Repo-Commit``, an
  ``ETag`` and, for a large (LFS) file, ``X-Linked-Etag`` and ``X-Linked-Size``: the headers
  ``file_download.py``'s ``get_hf_file_metadata`` reads for the commit, the blob's name and its
  size. No ``X-Xet-Hash``: files come over plain HTTP, as from a repository without Xet.

Anything else is the Hub's 404 for a repository it does not have (``X-Error-Code:
RepoNotFound``, ``utils/_http.py``, ``hf_raise_for_status``). Every file downloaded is recorded.
"""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.fakes.loopback import LoopbackServer

__all__ = ["FakeHub"]


class FakeHub(LoopbackServer):
    """``repo`` at ``commit``, its files those under ``root``.

    Attributes:
        downloads: The files sent whole (``GET`` of ``resolve``), in order.
    """

    def __init__(self, root: Path, *, repo: str, commit: str) -> None:
        self.root, self.repo, self.commit = root, repo, commit
        self.downloads: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                hub._resolve(self, body=False)

            def do_GET(self) -> None:
                api = f"/api/models/{hub.repo}"
                path = self.path.split("?")[0]
                if path.startswith(f"{api}/tree/"):
                    hub._json(self, [hub._entry(name) for name in hub.files()])
                elif path == api or path.startswith(f"{api}/revision/"):
                    siblings = [{"rfilename": name} for name in hub.files()]
                    body = {"id": hub.repo, "sha": hub.commit, "siblings": siblings}
                    hub._json(self, {**body, "private": False, "tags": []})
                else:
                    hub._resolve(self, body=True)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(Handler, name="fake-hub")

    def files(self) -> dict[str, Path]:
        """The repository's files by name."""
        return {str(p.relative_to(self.root)): p for p in self.root.rglob("*") if p.is_file()}

    def etag(self, name: str) -> str:
        """The ETag the file ``name`` is sent with, unquoted: the name of its blob in a cache."""
        data = (self.root / name).read_bytes()
        # A file stored with LFS is named by its sha256; any other by its git blob id.
        return hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _sha1(data)

    def _entry(self, name: str) -> dict[str, Any]:
        data = (self.root / name).read_bytes()
        return {"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}

    def _resolve(self, handler: BaseHTTPRequestHandler, *, body: bool) -> None:
        prefix = f"/{self.repo}/resolve/"
        path = handler.path.split("?")[0]
        name = path[len(prefix) :].partition("/")[2] if path.startswith(prefix) else ""
        file = self.files().get(name)
        if file is None:
            not_found = {"X-Error-Code": "RepoNotFound"}
            self._send(handler, 404, b'{"error":"Repository not found"}', not_found)
            return
        data = file.read_bytes()
        etag = self.etag(name)
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{etag}"'}
        if file.suffix == ".safetensors":  # stored with LFS
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        if body:
            self.downloads.append(name)
        self._send(handler, 200, data if body else b"", headers, length=len(data))

    def _json(self, handler: BaseHTTPRequestHandler, value: Any) -> None:
        self._send(handler, 200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str],
        *,
        length: int | None = None,
    ) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        handler.wfile.write(body)


def _sha1(data: bytes) -> str:
    # git's blob id: sha1 over "blob <size>\0" and the bytes (what the Hub's ETag of a file
    # not in LFS is); the Hub client only names the blob by it.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
