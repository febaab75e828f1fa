"""A local stand-in for the Hugging Face Hub: enough of its HTTP API for huggingface_hub's upload and download flows.

Model repositories on ``main``, in memory, on 127.0.0.1 (a random free port), served by daemon threads with socket
timeouts. Uploads: repo creation, README metadata validation, ``preupload`` (always answering the "regular" upload
mode, so file contents come inline, base64, in the commit's NDJSON: neither LFS nor Xet storage is involved, even with
``hf_xet`` installed) and ``commit`` (file additions). Downloads: model info, tree listing and file resolution with the
headers `hf_hub_download` checks (``X-Repo-Commit``, ``ETag``, ``Content-Length``; no ``X-Xet-Hash``, so the client
downloads over plain HTTP). Writes need ``Authorization: Bearer <token>``; errors carry the Hub's ``X-Error-Code``.

    with LocalHub(token="hf_dummy") as hub:   # then point HF_ENDPOINT at hub.url
        ...
        hub.file("user/tiny", "config.json")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

MAX_BODY_BYTES = 256 * 2**20
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REVISION = r"(?P<revision>[^/]+)"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    """The whole tree at this commit: path -> content."""


@dataclass
class Repo:
    repo_id: str
    commits: list[Commit] = field(default_factory=list)
    """The history of ``main``, oldest first."""

    def at(self, revision: str) -> Commit | None:
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c.oid == revision), None)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.code, self.commit = status, code, commit


class LocalHub:
    """The server: `start` / `stop` (or a ``with`` block); `repos` holds what was pushed, `requests` what was asked."""

    def __init__(self, token: str, user: str = "user", request_timeout: float = 30.0):
        self.token, self.user = token, user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unrouted: list[tuple[str, str]] = []
        """Requests no route of this server answers: what a client asked beyond the flows it implements."""
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self, "timeout": request_timeout})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes | None:
        """The content of ``path`` in ``repo_id`` at ``revision``, or None."""
        with self._lock:
            repo = self.repos.get(repo_id)
            commit = repo.at(revision) if repo else None
            return commit.files.get(path) if commit else None

    # ------------------------------------------------------------------ endpoints (called with the lock held)

    def create_repo(self, body: dict) -> tuple[dict, int]:
        if body.get("type", "model") != "model":
            raise HubError(400, "this test server holds model repositories only")
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = {"url": f"{self.url}/{repo_id}", "name": repo_id}
        if repo_id in self.repos:
            return {"error": "You already created this model repo", **url}, 409
        self.repos[repo_id] = Repo(repo_id, [Commit(self._oid(repo_id, "initial commit", {}), "initial commit", {})])
        return url, 200

    def validate_yaml(self, body: dict) -> tuple[dict, int]:
        """The README's front matter must parse as a YAML mapping."""
        front_matter = re.match(r"---\n(.*?)\n---\n", body["content"], re.DOTALL)
        try:
            if front_matter and not isinstance(yaml.safe_load(front_matter.group(1)), dict):
                raise yaml.YAMLError("the metadata is not a mapping")
        except yaml.YAMLError as err:
            return {"errors": [{"message": str(err)}]}, 400
        return {"errors": [], "warnings": []}, 200

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        tree = self._commit(repo, revision).files
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(tree[f["path"]]) if f["path"] in tree else None,
                }
                for f in body["files"]
            ]
        }

    def commit(self, repo: Repo, revision: str, ndjson: bytes) -> dict:
        if revision != "main":
            raise HubError(400, "this test server commits to main only")
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = dict(repo.commits[-1].files)
        for line in lines:
            if line["key"] == "file":
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] != "header":
                raise HubError(400, f"unsupported commit operation {line['key']!r} (only regular file additions)")
        oid = self._oid(repo.repo_id, header["summary"], files)
        repo.commits.append(Commit(oid, header["summary"], files))
        return {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}"}

    def model_info(self, repo: Repo, revision: str) -> dict:
        commit = self._commit(repo, revision)
        return {
            "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": False, "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def tree(self, repo: Repo, revision: str, path: str, recursive: bool) -> list[dict]:
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries = {}
        for name, content in self._commit(repo, revision).files.items():
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            shown = len(parts) if recursive else 1  # path components listed below the prefix
            for depth in range(1, min(shown, len(parts) - 1) + 1):
                folder = prefix + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode())}
            if shown == len(parts):
                entries[name] = {"type": "file", "path": name, "size": len(content), "oid": git_blob_oid(content)}
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        return [entries[name] for name in sorted(entries)]

    def resolve(self, repo: Repo, revision: str, path: str) -> tuple[bytes, dict[str, str]]:
        commit = self._commit(repo, revision)
        if path not in commit.files:
            raise HubError(404, f"{path} does not exist at {revision}", "EntryNotFound", commit=commit.oid)
        content = commit.files[path]
        return content, {"ETag": f'"{git_blob_oid(content)}"', "X-Repo-Commit": commit.oid}

    # ------------------------------------------------------------------ helpers

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.at(revision)
        if commit is None:
            raise HubError(404, f"revision {revision} not found", "RevisionNotFound")
        return commit

    @staticmethod
    def _oid(repo_id: str, message: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(f"{repo_id}\0{message}\0{len(files)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\0".encode())
        return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to `LocalHub`; every error answers with the Hub's ``X-Error-Code`` / ``X-Error-Message``."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"

    ROUTES = [
        ("POST", re.compile(r"/api/repos/create"), "create_repo", True),
        ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml", True),
        ("POST", re.compile(rf"/api/models/{REPO}/preupload/{REVISION}"), "preupload", True),
        ("POST", re.compile(rf"/api/models/{REPO}/commit/{REVISION}"), "commit", True),
        ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/{REVISION})?"), "model_info", False),
        ("GET", re.compile(rf"/api/models/{REPO}/tree/{REVISION}(?:/(?P<path>.*))?"), "tree", False),
        ("GET", re.compile(rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)"), "resolve", False),
        ("HEAD", re.compile(rf"/{REPO}/resolve/{REVISION}/(?P<path>.+)"), "resolve", False),
    ]

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, format, *args):  # noqa: A002 -- the base class's signature
        pass

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((method, url.path))
        try:
            body = self._body()
            for route_method, pattern, name, needs_token in self.ROUTES:
                match = pattern.fullmatch(url.path) if route_method == method else None
                if match:
                    break
            else:
                self.hub.unrouted.append((method, url.path))
                raise HubError(404, f"{method} {url.path} is not served by this test server")
            if needs_token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
                raise HubError(401, "Invalid credentials in Authorization header")
            with self.hub._lock:
                self._answer(method, name, {k: unquote(v) for k, v in match.groupdict("").items()}, body, url.query)
        except HubError as err:
            extra = {"X-Error-Code": err.code} if err.code else {}
            if err.commit:
                extra["X-Repo-Commit"] = err.commit
            answer = json.dumps({"error": str(err)}).encode()
            self._send(err.status, answer, {"X-Error-Message": str(err), **extra}, head=method == "HEAD")

    def _answer(self, method, name, groups, body: bytes, query: str) -> None:
        hub = self.hub
        if name == "create_repo":
            return self._json(*hub.create_repo(json.loads(body)))
        if name == "validate_yaml":
            return self._json(*hub.validate_yaml(json.loads(body)))
        repo = hub.repos.get(groups["repo"])
        if repo is None:
            raise HubError(404, f"Repository {groups['repo']} not found", "RepoNotFound")
        revision = groups["revision"] or "main"
        if name == "preupload":
            return self._json(hub.preupload(repo, revision, json.loads(body)))
        if name == "commit":
            return self._json(hub.commit(repo, revision, body))
        if name == "model_info":
            return self._json(hub.model_info(repo, revision))
        if name == "tree":
            recursive = parse_qs(query).get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._json(hub.tree(repo, revision, groups["path"], recursive))
        content, headers = hub.resolve(repo, revision, groups["path"])
        self._send(200, content, {"Content-Type": "application/octet-stream", **headers}, head=method == "HEAD")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise HubError(413, f"request body of {length} bytes is over this server's {MAX_BODY_BYTES}")
        return self.rfile.read(length) if length else b""

    def _json(self, answer, status: int = 200) -> None:
        self._send(status, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    def _send(self, status: int, content: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(content)
