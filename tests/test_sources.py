"""Text sources: listing pieces and shards, reading documents, errors, the pydoc corpus."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gemmascope import storage
from gemmascope.config import SourceConfig
from gemmascope.errors import UserError
from gemmascope.harvest.sources import (
    PYDOC_MODULES,
    Piece,
    SourceShard,
    list_pieces,
    list_shards,
    read_documents,
    render_pydoc,
)

ROOT = Path(__file__).resolve().parent.parent


def parquet_bytes(texts, row_group_size, column="text", extra=True) -> bytes:
    columns = {column: pa.array(texts, type=pa.string())}
    if extra:
        columns["id"] = pa.array(range(len(texts)), type=pa.int64())
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink, row_group_size=row_group_size)
    return sink.getvalue()


def jsonl_bytes(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def all_documents(config: SourceConfig) -> list[str]:
    return [d for shard in list_shards(config) for d in read_documents(shard, config.text_field)]


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        result = fn(*args)
        if hasattr(result, "__next__"):
            list(result)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def corpus(tmp_path) -> dict:
    """A local corpus of every kind, written in an unsorted order; returns what is in it."""
    txt = {"b.txt": "second file\nwith two lines", "a.txt": "first file", "c.txt": "third é ü 字"}
    for name in ["c.txt", "a.txt", "b.txt"]:
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / name).write_text(txt[name], encoding="utf-8")
    (tmp_path / "txt" / "empty.txt").write_text("  \n\t")
    data = tmp_path / "data"
    data.mkdir()
    (data / "z.jsonl").write_bytes(
        jsonl_bytes([{"text": "z one", "id": 1}, {"text": "z two"}])
    )
    # Blank lines are skipped, as are whitespace-only documents.
    (data / "m.jsonl").write_bytes(
        b'{"text": "m one"}\n\n   \n{"text": "   "}\n{"text": "m \\"two\\"", "extra": [1]}\n'
    )
    texts = [f"row {i}" for i in range(10)]
    texts[4] = None  # null rows are skipped
    (data / "p.parquet").write_bytes(parquet_bytes(texts, row_group_size=3))
    return {"root": tmp_path, "txt": txt, "parquet": texts}


# ---------------------------------------------------------------- listing and reading


def test_txt_files_are_one_document_each_in_sorted_order(corpus):
    root = corpus["root"]
    config = SourceConfig(paths=(f"{root}/txt/*.txt",))
    pieces = list_pieces(config)
    assert pieces == [Piece(str(root / "txt" / n), "txt") for n in ["a.txt", "b.txt", "c.txt", "empty.txt"]]
    # The whitespace-only file yields no document.
    assert all_documents(config) == [corpus["txt"][n] for n in ["a.txt", "b.txt", "c.txt"]]


def test_jsonl_records_in_file_and_line_order(corpus):
    root = corpus["root"]
    config = SourceConfig(paths=(f"{root}/data/*.jsonl",))
    assert [p.url for p in list_pieces(config)] == [str(root / "data" / "m.jsonl"), str(root / "data" / "z.jsonl")]
    assert all_documents(config) == ["m one", 'm "two"', "z one", "z two"]


def test_a_file_matched_by_two_globs_is_read_once(corpus):
    root = corpus["root"]
    config = SourceConfig(paths=(f"{root}/txt/b.txt", f"{root}/txt/*.txt"))
    assert [Path(p.url).name for p in list_pieces(config)] == ["b.txt", "a.txt", "c.txt", "empty.txt"]


def test_jsonl_custom_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes([{"body": "x", "text": "no"}, {"body": "y"}]))
    config = SourceConfig(paths=(f"{tmp_path}/*.jsonl",), text_field="body")
    assert all_documents(config) == ["x", "y"]


def test_parquet_row_groups_are_pieces(corpus):
    root = corpus["root"]
    url = str(root / "data" / "p.parquet")
    config = SourceConfig(paths=(url,))
    pieces = list_pieces(config)
    assert pieces == [Piece(url, "parquet", g) for g in range(4)]  # 10 rows, 3 per group
    expected_groups = [["row 0", "row 1", "row 2"], ["row 3", "row 5"], ["row 6", "row 7", "row 8"], ["row 9"]]
    for piece, expected in zip(pieces, expected_groups, strict=True):
        shard = SourceShard(0, (piece,))
        assert list(read_documents(shard, "text")) == expected
    assert all_documents(config) == [t for t in corpus["parquet"] if t is not None]


def test_mixed_globs_keep_glob_order_and_sort_within_each(corpus):
    root = corpus["root"]
    config = SourceConfig(
        paths=(f"{root}/data/*.parquet", f"{root}/txt/[ab].txt", f"{root}/data/*.jsonl"),
        pieces_per_shard=1,
    )
    pieces = list_pieces(config)
    assert [(Path(p.url).name, p.kind, p.part) for p in pieces] == [
        ("p.parquet", "parquet", 0), ("p.parquet", "parquet", 1),
        ("p.parquet", "parquet", 2), ("p.parquet", "parquet", 3),
        ("a.txt", "txt", 0), ("b.txt", "txt", 0),
        ("m.jsonl", "jsonl", 0), ("z.jsonl", "jsonl", 0),
    ]
    expected = [t for t in corpus["parquet"] if t is not None] + [
        "first file", "second file\nwith two lines", "m one", 'm "two"', "z one", "z two"]
    assert all_documents(config) == expected


@pytest.mark.parametrize("per_shard", [1, 2, 3, 5, 8, 100])
def test_pieces_per_shard_groups_consecutive_pieces(corpus, per_shard):
    root = corpus["root"]
    paths = (f"{root}/data/*.parquet", f"{root}/txt/*.txt", f"{root}/data/*.jsonl")
    pieces = list_pieces(SourceConfig(paths=paths))
    assert len(pieces) == 10
    shards = list_shards(SourceConfig(paths=paths, pieces_per_shard=per_shard))
    # Reference grouping, independent of the code under test.
    expected, current = [], []
    for piece in pieces:
        current.append(piece)
        if len(current) == per_shard:
            expected.append(tuple(current))
            current = []
    if current:
        expected.append(tuple(current))
    assert [s.pieces for s in shards] == expected
    assert [s.index for s in shards] == list(range(len(expected)))
    # Grouping does not change the documents or their order.
    assert all_documents(SourceConfig(paths=paths, pieces_per_shard=per_shard)) == all_documents(
        SourceConfig(paths=paths))


def test_shards_are_deterministic(corpus):
    root = corpus["root"]
    config = SourceConfig(paths=(f"{root}/txt/*.txt", f"{root}/data/*"), pieces_per_shard=3)
    first = list_shards(config)
    # New files' mtimes and creation order do not matter; only names do.
    os.utime(root / "txt" / "a.txt", (1, 1))
    assert list_shards(config) == first
    assert list_shards(SourceConfig(paths=config.paths, pieces_per_shard=3)) == first
    assert all_documents(config) == all_documents(config)


def test_gcs_globs(gcs_bucket):
    for name, records in [("b.jsonl", [{"text": "b1"}, {"text": "b2"}]), ("a.jsonl", [{"text": "a1"}])]:
        storage.write_bytes_atomic(f"{gcs_bucket}/corpus/{name}", jsonl_bytes(records))
    storage.write_bytes_atomic(f"{gcs_bucket}/corpus/t.txt", b"gcs text")
    storage.write_bytes_atomic(
        f"{gcs_bucket}/corpus/p.parquet", parquet_bytes(["p0", "p1", "p2", "p3", "p4"], row_group_size=2))
    config = SourceConfig(
        paths=(f"{gcs_bucket}/corpus/*.jsonl", f"{gcs_bucket}/corpus/*.parquet", f"{gcs_bucket}/corpus/*.txt"),
        pieces_per_shard=2,
    )
    shards = list_shards(config)
    assert [[(p.url, p.part) for p in s.pieces] for s in shards] == [
        [(f"{gcs_bucket}/corpus/a.jsonl", 0), (f"{gcs_bucket}/corpus/b.jsonl", 0)],
        [(f"{gcs_bucket}/corpus/p.parquet", 0), (f"{gcs_bucket}/corpus/p.parquet", 1)],
        [(f"{gcs_bucket}/corpus/p.parquet", 2), (f"{gcs_bucket}/corpus/t.txt", 0)],
    ]
    assert all_documents(config) == ["a1", "b1", "b2", "p0", "p1", "p2", "p3", "p4", "gcs text"]


# ---------------------------------------------------------------- errors


def test_glob_without_matches_names_the_config_key(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    message = user_error(list_pieces, SourceConfig(paths=(f"{tmp_path}/*.jsonl",)))
    assert message.startswith("source.paths[0]=")
    assert f"{tmp_path}/*.jsonl" in message
    message = user_error(list_shards, SourceConfig(paths=(f"{tmp_path}/*.txt", f"{tmp_path}/none/*")))
    assert message.startswith("source.paths[1]=")
    assert f"{tmp_path}/none/*" in message


def test_glob_without_matches_on_gcs(gcs_bucket):
    message = user_error(list_pieces, SourceConfig(paths=(f"{gcs_bucket}/nothing/*.jsonl",)))
    assert message.startswith("source.paths[0]=")
    assert f"{gcs_bucket}/nothing/*.jsonl" in message


def test_unsupported_suffix_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.csv").write_text("x,y")
    message = user_error(list_pieces, SourceConfig(paths=(f"{tmp_path}/*",)))
    assert message.startswith(f"{tmp_path}/b.csv: ")
    assert ".txt" in message and ".jsonl" in message and ".parquet" in message


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "cut\n{"text": "fine"}\n')
    shard = list_shards(SourceConfig(paths=(str(path),)))[0]
    message = user_error(read_documents, shard, "text")
    assert message.startswith(f"{path}:3: ")
    assert "JSON" in message


@pytest.mark.parametrize(
    ("lines", "line_no", "needle"),
    [
        (['{"text": "a"}', '{"body": "b"}'], 2, "no field 'text'"),
        (['["text"]'], 1, "no field 'text'"),
        (['{"text": "a"}', '{"text": 3}'], 2, "not a string"),
        (['{"text": null}'], 1, "not a string"),
    ],
)
def test_jsonl_bad_records_name_file_line_and_field(tmp_path, lines, line_no, needle):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    shard = SourceShard(0, (Piece(str(path), "jsonl"),))
    message = user_error(read_documents, shard, "text")
    assert message.startswith(f"{path}:{line_no}: ")
    assert needle in message


def test_parquet_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(["a", "b"], row_group_size=1, column="content"))
    shards = list_shards(SourceConfig(paths=(str(path),)))
    assert len(shards) == 2
    message = user_error(read_documents, shards[0], "text")
    assert message.startswith(f"{path}: ")
    assert "'text'" in message
    assert list(read_documents(shards[1], "content")) == ["b"]


def test_file_named_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "fake.parquet"
    path.write_text("not parquet at all")
    message = user_error(list_pieces, SourceConfig(paths=(str(path),)))
    assert message.startswith(f"{path}: ")
    assert "Parquet" in message


def test_non_utf8_text_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc café".encode("latin-1"))
    shard = list_shards(SourceConfig(paths=(str(path),)))[0]
    message = user_error(read_documents, shard, "text")
    assert message.startswith(f"{path}: ")
    assert "UTF-8" in message
    assert "byte 7" in message


def test_file_removed_after_listing(tmp_path):
    path = tmp_path / "gone.txt"
    path.write_text("x")
    shard = list_shards(SourceConfig(paths=(str(path),)))[0]
    path.unlink()
    message = user_error(read_documents, shard, "text")
    assert message.startswith(f"{path}: ")


def test_jsonl_text_with_unicode_line_separators(tmp_path):
    path = tmp_path / "u.jsonl"
    records = [{"text": "para one\u2028para two"}, {"text": "next\x85line"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    config = SourceConfig(paths=(str(path),))
    assert all_documents(config) == ["para one\u2028para two", "next\x85line"]


# ---------------------------------------------------------------- the pydoc corpus


def test_pydoc_pieces_are_the_module_list():
    config = SourceConfig(builtin="pydoc", pieces_per_shard=8)
    pieces = list_pieces(config)
    assert pieces == [Piece(name, "pydoc") for name in PYDOC_MODULES]
    assert len(pieces) == len(set(PYDOC_MODULES)) == 90
    assert "os" not in PYDOC_MODULES  # its page prints the environment
    shards = list_shards(config)
    assert len(shards) == 12  # ceil(90 / 8)
    assert [len(s.pieces) for s in shards] == [8] * 11 + [2]


def test_render_pydoc_has_no_machine_specific_details():
    text = render_pydoc("json")
    assert len(text) > 5000
    assert "JSON" in text and "dumps" in text
    assert " at 0x" not in text
    assert sysconfig.get_paths()["stdlib"] not in text
    assert os.path.dirname(os.path.dirname(json.__file__)) not in text
    assert "<stdlib>/json/__init__.py" in text


def test_read_documents_renders_pydoc_modules():
    shard = SourceShard(0, (Piece("json", "pydoc"), Piece("base64", "pydoc")))
    documents = list(read_documents(shard, "text"))
    assert documents == [render_pydoc("json"), render_pydoc("base64")]


_DIGESTS = """
import hashlib
from gemmascope.harvest.sources import PYDOC_MODULES, render_pydoc
print(hashlib.sha256(render_pydoc("json").encode()).hexdigest())
everything = hashlib.sha256()
for name in PYDOC_MODULES:
    everything.update(hashlib.sha256(render_pydoc(name).encode()).digest())
print(everything.hexdigest())
"""


def test_pydoc_corpus_is_identical_across_hash_seeds():
    def start(seed):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        return subprocess.Popen([sys.executable, "-c", _DIGESTS], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    runs = [start(0), start(123)]
    outputs = []
    for proc in runs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(out.split())
    here = hashlib.sha256(render_pydoc("json").encode()).hexdigest()
    assert outputs[0][0] == outputs[1][0] == here
    assert outputs[0][1] == outputs[1][1]


def test_parquet_non_string_column_is_a_user_error(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": pa.array([1, 2], type=pa.int64())}), path)
    shard = list_shards(SourceConfig(paths=(str(path),)))[0]
    message = user_error(read_documents, shard, "text")
    assert message.startswith(f"{path}: ")
