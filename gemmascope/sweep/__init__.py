"""Sweeps: the SAE grid as jobs, their ledger with leases, and the Ray launcher."""
