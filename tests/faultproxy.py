"""A fault-injecting HTTP proxy for GCS (emulator) traffic, stdlib only.

The proxy runs in its own process (an in-process proxy can deadlock against pyarrow,
whose GCS calls may hold the GIL while they wait for the network) on loopback, forwards
every request to ``upstream`` and is programmed from the test through ``FaultProxy``,
which talks to it over a control path on the same port (``/__faultproxy__/...``, never
forwarded, never logged).

Rules match a method (None = any) and a regular expression searched in the raw request
target (path *and* query string, still percent-encoded, e.g.
``/upload/storage/v1/b/kd-test/o?uploadType=multipart&name=a%2Fb``); each fires ``times``
times (None = forever) after letting ``skip`` matching requests through. The first
matching non-delay rule decides what happens to a request:

* ``fail(status=503)``: answer with an error (a JSON error body) without forwarding;
* ``reset(after_bytes=None, forward=False)``: abort the connection with a TCP RST and no
  response -- right after the request headers, after ``after_bytes`` bytes of the body,
  or (``forward=True``) after the upstream has processed the whole request (a write that
  happened although the client saw a network error);
* ``drop_body()``: do not forward an upload but answer as GCS does on success (a
  plausible object resource with the right ``size``/``md5Hash``/``crc32c``), i.e. a lost
  write the client believes succeeded. Only requests carrying object data count
  (``uploadType=media|multipart``, resumable-session chunks ``upload_id=...``, XML-API
  ``PUT``); once a resumable session loses a chunk, all its later chunks are swallowed
  too (acknowledged with 308, the last with the object resource), the rule firing once;
* ``corrupt_response(offset=None)``: flip one byte of a 200/206 response body (default:
  media downloads, ``alt=media`` or ``/download/``);
* ``delay(seconds, after_forward=False)``: wait before forwarding (or after the upstream
  answered, before the client gets the answer); delays add up and do not stop other rules.

Every request is logged (``proxy.log`` / ``proxy.requests(...)``) with what was done to
it. The client side speaks HTTP/1.1 keep-alive with ``Content-Length`` or chunked bodies
and ``Expect: 100-continue`` (requests/urllib3 and libcurl both work); each request gets
its own upstream connection.

Standalone: ``python tests/faultproxy.py --upstream http://127.0.0.1:9023 [--port N]
[--port-file F]``.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

CONTROL_PREFIX = "/__faultproxy__/"
_START_TIMEOUT_S = 20.0
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
               "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
               "expect", "content-length"}
KINDS = ("fail", "reset", "drop_body", "delay", "corrupt_response")


# ======================================================================================
# Shared
# ======================================================================================

@dataclass
class Record:
    """One request seen by the proxy."""
    method: str
    target: str  #: raw request target: path?query
    action: str  #: forward | fail | reset | drop_body | corrupt_response | upstream_error
    status: int | None  #: the status the client got (None: no response, connection aborted)
    request_bytes: int = 0  #: body bytes read from the client (de-chunked)
    response_bytes: int = 0  #: body bytes sent to the client
    delayed: float = 0.0  #: seconds of injected delay
    rule: int | None = None  #: id of the rule that decided the action
    chunked: bool = False  #: the request body came with Transfer-Encoding: chunked
    peer: str = ""  #: client address:port (requests on one keep-alive connection share it)
    time: float = 0.0

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


# ======================================================================================
# Client side (the test process)
# ======================================================================================

class Rule:
    """A handle on a rule living in the proxy process; counters are read live."""

    def __init__(self, proxy: FaultProxy, spec: dict):
        self._proxy = proxy
        self.id: int = spec["id"]
        self.kind: str = spec["kind"]
        self.spec = spec

    def _state(self) -> dict:
        for spec in self._proxy._control("GET", "rules"):
            if spec["id"] == self.id:
                return spec
        raise KeyError(f"rule {self.id} no longer exists (proxy.clear()?)")

    @property
    def fired(self) -> int:
        """Times the fault was applied."""
        return self._state()["fired"]

    @property
    def matched(self) -> int:
        """Requests that matched (including the ``skip`` ones let through)."""
        return self._state()["matched"]

    @property
    def exhausted(self) -> bool:
        st = self._state()
        return st["times"] is not None and st["fired"] >= st["times"]

    def remove(self) -> None:
        self._proxy._control("DELETE", f"rules/{self.id}")

    def __repr__(self) -> str:
        return f"Rule({self.spec})"


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a server we started (by its handle, so its pid), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class FaultProxy:
    """Starts and programs a fault-injecting proxy process in front of ``upstream``
    (``http://host:port``). Use as a context manager or call ``start()``/``stop()``;
    the proxy's own output goes to files in ``workdir``."""

    def __init__(self, upstream: str, workdir: str | os.PathLike | None = None, host: str = "127.0.0.1"):
        self.upstream = upstream
        self.host = host
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="faultproxy-"))
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("proxy not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> FaultProxy:
        if self._proc is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        out_path, err_path = self.workdir / "proxy.out", self.workdir / "proxy.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--upstream", self.upstream,
                 "--host", self.host, "--port", "0", "--port-file", str(port_file)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and self._proc.poll() is None:
            if port_file.exists():  # written (by rename) once the socket is bound
                self.port = int(port_file.read_text())
                try:
                    self._control("GET", "ping", timeout=1)
                    return self
                except OSError:
                    pass
            time.sleep(0.02)
        code = self._proc.poll()
        self.stop()
        what = "timed out" if code is None else f"exited with code {code}"
        raise RuntimeError(f"faultproxy did not start ({what}); "
                           f"stderr:\n{err_path.read_text(errors='replace')[-4000:]}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _control(self, method: str, path: str, body: object = None, timeout: float = 10):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, CONTROL_PREFIX + path, body=payload,
                         headers={"Content-Type": "application/json"} if payload else {})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"faultproxy control {method} {path}: {resp.status} {data[:500]!r}")
            return json.loads(data) if data else None
        finally:
            conn.close()

    # ---- rules ---------------------------------------------------------------------
    def _add(self, kind: str, method: str | None, path_regex: str | None, times: int | None, skip: int,
             **params) -> Rule:
        if path_regex is not None:
            re.compile(path_regex)
        spec = self._control("POST", "rules", {"kind": kind, "method": method, "path_regex": path_regex,
                                                "times": times, "skip": skip, "params": params})
        return Rule(self, spec)

    def fail(self, method: str | None = None, path_regex: str | None = None, status: int = 503,
             times: int | None = 1, skip: int = 0, body: str | None = None,
             headers: dict[str, str] | None = None) -> Rule:
        """Answer ``status`` without forwarding (after reading the request body); ``body``
        defaults to a GCS-style JSON error."""
        return self._add("fail", method, path_regex, times, skip, status=status, body=body,
                         headers=dict(headers or {}))

    def reset(self, method: str | None = None, path_regex: str | None = None, times: int | None = 1,
              skip: int = 0, after_bytes: int | None = None, forward: bool = False) -> Rule:
        """Abort the connection (TCP RST, no response): right after the headers
        (``after_bytes=None``), after reading ``after_bytes`` bytes of the body, or after the
        upstream processed the request (``forward=True``)."""
        return self._add("reset", method, path_regex, times, skip, after_bytes=after_bytes, forward=forward)

    def drop_body(self, method: str | None = None, path_regex: str | None = None, times: int | None = 1,
                  skip: int = 0) -> Rule:
        """Swallow an upload and answer success with a plausible object resource."""
        return self._add("drop_body", method, path_regex, times, skip)

    def delay(self, seconds: float, method: str | None = None, path_regex: str | None = None,
              times: int | None = None, skip: int = 0, after_forward: bool = False) -> Rule:
        """Sleep ``seconds`` before forwarding (``after_forward``: before answering)."""
        return self._add("delay", method, path_regex, times, skip, seconds=seconds, after_forward=after_forward)

    def corrupt_response(self, method: str | None = "GET", path_regex: str | None = r"alt=media|^/download/",
                         times: int | None = 1, skip: int = 0, offset: int | None = None) -> Rule:
        """Flip (xor 0xFF) the byte at ``offset`` (default: the middle) of a 200/206 body."""
        return self._add("corrupt_response", method, path_regex, times, skip, offset=offset)

    @property
    def rules(self) -> list[Rule]:
        return [Rule(self, spec) for spec in self._control("GET", "rules")]

    def clear(self) -> None:
        """Remove every rule (the log is kept)."""
        self._control("DELETE", "rules")

    # ---- log -----------------------------------------------------------------------
    @property
    def log(self) -> list[Record]:
        return [Record(**r) for r in self._control("GET", "log")]

    def requests(self, method: str | None = None, path_regex: str | None = None) -> list[Record]:
        """Logged requests with this method and a target matching ``path_regex``."""
        return [r for r in self.log if (method is None or r.method == method.upper())
                and (path_regex is None or re.search(path_regex, r.target))]

    def clear_log(self) -> None:
        self._control("DELETE", "log")


@dataclass
class FaultGCS:
    """What the ``fault_gcs`` fixture yields: the emulator behind a fault proxy."""
    endpoint: str  #: http://127.0.0.1:PORT of the proxy (STORAGE_EMULATOR_HOST during the test)
    proxy: FaultProxy
    bucket: str
    upstream: str  #: the emulator itself, bypassing the proxy

    def client(self, direct: bool = False):
        """A google-cloud-storage client through the proxy (``direct``: to the emulator)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.upstream if direct else self.endpoint})

    def pyarrow_fs(self, direct: bool = False, **kwargs):
        """A new ``pyarrow.fs.GcsFileSystem`` through the proxy (``direct``: to the emulator)."""
        import pyarrow.fs as pafs

        host = urlparse(self.upstream if direct else self.endpoint).netloc
        return pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host, **kwargs)


# ======================================================================================
# Server side (the proxy process)
# ======================================================================================

@dataclass
class _Rule:
    id: int
    kind: str
    method: str | None
    path_regex: str | None
    times: int | None
    skip: int = 0
    params: dict = field(default_factory=dict)
    matched: int = 0
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.path_regex is not None and not re.search(self.path_regex, target):
            return False
        if self.kind == "drop_body" and not _is_data_upload(method, target):
            return False
        return True

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times


_RULE_DEFAULTS = {
    "fail": {"status": 503, "body": None, "headers": {}},
    "reset": {"after_bytes": None, "forward": False},
    "drop_body": {},
    "delay": {"seconds": 0.0, "after_forward": False},
    "corrupt_response": {"offset": None},
}


class _State:
    def __init__(self, upstream: str):
        parsed = urlparse(upstream if "://" in upstream else "http://" + upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.upstream_timeout = 120.0
        self.lock = threading.Lock()
        self.rules: list[_Rule] = []
        self.next_id = 1
        self.log: list[Record] = []
        self.sessions: dict[str, dict] = {}  # resumable upload_id -> {bucket, name, data, dropped}

    def add_rule(self, spec: dict) -> _Rule:
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown rule kind {kind!r}")
        if spec.get("path_regex") is not None:
            re.compile(spec["path_regex"])
        params = {**_RULE_DEFAULTS[kind], **(spec.get("params") or {})}
        with self.lock:
            rule = _Rule(self.next_id, kind, spec.get("method"), spec.get("path_regex"), spec.get("times"),
                         int(spec.get("skip") or 0), params)
            self.next_id += 1
            self.rules.append(rule)
        return rule

    def select(self, method: str, target: str) -> tuple[list[_Rule], _Rule | None]:
        """The delay rules that fire, and the first other rule that fires, for a request.
        A resumable session that lost one chunk to drop_body loses all the rest too
        (under the same rule, which fired once)."""
        delays: list[_Rule] = []
        upload_id = _upload_id(target) if method in ("PUT", "POST") else None
        with self.lock:
            dropped_by = (self.sessions.get(upload_id) or {}).get("dropped") if upload_id else None
            if dropped_by is not None:
                rule = next((r for r in self.rules if r.id == dropped_by), None)
                return [], rule or _Rule(dropped_by, "drop_body", None, None, None)
            for rule in self.rules:
                if rule.exhausted or not rule.matches(method, target):
                    continue
                rule.matched += 1
                if rule.matched <= rule.skip:
                    continue
                rule.fired += 1
                if rule.kind == "delay":
                    delays.append(rule)
                    continue
                return delays, rule
        return delays, None

    def record(self, rec: Record) -> None:
        rec.time = time.time()
        with self.lock:
            self.log.append(rec)

    # resumable sessions, so drop_body can answer with the object's name and checksums
    def remember_session(self, target: str, body: bytes, location: str | None) -> None:
        upload_id = (parse_qs(urlparse(location or "").query).get("upload_id") or [None])[0]
        if not upload_id:
            return
        name = (parse_qs(urlparse(target).query).get("name") or [None])[0]
        if name is None and body:
            try:
                name = json.loads(body).get("name")
            except (ValueError, AttributeError):
                name = None
        with self.lock:
            self.sessions[upload_id] = {"bucket": _bucket_of(target), "name": name, "data": bytearray(),
                                        "dropped": None}

    def session_chunk(self, target: str, content_range: str | None, body: bytes,
                      dropped_by: int | None = None) -> tuple[dict | None, bool]:
        """Record a resumable chunk; returns (session or None, whether it is the last).
        ``dropped_by``: the drop_body rule that swallowed it (the session is lost)."""
        upload_id = _upload_id(target)
        start, total = _parse_content_range(content_range, len(body))
        with self.lock:
            session = self.sessions.get(upload_id)
            if session is None and dropped_by is not None:
                session = self.sessions[upload_id] = {"bucket": _bucket_of(target), "name": None,
                                                      "data": bytearray(), "dropped": None}
            if session is not None and dropped_by is not None:
                session["dropped"] = dropped_by
            if session is not None and start is not None:
                del session["data"][start:]
                session["data"].extend(body)
        final = total is not None and (start or 0) + len(body) >= total
        return session, final


def _upload_id(target: str) -> str | None:
    return (parse_qs(urlparse(target).query).get("upload_id") or [None])[0]


def _is_data_upload(method: str, target: str) -> bool:
    parsed = urlparse(target)
    query = parse_qs(parsed.query)
    if "upload_id" in query:
        return method in ("PUT", "POST")
    if method == "POST" and (query.get("uploadType") or [""])[0] in ("media", "multipart"):
        return True
    # XML API object PUT: /<bucket>/<object>
    return method == "PUT" and not parsed.path.startswith(("/upload/", "/storage/", "/b/", "/batch/"))


def _bucket_of(target: str) -> str | None:
    m = re.search(r"/b/([^/?]+)/o", target)
    if m:
        return unquote(m.group(1))
    parts = urlparse(target).path.split("/")
    return unquote(parts[1]) if len(parts) > 2 else None


def _parse_content_range(value: str | None, body_len: int) -> tuple[int | None, int | None]:
    """(start, total) of a resumable-upload ``Content-Range``; no header = the whole object."""
    if not value:
        return 0, body_len
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+|\*)/(\d+|\*)\s*", value)
    if m:
        return int(m.group(1)), (int(m.group(3)) if m.group(3) != "*" else None)
    m = re.fullmatch(r"\s*bytes\s+\*/(\d+|\*)\s*", value)
    if m:
        return None, (int(m.group(1)) if m.group(1) != "*" else None)
    return None, None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _crc32c_b64(data: bytes) -> str:
    import google_crc32c

    return _b64(google_crc32c.Checksum(data).digest())


def _fake_object(bucket: str | None, name: str | None, content: bytes, content_type: str | None) -> dict:
    gen = str(time.time_ns() // 1000)
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {
        "kind": "storage#object", "id": f"{bucket}/{name}/{gen}", "name": name, "bucket": bucket,
        "generation": gen, "metageneration": "1", "contentType": content_type or "application/octet-stream",
        "timeCreated": now, "updated": now, "storageClass": "STANDARD", "size": str(len(content)),
        "md5Hash": _b64(hashlib.md5(content).digest()), "crc32c": _crc32c_b64(content),
        "etag": _b64(f"{gen}/1".encode()),
    }


class _Abort(Exception):
    """Abort the client connection with an RST, no response."""


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, state: _State):
        self.state = state
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive towards the client
    timeout = 300  # idle keep-alive connections end
    server: _ProxyServer

    def log_message(self, format, *args):  # the proxy keeps its own log
        pass

    def do_GET(self):
        if self.path.startswith(CONTROL_PREFIX):
            self._control()
        else:
            self._proxy()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    # ---- control -------------------------------------------------------------------
    def _control(self) -> None:
        state = self.server.state
        path = self.path[len(CONTROL_PREFIX):].split("?", 1)[0].strip("/")
        try:
            body = self._read_body()
            if path == "ping":
                out: object = {"pid": os.getpid()}
            elif path == "rules" and self.command == "POST":
                out = asdict(state.add_rule(json.loads(body)))
            elif path == "rules" and self.command == "GET":
                with state.lock:
                    out = [asdict(r) for r in state.rules]
            elif path == "rules" and self.command == "DELETE":
                with state.lock:
                    state.rules.clear()
                out = {}
            elif path.startswith("rules/") and self.command == "DELETE":
                rid = int(path.split("/", 1)[1])
                with state.lock:
                    state.rules[:] = [r for r in state.rules if r.id != rid]
                out = {}
            elif path == "log" and self.command == "GET":
                with state.lock:
                    out = [asdict(r) for r in state.log]
            elif path == "log" and self.command == "DELETE":
                with state.lock:
                    state.log.clear()
                out = {}
            else:
                self._send(404, None, [], b"unknown control request")
                return
            self._send(200, None, [("Content-Type", "application/json")], json.dumps(out).encode())
        except (ValueError, TypeError, re.error) as err:
            self._send(400, None, [("Content-Type", "text/plain")], str(err).encode())

    # ---- request body --------------------------------------------------------------
    def _read_body(self, limit: int | None = None) -> bytes:
        """The request body (de-chunked); with ``limit``, at most that many raw bytes."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            if limit is not None:
                return self.rfile.read(limit)
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise _Abort()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(out)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise _Abort()
                out += chunk
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        if limit is not None:
            length = min(length, limit)
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            raise _Abort()
        return data

    # ---- responses -----------------------------------------------------------------
    def _send(self, status: int, reason: str | None, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", next((v for k, v in headers if k.lower() == "content-length"), "0"))
            body = b""
        elif status in (204, 304) or 100 <= status < 200:
            body = b""
        else:
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def _reply(self, rec: Record, status: int, reason: str | None, headers, payload: bytes) -> None:
        rec.status = status
        rec.response_bytes = 0 if self.command == "HEAD" else len(payload)
        self._send(status, reason, headers, payload)

    def _abort(self) -> None:
        """Close with an RST (SO_LINGER 0) and stop serving this connection. The socket is
        closed now; its descriptor goes (sending the RST, never a FIN) when finish()
        releases rfile; the server's later shutdown() of it fails harmlessly."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        state = self.server.state
        conn = http.client.HTTPConnection(state.upstream_host, state.upstream_port, timeout=state.upstream_timeout)
        try:
            # The client's Host header goes through: the emulator builds resumable-session
            # and media URLs from it, so they point back at the proxy.
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP_BY_HOP:
                    conn.putheader(k, v)
            if body or self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            return resp.status, resp.reason, list(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def _proxy(self) -> None:
        state = self.server.state
        method, target = self.command, self.path
        delays, rule = state.select(method, target)
        kind = rule.kind if rule else None
        rec = Record(method, target, "forward", None, rule=rule.id if rule else None,
                     chunked="chunked" in (self.headers.get("Transfer-Encoding") or "").lower(),
                     peer=f"{self.client_address[0]}:{self.client_address[1]}")
        try:
            for d in delays:
                if not d.params["after_forward"]:
                    time.sleep(d.params["seconds"])
                    rec.delayed += d.params["seconds"]
            if kind == "reset" and not rule.params["forward"]:
                rec.action = "reset"
                if rule.params["after_bytes"]:
                    rec.request_bytes = len(self._read_body(limit=rule.params["after_bytes"]))
                raise _Abort()
            body = self._read_body()
            rec.request_bytes = len(body)
            if kind == "fail":
                rec.action = "fail"
                status = int(rule.params["status"])
                payload = rule.params["body"]
                if payload is None:
                    msg = f"faultproxy: injected {status}"
                    payload = json.dumps({"error": {"code": status, "message": msg, "errors": [
                        {"message": msg, "domain": "global", "reason": "backendError"}]}})
                headers = [("Content-Type", "application/json; charset=UTF-8"), *rule.params["headers"].items()]
                self._reply(rec, status, None, headers, payload.encode())
                return
            if kind == "drop_body":
                rec.action = "drop_body"
                status, headers, payload = self._dropped_upload(target, body, rule.id)
                self._reply(rec, status, None, headers, payload)
                return
            try:
                status, reason, headers, payload = self._forward(body)
            except (OSError, http.client.HTTPException) as err:
                rec.action = "upstream_error"
                self._reply(rec, 502, "Bad Gateway", [("Content-Type", "text/plain")],
                            f"faultproxy: upstream error: {err!r}".encode())
                return
            query = parse_qs(urlparse(target).query)
            if method == "POST" and query.get("uploadType") == ["resumable"] and "upload_id" not in query:
                location = next((v for k, v in headers if k.lower() == "location"), None)
                state.remember_session(target, body, location)
            elif "upload_id" in query and method in ("PUT", "POST"):
                state.session_chunk(target, self.headers.get("Content-Range"), body)
            if kind == "reset":  # forward=True: the upstream did the work
                rec.action = "reset"
                raise _Abort()
            if kind == "corrupt_response" and status in (200, 206) and payload:
                rec.action = "corrupt_response"
                buf = bytearray(payload)
                offset = rule.params["offset"]
                buf[len(buf) // 2 if offset is None else min(int(offset), len(buf) - 1)] ^= 0xFF
                payload = bytes(buf)
            for d in delays:
                if d.params["after_forward"]:
                    time.sleep(d.params["seconds"])
                    rec.delayed += d.params["seconds"]
            self._reply(rec, status, reason, headers, payload)
        except _Abort:
            rec.status = None
            self._abort()
        except (OSError, ValueError):  # the client went away
            rec.status = None
            self.close_connection = True
        finally:
            state.record(rec)

    def _dropped_upload(self, target: str, body: bytes, rule_id: int) -> tuple[int, list[tuple[str, str]], bytes]:
        """What GCS would answer had the upload been stored."""
        query = parse_qs(urlparse(target).query)
        upload_type = (query.get("uploadType") or [""])[0]
        content_type = self.headers.get("Content-Type")
        name = (query.get("name") or [None])[0]
        bucket = _bucket_of(target)
        if "upload_id" in query:
            content_range = self.headers.get("Content-Range")
            session, final = self.server.state.session_chunk(target, content_range, body, dropped_by=rule_id)
            if not final:
                start, _ = _parse_content_range(content_range, len(body))
                return 308, [("Range", f"bytes=0-{(start or 0) + len(body) - 1}")], b""
            content = body
            if session is not None:
                bucket, name, content = session["bucket"], name or session["name"], bytes(session["data"])
            content_type = None
        elif upload_type == "multipart":
            msg = email.parser.BytesParser().parsebytes(
                b"Content-Type: " + (content_type or "").encode() + b"\r\n\r\n" + body)
            meta_part, data_part = msg.get_payload()[:2]
            name = name or json.loads(meta_part.get_payload(decode=True) or b"{}").get("name")
            content = data_part.get_payload(decode=True) or b""
            content_type = data_part.get_content_type()
        elif upload_type == "media":
            content = body
        else:  # XML API: PUT /bucket/object
            content = body
            return 200, [("ETag", f'"{hashlib.md5(content).hexdigest()}"'),
                         ("x-goog-hash", f"crc32c={_crc32c_b64(content)},md5={_b64(hashlib.md5(content).digest())}")], b""
        obj = _fake_object(bucket, name, content, content_type)
        return 200, [("Content-Type", "application/json; charset=UTF-8")], json.dumps(obj).encode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--upstream", required=True, help="http://host:port of the GCS (emulator) endpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", help="write the bound port here (atomically) once listening")
    args = parser.parse_args(argv)
    httpd = _ProxyServer((args.host, args.port), _State(args.upstream))
    port = httpd.server_address[1]
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    print(f"faultproxy {args.host}:{port} -> {args.upstream} (pid {os.getpid()})", flush=True)

    def _terminate(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        httpd.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
