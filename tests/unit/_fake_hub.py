"""A local stand-in for the Hub endpoints that `HfApi.create_repo`, `create_branch` and `upload_folder` call.

It speaks what huggingface_hub 2.4 sends (read from its `hf_api.py`, `_commit_api.py`, `lfs.py`,
`_upload_pipeline.py`):

    POST /api/repos/create                                 create_repo           -> {"url": ...}
    POST /api/models/{repo}/branch/{branch}                create_branch         -> {}
    POST /api/validate-yaml                                upload_folder checks README.md's metadata first
    POST /api/models/{repo}/preupload/{revision}           upload mode per file: "regular" or "lfs"
    POST /{repo}.git/info/lfs/objects/batch                LFS batch: one basic-transfer upload action per object
    PUT  /lfs-upload/{oid}                                 the LFS object's bytes (href given by the batch answer)
    POST /api/models/{repo}/commit/{revision}              NDJSON: header, then "file" (base64) / "lfsFile" lines

Files whose name ends with one of `lfs_suffixes` are answered "lfs"; all others "regular", so their bytes travel
inline (base64) in the commit. The answers carry no xet headers: with hf_xet installed, huggingface_hub only uses
xet for files answered "lfs", so with `lfs_suffixes=()` xet never opens a connection. Any other request is
answered 404 and recorded in `unexpected`. The server runs on 127.0.0.1 in a daemon thread, and shuts itself
down after `lifetime_s` even if the test never stops it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml


class FakeHub:
    """Use as a context manager; `url` is the endpoint to pass to HfApi."""

    def __init__(self, *, lfs_suffixes: tuple[str, ...] = (), token: str | None = None, lifetime_s: float = 60.0):
        self.lfs_suffixes = lfs_suffixes
        self.token = token
        self.lifetime_s = lifetime_s
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> the create_repo payload
        self.branches: dict[str, set[str]] = {}  # repo id -> branch names
        self.files: dict[tuple[str, str, str], bytes] = {}  # (repo id, revision, path) -> committed bytes
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> uploaded bytes
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.unexpected: list[str] = []
        self.errors: list[str] = []  # protocol violations seen by the server (bad token, bad LFS oid, ...)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        # Bounded: a test that hangs or forgets to stop the server still gets it stopped.
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def committed(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Path -> bytes of every file committed to `repo_id` at `revision`."""
        return {p: b for (r, rev, p), b in self.files.items() if r == repo_id and rev == revision}


_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$"), "branch"),
    ("POST", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every answer sets Content-Length
    timeout = 10  # seconds a connection may sit idle before the handler thread gives up on it

    def log_message(self, *args: Any) -> None:  # keep pytest output quiet
        pass

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        fake = self.fake
        path = unquote(urlsplit(self.path).path)
        body = self._body()
        with fake._lock:
            fake.requests.append((method, path))
        if fake.token is not None and not path.startswith("/lfs-upload/"):
            if self.headers.get("Authorization") != f"Bearer {fake.token}":
                fake.errors.append(f"{method} {path}: Authorization {self.headers.get('Authorization')!r}")
                return self._send(401, {"error": "Invalid credentials"})
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                return getattr(self, f"_{name}")(body, **match.groupdict())
        with fake._lock:
            fake.unexpected.append(f"{method} {self.path}")
        self._send(404, {"error": f"fake Hub does not serve {method} {path}"})

    # ---------------------------------------------------------------- endpoints

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        with self.fake._lock:
            if repo_id in self.fake.repos:
                return self._send(409, {"error": "You already created this model repo", "url": self._repo_url(repo_id)})
            self.fake.repos[repo_id] = payload
            self.fake.branches[repo_id] = {"main"}
        self._send(200, {"url": self._repo_url(repo_id), "name": repo_id})

    def _branch(self, body: bytes, repo: str, rev: str) -> None:
        with self.fake._lock:
            if repo not in self.fake.repos:
                return self._send(404, {"error": "Repository not found"})
            if rev in self.fake.branches[repo]:
                return self._send(409, {"error": "Reference already exists"})
            self.fake.branches[repo].add(rev)
        self._send(200, {})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            return self._send(400, {"errors": [{"message": f"YAML: {exc}"}]})
        if not isinstance(metadata, dict):
            return self._send(400, {"errors": [{"message": "no YAML metadata block"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        if not self._repo_exists(repo, rev):
            return None
        files = json.loads(body)["files"]
        answer = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(self.fake.lfs_suffixes) else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in files
        ]
        self._send(200, {"files": answer, "commitOid": "0" * 40})

    def _lfs_batch(self, body: bytes, repo: str) -> None:
        payload = json.loads(body)
        objects = [
            {
                "oid": o["oid"],
                "size": o["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"http://{self.headers['Host']}/lfs-upload/{o['oid']}"}},
            }
            for o in payload["objects"]
        ]
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            self.fake.errors.append(f"LFS object {oid}: uploaded bytes do not hash to the oid")
            return self._send(400, {"error": "sha256 mismatch"})
        with self.fake._lock:
            self.fake.lfs_objects[oid] = body
        self._send(200, {})

    def _commit(self, body: bytes, repo: str, rev: str) -> None:
        if not self._repo_exists(repo, rev):
            return None
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header" or not lines[0]["value"].get("summary"):
            return self._send(400, {"error": "commit payload must start with a header that has a summary"})
        staged: dict[str, bytes] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self.fake.lfs_objects.get(value["oid"])
                if content is None or len(content) != value.get("size", len(content)):
                    self.fake.errors.append(f"commit references LFS object {value['oid']} that was not uploaded")
                    return self._send(400, {"error": f"LFS object {value['oid']} not found"})
                staged[value["path"]] = content
            else:
                return self._send(400, {"error": f"fake Hub does not support commit operation {key!r}"})
        oid = hashlib.sha1(body).hexdigest()
        with self.fake._lock:
            for path, content in staged.items():
                self.fake.files[(repo, rev, path)] = content
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{self._repo_url(repo)}/commit/{oid}"})

    # ---------------------------------------------------------------- helpers

    def _repo_url(self, repo_id: str) -> str:
        return f"http://{self.headers['Host']}/{repo_id}"

    def _repo_exists(self, repo: str, rev: str) -> bool:
        with self.fake._lock:
            if repo not in self.fake.repos:
                self._send(404, {"error": "Repository not found"})
                return False
            if rev not in self.fake.branches[repo]:
                self._send(404, {"error": f"Invalid rev id: {rev}"})
                return False
        return True
