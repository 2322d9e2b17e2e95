"""A small Hugging Face Hub stand-in on 127.0.0.1 for tests (standard library only).

It speaks the part of the Hub's HTTP protocol that the real ``huggingface_hub`` client uses to download and upload
model repositories, so tests can point ``HF_ENDPOINT`` at it and run ``huggingface_hub`` and timm unchanged:

- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}``: small text files are served directly with ``ETag`` (git blob
  sha1), ``X-Repo-Commit`` and ``Content-Length``; LFS-style files (weights) answer ``302`` with ``X-Linked-Etag``
  (sha256), ``X-Linked-Size`` and a ``Location`` on a second origin, the "CDN", which serves the bytes (with
  ``Range`` support), like the real Hub does.
- ``404`` errors carry ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.
- ``GET /api/models/{repo_id}[/revision/{revision}]`` and ``/api/models/{repo_id}/tree/{revision}``.
- Uploads: ``POST /api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo_id}/preupload/{revision}`` (every
  file is given the "regular" upload mode, so no LFS or Xet transfer is needed) and the ndjson
  ``/api/models/{repo_id}/commit/{revision}``.

Every request is logged (``LocalHub.requests``) so tests can assert what the client did. Faults can be injected per
blob to test interrupted and truncated transfers.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlsplit

__all__ = ["LocalHub", "LoggedRequest"]

# Suffixes the Hub stores with Git LFS by default (its .gitattributes template); other files are plain git blobs.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npz", ".tar", ".gz")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class LoggedRequest:
    """One request as the server saw it."""

    origin: str  # "hub" or "cdn"
    method: str
    path: str
    status: int
    range: str | None


@dataclasses.dataclass
class _Repo:
    commits: dict[str, dict[str, str]]  # commit oid -> {path in repo: sha256 of content}
    refs: dict[str, str]  # branch -> commit oid
    history: list[str]


class LocalHub:
    """A Hub-compatible HTTP server over repos kept under ``root``.

    Use as a context manager; ``url`` is the value for ``HF_ENDPOINT``.

    Args:
        root: Folder where the server keeps its blobs (content-addressed by sha256).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.requests: list[LoggedRequest] = []
        self._repos: dict[str, _Repo] = {}
        self._faults: dict[str, list[tuple[str, int]]] = {}
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, "cdn"))
        self._hub.daemon_threads = self._cdn.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------------------------------------- life cycle
    @property
    def url(self) -> str:
        """The Hub endpoint, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The second origin that serves LFS blobs (a different port is a different origin to the client)."""
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> "LocalHub":
        for server in (self._hub, self._cdn):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------- content
    def upload(self, repo_id: str, files: Mapping[str, bytes | str | Path], message: str = "upload") -> str:
        """Create ``repo_id`` if needed and commit ``files`` (path in repo -> content or local file) on ``main``.

        Returns:
            The new commit's oid.
        """
        contents = {}
        for path, value in files.items():
            if isinstance(value, Path):
                value = value.read_bytes()
            contents[path] = value.encode() if isinstance(value, str) else bytes(value)
        with self._lock:
            self._ensure_repo(repo_id)
            return self._commit(repo_id, "main", contents, deleted=(), message=message)

    def upload_folder(self, repo_id: str, folder: str | Path) -> str:
        """Commit every file under ``folder`` to ``repo_id``."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.upload(repo_id, files)

    def create_repo(self, repo_id: str) -> None:
        """Create an empty repo (one empty commit on ``main``)."""
        with self._lock:
            self._ensure_repo(repo_id)

    def has_repo(self, repo_id: str) -> bool:
        return repo_id in self._repos

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``: path -> content."""
        with self._lock:
            tree = self._repos[repo_id].commits[self._resolve_revision(self._repos[repo_id], revision)]
            return {path: self._blob_path(sha).read_bytes() for path, sha in tree.items()}

    def head_commit(self, repo_id: str) -> str:
        return self._repos[repo_id].refs["main"]

    def sha256(self, content: bytes) -> str:
        return hashlib.sha256(content).hexdigest()

    # -------------------------------------------------------------------------------------------------- faults
    def add_fault(self, content_sha256: str, kind: str, nbytes: int) -> None:
        """Make the next CDN ``GET`` of a blob misbehave once.

        Args:
            content_sha256: The blob (sha256 of its content).
            kind: ``"drop"``: announce the full length, send ``nbytes`` bytes, then close the connection (a
                network failure mid-transfer). ``"short"``: send only ``nbytes`` bytes with a matching
                ``Content-Length`` (a CDN serving a truncated object).
            nbytes: How many bytes to send.
        """
        if kind not in ("drop", "short"):
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._faults.setdefault(content_sha256, []).append((kind, nbytes))

    # ------------------------------------------------------------------------------------------------ requests
    def count(self, method: str, origin: str | None = None, path_contains: str = "") -> int:
        """How many logged requests match."""
        return sum(
            1
            for r in list(self.requests)
            if r.method == method and (origin is None or r.origin == origin) and path_contains in r.path
        )

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---------------------------------------------------------------------------------------------- internals
    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _store_blob(self, content: bytes) -> str:
        sha = hashlib.sha256(content).hexdigest()
        path = self._blob_path(sha)
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
        return sha

    def _ensure_repo(self, repo_id: str) -> bool:
        if repo_id in self._repos:
            return False
        oid = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
        self._repos[repo_id] = _Repo(commits={oid: {}}, refs={"main": oid}, history=[oid])
        return True

    def _commit(
        self, repo_id: str, branch: str, additions: Mapping[str, bytes], deleted: tuple[str, ...], message: str
    ) -> str:
        repo = self._repos[repo_id]
        parent = repo.refs[branch]
        tree = dict(repo.commits[parent])
        for path in deleted:
            prefix = path.rstrip("/") + "/"
            for existing in [p for p in tree if p == path or p.startswith(prefix)]:
                del tree[existing]
        for path, content in additions.items():
            tree[path] = self._store_blob(content)
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(tree):
            digest.update(f"\0{path}\0{tree[path]}".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = tree
        repo.refs[branch] = oid
        repo.history.append(oid)
        return oid

    @staticmethod
    def _resolve_revision(repo: _Repo, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in repo.refs:
            return repo.refs[revision]
        if _COMMIT_RE.fullmatch(revision) and revision in repo.commits:
            return revision
        return None

    def _git_blob_sha1(self, content: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()

    def _take_fault(self, sha256: str) -> tuple[str, int] | None:
        with self._lock:
            pending = self._faults.get(sha256)
            return pending.pop(0) if pending else None


_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API_MODEL_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_API_WRITE_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>[^/]+)$")
_CDN_RE = re.compile(r"^/lfs/(?P<sha>[0-9a-f]{64})$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _make_handler(hub: LocalHub, origin: str) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    Handler.origin = origin
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub
    origin: str

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (keep test output quiet)
        pass

    # ------------------------------------------------------------------------------------------------ plumbing
    def _log(self, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append(
                LoggedRequest(self.origin, self.command, urlsplit(self.path).path, status, self.headers.get("Range"))
            )

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self._log(status)
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, headers: Mapping[str, str] | None = None) -> None:
        extra = {"X-Error-Message": message, **(headers or {})}
        if code:
            extra["X-Error-Code"] = code
        self._json(status, {"error": message}, extra)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # ------------------------------------------------------------------------------------------------- methods
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self._get_or_head()

    def do_GET(self) -> None:  # noqa: N802
        self._get_or_head()

    def do_POST(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        body = self._body()
        if self.origin != "hub":
            return self._error(404, None, "Not found")
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        match = _API_WRITE_RE.match(path)
        if match:
            repo_id, revision = unquote(match["repo"]), unquote(match["rev"])
            if repo_id not in self.hub._repos:
                return self._error(404, "RepoNotFound", "Repository not found")
            repo = self.hub._repos[repo_id]
            if revision not in repo.refs:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if match["action"] == "preupload":
                return self._preupload(repo, revision, json.loads(body))
            return self._apply_commit(repo_id, revision, body)
        self._error(404, None, "Not found")

    def _get_or_head(self) -> None:
        path = urlsplit(self.path).path
        if self.origin == "cdn":
            match = _CDN_RE.match(path)
            return self._serve_blob(match["sha"]) if match else self._error(404, None, "Not found")
        match = _RESOLVE_RE.match(path)
        if match:
            return self._resolve(unquote(match["repo"]), match["rev"], unquote(match["path"]))
        match = _API_TREE_RE.match(path)
        if match and self.command == "GET":
            return self._tree(unquote(match["repo"]), match["rev"], unquote(match["path"] or ""))
        match = _API_MODEL_RE.match(path)
        if match and self.command == "GET":
            return self._model_info(unquote(match["repo"]), match["rev"] or "main")
        self._error(404, None, "Not found")

    # --------------------------------------------------------------------------------------------- downloads
    def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, str]] | None:
        repo = self.hub._repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        oid = self.hub._resolve_revision(repo, revision)
        if oid is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}")
            return None
        return oid, repo.commits[oid]

    def _resolve(self, repo_id: str, revision: str, file_path: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        oid, tree = found
        if file_path not in tree:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": oid})
        sha256 = tree[file_path]
        blob = self.hub._blob_path(sha256)
        size = blob.stat().st_size
        if file_path.endswith(LFS_SUFFIXES):
            location = f"{self.hub.cdn_url}/lfs/{sha256}"
            headers = {
                "X-Repo-Commit": oid,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(size),
                "ETag": f'"{self.hub._git_blob_sha1(sha256.encode())}"',
                "Location": location,
            }
            return self._send(302, b"", headers)
        content = blob.read_bytes()
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{self.hub._git_blob_sha1(content)}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        self._send(200, content, headers)

    def _serve_blob(self, sha256: str) -> None:
        blob = self.hub._blob_path(sha256)
        if not blob.exists():
            return self._error(404, None, "Not found")
        content = blob.read_bytes()
        start, end = 0, len(content)
        status = 200
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        requested = self.headers.get("Range")
        if requested:
            match = _RANGE_RE.match(requested.strip())
            if not match or int(match[1]) >= len(content):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(content)}"})
            start = int(match[1])
            end = min(int(match[2]) + 1, len(content)) if match[2] else len(content)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        body = content[start:end]
        fault = self.hub._take_fault(sha256) if self.command == "GET" else None
        if fault is None:
            return self._send(status, body, headers)
        kind, nbytes = fault
        self._log(status)
        self.send_response(status)
        for key, value in headers.items():
            if key != "Content-Range" or kind == "drop":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if kind == "drop" else min(nbytes, len(body))))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[:nbytes])
        self.wfile.flush()
        self.close_connection = True

    def _model_info(self, repo_id: str, revision: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        oid, tree = found
        siblings = [{"rfilename": path} for path in sorted(tree)]
        self._json(200, {"id": repo_id, "modelId": repo_id, "sha": oid, "private": False, "siblings": siblings,
                         "tags": [], "downloads": 0, "likes": 0})

    def _tree(self, repo_id: str, revision: str, under: str) -> None:
        found = self._lookup(repo_id, revision)
        if found is None:
            return
        _, tree = found
        entries = []
        for path, sha256 in sorted(tree.items()):
            if under and not path.startswith(under.rstrip("/") + "/"):
                continue
            content = self.hub._blob_path(sha256).read_bytes()
            size = len(content)
            entry = {"type": "file", "path": path, "size": size, "oid": self.hub._git_blob_sha1(content)}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": 130}
            entries.append(entry)
        self._json(200, entries)

    # ----------------------------------------------------------------------------------------------- uploads
    def _create_repo(self, payload: Mapping[str, object]) -> None:
        name, organization = payload.get("name"), payload.get("organization")
        if not isinstance(name, str) or not name:
            return self._error(400, None, "Missing repo name")
        if payload.get("type", "model") not in ("model", None):
            return self._error(400, None, "Only model repos are served here")
        repo_id = f"{organization}/{name}" if organization else f"user/{name}"
        with self.hub._lock:
            created = self.hub._ensure_repo(repo_id)
        url = f"{self.hub.url}/{repo_id}"
        if not created:
            return self._json(409, {"error": "You already created this model repo", "url": url},
                              {"X-Error-Message": "You already created this model repo"})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: Mapping[str, object]) -> None:
        content = payload.get("content")
        if not isinstance(content, str):
            return self._json(400, {"errors": [{"message": "missing content"}], "warnings": []})
        if content.startswith("---") and content.count("\n---") < 1:
            return self._json(400, {"errors": [{"message": "unterminated YAML front matter"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo: _Repo, revision: str, payload: Mapping[str, object]) -> None:
        tree = repo.commits[repo.refs[revision]]
        files = []
        for entry in payload.get("files", []):  # type: ignore[union-attr]
            path = entry["path"]
            # The oid of a file already there lets the client skip unchanged files, as with the real Hub.
            oid = self.hub._git_blob_sha1(self.hub._blob_path(tree[path]).read_bytes()) if path in tree else None
            files.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": repo.refs[revision]})

    def _apply_commit(self, repo_id: str, revision: str, body: bytes) -> None:
        additions: dict[str, bytes] = {}
        deleted: list[str] = []
        summary = "commit"
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary") or summary
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, f"unsupported encoding for {value.get('path')}")
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                return self._error(400, None, f"operation {key!r} is not supported by this server")
        with self.hub._lock:
            oid = self.hub._commit(repo_id, revision, additions, tuple(deleted), summary)
        self._json(200, {"success": True, "commitOid": oid, "pullRequestUrl": None,
                         "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}"})
