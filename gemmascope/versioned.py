"""Compare-and-swap for small JSON records, on local disk and on GCS.

Several launchers (on one host or many) update the same records, so a write must say
which version it replaces and fail if someone else wrote first. On GCS the version is
the object's generation and the write carries an `ifGenerationMatch` precondition (0:
the object must not exist yet). On a local disk the version is a hash of the content,
checked and replaced under an exclusive `flock` on a sidecar lock file, and the new
content is published by rename, so readers never see a partial record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import Any

from gemmascope import storage
from gemmascope.errors import UserError

ABSENT = "absent"  # the version of a record that does not exist yet
_BOUNDARY = "==gemmascope-record=="


def _local_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def _locked(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _gcs_bucket_key(url: str) -> tuple[Any, str, str]:
    fs, path = storage.filesystem(url)
    bucket, _, key = path.partition("/")
    return fs, bucket, key


def _gcs_read(url: str) -> tuple[bytes | None, str]:
    fs, bucket, key = _gcs_bucket_key(url)
    try:
        meta = storage.with_retries(lambda: fs.call("GET", "b/{}/o/{}", bucket, key, json_out=True), what=url)
    except FileNotFoundError:
        return None, ABSENT
    generation = meta["generation"]
    try:
        data = storage.with_retries(
            lambda: fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation)[1], what=url)
    except FileNotFoundError:  # replaced between the two requests: read again
        return _gcs_read(url)
    return data, str(generation)


def _gcs_write(url: str, data: bytes, version: str) -> bool:
    fs, bucket, key = _gcs_bucket_key(url)
    upload = f"{fs._location}/upload/storage/v1/b/{bucket}/o"
    # A multipart upload (metadata part, then the content): the form whose preconditions
    # both GCS and its emulator enforce.
    body = (f"--{_BOUNDARY}\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': key})}\n"
            f"--{_BOUNDARY}\nContent-Type: application/json\n\n").encode() + data + f"\n--{_BOUNDARY}--".encode()
    try:
        storage.with_retries(lambda: fs.call(
            "POST", upload, uploadType="multipart", data=body,
            ifGenerationMatch="0" if version == ABSENT else version,
            headers={"Content-Type": f'multipart/related; boundary="{_BOUNDARY}"'}), what=url)
    except FileExistsError:  # 412: the precondition failed
        # Either someone else wrote first, or our own write landed and only its answer was
        # lost, so the retry met our write's new generation. Records carry the writer and
        # a timestamp, so equal bytes mean the write was ours.
        return _gcs_read(url)[0] == data
    return True


def read(url: str) -> tuple[Any | None, str]:
    """(the parsed record or None, its version)."""
    kind = storage.scheme(url)
    if kind == "gs":
        data, version = _gcs_read(url)
    elif kind == "file":
        data = _local_read(storage.normalize(url))
        version = ABSENT if data is None else _local_version(data)
    else:
        raise UserError(f"{url}: records that several launchers update need a local or gs:// location")
    if data is None:
        return None, ABSENT
    try:
        return json.loads(data), version
    except json.JSONDecodeError as err:
        raise UserError(f"{url}: not valid JSON ({err.msg} at line {err.lineno})") from None


def replace(url: str, record: Any, version: str) -> bool:
    """Write `record` if the stored version is still `version`; False if another writer won."""
    data = (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()
    kind = storage.scheme(url)
    if kind == "gs":
        return _gcs_write(url, data, version)
    if kind != "file":
        raise UserError(f"{url}: records that several launchers update need a local or gs:// location")
    path = storage.normalize(url)
    with _locked(path):
        current = _local_read(path)
        if (ABSENT if current is None else _local_version(current)) != version:
            return False
        storage.write_bytes_atomic(path, data)
    return True
