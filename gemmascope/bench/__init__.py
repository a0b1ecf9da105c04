"""Throughput benchmarks (`gemmascope bench NAME --json`); they measure, tests assert."""

from __future__ import annotations

import argparse
import json


def report(result: dict, as_json: bool) -> None:
    """One JSON object (for scripts and `make bench`), or an aligned table for people."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")


def add_benchmarks(commands: argparse._SubParsersAction) -> None:
    from gemmascope.bench import harvest, loader, summary, train_step

    harvest.add_parser(commands)
    loader.add_parser(commands)
    summary.add_parser(commands)
    train_step.add_parser(commands)
