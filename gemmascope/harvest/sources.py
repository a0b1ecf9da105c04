"""Text sources, split deterministically into source shards (the units of tokenisation).

A source is a list of globs (local or gs://) of .txt, .jsonl and .parquet files, or
the built-in offline corpus. Files are expanded in glob order then sorted, and cut into
"pieces" (a .txt or .jsonl file, one Parquet row group, one pydoc module); consecutive
pieces form a shard. The same config always yields the same shards in the same order,
which is what makes a resumed harvest write the same rows as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

from gemmascope import storage
from gemmascope.config import SourceConfig
from gemmascope.errors import UserError

# Standard-library modules whose pydoc pages form the demo corpus (~3 M characters of
# real English technical prose and code on any machine with Python 3.11). `os` is left
# out: its page prints the environment.
PYDOC_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "calendar", "cmd",
    "codecs", "collections", "colorsys", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email", "enum", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html", "http", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib", "uuid", "warnings", "weakref", "zipfile", "zlib"
)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Piece:
    url: str
    kind: str  # "txt", "jsonl", "parquet" or "pydoc"
    part: int = 0  # Parquet row group


@dataclass(frozen=True)
class SourceShard:
    index: int
    pieces: tuple[Piece, ...]


def _kind_of(url: str) -> str:
    for suffix in SUFFIXES:
        if url.endswith(suffix):
            return suffix[1:]
    raise UserError(f"{url}: unsupported text file (expected {', '.join(SUFFIXES)})")


def _parquet_row_groups(url: str) -> int:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_row_groups
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{url}: not a readable Parquet file ({err})") from None


def list_pieces(config: SourceConfig) -> list[Piece]:
    if config.builtin == "pydoc":
        return [Piece(name, "pydoc") for name in PYDOC_MODULES]
    pieces: list[Piece] = []
    seen: set[str] = set()
    for i, pattern in enumerate(config.paths):
        matches = storage.glob(pattern)
        if not matches:
            raise UserError(f"source.paths[{i}]={pattern!r}: no files match")
        for url in matches:
            if url in seen:  # matched by an earlier glob: read each file once
                continue
            seen.add(url)
            kind = _kind_of(url)
            if kind == "parquet":
                pieces.extend(Piece(url, kind, g) for g in range(_parquet_row_groups(url)))
            else:
                pieces.append(Piece(url, kind))
    return pieces


def list_shards(config: SourceConfig) -> list[SourceShard]:
    pieces = list_pieces(config)
    size = config.pieces_per_shard
    return [
        SourceShard(i, tuple(pieces[start:start + size]))
        for i, start in enumerate(range(0, len(pieces), size))
    ]


def render_pydoc(module_name: str) -> str:
    """A module's pydoc page with machine-specific details (paths, addresses) removed."""
    import importlib
    import pydoc

    text = pydoc.render_doc(importlib.import_module(module_name), renderer=pydoc.plaintext)
    text = _ADDRESS.sub("", text)
    return text.replace(sysconfig.get_paths()["stdlib"], "<stdlib>")


def _read_text(url: str) -> str:
    try:
        return storage.read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{url}: file disappeared after listing") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{url}: not UTF-8 text (byte {err.start})") from None


def _jsonl_documents(url: str, field: str) -> Iterator[str]:
    # Split on "\n" only: str.splitlines() also splits on U+2028 and U+0085, which JSON
    # writers leave unescaped inside strings.
    for number, line in enumerate(_read_text(url).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{url}:{number}: not valid JSON") from None
        if not isinstance(record, dict) or field not in record:
            raise UserError(f"{url}:{number}: no field {field!r} (source.text_field)")
        if not isinstance(record[field], str):
            raise UserError(f"{url}:{number}: field {field!r} is not a string")
        yield record[field]


def _parquet_documents(url: str, row_group: int, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as handle:
        reader = pq.ParquetFile(handle)
        if field not in reader.schema_arrow.names:
            raise UserError(f"{url}: no column {field!r} (source.text_field)")
        kind = reader.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{url}: column {field!r} is {kind}, not text (source.text_field)")
        column = reader.read_row_group(row_group, columns=[field]).column(0)
    for value in column.to_pylist():
        if value is not None:
            yield value


def read_documents(shard: SourceShard, text_field: str) -> Iterator[str]:
    """The documents of a shard, in a fixed order; empty documents are skipped."""
    for piece in shard.pieces:
        if piece.kind == "pydoc":
            documents: Iterator[str] = iter([render_pydoc(piece.url)])
        elif piece.kind == "txt":
            documents = iter([_read_text(piece.url)])
        elif piece.kind == "jsonl":
            documents = _jsonl_documents(piece.url, text_field)
        else:
            documents = _parquet_documents(piece.url, piece.part, text_field)
        for document in documents:
            if document.strip():
                yield document
