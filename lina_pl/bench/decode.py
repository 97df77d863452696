"""Decoding benchmark: per-token latency and memory of raster generation, LASAD vs softmax + KV cache.

Prints one JSON object whose ``rows`` hold ``{"mixer", "tokens", "batch", "ms_per_token",
"tokens_per_sec", "peak_mem_mb", "state_mb"}``. Generation goes through ``RasterGenerator.generate`` (the
code ``lina sample`` uses) on a small random model on the CPU; ``ms_per_token`` averages the last quarter
of the tokens (where a KV cache is longest), ``peak_mem_mb`` is the growth of the resident set over the
run (measured in a second process whose allocator returns freed memory at once, which would distort the
timing) and ``state_mb`` the size of the decoding state (recurrent states or KV caches) at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from lina_pl.bench.memory import reset_peak_rss, rss_bytes
from lina_pl.errors import ArgumentParser
from lina_pl.models import create_model

TARGETS = {
    "lasad_ms_per_token_4096_over_256_max": 1.15,
    "softmax_over_lasad_ms_per_token_at_4096_min": 1.5,
    "lasad_state_independent_of_length": True,
}


def state_bytes(states: list) -> int:
    """Bytes held by the per-layer decoding states (tensors, tuples of tensors, or KV caches)."""
    total = 0
    for state in states:
        parts = state if isinstance(state, tuple) else [state]
        for part in parts:
            if isinstance(part, torch.Tensor):
                total += part.numel() * part.element_size()
            elif part is not None:  # KVCache: the filled part of its buffers
                total += 2 * part.keys[:, : part.length].numel() * part.keys.element_size()
    return total


def measure(mixer: str, tokens: int, batch: int, dim: int, depth: int, heads: int, vocab: int) -> dict:
    side = int(math.isqrt(tokens))
    if side * side != tokens:
        raise ValueError(f"tokens must be a square number (a square grid), got {tokens}")
    torch.manual_seed(0)
    model = create_model(
        "lasad_tiny",
        mixer=mixer,
        dim=dim,
        depth=depth,
        heads=heads,
        expand_ratio=dim // heads,
        vocab_size=vocab,
        grid=(side, side),
    ).eval()
    with torch.no_grad():
        model.output.weight.normal_(std=0.02)
    labels = torch.arange(batch) % 10
    # warm-up (kernels, allocator)
    model.generate({"label": labels[:1]}, generator=torch.Generator().manual_seed(0))
    stamps, final = [], {}

    def on_token(i, states):
        stamps.append(time.perf_counter())
        if i == tokens - 1:
            final["state"] = state_bytes(states)

    reset_peak_rss()
    baseline = rss_bytes()
    model.generate({"label": labels}, generator=torch.Generator().manual_seed(0), on_token=on_token)
    peak = rss_bytes("VmHWM") - baseline
    tail = stamps[-(tokens // 4) - 1 :]
    ms = 1e3 * (tail[-1] - tail[0]) / (len(tail) - 1)
    return {
        "mixer": mixer,
        "tokens": tokens,
        "batch": batch,
        "ms_per_token": ms,
        "tokens_per_sec": 1e3 * batch / ms,  # generated tokens of the whole batch per second
        "peak_mem_mb": peak / 2**20,
        "state_mb": final["state"] / 2**20,
    }


def _worker(cmd: list[str], env: dict | None = None) -> dict:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"decode worker {' '.join(cmd[3:])} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="lina bench decode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--mixers", nargs="+", default=["lasad", "softmax"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--worker", nargs=2, metavar=("MIXER", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(batch=args.batch, dim=args.dim, depth=args.depth, heads=args.heads, vocab=args.vocab)
    if args.worker:
        print(json.dumps(measure(args.worker[0], int(args.worker[1]), **shape)))
        return 0
    rows = []
    for tokens in args.tokens:
        for mixer in args.mixers:
            cmd = [sys.executable, "-m", "lina_pl.bench.decode", "--worker", mixer, str(tokens)]
            cmd += [f"--{k}={v}" for k, v in shape.items()]
            row = _worker(cmd)  # timing: the allocator as users run it
            # memory: a fixed mmap threshold returns freed buffers at once (slower, so not timed)
            memory = _worker(cmd, os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
            rows.append(row | {"peak_mem_mb": memory["peak_mem_mb"]})
            r = rows[-1]
            print(
                f"  {mixer:>8} tokens={tokens:>5}: {r['ms_per_token']:7.2f} ms/token "
                f"{r['peak_mem_mb']:8.1f} MB peak {r['state_mb']:8.2f} MB state",
                file=sys.stderr,
                flush=True,
            )
    table = {(r["mixer"], r["tokens"]): r for r in rows}
    ratios = {}
    lo, hi = min(args.tokens), max(args.tokens)
    if ("lasad", lo) in table and ("lasad", hi) in table:
        ratios[f"lasad_ms_per_token_{hi}_over_{lo}"] = (
            table["lasad", hi]["ms_per_token"] / table["lasad", lo]["ms_per_token"]
        )
        ratios["lasad_state_mb_by_tokens"] = {t: table["lasad", t]["state_mb"] for t in args.tokens}
    if ("lasad", hi) in table and ("softmax", hi) in table:
        ratios[f"softmax_over_lasad_ms_per_token_at_{hi}"] = (
            table["softmax", hi]["ms_per_token"] / table["lasad", hi]["ms_per_token"]
        )
    report = {
        "benchmark": "decode",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": shape,
        "targets": TARGETS,
        "rows": rows,
        "ratios": ratios,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
