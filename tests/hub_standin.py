"""A local stand-in for the few ModelScope Hub endpoints ``HubApi`` uses to create a model and upload a folder.

For tests and offline rehearsals only: it listens on 127.0.0.1, keeps repos
in memory, and implements just what ``modelscope``'s client calls for
``repo_exists`` / ``create_model`` / ``get_model_files`` / ``upload_folder``:

* ``GET  /openapi/v1/models/{owner}/{name}``                           always 404, so the client falls back to:
* ``GET  /api/v1/models/{owner}/{name}``                               repo info (404 when missing)
* ``POST /api/v1/models``                                              create a model repo
* ``GET  /api/v1/models/{owner}/{name}/repo/files``                    file listing
* ``POST /api/v1/repos/models/{owner}/{name}/info/lfs/objects/batch``  which blobs need uploading
* ``PUT  /lfs/{oid}``                                                  blob upload
* ``POST /api/v1/repos/models/{owner}/{name}/commit/{revision}``       commit file operations

Anything else answers 404 and is recorded in ``unknown``. ``fail`` injects
failures: ``{(method, path fragment): count}`` answers 503 that many times,
``{(method, fragment): (count, status)}`` another status.
Requests must carry the token (``Authorization: Bearer`` or the
``m_session_id`` cookie); ``requests`` records each (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    owner: str
    name: str
    visibility: int
    files: dict[str, bytes] = field(default_factory=dict)  # path -> content
    commits: list[dict[str, Any]] = field(default_factory=list)


class StandInHub:
    """Start with ``with StandInHub(token) as hub: HubApi(endpoint=hub.endpoint, ...)``."""

    def __init__(self, token: str, *, max_requests: int = 2000):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []  # every request body, to check what was sent
        self.headers_seen: list[str] = []
        self.fail: dict[tuple[str, str], int | tuple[int, int]] = {}  # -> count or (count, HTTP status)
        self.injected = 0
        self.max_requests = max_requests  # bounded: a runaway client loop fails fast
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> StandInHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


_MODEL = re.compile(r"^/api/v1/models/([^/]+)/([^/]+)$")
_FILES = re.compile(r"^/api/v1/models/([^/]+)/([^/]+)/repo/files$")
_BATCH = re.compile(r"^/api/v1/repos/models/([^/]+)/([^/]+)/info/lfs/objects/batch$")
_COMMIT = re.compile(r"^/api/v1/repos/models/([^/]+)/([^/]+)/commit/([^/]+)$")
_BLOB = re.compile(r"^/lfs/([0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    hub: StandInHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing --------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _ok(self, data: Any) -> None:
        self._send(200, {"Code": 200, "Success": True, "Message": "success", "Data": data,
                         "RequestId": "standin"})

    def _error(self, status: int, message: str, code: int | None = None) -> None:
        self._send(status, {"Code": code or status, "Success": False, "Message": message, "RequestId": "standin"})

    def _authorised(self) -> bool:
        auth = self.headers.get("Authorization", "")
        cookie = self.headers.get("Cookie", "")
        token = self.hub.token
        return auth == f"Bearer {token}" or f"m_session_id={token}" in cookie

    def _handle(self, method: str) -> None:
        hub = self.hub
        path = unquote(urlparse(self.path).path)
        body = self._body()
        with hub.lock:
            hub.requests.append((method, path))
            hub.bodies.append(body)
            hub.headers_seen.append(str(self.headers))
            if len(hub.requests) > hub.max_requests:
                self._error(429, "stand-in request budget exhausted")
                return
            for (fail_method, fragment), plan in list(hub.fail.items()):
                count, status = plan if isinstance(plan, tuple) else (plan, 503)
                if count > 0 and fail_method == method and fragment in path:
                    hub.fail[(fail_method, fragment)] = (count - 1, status)
                    hub.injected += 1
                    self._error(status, "injected failure")
                    return
        if not self._authorised():
            self._error(401, "token invalid or missing", 10010205001)
            return
        with hub.lock:
            self._route(method, path, body)

    def _route(self, method: str, path: str, body: bytes) -> None:
        hub = self.hub
        if method == "POST" and path == "/api/v1/models":
            payload = json.loads(body or b"{}")
            key = f"{payload.get('Path')}/{payload.get('Name')}"
            if key in hub.repos:
                self._error(409, f"model {key} already exists", 10010205004)
                return
            hub.repos[key] = Repo(payload["Path"], payload["Name"], int(payload.get("Visibility", 5)))
            self._ok({"Path": payload["Path"], "Name": payload["Name"]})
            return
        if path.startswith("/openapi/v1/models/") and method == "GET":
            # The client asks OpenAPI first and falls back to the legacy endpoint on a 404.
            self._error(404, "use the legacy endpoint", 10010205001)
            return
        if m := _MODEL.match(path):
            repo = hub.repos.get(f"{m[1]}/{m[2]}")
            if method == "GET" and repo is not None:
                self._ok({"Id": 1, "Path": repo.owner, "Name": repo.name, "Visibility": repo.visibility,
                          "ModelType": ["text-to-image-synthesis"]})
            else:
                self._error(404, "model not found", 10010205001)
            return
        if (m := _FILES.match(path)) and method == "GET":
            repo = hub.repos.get(f"{m[1]}/{m[2]}")
            if repo is None:
                self._error(404, "model not found")
                return
            files = [{"Name": p.rsplit("/", 1)[-1], "Path": p, "Type": "blob", "Size": len(c),
                      "Sha256": hashlib.sha256(c).hexdigest(), "Revision": "standin"}
                     for p, c in sorted(repo.files.items())]
            self._ok({"Files": files})
            return
        if (m := _BATCH.match(path)) and method == "POST":
            objects = json.loads(body or b"{}").get("objects", [])
            host = self.headers.get("Host")
            out = []
            for obj in objects:
                oid = obj.get("oid", "")
                entry: dict[str, Any] = {"oid": oid, "size": obj.get("size", 0)}
                if oid not in hub.blobs:
                    entry["actions"] = {"upload": {"href": f"http://{host}/lfs/{oid}"}}
                out.append(entry)
            self._ok({"objects": out})
            return
        if (m := _BLOB.match(path)) and method == "PUT":
            if hashlib.sha256(body).hexdigest() != m[1]:
                self._error(400, "blob does not match its oid")
                return
            hub.blobs[m[1]] = body
            self._ok({})
            return
        if (m := _COMMIT.match(path)) and method == "POST":
            repo = hub.repos.get(f"{m[1]}/{m[2]}")
            if repo is None:
                self._error(404, "model not found")
                return
            payload = json.loads(body or b"{}")
            for action in payload.get("actions", []):
                name = action["path"]
                if action.get("action") == "delete":
                    repo.files.pop(name, None)
                elif action.get("type") == "lfs" or action.get("sha256") and not action.get("content"):
                    blob = hub.blobs.get(action["sha256"])
                    if blob is None:
                        self._error(400, f"blob of {name} was never uploaded")
                        return
                    repo.files[name] = blob
                else:
                    repo.files[name] = base64.b64decode(action.get("content", ""))
            repo.commits.append({"message": payload.get("commit_message"), "files": len(payload.get("actions", []))})
            self._ok({"CommitId": f"c{len(repo.commits)}"})
            return
        hub.unknown.append((method, path))
        self._error(404, f"stand-in does not implement {method} {path}")

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")
