"""Where every activation row goes: source shards -> global rows -> work units.

Rows are numbered in corpus order (shard, sequence, position), stored positions only.
A work unit owns a fixed range of `unit_rows` rows, a multiple of the storage shard, so
each storage object is written by exactly one unit and a unit's rows are known before
it runs; a unit that crashed is simply run again over the same range. A sequence that
straddles two units is computed by both and each keeps its own rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ShardStats:
    """What tokenising one source shard produced."""

    n_sequences: int
    n_rows: int  # stored (text) positions
    n_documents: int
    n_tokens: int  # all positions, BOS/EOS/padding included


@dataclass(frozen=True)
class Layout:
    shards: tuple[ShardStats, ...]  # the shards in use, in order
    n_rows: int  # rows per array (may stop inside the last shard: max_tokens)
    unit_rows: int

    @classmethod
    def plan(cls, stats: list[ShardStats], max_rows: int | None, unit_rows: int) -> Layout:
        """The shortest prefix of shards that holds `max_rows` rows (all shards if None)."""
        used, total = [], 0
        for s in stats:
            if max_rows is not None and total >= max_rows:
                break
            used.append(s)
            total += s.n_rows
        n_rows = total if max_rows is None else min(total, max_rows)
        return cls(tuple(used), n_rows, unit_rows)

    @property
    def n_units(self) -> int:
        return -(-self.n_rows // self.unit_rows)

    def unit_range(self, unit: int) -> tuple[int, int]:
        start = unit * self.unit_rows
        return start, min(start + self.unit_rows, self.n_rows)

    def _offsets(self, field: str) -> np.ndarray:
        counts = np.array([getattr(s, field) for s in self.shards], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)])

    @property
    def row_offsets(self) -> np.ndarray:
        return self._offsets("n_rows")

    @property
    def sequence_offsets(self) -> np.ndarray:
        return self._offsets("n_sequences")

    @property
    def document_offsets(self) -> np.ndarray:
        return self._offsets("n_documents")

    def shards_of_rows(self, start: int, stop: int) -> list[int]:
        """Indices of the shards holding rows [start, stop), empty shards skipped."""
        offsets = self.row_offsets
        return np.flatnonzero((offsets[:-1] < stop) & (offsets[1:] > start)).tolist()

    def to_json(self) -> dict:
        return {"shards": [asdict(s) for s in self.shards], "n_rows": self.n_rows, "unit_rows": self.unit_rows}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        return cls(tuple(ShardStats(**s) for s in data["shards"]), data["n_rows"], data["unit_rows"])
