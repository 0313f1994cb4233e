"""gcp-storage-emulator with the write semantics of real GCS.

The stock emulator ignores every request precondition (``ifGenerationMatch=0`` happily
overwrites an existing object), stamps resumable uploads with the generation of the moment
the session was *opened*, reports ``metageneration: "2"`` for fresh uploads that carry
metadata, an integer ``size`` and an ``md5Hash`` for composed objects, and serves any
``generation=`` a reader asks for. This module starts the same emulator with those paths
patched so tests exercise what production will see:

* preconditions, checked under one lock together with the write they guard:
  ``ifGenerationMatch`` (``0`` = only if absent), ``ifGenerationNotMatch``
  (``0`` = only if present), ``ifMetagenerationMatch``, ``ifMetagenerationNotMatch``
  (query parameters, or ``x-goog-if-*`` headers on XML-API uploads) on simple, multipart
  and resumable uploads (a resumable upload's preconditions are evaluated when it
  completes, as GCS does), copy/rewrite (plus ``ifSource*``/``sourceGeneration``),
  compose (plus per-source ``generation``/``objectPreconditions``), delete, metadata
  patch, and reads (412, or 304 for the ``NotMatch`` ones on reads, as GCS answers);
* a ``generation=`` that is not the live one answers 404 (no object versioning);
* every object write gets a fresh generation, strictly greater than any before it, and
  metadata recomputed from the stored bytes: ``size`` (string), ``md5Hash``, ``crc32c``,
  ``metageneration: "1"``; composed objects have ``componentCount`` and no ``md5Hash``;
* downloads carry ``x-goog-hash`` (without ``md5`` for composite objects, which crashed
  the stock handler) and ``x-goog-generation``/``x-goog-metageneration``/
  ``x-goog-stored-content-length`` headers;
* requests are served concurrently (one thread each) while every handler runs under one
  lock after its request body is read, so check-and-write is atomic.

Run it like the emulator (same CLI)::

    python tests/gcs_strict.py start --host 127.0.0.1 --port 9023 --in-memory --default-bucket B
    python -m tests.gcs_strict start ...            # from the repository root

Not covered: preconditions inside batch requests (``/batch/storage/v1``).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from functools import partial
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import google_crc32c
from gcp_storage_emulator import __main__ as emu_main
from gcp_storage_emulator import server as emu_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage

logger = logging.getLogger("gcs_strict")

#: Serializes every handler (after its body is read) so a precondition check and the write
#: it guards are one atomic step. Re-entrant: handlers call each other.
LOCK = threading.RLock()
_ctx = threading.local()
_last_generation = 0
#: upload_id -> preconditions given when the resumable session was opened.
_resumable_preconditions: dict[str, dict[str, int]] = {}

_WRITE_PRECONDITIONS = {
    # query parameter: XML-API header
    "ifGenerationMatch": "x-goog-if-generation-match",
    "ifGenerationNotMatch": "x-goog-if-generation-not-match",
    "ifMetagenerationMatch": "x-goog-if-metageneration-match",
    "ifMetagenerationNotMatch": "x-goog-if-metageneration-not-match",
}
_SOURCE_PRECONDITIONS = {
    "ifSourceGenerationMatch": "ifGenerationMatch",
    "ifSourceGenerationNotMatch": "ifGenerationNotMatch",
    "ifSourceMetagenerationMatch": "ifMetagenerationMatch",
    "ifSourceMetagenerationNotMatch": "ifMetagenerationNotMatch",
}


class _BadPrecondition(ValueError):
    pass


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------

def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def crc32c_b64(data: bytes) -> str:
    """``crc32c`` as GCS reports it: base64 of the big-endian CRC32C."""
    return _b64(google_crc32c.Checksum(bytes(data)).digest())


def md5_b64(data: bytes) -> str:
    """``md5Hash`` as GCS reports it: base64 of the MD5 digest."""
    return _b64(hashlib.md5(bytes(data)).digest())


def _next_generation(current: int) -> int:
    """Microseconds since the epoch like real GCS, but strictly increasing."""
    global _last_generation
    gen = max(time.time_ns() // 1000, _last_generation + 1, current + 1)
    _last_generation = gen
    return gen


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_orig_create_file = Storage.create_file


def _create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
    """Every object write: a new generation and metadata derived from the stored bytes.

    ``file_obj`` is updated in place because the handlers answer with that same dict."""
    with LOCK:
        current = self.objects.get(bucket_name, {}).get(file_name)
        gen = _next_generation(int(current["generation"]) if current else 0)
        content = bytes(content or b"")
        now = _now()
        file_obj.update({
            "name": file_name,
            "bucket": bucket_name,
            "generation": str(gen),
            "metageneration": "1",
            "id": f"{bucket_name}/{file_name}/{gen}",
            "size": str(len(content)),
            "crc32c": crc32c_b64(content),
            "md5Hash": md5_b64(content),
            "etag": _b64(f"{gen}/1".encode()),
            "timeCreated": now,
            "updated": now,
            "timeStorageClassUpdated": now,
        })
        for key in ("softDeleteTime", "hardDeleteTime", "componentCount"):
            file_obj.pop(key, None)
        components = getattr(_ctx, "component_count", None)
        if components is not None:  # composite objects have no MD5 on GCS
            file_obj.pop("md5Hash", None)
            file_obj["componentCount"] = components
        if isinstance(file_obj.get("mediaLink"), str):
            file_obj["mediaLink"] = re.sub(r"generation=\d+", f"generation={gen}", file_obj["mediaLink"])
        return _orig_create_file(self, bucket_name, file_name, content, file_obj, file_id)


# --------------------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------------------

def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _BadPrecondition(f"Invalid value for {name}: {value!r}") from None


def _write_preconditions(request) -> dict[str, int]:
    out = {}
    for name, header in _WRITE_PRECONDITIONS.items():
        if request.query.get(name):
            out[name] = _int(request.query[name][0], name)
        elif request.get_header(header) is not None:
            out[name] = _int(request.get_header(header), header)
    return out


def _source_preconditions(request) -> dict[str, int]:
    return {target: _int(request.query[name][0], name)
            for name, target in _SOURCE_PRECONDITIONS.items() if request.query.get(name)}


def _failed_precondition(pre: dict[str, int], current: dict | None) -> str | None:
    """The first precondition in ``pre`` that does not hold for ``current`` (the live
    object resource, or None when absent), or None when all hold."""
    gen = int(current["generation"]) if current else None
    meta = int(current["metageneration"]) if current else None
    if "ifGenerationMatch" in pre:
        want = pre["ifGenerationMatch"]
        if (want == 0 and current is not None) or (want != 0 and gen != want):
            return "ifGenerationMatch"
    if "ifGenerationNotMatch" in pre:
        want = pre["ifGenerationNotMatch"]
        if (want == 0 and current is None) or (want != 0 and gen == want):
            return "ifGenerationNotMatch"
    if "ifMetagenerationMatch" in pre and (current is None or meta != pre["ifMetagenerationMatch"]):
        return "ifMetagenerationMatch"
    if "ifMetagenerationNotMatch" in pre and current is not None and meta == pre["ifMetagenerationNotMatch"]:
        return "ifMetagenerationNotMatch"
    return None


def _error(response, status: HTTPStatus, reason: str, message: str) -> None:
    response.status = status
    response.json({"error": {"code": status.value, "message": message, "errors": [
        {"message": message, "domain": "global", "reason": reason}]}})


def _precondition_failed(response, which: str) -> None:
    _error(response, HTTPStatus.PRECONDITION_FAILED, "conditionNotMet",
           f"At least one of the pre-conditions you specified did not hold. ({which})")


def _not_found(response, bucket: str, name: str) -> None:
    _error(response, HTTPStatus.NOT_FOUND, "notFound", f"No such object: {bucket}/{name}")


def _live(storage, bucket: str, name: str) -> dict | None:
    return storage.objects.get(bucket, {}).get(name)


def _check_write(response, storage, bucket: str, name: str | None, pre: dict[str, int]) -> bool:
    if not pre or name is None:
        return True
    which = _failed_precondition(pre, _live(storage, bucket, name))
    if which:
        _precondition_failed(response, which)
        return False
    return True


def _check_existing(request, response, storage, bucket: str, name: str, *, read: bool) -> bool:
    """Reads, deletes and patches of a live object: absent -> let the emulator answer 404;
    ``generation=`` other than the live one -> 404; failed precondition -> 412 (304 for
    the NotMatch ones on reads)."""
    current = _live(storage, bucket, name)
    if current is None:
        return True
    if request.query.get("generation"):
        if _int(request.query["generation"][0], "generation") != int(current["generation"]):
            _not_found(response, bucket, name)
            return False
    which = _failed_precondition(_write_preconditions(request), current)
    if which is None:
        return True
    if read and which in ("ifGenerationNotMatch", "ifMetagenerationNotMatch"):
        response.status = HTTPStatus.NOT_MODIFIED
    else:
        _precondition_failed(response, which)
    return False


# Per-route checks: return False after writing the error response to stop the handler.

def _check_insert(request, response, storage) -> bool:
    upload_type = (request.query.get("uploadType") or [""])[0]
    bucket = request.params["bucket_name"]
    if upload_type == "media":
        name = (request.query.get("name") or [None])[0]
    elif upload_type == "multipart" and isinstance(request.data, dict):
        name = (request.query.get("name") or [request.data.get("meta", {}).get("name")])[0]
    else:  # resumable: evaluated when the upload completes (_finalize_resumable_object)
        return True
    return _check_write(response, storage, bucket, name, _write_preconditions(request))


def _check_xml_upload(request, response, storage) -> bool:
    return _check_write(response, storage, request.params["bucket_name"], request.params["object_id"],
                        _write_preconditions(request))


def _check_read(request, response, storage) -> bool:
    if request.query.get("softDeleted"):
        return True
    return _check_existing(request, response, storage, request.params["bucket_name"],
                           request.params["object_id"], read=True)


def _check_modify(request, response, storage) -> bool:
    return _check_existing(request, response, storage, request.params["bucket_name"],
                           request.params["object_id"], read=False)


def _check_copy(request, response, storage) -> bool:
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    source = _live(storage, bucket, name)
    if source is None:
        return True  # the emulator answers 404
    if request.query.get("sourceGeneration"):
        if _int(request.query["sourceGeneration"][0], "sourceGeneration") != int(source["generation"]):
            _not_found(response, bucket, name)
            return False
    which = _failed_precondition(_source_preconditions(request), source)
    if which:
        _precondition_failed(response, which.replace("if", "ifSource", 1))
        return False
    return _check_write(response, storage, request.params["dest_bucket_name"],
                        request.params["dest_object_id"], _write_preconditions(request))


def _check_compose(request, response, storage) -> bool:
    bucket = request.params["bucket_name"]
    sources = (request.data or {}).get("sourceObjects") or []
    for src in sources:
        current = _live(storage, bucket, src.get("name"))
        if current is None:
            _not_found(response, bucket, src.get("name"))
            return False
        pre = {}
        if src.get("generation") is not None:
            if _int(src["generation"], "generation") != int(current["generation"]):
                _not_found(response, bucket, src["name"])
                return False
        want = (src.get("objectPreconditions") or {}).get("ifGenerationMatch")
        if want is not None:
            pre["ifGenerationMatch"] = _int(want, "ifGenerationMatch")
        which = _failed_precondition(pre, current)
        if which:
            _precondition_failed(response, f"sourceObjects[{src['name']}].{which}")
            return False
    _ctx.component_count = sum(int(_live(storage, bucket, s["name"]).get("componentCount", 1))
                               for s in sources)
    return _check_write(response, storage, bucket, request.params["object_id"],
                        _write_preconditions(request))


def _after_resumable_start(request, response, storage) -> None:
    """Remember a resumable session's preconditions until it completes."""
    if "upload_id" in request.query or (request.query.get("uploadType") or [""])[0] != "resumable":
        return
    try:
        location = response["Location"]
    except KeyError:
        return
    upload_id = (parse_qs(urlparse(location).query).get("upload_id") or [None])[0]
    if upload_id:
        _resumable_preconditions[upload_id] = _write_preconditions(request)


def _download(request, response, storage, *args, **kwargs):
    """The emulator's media download, answering like GCS: ``x-goog-hash`` on every
    answer (ranged ones too; clients skip checking those) and without ``md5`` for
    composite objects (the emulator's own crashes on them), plus ``x-goog-generation``,
    ``x-goog-metageneration`` and ``x-goog-stored-content-length``."""
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    obj = _live(storage, bucket, name)
    try:
        data = storage.get_file(bucket, name)
    except NotFound:
        obj = None
    if obj is None:
        _not_found(response, bucket, name)
        return
    hashes = [f"crc32c={obj['crc32c']}"] + ([f"md5={obj['md5Hash']}"] if obj.get("md5Hash") else [])
    response["X-Goog-Hash"] = ",".join(hashes)
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]
    response["x-goog-stored-content-length"] = str(len(data))
    response["x-goog-stored-content-encoding"] = obj.get("contentEncoding") or "identity"
    match = re.fullmatch(r"\s*bytes=(?P<start>[0-9]+)-(?P<end>[0-9]*)", request.get_header("range") or "")
    if match:  # as the emulator does
        size = len(data)
        start = int(match["start"])
        end = min(size, int(match["end"]) + 1) if match["end"] else size
        data = data[start:end]
        response["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response.status = HTTPStatus.PARTIAL_CONTENT
    if "response-content-disposition" in request.query:
        response["Content-Disposition"] = request.query["response-content-disposition"][0]
    for key, value in (obj.get("metadata") or {}).items():
        if value is not None:
            response[f"x-goog-meta-{key}"] = str(value)
    response.write_file(data, content_type=obj.get("contentType"))


_orig_finalize_resumable = objects._finalize_resumable_object


def _finalize_resumable_object(response, storage, obj, data, upload_id):
    """The last byte of a resumable upload arrived: evaluate its preconditions now."""
    with LOCK:
        pre = _resumable_preconditions.get(upload_id)
        if pre is None:
            request = getattr(_ctx, "request", None)
            pre = _write_preconditions(request) if request is not None else {}
        if not _check_write(response, storage, obj["bucket"], obj["name"], pre):
            return None
        _resumable_preconditions.pop(upload_id, None)
        return _orig_finalize_resumable(response, storage, obj, data, upload_id)


# --------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------

def _locked(handler, check=None, after=None):
    def wrapped(request, response, storage, *args, **kwargs):
        request.data  # noqa: B018 -- read the body outside the lock (slow clients)
        with LOCK:
            _ctx.request = request
            _ctx.component_count = None
            try:
                if check is not None and not check(request, response, storage):
                    return None
                result = handler(request, response, storage, *args, **kwargs)
                if after is not None:
                    after(request, response, storage)
                return result
            except _BadPrecondition as err:
                _error(response, HTTPStatus.BAD_REQUEST, "invalid", str(err))
                return None
            finally:
                _ctx.request = None
                _ctx.component_count = None

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    wrapped.__wrapped__ = handler
    return wrapped


def _read_raw_data(request_handler):
    """The emulator's body reader, without its quadratic chunk concatenation."""
    length = request_handler.headers.get("Content-Length")
    if length:
        return request_handler.rfile.read(int(length))
    if (request_handler.headers.get("Transfer-Encoding") or "").lower() == "chunked":
        out = bytearray()
        while True:
            line = request_handler.rfile.readline().strip().split(b";", 1)[0]
            size = int(line, 16) if line else 0
            if size == 0:
                while request_handler.rfile.readline().strip():  # trailers
                    pass
                return bytes(out)
            out += request_handler.rfile.read(size)
            request_handler.rfile.readline()
    return None


_installed = False


def install() -> None:
    """Patch the emulator in this process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    Storage.create_file = _create_file
    objects._finalize_resumable_object = _finalize_resumable_object
    emu_server._read_raw_data = _read_raw_data
    checks = {
        objects.insert: (_check_insert, _after_resumable_start),
        objects.xml_upload: (_check_xml_upload, None),
        objects.get: (_check_read, None),
        objects.download: (_check_read, None),
        objects.delete: (_check_modify, None),
        objects.patch: (_check_modify, None),
        objects.copy: (_check_copy, None),
        objects.rewrite: (_check_copy, None),
        objects.compose: (_check_compose, None),
    }
    wrapped: dict = {}

    def wrap(fn):
        if fn not in wrapped:
            check, after = checks.get(fn, (None, None))
            wrapped[fn] = _locked(_download if fn is objects.download else fn, check, after)
        return wrapped[fn]

    emu_server.HANDLERS = tuple(
        (regex, {method: wrap(fn) for method, fn in routes.items()})
        for regex, routes in emu_server.HANDLERS)
    # The router's fallback for uploads POSTed without the /upload prefix.
    objects.insert = wrap(objects.insert)
    # objects.get (alt=media) calls the module's download: already checked and locked.
    objects.download = _download


class StrictServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def make_server(host: str, port: int, *, in_memory: bool = True, default_bucket: str | None = None,
                data_dir: str | None = None, project_number: str | None = None) -> StrictServer:
    """A bound (not yet serving) strict emulator; call ``serve_forever()``."""
    install()
    storage = Storage(use_memory_fs=in_memory, data_dir=data_dir, project_number=project_number)
    if default_bucket:
        buckets.create_bucket(default_bucket, storage)
    return StrictServer((host, port), partial(emu_server.RequestHandler, storage))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, _ = emu_main.prepare_args_parser()
    args = parser.parse_args(argv)
    if args.subcommand != "start":
        return emu_main.main(argv)
    root = logging.getLogger("")
    root.addHandler(logging.StreamHandler())
    root.setLevel(logging.CRITICAL if args.quiet else logging.DEBUG)
    httpd = make_server(args.host, args.port, in_memory=args.no_store_on_disk,
                        default_bucket=args.default_bucket, data_dir=args.data_dir,
                        project_number=args.project_number)

    def _terminate(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    logger.info("strict GCS emulator serving on %s:%s", *httpd.server_address[:2])
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
