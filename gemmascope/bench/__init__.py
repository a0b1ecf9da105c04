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


def positive_int(text: str) -> int:
    """argparse type of sizes and counts: 0 or less would fail deep inside JAX, not as a usage error."""
    value = int(text)  # a ValueError becomes argparse's "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type of rates: finite and above 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def fraction(text: str) -> float:
    """argparse type of shares of a width: in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def add_sae_shape(parser: argparse.ArgumentParser) -> None:
    """--d-in, --width, --batch: the shape every training benchmark times, one default for all."""
    parser.add_argument("--d-in", type=positive_int, default=640)
    parser.add_argument("--width", type=positive_int, default=4096)
    parser.add_argument("--batch", type=positive_int, default=1024)


def add_benchmarks(commands: argparse._SubParsersAction) -> None:
    from gemmascope.bench import harvest, loader, peers, summary, train_step

    harvest.add_parser(commands)
    loader.add_parser(commands)
    peers.add_parser(commands)
    summary.add_parser(commands)
    train_step.add_parser(commands)
