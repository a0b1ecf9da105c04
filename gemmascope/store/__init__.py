"""The activation store: TensorStore zarr3 arrays (or Parquet), a token table, and a ledger.

Public API: `ActivationStore` (reading) and the paths and layout helpers the harvest
writes with. See DESIGN.md "Store" for the on-disk contract.
"""

from gemmascope.store.layout import Layout, ShardStats
from gemmascope.store.reader import ActivationStore

__all__ = ["ActivationStore", "Layout", "ShardStats"]
