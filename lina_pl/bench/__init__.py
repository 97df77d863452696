"""Benchmarks: programs that print JSON. ``lina bench NAME`` runs ``lina_pl.bench.NAME``."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "attention": "FLOPs, CPU time and peak memory of LINA attention vs softmax",
    "decode": "per-token decoding latency and memory, LASAD vs softmax + KV cache",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lina bench", description="Run a benchmark; it prints JSON.")
    parser.add_argument(
        "name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    )
    args, rest = parser.parse_known_args(argv)
    return importlib.import_module(f"lina_pl.bench.{args.name}").main(rest) or 0
