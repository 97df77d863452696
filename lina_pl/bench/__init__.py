"""Benchmarks: programs that print JSON. ``lina bench NAME`` runs ``lina_pl.bench.NAME``."""

from __future__ import annotations

import importlib

from lina_pl.errors import ArgumentParser

BENCHMARKS = {
    "attention": "FLOPs, CPU time and peak memory of LINA attention vs softmax",
    "decode": "per-token decoding latency and memory, LASAD vs softmax + KV cache",
    "sample": "whole-model FLOPs per image and sampling latency (CPU, or the 1024 px GPU protocol)",
    "data": "training-loader samples/s on KL-16 latent shards, with a per-sample cost breakdown",
}


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lina bench", description="Run a benchmark; it prints JSON.")
    parser.add_argument(
        "name", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    )
    # parse the name alone, so ``lina bench NAME --help`` reaches the benchmark's own parser
    args = parser.parse_args(argv[:1])
    return importlib.import_module(f"lina_pl.bench.{args.name}").main(argv[1:]) or 0
