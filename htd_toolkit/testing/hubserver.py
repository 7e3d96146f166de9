"""A small Hugging Face Hub-compatible HTTP server for offline tests and demos.

The real `huggingface_hub` and `datasets` clients talk to it over real HTTP (no mocks): repo
creation, the preupload / LFS basic-transfer / commit upload path, repo info, tree and paths-info
listings and `resolve` downloads with Range. Repos live on disk: a content-addressed object store
plus one `meta.json` per repo holding its refs and every commit with a full flat tree, so old
revisions stay readable.

Every path it touches stays under its root: repo ids, repo types, LFS object ids (64 hex digits) and the
paths of committed files (plain relative paths) are checked, and a malformed request is answered 400
with the connection kept, never a dropped connection.

Test switches: a read-only token (writes answer 403), a fault switch (the next N requests to an
endpoint answer 500/503, or wait some seconds first) and an `all_regular` mode (every file uploaded inline,
so clients with Xet left enabled work). No existing package does this offline.

Run standalone: ``python -m htd_toolkit.testing.hubserver ROOT [PORT]`` prints the URL.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import hashlib
import json
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

USER_TOKEN, OTHER_TOKEN, READ_TOKEN = "hf_test_user_write", "hf_test_other_write", "hf_test_user_read"
DEFAULT_TOKENS = {USER_TOKEN: ("user", True), OTHER_TOKEN: ("other", True), READ_TOKEN: ("user", False)}
LFS_PATTERNS = ["*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.gz", "*.h5", "*.jpg", "*.jpeg", "*.npy",
                "*.npz", "*.onnx", "*.parquet", "*.pkl", "*.png", "*.pt", "*.pth", "*.safetensors", "*.tar",
                "*.tiff", "*.webp", "*.zip", "*.zst"]
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
WEB_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The Hub's own rule for a namespace or repo name: no path separators, no "..", no leading dot or dash.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
OID = re.compile(r"[0-9a-f]{64}")  # an LFS object id: the sha256 of its content
# What a handler raises on a request body or header it cannot parse (bad JSON, base64, UTF-8, numbers,
# a missing key, a value of the wrong type): answered 400 as a malformed request.
MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def check_oid(oid) -> str:
    if not isinstance(oid, str) or not OID.fullmatch(oid):
        raise HubError(400, f"Invalid LFS object id {str(oid)[:80]!r}: expected 64 hex digits")
    return oid


def check_file_path(path) -> str:
    """A repo file path as the Hub takes it: relative, '/'-separated, no empty, '.' or '..' segment."""
    parts = path.split("/") if isinstance(path, str) else [""]
    if any(part in ("", ".", "..") or "\\" in part or any(ord(c) < 32 for c in part) for part in parts):
        raise HubError(400, f"Invalid path {str(path)[:80]!r}: not a plain relative path")
    return path


def commit_lines(body: bytes) -> list[tuple[str, dict]]:
    """A commit's NDJSON body as (key, value) pairs; 400 unless every line is {"key": str, "value": {...}}."""
    lines = []
    for text in body.decode().splitlines():
        line = json.loads(text) if text.strip() else None
        if line is None:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("key"), str) or not isinstance(line.get("value"), dict):
            raise HubError(400, 'Malformed commit: every line is {"key": ..., "value": {...}}')
        lines.append((line["key"], line["value"]))
    return lines


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class HubState:
    """Everything on disk plus the test switches. All mutations hold `lock`."""

    root: Path
    tokens: dict[str, tuple[str, bool]] = field(default_factory=lambda: dict(DEFAULT_TOKENS))
    all_regular: bool = False
    faults: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, list[float]] = field(default_factory=dict)
    request_log: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    upload_secret: str = field(default_factory=lambda: secrets.token_hex(8))

    def fail_next(self, endpoint: str, count: int = 1, status: int = 503) -> None:
        """Make the next `count` requests to `endpoint` (e.g. "commit", "preupload") answer `status`."""
        with self.lock:
            self.faults.setdefault(endpoint, []).extend([status] * count)

    def delay_next(self, endpoint: str, seconds: float, count: int = 1) -> None:
        """Make the next `count` requests to `endpoint` wait `seconds` before they are handled (a slow commit
        a test can kill a client in the middle of)."""
        with self.lock:
            self.delays.setdefault(endpoint, []).extend([seconds] * count)

    def take_delay(self, endpoint: str) -> float:
        with self.lock:
            pending = self.delays.get(endpoint)
            return pending.pop(0) if pending else 0.0

    def take_fault(self, endpoint: str) -> int | None:
        with self.lock:
            pending = self.faults.get(endpoint)
            return pending.pop(0) if pending else None

    # --- storage -------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / check_oid(sha256)

    def put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.object_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp" + secrets.token_hex(4))
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def meta_path(self, repo_type: str, repo_id: str) -> Path:
        if repo_type not in WEB_PREFIX:
            raise HubError(400, f"Invalid repo type {str(repo_type)[:40]!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(NAME.fullmatch(p) and ".." not in p and "--" not in p for p in parts):
            raise HubError(400, f"Invalid repo id {repo_id!r}: names are letters, digits, '.', '_' and '-'")
        return self.root / "repos" / repo_type / repo_id / "meta.json"

    def load_meta(self, repo_type: str, repo_id: str) -> dict:
        path = self.meta_path(repo_type, repo_id)
        if not path.exists():
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def save_meta(self, repo_type: str, repo_id: str, meta: dict) -> None:
        path = self.meta_path(repo_type, repo_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(path)

    def tree_entry(self, data: bytes, lfs: bool) -> dict:
        return {"sha256": self.put_object(data), "size": len(data), "lfs": lfs, "git_oid": git_blob_sha1(data)}

    def add_commit(self, meta: dict, branch: str, tree: dict, title: str, author: str) -> str:
        parent = meta["refs"].get(branch)
        payload = json.dumps([parent, sorted(tree.items()), title, _now(), secrets.token_hex(4)])
        sha = hashlib.sha1(payload.encode()).hexdigest()
        meta["commits"][sha] = {"parent": parent, "title": title, "date": _now(), "author": author, "tree": tree}
        meta["refs"][branch] = sha
        meta["lastModified"] = meta["commits"][sha]["date"]
        return sha

    @staticmethod
    def resolve(meta: dict, rev: str) -> str:
        if rev in meta["refs"]:
            return meta["refs"][rev]
        if rev in meta["commits"]:
            return rev
        matches = [sha for sha in meta["commits"] if len(rev) >= 7 and sha.startswith(rev)]
        if len(matches) == 1:
            return matches[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def is_lfs(self, tree: dict, path: str, size: int, sample: bytes) -> bool:
        if self.all_regular:
            return False
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample:
            return True
        patterns = list(LFS_PATTERNS)
        attrs = tree.get(".gitattributes")
        if attrs:
            text = self.object_path(attrs["sha256"]).read_text(errors="replace")
            patterns = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format: str, *args) -> None:  # quiet: tests read `state.request_log`
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base_url(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    # --- plumbing ------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, err: HubError, head: bool = False, extra: dict | None = None) -> None:
        header = err.message.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")
        headers = {"Content-Type": "application/json", "X-Error-Message": header, **(extra or {})}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send(err.status, json.dumps({"error": err.message, "url": getattr(err, "url", None)}).encode(),
                   headers, head=head)

    def _user(self) -> tuple[str | None, bool]:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None, False
        token = auth[len("Bearer "):].strip()
        if token not in self.state.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.state.tokens[token]

    def _check_read(self, meta: dict, repo_id: str) -> None:
        if not meta.get("private"):
            return
        user, _ = self._user()
        if user is None:
            raise HubError(401, f"Repository {repo_id} not found", "RepoNotFound")
        if user != repo_id.split("/")[0]:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")

    def _check_write(self, repo_id: str) -> str:
        user, can_write = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write")
        if user != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        if not can_write:
            raise HubError(403, "This token is read-only: it cannot write to the Hub")
        return user

    # --- routing -------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        head = method == "HEAD"
        try:
            self._handle(method, head)
        except HubError as err:
            self._error(err, head=head, extra=getattr(err, "headers", None))
        except MALFORMED as err:
            self._error(HubError(400, f"Malformed request ({type(err).__name__}: {err})"), head=head)

    def _handle(self, method: str, head: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = self._route(method, parts)
        with self.state.lock:
            self.state.request_log.append((method, url.path))
        try:
            body = self._body() if method in ("POST", "PUT") else b""
        except ValueError:  # a bad Content-Length or chunk size: the rest of the stream cannot be framed
            self.close_connection = True
            raise
        if route is None:
            raise HubError(404, f"No route for {method} {url.path}")
        name, handler, args = route
        time.sleep(self.state.take_delay(name))
        fault = self.state.take_fault(name)
        if fault is not None:
            raise HubError(fault, f"Injected fault on {name}")
        handler(*args, query=query, body=body, head=head)

    def _route(self, method: str, parts: list[str]):
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"] and method == "POST":
            return "create", self.create_repo, ()
        if parts == ["api", "validate-yaml"]:
            return "validate-yaml", self.validate_yaml, ()
        if parts == ["api", "whoami-v2"]:
            return "whoami", self.whoami, ()
        if parts == ["_test", "fault"] and method == "POST":
            return "_test", self.set_fault, ()
        if parts and parts[0] == "lfs-upload" and method == "PUT" and len(parts) == 3:
            return "lfs-upload", self.lfs_upload, (parts[1], parts[2])
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            if not rest and method == "GET":
                return "info", self.repo_info, (repo_type, repo_id, "main")
            action = rest[0] if rest else ""
            if action in ("preupload", "commit", "tree", "paths-info") and len(rest) < 2:
                return None
            if action == "revision" and len(rest) >= 2 and method == "GET":
                return "info", self.repo_info, (repo_type, repo_id, rest[1])
            if action == "preupload" and method == "POST":
                return "preupload", self.preupload, (repo_type, repo_id, rest[1])
            if action == "commit" and method == "POST":
                return "commit", self.commit, (repo_type, repo_id, rest[1])
            if action == "tree" and method == "GET":
                return "tree", self.tree, (repo_type, repo_id, rest[1], "/".join(rest[2:]))
            if action == "paths-info" and method == "POST":
                return "paths-info", self.paths_info, (repo_type, repo_id, rest[1])
            if rest == ["settings"] and method == "PUT":
                return "settings", self.repo_settings, (repo_type, repo_id)
            return None
        # web routes: /{pfx}{ns}/{name}.git/info/lfs/objects/batch and /{pfx}{ns}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return "lfs-batch", self.lfs_batch, (repo_type, f"{parts[0]}/{parts[1][:-4]}")
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return "resolve", self.resolve_file, (repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return None

    # --- endpoints -----------------------------------------------------------------------
    def whoami(self, **_) -> None:
        user, can_write = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        role = "write" if can_write else "read"
        self._json(200, {"type": "user", "name": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})

    def set_fault(self, body: bytes, **_) -> None:
        if self._user()[0] is None:
            raise HubError(401, "The fault switch needs a token")
        spec = json.loads(body)
        if "delay" in spec:
            self.state.delay_next(spec["endpoint"], float(spec["delay"]), int(spec.get("count", 1)))
        else:
            self.state.fail_next(spec["endpoint"], int(spec.get("count", 1)), int(spec.get("status", 503)))
        self._json(200, {"ok": True})

    def validate_yaml(self, **_) -> None:
        self._json(200, {"errors": [], "warnings": []})

    def create_repo(self, body: bytes, **_) -> None:
        spec = json.loads(body or b"{}")
        user, _ = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_type = spec.get("type") or "model"
        repo_id = f"{spec.get('organization') or user}/{spec['name']}"
        meta_path = self.state.meta_path(repo_type, repo_id)
        url = f"{self.base_url}/{WEB_PREFIX[repo_type]}{repo_id}"
        self._check_write(repo_id)
        with self.state.lock:
            if meta_path.exists():
                err = HubError(409, "You already created this repo")
                err.url = url
                raise err
            private = spec.get("private", spec.get("visibility") == "private")
            meta = {"private": bool(private), "refs": {}, "commits": {}, "createdAt": _now(), "author": user}
            attrs = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
            tree = {".gitattributes": self.state.tree_entry(attrs, lfs=False)}
            self.state.add_commit(meta, "main", tree, "initial commit", user)
            self.state.save_meta(repo_type, repo_id, meta)
        self._json(200, {"url": url, "name": repo_id})

    def repo_settings(self, repo_type: str, repo_id: str, body: bytes, **_) -> None:
        """`update_repo_settings`: the visibility ("visibility": public/private, or "private": bool)."""
        self._check_write(repo_id)
        spec = json.loads(body or b"{}")
        visibility = spec.get("visibility", {True: "private", False: "public"}.get(spec.get("private")))
        if visibility not in ("public", "private", None):
            raise HubError(400, f"Invalid visibility {str(visibility)[:40]!r}: public or private")
        with self.state.lock:
            meta = self.state.load_meta(repo_type, repo_id)
            if visibility is not None:
                meta["private"] = visibility == "private"
            self.state.save_meta(repo_type, repo_id, meta)
        self._json(200, {})

    def _tree_at(self, repo_type: str, repo_id: str, rev: str) -> tuple[dict, str, dict]:
        meta = self.state.load_meta(repo_type, repo_id)
        self._check_read(meta, repo_id)
        sha = self.state.resolve(meta, rev)
        return meta, sha, meta["commits"][sha]["tree"]

    @staticmethod
    def _file_item(path: str, entry: dict) -> dict:
        item = {"type": "file", "oid": entry["git_oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": 134}
        return item

    def repo_info(self, repo_type: str, repo_id: str, rev: str, **_) -> None:
        meta, sha, tree = self._tree_at(repo_type, repo_id, rev)
        siblings = []
        for path, entry in sorted(tree.items()):
            sibling = {"rfilename": path, "size": entry["size"], "blobId": entry["git_oid"]}
            if entry["lfs"]:
                sibling["lfs"] = {"sha256": entry["sha256"], "size": entry["size"], "pointerSize": 134}
            siblings.append(sibling)
        info = {"id": repo_id, "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "sha": sha,
                "private": meta["private"], "author": repo_id.split("/")[0], "gated": False, "disabled": False,
                "createdAt": meta["createdAt"], "lastModified": meta["commits"][sha]["date"], "tags": [],
                "downloads": 0, "likes": 0, "siblings": siblings}
        if repo_type == "model":
            info["modelId"] = repo_id
        self._json(200, info)

    def tree(self, repo_type: str, repo_id: str, rev: str, path: str, query: dict, **_) -> None:
        _, _, tree = self._tree_at(repo_type, repo_id, rev)
        recursive = query.get("recursive", "false").lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        items, dirs = [], set()
        for file_path, entry in sorted(tree.items()):
            if not file_path.startswith(prefix):
                continue
            rel = file_path[len(prefix):].split("/")
            if len(rel) == 1 or recursive:
                items.append(self._file_item(file_path, entry))
            for depth in range(1, len(rel) if recursive else min(2, len(rel))):
                dirs.add(prefix + "/".join(rel[:depth]))
        items += [{"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d} for d in sorted(dirs)]
        self._json(200, items)

    def paths_info(self, repo_type: str, repo_id: str, rev: str, body: bytes, **_) -> None:
        _, _, tree = self._tree_at(repo_type, repo_id, rev)
        paths = parse_qs(body.decode()).get("paths", [])
        items = []
        for path in paths:
            path = path.strip("/")
            if path in tree:
                items.append(self._file_item(path, tree[path]))
            elif any(p.startswith(path + "/") for p in tree):
                items.append({"type": "directory", "oid": git_blob_sha1(path.encode()), "size": 0, "path": path})
        self._json(200, items)

    def resolve_file(self, repo_type: str, repo_id: str, rev: str, path: str, head: bool, **_) -> None:
        _, sha, tree = self._tree_at(repo_type, repo_id, rev)
        if path not in tree:
            err = HubError(404, f"Entry not found: {path}", "EntryNotFound")
            err.headers = {"X-Repo-Commit": sha}
            raise err
        entry = tree[path]
        data = self.state.object_path(entry["sha256"]).read_bytes()
        etag = entry["sha256"] if entry["lfs"] else entry["git_oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
        status, range_header = 200, self.headers.get("Range")
        if range_header and range_header.startswith("bytes="):
            start_s, _, end_s = range_header[len("bytes="):].partition("-")
            start = int(start_s) if start_s else max(0, len(data) - int(end_s))
            end = int(end_s) if start_s and end_s else len(data) - 1
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head=head)
                return
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, head=head)

    def preupload(self, repo_type: str, repo_id: str, rev: str, body: bytes, **_) -> None:
        self._check_write(repo_id)
        meta = self.state.load_meta(repo_type, repo_id)
        tree = meta["commits"][self.state.resolve(meta, rev)]["tree"]
        answers = []
        for spec in json.loads(body)["files"]:
            sample = base64.b64decode(spec.get("sample", ""), validate=True)
            lfs = self.state.is_lfs(tree, check_file_path(spec["path"]), int(spec.get("size", 0)), sample)
            remote = tree.get(spec["path"])
            oid = None
            if remote is not None and remote["lfs"] == lfs:
                oid = remote["sha256"] if lfs else remote["git_oid"]
            answers.append({"path": spec["path"], "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": answers})

    def lfs_batch(self, repo_type: str, repo_id: str, body: bytes, **_) -> None:
        self._check_write(repo_id)
        self.state.load_meta(repo_type, repo_id)
        objects = []
        for obj in json.loads(body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"]}
            if not self.state.object_path(obj["oid"]).exists():
                href = f"{self.base_url}/lfs-upload/{self.state.upload_secret}/{obj['oid']}"
                answer["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(answer)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, secret: str, oid: str, body: bytes, **_) -> None:
        if secret != self.state.upload_secret:
            raise HubError(403, "Bad upload URL")
        check_oid(oid)
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"sha256 mismatch for LFS object {oid}")
        self.state.put_object(body)
        self._send(200)

    def commit(self, repo_type: str, repo_id: str, rev: str, body: bytes, **_) -> None:
        user = self._check_write(repo_id)
        lines = commit_lines(body)
        with self.state.lock:
            meta = self.state.load_meta(repo_type, repo_id)
            if rev not in meta["refs"]:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head_sha = meta["refs"][rev]
            tree = dict(meta["commits"][head_sha]["tree"])
            title = "commit"
            for key, value in lines:
                if key == "header":
                    title = value.get("summary") or title
                    parent = value.get("parentCommit")
                    if parent and not head_sha.startswith(parent):
                        raise HubError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    data = base64.b64decode(value["content"], validate=True)
                    tree[check_file_path(value["path"])] = self.state.tree_entry(data, lfs=False)
                elif key == "lfsFile":
                    obj = self.state.object_path(value["oid"])
                    if not obj.exists():
                        raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                    data = obj.read_bytes()
                    tree[check_file_path(value["path"])] = {"sha256": value["oid"], "size": len(data), "lfs": True,
                                           "git_oid": git_blob_sha1(data)}
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise HubError(404, f"{value['path']} does not exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = check_file_path(value["path"].rstrip("/")) + "/"
                    tree = {p: e for p, e in tree.items() if not p.startswith(folder)}
            sha = self.state.add_commit(meta, rev, tree, title, user)
            self.state.save_meta(repo_type, repo_id, meta)
        commit_url = f"{self.base_url}/{WEB_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._json(200, {"commitOid": sha, "commitUrl": commit_url, "pullRequestUrl": None})


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), HubHandler)
        self.state = state

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def serve(root: str | Path, port: int = 0, tokens: dict[str, tuple[str, bool]] | None = None) -> HubServer:
    """Start a server on 127.0.0.1 in a daemon thread; stop it with `server.shutdown()`."""
    state = HubState(Path(root), **({"tokens": tokens} if tokens else {}))
    server = HubServer(state, port=port)
    threading.Thread(target=server.serve_forever, daemon=True, name="hub-test-server").start()
    return server


def point_clients_at(url: str) -> None:
    """Point already-imported huggingface_hub and datasets at `url` (they read HF_ENDPOINT at import)."""
    from huggingface_hub import constants

    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_URL_HOSTS = frozenset({*constants.HF_URL_HOSTS, urlsplit(url).hostname})
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_ENDPOINT = url
        datasets.config.HUB_DATASETS_URL = url + "/datasets/{repo_id}/resolve/{revision}/{path}"
        datasets.config.USE_PARQUET_EXPORT = False


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit("usage: python -m htd_toolkit.testing.hubserver ROOT [PORT]")
    server = serve(args[0], int(args[1]) if len(args) > 1 else 0)
    print(server.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
