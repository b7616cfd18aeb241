"""A loopback stand-in for the Hugging Face Hub's HTTP endpoints that `HfApi.create_repo` and `HfApi.upload_folder`
use in huggingface_hub 2.x (with Xet disabled, i.e. the LFS path), for tests without network:

- `POST /api/repos/create`                              create a repo (409 if it exists)
- `POST /api/models/{ns}/{name}/preupload/{revision}`   upload mode per file: "lfs" for weights, "regular" otherwise
- `POST /{ns}/{name}.git/info/lfs/objects/batch`        LFS batch: an upload and a verify action per object
- `PUT  /lfs/{oid}?sig=...`                            the LFS object, to a pre-signed URL (sha256 checked)
- `POST /lfs/verify`                                    LFS verify
- `POST /api/models/{ns}/{name}/commit/{revision}`      ndjson commit: header, regular files (base64), LFS pointers
- `POST /api/validate-yaml`                             the model card's metadata (checked to be a YAML mapping)

Every request but the pre-signed upload must carry `Authorization: Bearer <token>`. Received files are kept per repo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class StubRepo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)


class HubStub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, StubRepo] = {}
        self.lfs: dict[str, bytes] = {}
        self.signature = secrets.token_hex(8)  # LFS uploads go to a pre-signed URL (S3 on the Hub), with no token
        self.requests: list[tuple[str, str]] = []  # (method, path) in order
        self.errors: list[str] = []
        self.validated: list = []  # model-card metadata received by /api/validate-yaml
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                stub._handle(self, "POST")

            def do_PUT(self):
                stub._handle(self, "PUT")

            def do_GET(self):
                stub._handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # --- plumbing --------------------------------------------------------------------------------------------------

    @staticmethod
    def _body(handler: BaseHTTPRequestHandler) -> bytes:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(handler.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    handler.rfile.readline()
                    return data
                data += handler.rfile.read(size)
                handler.rfile.readline()
        return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, payload: dict | None = None) -> None:
        body = json.dumps(payload or {}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path, _, query = handler.path.partition("?")
        body = self._body(handler)
        with self.lock:
            self.requests.append((method, path))
        presigned = method == "PUT" and path.startswith("/lfs/") and query == f"sig={self.signature}"
        if not presigned and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(handler, 401, {"error": "Invalid credentials in Authorization header"})
        try:
            status, payload = self._route(method, path, body)
        except Exception as err:  # noqa: BLE001 - report to the test, answer 500
            self.errors.append(f"{method} {path}: {err!r}")
            status, payload = 500, {"error": repr(err)}
        if status == 404:
            self.errors.append(f"unexpected request {method} {path}")
        self._reply(handler, status, payload)

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "POST" and path == "/api/repos/create":
            data = json.loads(body)
            if data.get("type", "model") != "model":
                return 400, {"error": "only model repos here"}
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            with self.lock:
                if repo_id in self.repos:
                    return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo_id}"}
                self.repos[repo_id] = StubRepo(repo_id, data.get("visibility") == "private")
            return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}
        if method == "POST" and path == "/api/validate-yaml":
            import yaml

            content = json.loads(body)["content"]
            front = content.split("---\n")[1] if content.startswith("---\n") else ""
            metadata = yaml.safe_load(front)
            self.validated.append(metadata)
            if not isinstance(metadata, dict):
                return 400, {"error": "Invalid metadata in README.md."}
            return 200, {"warnings": []}
        if match := re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path):
            self._repo(match.group(1))
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                for f in files
            ]
            return 200, {"files": [dict(m, shouldIgnore=False) for m in modes]}
        if match := re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path):
            self._repo(match.group(1))
            data = json.loads(body)
            objects = [
                {
                    "oid": o["oid"],
                    "size": o["size"],
                    "actions": {
                        "upload": {"href": f"{self.endpoint}/lfs/{o['oid']}?sig={self.signature}"},
                        "verify": {"href": f"{self.endpoint}/lfs/verify"},
                    },
                }
                for o in data["objects"]
            ]
            return 200, {"transfer": "basic", "objects": objects}
        if method == "PUT" and (match := re.fullmatch(r"/lfs/([0-9a-f]{64})", path)):
            if hashlib.sha256(body).hexdigest() != match.group(1):
                return 400, {"error": "sha256 mismatch"}
            with self.lock:
                self.lfs[match.group(1)] = body
            return 200, {}
        if method == "POST" and path == "/lfs/verify":
            data = json.loads(body)
            ok = data["oid"] in self.lfs and len(self.lfs[data["oid"]]) == data["size"]
            return (200, {}) if ok else (404, {"error": "object not uploaded"})
        if method == "POST" and (match := re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)):
            repo = self._repo(match.group(1))
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            files = {}
            for line in lines:
                value = line["value"]
                if line["key"] == "file":
                    assert value["encoding"] == "base64"
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    files[value["path"]] = self.lfs[value["oid"]]
                elif line["key"] != "header":
                    raise ValueError(f"unsupported commit operation {line['key']}")
            oid = hashlib.sha1(json.dumps(sorted(files)).encode() + str(len(repo.commits)).encode()).hexdigest()
            with self.lock:
                repo.files.update(files)
                repo.commits.append({"oid": oid, "summary": header.get("summary"), "paths": sorted(files)})
            return 200, {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{oid}", "commitOid": oid}
        return 404, {"error": f"no route {method} {path}"}

    def _repo(self, repo_id: str) -> StubRepo:
        if repo_id not in self.repos:
            raise KeyError(f"repository {repo_id} not found")
        return self.repos[repo_id]
