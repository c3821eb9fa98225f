"""A small Hub-protocol server on 127.0.0.1 for tests, driven by the real ``huggingface_hub`` client.

It speaks the endpoints the client uses to create repos and branches, read repo info, pre-upload,
upload LFS objects (batch + PUT), commit (ndjson) and resolve files (with ``ETag``/``X-Repo-Commit``
and ``X-Error-Code`` on errors). State lives in memory; every request is logged for assertions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    message: str
    parent: str | None


@dataclass
class Repo:
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


def _oid() -> str:
    return secrets.token_hex(20)


def _git_hash(data: bytes) -> str:
    """What ``git hash-object`` prints for ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubState:
    """Repos, LFS objects and the request log of one server."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.announced: set[str] = set()
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.commit_status: int | None = None  # set to make every commit fail with this HTTP status (a Hub fault)
        self.drop_downloads = False  # set to cut every weights download halfway through its body (a lost connection)

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.repos[repo_id].commits.values())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState
    endpoint: str

    def log_message(self, format: str, *args: object) -> None:
        return

    # -- plumbing -----------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        self.send_response(status)
        if isinstance(body, (dict, list)):
            self.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, code: str, head: bool = False) -> None:
        self._send(status, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code}, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _authorized(self) -> bool:
        return self.state.token is None or self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _route(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        with self.state.lock:
            self.state.log.append((method, path, {k.lower(): v for k, v in self.headers.items()}))
        presigned = method == "PUT" and path.startswith("/lfs-upload/")  # like the Hub's pre-signed upload URLs
        if method in ("POST", "PUT") and not presigned and not self._authorized():
            self._body()
            return self._error(401, "Unauthorized")
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo()
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    return self._model_info(repo_id, "/".join(rest[1:]) or "main", method)
                if rest[0] == "preupload" and method == "POST":
                    return self._preupload(repo_id, "/".join(rest[1:]))
                if rest[0] == "commit" and method == "POST":
                    return self._commit(repo_id, "/".join(rest[1:]))
                if rest[0] == "branch" and method == "POST":
                    return self._branch(repo_id, "/".join(rest[1:]))
                if rest[0] == "tree" and method == "GET":
                    return self._tree(repo_id, rest[1] if len(rest) > 1 else "main")
                if rest[0] == "paths-info" and method == "POST":
                    return self._paths_info(repo_id, "/".join(rest[1:]))
            if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch()
            if parts[0] == "lfs-upload" and method == "PUT":
                return self._lfs_put(parts[1])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=method == "HEAD")
        except KeyError:
            return self._error(404, "RepoNotFound", head=method == "HEAD")
        self._error(404, "NotFound", head=method == "HEAD")

    do_GET = lambda self: self._route("GET")  # noqa: E731
    do_HEAD = lambda self: self._route("HEAD")  # noqa: E731
    do_POST = lambda self: self._route("POST")  # noqa: E731
    do_PUT = lambda self: self._route("PUT")  # noqa: E731

    # -- endpoints -----------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = json.loads(self._body())
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else f"user/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url}, {"X-Error-Code": "RepoExists"})
        repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        first = Commit(_oid(), {}, "initial commit", None)
        repo.commits[first.oid] = first
        repo.branches["main"] = first.oid
        self.state.repos[repo_id] = repo
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self) -> None:
        content = json.loads(self._body())["content"]
        try:
            front = content.split("---\n")[1] if content.startswith("---\n") else ""
            meta = yaml.safe_load(front) if front else {}
            if meta is not None and not isinstance(meta, dict):
                raise yaml.YAMLError("metadata is not a mapping")
        except yaml.YAMLError as e:
            return self._send(400, {"errors": [{"message": str(e)}]})
        self._send(200, {"warnings": []})

    def _model_info(self, repo_id: str, revision: str, method: str) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", head=method == "HEAD")
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", head=method == "HEAD")
        self._send(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
            head=method == "HEAD",
        )

    def _preupload(self, repo_id: str, revision: str) -> None:
        """Upload modes, and like the Hub the ``oid`` of each file the branch already holds (sha256 for LFS, the git
        blob hash otherwise), which the client uses to leave unchanged files out of a commit."""
        files = json.loads(self._body())["files"]
        head = self.state.repos[repo_id].resolve(revision)
        existing = head.files if head is not None else {}
        modes = []
        for f in files:
            lfs = f["path"].endswith(".safetensors")
            data = existing.get(f["path"])
            oid = None if data is None else hashlib.sha256(data).hexdigest() if lfs else _git_hash(data)
            modes.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": modes, "commitOid": None})

    def _lfs_batch(self) -> None:
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs:
                self.state.announced.add(obj["oid"])
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str) -> None:
        data = self._body()
        if oid not in self.state.announced or hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadOid")
        self.state.lfs[oid] = data
        self._send(200, b"")

    def _commit(self, repo_id: str, revision: str) -> None:
        repo = self.state.repos[repo_id]
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if self.state.commit_status is not None:
            return self._error(self.state.commit_status, "InternalError")
        parent = repo.resolve(revision)
        if parent is None or revision not in repo.branches:
            return self._error(404, "RevisionNotFound")
        files = dict(parent.files)
        message = ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                files[value["path"]] = self.state.lfs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
        commit = Commit(_oid(), files, message, parent.oid)
        repo.commits[commit.oid] = commit
        repo.branches[revision] = commit.oid
        self._send(200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "pullRequestUrl": None})

    def _branch(self, repo_id: str, branch: str) -> None:
        repo = self.state.repos[repo_id]
        self._body()
        if branch in repo.branches:
            return self._send(409, {"error": "Reference already exists"}, {"X-Error-Code": "RefExists"})
        repo.branches[branch] = repo.branches["main"]
        self._send(200, {})

    def _tree(self, repo_id: str, revision: str) -> None:
        commit = self.state.repos[repo_id].resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        self._send(200, [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()} for p, d in commit.files.items()])

    def _paths_info(self, repo_id: str, revision: str) -> None:
        self._body()
        commit = self.state.repos[repo_id].resolve(revision)
        self._send(200, [] if commit is None else [{"type": "file", "path": p, "size": len(d)} for p, d in commit.files.items()])

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", head=head)
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", head=head)
        if filename not in commit.files:
            return self._error(404, "EntryNotFound", head=head)
        data = commit.files[filename]
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {"ETag": etag, "X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream"}
        if filename.endswith(".safetensors"):
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
            if self.state.drop_downloads and not head:
                self._send(200, data, headers, head=True)  # the status line and headers, announcing the full length
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return self.connection.shutdown(socket.SHUT_RDWR)
        self._send(200, data, headers, head=head)


class HubServer:
    """A running server: ``with HubServer(port, token) as hub: ...``."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.state = HubState(token)
        self.endpoint = f"http://127.0.0.1:{port}"
        handler = type("Handler", (_Handler,), {"state": self.state, "endpoint": self.endpoint})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
