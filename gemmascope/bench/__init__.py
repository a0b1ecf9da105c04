"""Throughput benchmarks (`gemmascope bench NAME --json`); they measure, tests assert."""

from __future__ import annotations

import argparse


def add_benchmarks(commands: argparse._SubParsersAction) -> None:
    from gemmascope.bench import harvest, train_step

    harvest.add_parser(commands)
    train_step.add_parser(commands)
