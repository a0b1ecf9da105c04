"""The storage layer on local paths, file:// URLs, memory:// and gs:// (a real emulator)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.store.arrays import NUMPY_DTYPES, create_array, open_array

SCHEMES = ["local", "file", "memory", "gs"]


@pytest.fixture(params=SCHEMES)
def base(request, tmp_path) -> str:
    """An empty directory URL of each kind."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "file":
        return f"file://{tmp_path}/root"
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex[:12]}"
    return storage.join(request.getfixturevalue("gcs_bucket"), "root")


def expected_prefix(url: str) -> str:
    """What `glob` results start with for a directory URL."""
    if url.startswith("gs://"):
        return url
    if url.startswith("memory://"):
        return url
    # Local paths and file:// URLs come back as absolute local paths.
    return storage.normalize(url)


# ---------------------------------------------------------------- round trips


def test_bytes_round_trip_and_replace(base):
    url = storage.join(base, "dir", "data.bin")
    assert not storage.exists(url)
    payload = bytes(range(256)) * 5
    storage.write_bytes_atomic(url, payload)
    assert storage.exists(url)
    assert storage.read_bytes(url) == payload
    storage.write_bytes_atomic(url, b"second")
    assert storage.read_bytes(url) == b"second"
    storage.write_bytes_atomic(url, b"")
    assert storage.read_bytes(url) == b""
    assert storage.exists(url)


def test_json_round_trip(base):
    url = storage.join(base, "ledger.json")
    obj = {"units": [{"index": 3, "rows": 2048}], "fingerprint": "abc", "done": True, "x": None}
    storage.write_json_atomic(url, obj)
    assert storage.read_json(url) == obj
    # Written sorted and newline-terminated, so identical objects give identical bytes.
    raw = storage.read_bytes(url)
    assert raw.endswith(b"\n")
    assert json.loads(raw) == obj
    assert raw.index(b'"done"') < raw.index(b'"fingerprint"') < raw.index(b'"units"')
    storage.write_json_atomic(url, {"b": 1, "a": 2})
    assert storage.read_json(url) == {"a": 2, "b": 1}


def test_missing_file_raises_file_not_found(base):
    url = storage.join(base, "missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)


def test_corrupt_json_names_the_url(base):
    url = storage.join(base, "bad.json")
    storage.write_bytes_atomic(url, b'{"a": 1,\n "b": }')
    with pytest.raises(UserError) as info:
        storage.read_json(url)
    message = str(info.value)
    assert message.startswith(f"{url}: not valid JSON")
    assert "line 2" in message


def test_glob_sorts_and_keeps_the_scheme(base):
    names = ["c.json", "a.json", "b10.json", "b2.json"]
    for i, name in enumerate(names):
        storage.write_bytes_atomic(storage.join(base, "g", name), str(i).encode())
    storage.write_bytes_atomic(storage.join(base, "g", "other.txt"), b"x")
    storage.write_bytes_atomic(storage.join(base, "h", "a.json"), b"x")

    matches = storage.glob(storage.join(base, "g", "*.json"))
    prefix = expected_prefix(base)
    assert matches == [f"{prefix}/g/{n}" for n in sorted(names)]
    assert matches == sorted(matches)
    # Every match is itself a URL of the same store.
    assert [storage.read_bytes(m) for m in matches] == [b"1", b"2", b"3", b"0"]

    both = storage.glob(storage.join(base, "*", "a.json"))
    assert both == [f"{prefix}/g/a.json", f"{prefix}/h/a.json"]
    assert storage.glob(storage.join(base, "g", "*.parquet")) == []


# ---------------------------------------------------------------- local specifics


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "meta.json"
    storage.write_bytes_atomic(str(target), b"old")
    storage.write_bytes_atomic(str(target), b"new contents")
    storage.write_json_atomic(f"file://{tmp_path}/out/other.json", [1, 2])
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "other.json"]
    assert target.read_bytes() == b"new contents"
    assert json.loads((tmp_path / "out" / "other.json").read_text()) == [1, 2]


def test_local_write_into_a_file_is_a_user_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    url = str(tmp_path / "afile" / "sub" / "x.bin")
    with pytest.raises(UserError) as info:
        storage.write_bytes_atomic(url, b"1")
    assert str(info.value).startswith(url)


def test_local_write_replaces_an_existing_file_in_place(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")
    before = os.stat(target).st_ino
    storage.write_bytes_atomic(str(target), b"replacement")
    assert target.read_bytes() == b"replacement"
    # A rename, not an in-place rewrite: readers holding the old file keep the old bytes.
    assert os.stat(target).st_ino != before


# ---------------------------------------------------------------- retries


def test_with_retries_retries_transient_errors_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("reset by peer")
        return "ok"

    assert storage.with_retries(flaky, what="x", attempts=5, base_delay=0.001) == "ok"
    assert len(calls) == 3


def test_with_retries_does_not_retry_missing_files():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, what="x", attempts=5, base_delay=0.001)
    assert len(calls) == 1


def test_with_retries_gives_up_after_attempts():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionError(f"attempt {len(calls)}")

    with pytest.raises(ConnectionError, match="attempt 4"):
        storage.with_retries(down, what="x", attempts=4, base_delay=0.001)
    assert len(calls) == 4


class HTTPError(Exception):
    def __init__(self, code):
        super().__init__(f"HTTP {code}")
        self.code = code


class StatusError(Exception):
    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (HTTPError(503), True),
        (HTTPError(429), True),
        (HTTPError(500), True),
        (HTTPError(404), False),
        (HTTPError(403), False),
        (StatusError(502), True),
        (StatusError(401), False),
        (ConnectionError(), True),
        (TimeoutError(), True),
        (FileNotFoundError(), False),
        (PermissionError(), False),
        (UserError("bad"), False),
        (ValueError("bug"), False),
    ],
)
def test_is_transient(err, transient):
    assert storage.is_transient(err) is transient


def test_with_retries_retries_http_503_but_not_404():
    calls = []

    def unavailable_then_ok():
        calls.append(1)
        if len(calls) == 1:
            raise HTTPError(503)
        return 7

    assert storage.with_retries(unavailable_then_ok, what="x", base_delay=0.001) == 7
    assert len(calls) == 2
    calls.clear()

    def not_found():
        calls.append(1)
        raise HTTPError(404)

    with pytest.raises(HTTPError):
        storage.with_retries(not_found, what="x", base_delay=0.001)
    assert len(calls) == 1


# ---------------------------------------------------------------- writability


def test_check_writable_accepts_a_writable_directory_and_leaves_nothing(tmp_path):
    storage.check_writable(str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == []


def test_check_writable_on_gcs_leaves_nothing(gcs_bucket):
    url = storage.join(gcs_bucket, "run")
    storage.check_writable(url)
    assert storage.glob(storage.join(url, "*")) == []


def test_check_writable_on_gcs_when_the_probe_delete_answer_was_lost(gcs_bucket, monkeypatch):
    """The probe's DELETE lands but its answer is lost, so the retry finds no object (a
    5%-fault harvest rerun stopped on this with "not writable"): the location is writable."""
    url = storage.join(gcs_bucket, "run")
    fs, _ = storage.filesystem(url)  # fsspec's cached instance, the one check_writable gets
    delete, deletes = fs.rm_file, []

    def delete_then_retry(path, *args, **kwargs):
        delete(path, *args, **kwargs)
        deletes.append(path)
        return delete(path, *args, **kwargs)  # the retry: FileNotFoundError from the emulator

    monkeypatch.setattr(fs, "rm_file", delete_then_retry)
    storage.check_writable(url)
    assert len(deletes) == 1
    assert storage.glob(storage.join(url, "*")) == []


def test_check_writable_under_a_regular_file_names_the_path(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    url = str(tmp_path / "afile" / "sub")
    with pytest.raises(UserError) as info:
        storage.check_writable(url)
    assert str(info.value).startswith(url)
    assert "\n" not in str(info.value)


def test_check_writable_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("permissions are not enforced for this user (root)")
        with pytest.raises(UserError) as info:
            storage.check_writable(str(locked))
        assert str(locked) in str(info.value)
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- URLs


def test_normalize(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.normalize("runs/x/") == str(tmp_path / "runs" / "x")
    assert storage.normalize("./a/../b") == str(tmp_path / "b")
    assert storage.normalize(f"file://{tmp_path}/c/") == str(tmp_path / "c")
    assert storage.normalize("~/z") == str(Path.home() / "z")
    assert storage.normalize("gs://bucket/run/") == "gs://bucket/run"
    assert storage.normalize("gcs://bucket/run//") == "gs://bucket/run"
    assert storage.normalize("memory://m/run/") == "memory://m/run"


def test_scheme_and_unsupported_scheme():
    assert storage.scheme("/a/b") == "file"
    assert storage.scheme("rel") == "file"
    assert storage.scheme("file:///a") == "file"
    assert storage.scheme("gs://b/x") == "gs"
    assert storage.scheme("gcs://b/x") == "gs"
    assert storage.scheme("memory://x") == "memory"
    with pytest.raises(UserError) as info:
        storage.scheme("s3://bucket/x")
    assert str(info.value).startswith("s3://bucket/x: ")


def test_join():
    assert storage.join("gs://b/run/", "/activations/", "res") == "gs://b/run/activations/res"
    assert storage.join("/tmp/x", "a/b") == "/tmp/x/a/b"


def test_tensorstore_kvstore_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.tensorstore_kvstore("run/acts") == {
        "driver": "file", "path": f"{tmp_path}/run/acts/"}
    assert storage.tensorstore_kvstore(f"file://{tmp_path}/r/") == {
        "driver": "file", "path": f"{tmp_path}/r/"}
    assert storage.tensorstore_kvstore("gs://bucket/run/acts/") == {
        "driver": "gcs", "bucket": "bucket", "path": "run/acts/"}
    assert storage.tensorstore_kvstore("gcs://bucket/a") == {
        "driver": "gcs", "bucket": "bucket", "path": "a/"}
    assert storage.tensorstore_kvstore("memory://m/acts/") == {"driver": "memory", "path": "m/acts/"}


def test_tensorstore_kvstore_at_bucket_root_matches_storage(gcs_bucket):
    import tensorstore as ts

    spec = storage.tensorstore_kvstore(gcs_bucket)
    kvstore = ts.KvStore.open(spec, context=storage.tensorstore_context()).result()
    kvstore.write("zarr.json", b"{}").result()
    assert storage.exists(storage.join(gcs_bucket, "zarr.json"))


def test_tensorstore_kvstore_keys_match_storage_urls(gcs_bucket):
    import tensorstore as ts

    url = storage.join(gcs_bucket, "run", "x")
    kvstore = ts.KvStore.open(storage.tensorstore_kvstore(url), context=storage.tensorstore_context()).result()
    kvstore.write("zarr.json", b"{}").result()
    assert storage.read_bytes(storage.join(url, "zarr.json")) == b"{}"


# ---------------------------------------------------------------- TensorStore arrays


LAYOUT = {"n_rows": 96, "d_in": 8, "dtype": "float32", "shard_rows": 32, "chunk_rows": 16}


@pytest.fixture(params=["local", "gs"])
def array_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "acts" / "res" / "layer_0")
    return storage.join(request.getfixturevalue("gcs_bucket"), "run", "acts", "res", "layer_0")


def test_zarr3_array_round_trip(array_url):
    create_array(array_url, **LAYOUT)
    create_array(array_url, **LAYOUT)  # again with the same layout: accepted
    rng = np.random.default_rng(0)
    data = rng.standard_normal((96, 8)).astype(np.float32)
    array = open_array(array_url, write=True)
    assert tuple(array.shape) == (96, 8)
    array[32:96].write(data[32:96]).result()
    array[0:32].write(data[0:32]).result()

    reread = open_array(array_url)
    np.testing.assert_array_equal(reread[:].read().result(), data)
    np.testing.assert_array_equal(reread[40:57].read().result(), data[40:57])
    # The metadata and one object per shard are stored where the URL says.
    assert storage.exists(storage.join(array_url, "zarr.json"))
    meta = storage.read_json(storage.join(array_url, "zarr.json"))
    assert meta["shape"] == [96, 8]
    assert meta["data_type"] == "float32"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [32, 8]
    shards = storage.glob(storage.join(array_url, "c", "*", "*"))
    assert len(shards) == 3


def test_zarr3_bfloat16_rounds_like_ml_dtypes(tmp_path):
    url = str(tmp_path / "bf16")
    create_array(url, **{**LAYOUT, "dtype": "bfloat16"})
    data = np.linspace(-3, 3, 96 * 8, dtype=np.float32).reshape(96, 8)
    expected = data.astype(NUMPY_DTYPES["bfloat16"])
    array = open_array(url, write=True)
    array[:].write(expected).result()
    got = open_array(url)[:].read().result()
    assert got.dtype == NUMPY_DTYPES["bfloat16"]
    np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))


def test_zarr3_unwritten_rows_read_as_zero(tmp_path):
    url = str(tmp_path / "sparse")
    create_array(url, **LAYOUT)
    open_array(url, write=True)[0:16].write(np.ones((16, 8), np.float32)).result()
    got = open_array(url)[:].read().result()
    assert got[:16].sum() == 16 * 8
    assert not got[16:].any()


def test_create_array_with_a_different_layout_is_a_user_error(array_url):
    create_array(array_url, **LAYOUT)
    with pytest.raises(UserError) as info:
        create_array(array_url, **{**LAYOUT, "d_in": 16})
    assert str(info.value).startswith(array_url)


def test_open_missing_array_is_a_user_error(tmp_path):
    url = str(tmp_path / "none")
    with pytest.raises(UserError) as info:
        open_array(url)
    assert str(info.value).startswith(url)


# ---------------------------------------------------------------- publishing local files


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_publish_local_file(kind, tmp_path, request):
    source = tmp_path / "staging" / "tokens.parquet"
    source.parent.mkdir()
    payload = os.urandom(100_000)
    source.write_bytes(payload)
    if kind == "local":
        target = str(tmp_path / "run" / "activations" / "tokens.parquet")
    else:
        target = storage.join(request.getfixturevalue("gcs_bucket"), "run", "tokens.parquet")
    storage.publish_local_file(str(source), target)
    assert storage.read_bytes(target) == payload
    # Publishing again replaces the file.
    source.write_bytes(b"v2")
    storage.publish_local_file(str(source), target)
    assert storage.read_bytes(target) == b"v2"
    if kind == "local":
        assert os.listdir(tmp_path / "run" / "activations") == ["tokens.parquet"]
    else:
        assert storage.glob(storage.join(target.rsplit("/", 1)[0], "*")) == [target]


def test_publish_removes_staging_files_left_by_a_killed_writer(tmp_path):
    target = tmp_path / "ledger.json"
    stale = tmp_path / ".ledger.json.tmp-0123456789abcdef"
    stale.write_bytes(b"half a ledger")
    old = time.time() - storage.STALE_STAGING_S - 60
    os.utime(stale, (old, old))
    live = tmp_path / ".ledger.json.tmp-fedcba9876543210"  # another writer's, being written now
    live.write_bytes(b"the same ledger, half written")
    other = tmp_path / ".other.json.tmp-0123456789abcdef"  # another file's: not ours to remove
    other.write_bytes(b"x")
    os.utime(other, (old, old))
    storage.write_json_atomic(str(target), {"units": {}})
    assert json.loads(target.read_text()) == {"units": {}}
    assert not stale.exists() and live.exists() and other.exists()


def test_concurrent_writers_of_one_file_all_publish(tmp_path):
    """Writers of the same file at the same time (two sweep launchers publishing
    sweep/plan.json) never remove each other's staging file: every write lands."""
    target = str(tmp_path / "sweep" / "plan.json")
    errors = []

    def write(worker: int) -> None:
        try:
            for _ in range(200):
                storage.write_json_atomic(target, {"jobs": list(range(200))})
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append((worker, err))

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(Path(target).read_text()) == {"jobs": list(range(200))}
    assert os.listdir(tmp_path / "sweep") == ["plan.json"]
