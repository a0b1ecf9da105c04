"""One storage layer for local paths, file://, gs:// and memory:// URLs.

Every stage names its inputs and outputs as URLs and goes through here, so the same
code runs on a laptop and on a cluster writing to GCS. Files that other processes read
are published atomically: a temp file renamed into place on local disks, a single-object
upload on GCS (an object is either fully there or not), so a crash never leaves a
half-written file visible.

Transient network errors (HTTP 408/429/5xx, dropped or truncated connections) are
retried on one bounded schedule whichever client meets them: gcsfs requests (through
`GCSFileSystem`, also registered for every other gs:// user in the process, Orbax's
included) and TensorStore's gcs driver (through `tensorstore_context`). A 5% fault rate
costs a few retries; a store that stays down ends the operation within ~15 s with a
`StorageUnavailable` naming the object, one line on the command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob as globlib
import json
import logging
import os
import random
import re
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
# TensorStore reports failures as ValueError("<STATUS>: ..."); these statuses are network
# trouble (ABORTED: its own retries ran out), not a bad spec or a damaged object.
_TRANSIENT_TENSORSTORE = ("UNAVAILABLE:", "ABORTED:", "DEADLINE_EXCEEDED:", "RESOURCE_EXHAUSTED:")

# The retry schedule of every storage request: six attempts, jittered backoff from 0.25 s
# doubling to at most 4 s, about 8 s of waiting in all. Six failures in a row at a 5%
# fault rate happen once in ~10^8 requests; a store that stays down is reported quickly
# enough that a harvest, which retries its units a few times, stops within a minute or two.
REQUEST_ATTEMPTS = 6
FIRST_RETRY_S = 0.25
MAX_RETRY_S = 4.0


class StorageUnavailable(UserError):
    """A storage request failed on every attempt: the store is unreachable, not the input
    wrong. One line on the command line; the harvest driver may still rerun the unit."""


def backoff_s(attempt: int, first: float = FIRST_RETRY_S) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): doubling, capped, jittered."""
    return min(MAX_RETRY_S, first * 2 ** (attempt - 1)) * (0.5 + random.random())


def describe_error(err: BaseException) -> str:
    """An error as one short line: TensorStore's trailing spec and response body dropped."""
    text = str(err).split(" [tensorstore_spec=")[0].split(" [http_response_body=")[0]
    text = " ".join(text.split()) or type(err).__name__
    return text if isinstance(err, UserError) else f"{type(err).__name__}: {text}"


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
    """`url` with `parts` appended; a part that climbs out with '..' (a name taken from a
    config or the command line) is refused, so nothing is written outside the run."""
    for part in parts:
        if ".." in part.split("/"):
            raise UserError(f"{part!r}: a path component may not be '..' (it would leave {url})")
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def _request_target(method: str, path: str, *args, **kwargs) -> str:
    """The gs:// object (or prefix) a gcsfs request is about, for error messages: its path
    is a template ("b/{}/o/{}") filled with the bucket and the object's name, or an upload
    URL ending in "b/BUCKET/o" with the name as a parameter."""
    match = re.search(r"(?:^|/)b/([^/?]+)(?:/o/?([^?]*))?", path.format(*args))
    if not match:
        return path
    name = match.group(2) or kwargs.get("name") or kwargs.get("prefix") or ""
    return f"gs://{match.group(1)}/{name}".rstrip("/")


def _bounded(request: Callable, target: Callable[..., str]) -> Callable:
    """An undecorated gcsfs request method retried on this module's schedule."""

    async def call(self, *args, **kwargs):
        began = time.monotonic()
        for attempt in range(1, REQUEST_ATTEMPTS + 1):
            try:
                return await request(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - classified below
                if not is_transient(err):
                    raise
                if attempt == REQUEST_ATTEMPTS:
                    raise StorageUnavailable(
                        f"{target(*args, **kwargs)}: storage unavailable, {attempt} attempts failed in "
                        f"{time.monotonic() - began:.1f} s (last: {describe_error(err)})") from None
                delay = backoff_s(attempt)
                log.debug("%s: %s; retry %d in %.2f s", target(*args, **kwargs), describe_error(err), attempt,
                          delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    return call


@cache
def gcs_filesystem_class() -> type:
    """gcsfs with this module's retries on every request instead of its own (6 tries up
    to 32 s apart, then the raw error), registered for gs:// so Orbax's paths (etils) use
    it too. Whole-file downloads (`get`, as `download_dir` does) keep gcsfs's retries.

    `gcsfs.GCSFileSystem` is the core class or, unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
    is false, its zonal/HNS extension; both inherit the core's decorated `_request`."""
    import gcsfs

    base = gcsfs.GCSFileSystem
    request = getattr(base._request, "__wrapped__", base._request)  # without gcsfs's retries

    class GCSFileSystem(base):
        _request = _bounded(request, _request_target)

    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
    return GCSFileSystem


@cache
def _filesystem(kind: str) -> fsspec.AbstractFileSystem:
    if kind == "gs":
        # The emulator (STORAGE_EMULATOR_HOST) takes anonymous access; real GCS uses ADC.
        token = "anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None
        return gcs_filesystem_class()(token=token)
    return fsspec.filesystem(kind)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    kind = scheme(url)
    url = normalize(url)
    if kind == "file":
        return _filesystem("file"), url
    return _filesystem(kind), url.partition("://")[2] if kind == "gs" else url


def is_transient(err: BaseException) -> bool:
    """Network hiccups worth retrying; missing files and permissions are not.

    HTTP errors carry their status (gcsfs's HttpError `.code`, aiohttp's `.status`);
    aiohttp's other errors are connection trouble (server disconnected, payload cut
    short), as are the requests exceptions gcsfs raises for a 502; TensorStore's say so
    in their status prefix."""
    if isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError | UserError):
        return False
    code = getattr(err, "code", None) or getattr(err, "status", None)
    if isinstance(code, int):
        return code in _TRANSIENT_HTTP
    if isinstance(err, ValueError):
        return str(err).startswith(_TRANSIENT_TENSORSTORE)
    return (isinstance(err, ConnectionError | TimeoutError)
            or type(err).__module__.split(".")[0] in ("aiohttp", "requests"))


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 6, base_delay: float = 0.25) -> T:
    """Call `fn`, retrying transient errors with jittered exponential backoff."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below
            if not is_transient(err) or attempt == attempts - 1:
                raise
            delay = backoff_s(attempt + 1, base_delay)
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


# A staging file untouched this long belongs to a writer that died before its rename: a
# live writer touches it with every write, and fsync + rename follow its last write at once.
STALE_STAGING_S = 600.0


def _remove_stale_staging(path: str) -> None:
    """Temp files of earlier writers of `path` that were killed before their rename.

    Only old ones: some files have concurrent writers of the same content (two sweep
    launchers started together both publish sweep/plan.json), and removing another
    writer's fresh staging file would make its rename fail."""
    pattern = os.path.join(os.path.dirname(path), f".{globlib.escape(os.path.basename(path))}.tmp-*")
    cutoff = time.time() - STALE_STAGING_S
    for stale in globlib.glob(pattern, include_hidden=True):
        with contextlib.suppress(FileNotFoundError):
            if os.path.getmtime(stale) < cutoff:
                os.remove(stale)


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
        _remove_stale_staging(path)
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
        # A delete whose answer was lost is retried and finds nothing: the probe is gone.
        with contextlib.suppress(FileNotFoundError):
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
    """One TensorStore context per process: memory:// stores and caches are shared through
    it, and gcs requests retry on this module's schedule (TensorStore's default, 32 tries
    up to 32 s apart, would take a quarter of an hour to give up on a dead store)."""
    import tensorstore as ts

    return ts.Context({"gcs_request_retries": {
        "max_retries": REQUEST_ATTEMPTS, "initial_delay": f"{FIRST_RETRY_S}s", "max_delay": f"{MAX_RETRY_S}s"}})


def tensorstore_failure(url: str, doing: str, err: Exception) -> UserError:
    """A failed TensorStore read or write of `url` as one line: `StorageUnavailable` when
    the network gave out (the harvest may retry the unit), a plain `UserError` otherwise."""
    kind = StorageUnavailable if is_transient(err) else UserError
    return kind(f"{url}: cannot {doing} ({describe_error(err)})")


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
