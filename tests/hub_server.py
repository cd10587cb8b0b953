"""A Hugging Face Hub-compatible HTTP endpoint for tests, on 127.0.0.1, keeping repos in memory.

It answers the calls that `huggingface_hub` (upload and download) and `datasets.load_dataset` make, the way the Hub
answers them, so that the real client code runs:

    POST /api/repos/create                               create a repo (and its first commit, .gitattributes)
    GET  /api/agent-harnesses                            the client's telemetry registry (answered empty)
    GET  /api/agent-harnesses                            the client's telemetry registry (empty)
    POST /api/validate-yaml                              the card's front matter must be a YAML mapping
    GET  /api/{type}s/{repo}[/revision/{rev}]            repo info: sha, siblings, cardData
    POST /api/{type}s/{repo}/preupload/{rev}             upload mode per file: `lfs` for binary or large files
    POST /{type}s/{repo}.git/info/lfs/objects/batch      LFS batch (basic transfer, keyed by sha256): no upload
                                                         action for an object the server already holds
    PUT  /_lfs/{oid}                                     the object's bytes; the sha256 and size are checked
    POST /_lfs/verify                                    LFS verify
    POST /api/{type}s/{repo}/commit/{rev}                NDJSON commit: file, lfsFile, deletedFile, deletedFolder
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]         tree listing, recursive or not, cursor-paginated (Link)
    POST /api/{type}s/{repo}/paths-info/{rev}            entries of the given paths
    GET  /api/{type}s/{repo}/refs | /commits/{rev}       branches; commit history
    POST /api/{type}s/{repo}/branch/{branch}             create a branch (409 if it exists)
    POST /api/{type}s/{repo}/super-squash/{branch}       replace a branch's history by one commit
    GET|HEAD /{type}s/{repo}/resolve/{rev}/{path}        file content with X-Repo-Commit, ETag, X-Linked-*; Range

Revisions are branch names or commit ids (full or 7+ characters). Errors carry `X-Error-Code` (RepoNotFound,
RevisionNotFound, EntryNotFound) as the Hub's do. Writes need `Authorization: Bearer <token>`; the server never logs
or echoes headers. `HubState.fail(...)` injects failures (429 / 5xx) on matching requests; `lfs_puts` and
`lfs_bytes` count what clients sent, per sha256, so tests can prove that nothing was sent twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

PAGE_SIZE = 50  # tree listing page size: small, so that pagination really happens in tests
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores files of 10 MB and more in LFS whatever their content
LFS_PATTERNS = (".parquet", ".arrow", ".jpg", ".jpeg", ".png", ".webp", ".bin", ".safetensors", ".zip", ".gz")
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_PATTERNS).encode()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Entry:
    """A file of a commit's tree: regular files by git blob id, LFS files by sha256."""

    size: int
    blob_id: str
    lfs_oid: str | None = None

    def to_json(self, path: str) -> dict[str, Any]:
        info: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.lfs_oid is not None:
            info["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": len(lfs_pointer(self.lfs_oid, 1))}
        return info


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    tree: dict[str, Entry]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if len(revision) >= 7:
            found = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    skip: int
    retry_after: float | None


class HubState:
    """Everything the server holds and counts; shared by the handler threads under one lock."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # regular files by git blob id
        self.lfs: dict[str, bytes] = {}  # LFS objects by sha256
        self.lfs_puts: Counter[str] = Counter()  # PUTs received per sha256
        self.lfs_bytes: Counter[str] = Counter()  # bytes received per sha256
        self.regular_bytes: Counter[str] = Counter()  # decoded bytes of regular files received per path
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.faults: list[Fault] = []
        self._serial = 0

    def fail(
        self, method: str, pattern: str, status: int, times: int = 1, skip: int = 0, retry_after: float | None = None
    ) -> None:
        """Answer `status` to the next `times` requests matching method and path regex, after `skip` matches."""
        with self.lock:
            self.faults.append(Fault(method, re.compile(pattern), status, times, skip, retry_after))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times <= 0 or fault.method != method or not fault.pattern.search(path):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.times -= 1
                return fault
        return None

    def count(self, method: str, pattern: str) -> int:
        regex = re.compile(pattern)
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and regex.search(p))

    def new_commit(
        self, repo: Repo, branch: str, tree: dict[str, Entry], title: str, message: str = "", root: bool = False
    ) -> Commit:
        with self.lock:
            self._serial += 1
            parent = None if root else repo.branches.get(branch)
            oid = hashlib.sha1(f"{repo.repo_id}\0{parent}\0{self._serial}\0{title}".encode()).hexdigest()
            date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            commit = Commit(oid, parent, title, message, dict(tree), date)
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            return commit

    def content(self, entry: Entry) -> bytes:
        return self.lfs[entry.lfs_oid] if entry.lfs_oid is not None else self.objects[entry.blob_id]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _needs_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's rule: .gitattributes LFS patterns, binary content, or large files."""
    return path.lower().endswith(LFS_PATTERNS) or size >= LFS_MIN_SIZE or b"\0" in sample


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState  # set on the subclass made per server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # silent: tests read HubState.requests instead, and headers are never logged

    # -- plumbing --------------------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://{self.headers.get('Host')}"

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _chunked_body(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the GET one and no body
            self.wfile.write(body)
        with self.state.lock:
            self.state.requests.append((self.command, self.path, status))

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": str(err)}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": str(err)}, headers)

    def _authorised(self) -> bool:
        return self.state.token is None or self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _require_write(self) -> None:
        if not self._authorised():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        body = self._body() if method in ("POST", "PUT") else b""
        if method == "PUT" and self.path.startswith("/_lfs/"):
            with self.state.lock:  # counted before any injected fault: the bytes did cross the wire
                self.state.lfs_puts[self.path.rsplit("/", 1)[1]] += 1
                self.state.lfs_bytes[self.path.rsplit("/", 1)[1]] += len(body)
        fault = self.state.take_fault(method, self.path)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            return self._json(fault.status, {"error": f"injected {fault.status}"}, headers)
        try:
            self._route(method, body)
        except HubError as err:
            self._error(err)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- routing ---------------------------------------------------------------------------------------------

    def _route(self, method: str, body: bytes) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = url.path.strip("/").split("/")  # still quoted: a revision may hold an encoded "/"
        if method == "POST" and url.path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "GET" and url.path == "/api/agent-harnesses":
            return self._json(200, {"standardEnvVars": [], "harnesses": {}})  # client telemetry: nothing known
        if method == "POST" and url.path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if method == "PUT" and parts[0] == "_lfs" and len(parts) == 2:
            return self._lfs_put(parts[1], body)
        if method == "POST" and url.path == "/_lfs/verify":
            return self._lfs_verify(json.loads(body))
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
            repo = self._repo(parts[1][:-1], f"{parts[2]}/{parts[3]}")
            return self._api(method, repo, parts[4:], query, body)
        if len(parts) >= 3 and parts[0] in ("datasets", "spaces") and parts[2].endswith(".git"):
            repo = self._repo(parts[0][:-1], f"{parts[1]}/{parts[2][:-4]}")
            if method == "POST" and parts[3:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(repo, json.loads(body))
        if len(parts) >= 6 and parts[0] in ("datasets", "spaces") and parts[3] == "resolve":
            repo = self._repo(parts[0][:-1], f"{parts[1]}/{parts[2]}")
            return self._resolve(repo, unquote(parts[4]), unquote("/".join(parts[5:])))
        # Model repos have no type prefix in these two URLs.
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo = self._repo("model", f"{parts[0]}/{parts[1][:-4]}")
            return self._lfs_batch(repo, json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self._repo("model", f"{parts[0]}/{parts[1]}")
            return self._resolve(repo, unquote(parts[3]), unquote("/".join(parts[4:])))
        raise HubError(404, f"no route for {method} {url.path}")

    def _api(self, method: str, repo: Repo, rest: list[str], query: dict[str, list[str]], body: bytes) -> None:
        head, revision = (rest[0] if rest else ""), (unquote(rest[1]) if len(rest) > 1 else "main")
        if method == "GET" and head in ("", "revision"):
            return self._repo_info(repo, revision)
        if method == "POST" and head == "preupload":
            return self._preupload(repo, revision, json.loads(body))
        if method == "POST" and head == "commit":
            return self._commit(repo, revision, body)
        if method == "GET" and head == "tree":
            path = unquote("/".join(rest[2:]))
            return self._tree(repo, revision, path, query)
        if method == "POST" and head == "paths-info":
            return self._paths_info(repo, revision, body)
        if method == "GET" and head == "refs":
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o} for n, o in repo.branches.items()]
            return self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
        if method == "GET" and head == "commits":
            return self._commits(repo, revision)
        if method == "POST" and head == "branch":
            return self._create_branch(repo, revision, json.loads(body or b"{}"))
        if method == "POST" and head == "super-squash":
            return self._super_squash(repo, revision, json.loads(body or b"{}"))
        raise HubError(404, f"no route for {method} {self.path}")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.state.repos.get(f"{repo_type}/{repo_id}")
        if repo is None or (repo.private and not self._authorised()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _repo_url(self, repo: Repo) -> str:
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return f"{self.base}/{prefix}{repo.repo_id}"

    # -- repos, cards, refs ----------------------------------------------------------------------------------

    def _create_repo(self, payload: dict[str, Any]) -> None:
        self._require_write()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        key = f"{repo_type}/{repo_id}"
        with self.state.lock:
            if key in self.state.repos:  # the Hub's conflict answer carries the repo's url too
                message = f"You already created this {repo_type} repo"
                url = self._repo_url(self.state.repos[key])
                return self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(repo_type, repo_id, private)
            self.state.repos[key] = repo
            blob = git_blob_id(GITATTRIBUTES)
            self.state.objects[blob] = GITATTRIBUTES
            self.state.new_commit(repo, "main", {".gitattributes": Entry(len(GITATTRIBUTES), blob)}, "initial commit")
        self._json(200, {"url": self._repo_url(repo), "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "the front matter must be a mapping"}]})
        warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
        self._json(200, {"errors": [], "warnings": warnings})

    def _repo_info(self, repo: Repo, revision: str) -> None:
        commit = self._commit_of(repo, revision)
        card = None
        if "README.md" in commit.tree:
            text = self.state.content(commit.tree["README.md"]).decode()
            match = re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL)
            card = yaml.safe_load(match.group(1)) if match else None
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": next(iter(repo.commits.values())).date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.tree)],
        }
        if card is not None:
            info["cardData"] = card
        self._json(200, info)

    def _commits(self, repo: Repo, revision: str) -> None:
        commit: Commit | None = self._commit_of(repo, revision)
        history = []
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": "test"}],
                    "date": commit.date,
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(200, history)

    def _create_branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> None:
        self._require_write()
        with self.state.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._commit_of(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        self._json(200, {})

    def _super_squash(self, repo: Repo, branch: str, payload: dict[str, Any]) -> None:
        """One root commit with the branch's tree; commits no branch reaches any more are forgotten."""
        self._require_write()
        with self.state.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            tree = repo.commits[repo.branches[branch]].tree
            self.state.new_commit(repo, branch, tree, payload.get("message") or "Super-squash", root=True)
            reachable = set()
            for oid in repo.branches.values():
                commit: Commit | None = repo.commits[oid]
                while commit is not None:
                    reachable.add(commit.oid)
                    commit = repo.commits.get(commit.parent) if commit.parent else None
            repo.commits = {oid: c for oid, c in repo.commits.items() if oid in reachable}
        self._json(200, {})

    # -- upload: preupload, LFS, commit ----------------------------------------------------------------------

    def _preupload(self, repo: Repo, revision: str, payload: dict[str, Any]) -> None:
        self._require_write()
        commit = self._commit_of(repo, revision)
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = _needs_lfs(f["path"], int(f["size"]), sample)
            existing = commit.tree.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs_oid if lfs else existing.blob_id
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._json(200, {"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, repo: Repo, payload: dict[str, Any]) -> None:
        self._require_write()
        if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
            raise HubError(400, "only sha256 uploads are supported")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "oid is not a sha256"}})
            elif oid in self.state.lfs and len(self.state.lfs[oid]) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no actions, nothing to send
            else:
                actions = {
                    "upload": {"href": f"{self.base}/_lfs/{oid}", "header": {}},
                    "verify": {"href": f"{self.base}/_lfs/verify", "header": {}},
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "the content does not match its sha256")
        with self.state.lock:
            self.state.lfs[oid] = body
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, payload: dict[str, Any]) -> None:
        data = self.state.lfs.get(payload.get("oid", ""))
        if data is None or len(data) != int(payload.get("size", -1)):
            raise HubError(404, "object not found")
        self._json(200, {})

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        self._require_write()
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        with self.state.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            if header.get("parentCommit") and header["parentCommit"] != parent.oid:
                raise HubError(412, "the branch moved since the parent commit")
            tree = dict(parent.tree)
            for line in lines:
                self._apply(tree, line["key"], line["value"])
            commit = self.state.new_commit(
                repo, revision, tree, header.get("summary", ""), header.get("description", "")
            )
        url = f"{self._repo_url(repo)}/commit/{commit.oid}"
        self._json(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _apply(self, tree: dict[str, Entry], key: str, value: dict[str, Any]) -> None:
        if key == "file":
            data = base64.b64decode(value["content"])
            blob = git_blob_id(data)
            self.state.objects[blob] = data
            self.state.regular_bytes[value["path"]] += len(data)
            tree[value["path"]] = Entry(len(data), blob)
        elif key == "lfsFile":
            oid = value["oid"]
            if oid not in self.state.lfs:
                raise HubError(422, f"LFS object {oid} of {value['path']} was never uploaded")
            size = len(self.state.lfs[oid])
            tree[value["path"]] = Entry(size, git_blob_id(lfs_pointer(oid, size)), oid)
        elif key == "deletedFile":
            if value["path"] not in tree:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            del tree[value["path"]]
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in tree if p.startswith(prefix)]:
                del tree[path]
        elif key != "header":
            raise HubError(400, f"unknown commit operation {key!r}")

    # -- download: tree, paths-info, resolve -----------------------------------------------------------------

    def _entries(self, commit: Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{path}/" if path else ""
        files, folders = [], set()
        for p in sorted(commit.tree):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            if recursive or len(rest) == 1:
                files.append(commit.tree[p].to_json(p))
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
        dirs = [self._folder(commit, f) for f in sorted(folders)]
        return sorted(dirs + files, key=lambda e: e["path"])

    @staticmethod
    def _folder(commit: Commit, path: str) -> dict[str, Any]:
        oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}

    def _tree(self, repo: Repo, revision: str, path: str, query: dict[str, list[str]]) -> None:
        commit = self._commit_of(repo, revision)
        path = path.strip("/")
        if path and not any(p.startswith(f"{path}/") for p in commit.tree):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = self._entries(commit, path, recursive)
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + PAGE_SIZE]
        headers = {}
        if start + PAGE_SIZE < len(entries):
            url = urlsplit(self.path)
            params = {k: v[0] for k, v in query.items() if k != "cursor"}
            params["cursor"] = str(start + PAGE_SIZE)
            next_url = f"{self.base}{url.path}?" + "&".join(f"{k}={quote(v)}" for k, v in params.items())
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._json(200, page, headers)

    def _paths_info(self, repo: Repo, revision: str, body: bytes) -> None:
        commit = self._commit_of(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        result = []
        for path in paths:
            path = path.strip("/")
            if path in commit.tree:
                result.append(commit.tree[path].to_json(path))
            elif any(p.startswith(f"{path}/") for p in commit.tree):
                result.append(self._folder(commit, path))
        self._json(200, result)

    def _resolve(self, repo: Repo, revision: str, path: str) -> None:
        commit = self._commit_of(repo, revision)
        entry = commit.tree.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = self.state.content(entry)
        etag = entry.lfs_oid or entry.blob_id
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry.lfs_oid is not None:
            headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)}
        status, body = 200, data
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and data:
            first, last = match.groups()
            start = int(first) if first else max(0, len(data) - int(last))
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status, body = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, body, {"Content-Type": "application/octet-stream", **headers})


@dataclass
class FakeHub:
    url: str
    state: HubState
    server: ThreadingHTTPServer


@contextmanager
def serve_hub(token: str | None = None) -> Iterator[FakeHub]:
    """Run the endpoint on a free port of 127.0.0.1 for the duration of the block."""
    state = HubState(token)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield FakeHub(f"http://127.0.0.1:{server.server_address[1]}", state, server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
