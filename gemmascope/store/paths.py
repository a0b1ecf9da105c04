"""The store's file layout (DESIGN.md contract), in one place.

    RUN/activations/ledger.json                     commit point
    RUN/activations/<site>/layer_<L>/               zarr3 array [n_rows, d_in]
    RUN/activations/<site>/layer_<L>/unit-K.parquet (Parquet output instead of zarr3)
    RUN/activations/tokens/unit-K.parquet           row table of unit K
    RUN/activations/sequences/shard-S.parquet       packed token sequences of source shard S
"""

from __future__ import annotations

from gemmascope import storage


def activations_url(run_dir: str) -> str:
    return storage.join(storage.normalize(run_dir), "activations")


def ledger_url(activations: str) -> str:
    return storage.join(activations, "ledger.json")


def array_key(site: str, layer: int) -> str:
    """An array's path under `activations/`, also its key in the ledger's checksums."""
    return f"{site}/layer_{layer}"


def array_url(activations: str, site: str, layer: int) -> str:
    return storage.join(activations, array_key(site, layer))


def parquet_part_url(activations: str, site: str, layer: int, unit: int) -> str:
    return storage.join(array_url(activations, site, layer), f"unit-{unit:06d}.parquet")


def tokens_url(activations: str, unit: int) -> str:
    return storage.join(activations, "tokens", f"unit-{unit:06d}.parquet")


def sequences_url(activations: str, shard: int) -> str:
    return storage.join(activations, "sequences", f"shard-{shard:06d}.parquet")
