"""One storage layer for local paths, file://, gs:// and memory:// URLs.

Every stage names its inputs and outputs as URLs and goes through here, so the same
code runs on a laptop and on a cluster writing to GCS. Files that other processes read
are published atomically: a temp file renamed into place on local disks, a single-object
upload on GCS (an object is either fully there or not), so a crash never leaves a
half-written file visible. Transient network errors are retried with backoff.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, TypeVar

import fsspec

from gemmascope.errors import UserError
from gemmascope.faults import crash_point

T = TypeVar("T")
log = logging.getLogger("gemmascope.storage")

_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


def scheme(url: str) -> str:
    """'gs', 'memory' or 'file' (local paths and file:// URLs)."""
    head, sep, _ = url.partition("://")
    if not sep:
        return "file"
    if head in ("gs", "gcs"):
        return "gs"
    if head in ("file", "memory"):
        return head
    raise UserError(f"{url}: unsupported URL scheme {head!r} (use a path, file://, gs:// or memory://)")


def normalize(url: str) -> str:
    """Absolute local paths (workers may run elsewhere), `gs://` for GCS, others unchanged."""
    kind = scheme(url)
    if kind == "file":
        path = url[len("file://"):] if url.startswith("file://") else url
        return str(Path(path).expanduser().resolve())
    if kind == "gs":
        return "gs://" + url.partition("://")[2].strip("/")
    return url.rstrip("/")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


@cache
def _filesystem(kind: str) -> fsspec.AbstractFileSystem:
    if kind == "gs":
        import gcsfs

        # The emulator (STORAGE_EMULATOR_HOST) takes anonymous access; real GCS uses ADC.
        token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None
        return gcsfs.GCSFileSystem(token=token)
    return fsspec.filesystem(kind)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    kind = scheme(url)
    url = normalize(url)
    if kind == "file":
        return _filesystem("file"), url
    return _filesystem(kind), url.partition("://")[2] if kind == "gs" else url


def is_transient(err: BaseException) -> bool:
    """Network hiccups worth retrying; missing files and permissions are not."""
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError | UserError):
        return False
    code = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(code, int):
        return code in _TRANSIENT_HTTP
    return isinstance(err, ConnectionError | TimeoutError) or type(err).__module__.startswith("aiohttp")


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.25) -> T:
    """Call `fn`, retrying transient errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_transient(err) or attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt * (0.5 + random.random())
            log.warning("%s: %r; retry %d/%d in %.1f s", what, err, attempt + 1, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.exists(path), what=url)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return with_retries(lambda: fs.cat_file(path), what=url)


def read_json(url: str) -> Any:
    """Parse a JSON file; a corrupt file is a user-facing error naming it."""
    data = read_bytes(url)
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise UserError(f"{url}: not valid JSON ({err.msg} at line {err.lineno})") from None


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    if scheme(url) == "file":
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise UserError(f"{url}: cannot create directory ({err.strerror})") from None
    elif scheme(url) == "memory":
        fs.makedirs(path, exist_ok=True)
    # GCS has no directories.


def _publish_local(url: str, write: Callable[[Any], None]) -> None:
    """Write a local file through a temp file in the same directory, fsync, then rename."""
    path = normalize(url)
    directory = os.path.dirname(path)
    staging = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(staging, "wb") as handle:
            write(handle)
            handle.flush()
            crash_point(f"storage.publish {os.path.basename(path)}")  # written, not yet visible
            os.fsync(handle.fileno())
        os.replace(staging, path)  # atomic within one filesystem, hence the staging directory
    except OSError as err:
        raise UserError(f"{url}: cannot write ({err.strerror})") from None
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Publish `data` at `url` so readers see the old file or the new one, never a mix."""
    if scheme(url) == "file":
        _publish_local(url, lambda handle: handle.write(data))
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.pipe_file(path, data), what=url)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def glob(pattern: str) -> list[str]:
    """Sorted URLs matching `pattern`, keeping the pattern's scheme."""
    kind = scheme(pattern)
    fs, path = filesystem(pattern)
    matches = sorted(with_retries(lambda: fs.glob(path), what=pattern))
    if kind == "gs":
        return [f"gs://{m}" for m in matches]
    if kind == "memory":
        return [f"memory://{m.lstrip('/')}" for m in matches]
    return matches


def check_writable(url: str) -> None:
    """Fail early, with the URL, if outputs cannot be written there."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex}")
    try:
        write_bytes_atomic(probe, b"")
        fs, path = filesystem(probe)
        fs.rm_file(path)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - reported with the URL
        raise UserError(f"{url}: output location is not writable ({err})") from None


def tensorstore_kvstore(url: str) -> dict:
    """The TensorStore kvstore spec of a directory URL."""
    kind = scheme(url)
    url = normalize(url)
    if kind == "file":
        return {"driver": "file", "path": url + "/"}
    if kind == "gs":
        bucket, _, path = url[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": path + "/" if path else ""}
    return {"driver": "memory", "path": url.partition("://")[2] + "/"}


@lru_cache(maxsize=1)
def tensorstore_context() -> Any:
    """One TensorStore context per process: memory:// stores and caches are shared through it."""
    import tensorstore as ts

    return ts.Context()


def download_dir(url: str, target: Path) -> Path:
    """Copy a remote directory (a gs:// model) to `target` once; the copy appears atomically."""
    if target.exists():
        return target
    fs, path = filesystem(url)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    with_retries(lambda: fs.get(path.rstrip("/") + "/", str(staging), recursive=True), what=url)
    os.replace(staging, target)
    return target


def publish_local_file(local_path: str, url: str) -> None:
    """Move a finished local file to `url` atomically (rename locally, one upload remotely)."""
    if scheme(url) == "file":
        def copy(handle) -> None:
            with open(local_path, "rb") as source:
                shutil.copyfileobj(source, handle, 1 << 24)

        _publish_local(url, copy)
        return
    fs, path = filesystem(url)
    with_retries(lambda: fs.put_file(local_path, path), what=url)
