"""The harvest ledger: the store's single commit point.

A JSON file rewritten atomically by the harvest driver (its only writer) after each
event: a source shard tokenised, the row layout fixed, a work unit's rows committed.
Readers trust only what it lists; on resume, anything a crashed unit left behind is
overwritten when the unit runs again over the same rows.
"""

from __future__ import annotations

from typing import Any

from gemmascope import storage
from gemmascope.errors import UserError
from gemmascope.store.layout import Layout, ShardStats
from gemmascope.store.paths import ledger_url

FORMAT = "gemmascope.activations/1"


def _first_difference(old: Any, new: Any, prefix: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: store has {old!r}, config has {new!r}"


class HarvestLedger:
    def __init__(self, url: str, data: dict):
        self.url = url
        self.data = data

    @classmethod
    def read(cls, activations: str) -> HarvestLedger:
        url = ledger_url(activations)
        try:
            data = storage.read_json(url)
        except FileNotFoundError:
            raise UserError(f"{url}: no activation store here (ledger missing; run `gemmascope harvest` first)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{url}: not a gemmascope activation ledger (format {data.get('format') if isinstance(data, dict) else None!r})")
        return cls(url, data)

    @classmethod
    def open_for_harvest(cls, activations: str, *, fingerprint: str, header: dict) -> HarvestLedger:
        """Resume the store's ledger, or start one; refuse a store made by another config."""
        url = ledger_url(activations)
        if storage.exists(url):
            ledger = cls.read(activations)
            if ledger.data["fingerprint"] != fingerprint:
                difference = _first_difference(ledger.data["identity"], header["identity"])
                raise UserError(f"{url}: made by a different harvest config ({difference}); use a new run_dir")
            return ledger
        ledger = cls(url, {"format": FORMAT, "fingerprint": fingerprint, **header,
                           "shards": {}, "layout": None, "units": {}, "complete": False})
        ledger.save()
        return ledger

    def save(self) -> None:
        storage.write_json_atomic(self.url, self.data)

    # Source shards -------------------------------------------------------------
    def shard_stats(self, shard: int) -> ShardStats | None:
        record = self.data["shards"].get(str(shard))
        return ShardStats(**record) if record else None

    def record_shard(self, shard: int, stats: ShardStats) -> None:
        self.data["shards"][str(shard)] = stats.__dict__.copy()

    # Layout and units ----------------------------------------------------------
    @property
    def layout(self) -> Layout | None:
        return Layout.from_json(self.data["layout"]) if self.data["layout"] else None

    def set_layout(self, layout: Layout) -> None:
        self.data["layout"] = layout.to_json()

    @property
    def committed_units(self) -> dict[int, dict]:
        return {int(k): v for k, v in self.data["units"].items()}

    def commit_unit(self, unit: int, info: dict) -> None:
        self.data["units"][str(unit)] = info

    @property
    def complete(self) -> bool:
        return bool(self.data["complete"])

    def mark_complete(self, summary: dict) -> None:
        self.data["complete"] = True
        self.data["summary"] = summary
