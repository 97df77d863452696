"""Attention benchmark: FLOPs at the paper's 1024 px decoder shape, CPU time and peak memory vs softmax.

Prints one JSON object. Sections:

* ``flops``: ``torch.utils.flop_counter`` on the meta device (no memory, no time) for one LINA decoder
  attention module (division, 5×5 DWConv, KV gate) and one softmax module at N=5120 (1024 condition +
  64×64 image tokens), D=1536, 16 heads. Softmax runs SDPA's math backend so its matmuls are counted,
  like the explicit-matmul count of ``reference/lina.md`` §5.2. Target: ratio ≤ 0.39.
* ``timing``: forward+backward of one attention module (qkv projection, attention, output projection;
  D=512, 8 heads, batch 1) at several lengths for ``lina`` (division), ``softmax`` (SDPA; on CPU its
  fused kernel keeps O(N) memory), ``softmax_math`` (SDPA's explicit N×N math backend, the textbook
  quadratic-memory softmax; skipped above 8192 tokens, where it needs tens of GB) and ``projections``
  (the same two Linears with no token mixing: the floor). Each (variant, N) runs in its own
  subprocess: median time over repeats and peak extra resident memory of one forward+backward after a
  small warm-up. Ratios are computed inside one run, since the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from lina_pl.bench.memory import reset_peak_rss, rss_bytes
from lina_pl.errors import ArgumentParser
from lina_pl.nn.attention import create_mixer

TARGETS = {
    "flops_ratio_max": 0.39,
    "time_ratio_vs_softmax_max": {"4096": 0.30, "16384": 0.15},
    "time_ratio_vs_projections_max_at_8192_and_above": 1.35,
    "peak_memory_ratio_vs_softmax_max_at_16384": 0.5,
}


class ProjectionsOnly(nn.Module):
    """The qkv and output projections of an attention module with the mixing removed (``o = v``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, **_):
        return self.proj(self.qkv(x).chunk(3, dim=-1)[2])


MATH_SOFTMAX_MAX_TOKENS = 8192


def build(variant: str, dim: int, heads: int) -> nn.Module:
    """A benchmarked module: a registry mixer (``softmax_math``: softmax through the math SDPA kernel)."""
    if variant == "projections":
        return ProjectionsOnly(dim)
    return create_mixer("softmax" if variant == "softmax_math" else variant, dim, heads)


def count_flops(n_cond: int = 1024, grid: int = 64, dim: int = 1536, heads: int = 16) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    n = n_cond + grid * grid
    results = {}
    with torch.device("meta"):
        lina = create_mixer(
            "lina", dim, heads, conv_kernel_size=5, kv_gate="absolute", n_cond=n_cond, grid_hw=(grid, grid)
        )
        softmax = create_mixer("softmax", dim, heads)
        x = torch.empty(1, n, dim)
    for name, module in (("lina_decoder", lina), ("softmax", softmax)):
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            module(x, n_cond=n_cond, grid_hw=(grid, grid))
        by_op = {str(op): int(v) for op, v in counter.get_flop_counts()["Global"].items()}
        results[name] = {
            "gflops": counter.get_total_flops() / 1e9,
            "by_op_gflops": {k: v / 1e9 for k, v in by_op.items()},
        }
    results["ratio"] = results["lina_decoder"]["gflops"] / results["softmax"]["gflops"]
    results["shape"] = {"n": n, "n_cond": n_cond, "grid": [grid, grid], "dim": dim, "heads": heads}
    return results


def measure(
    variant: str,
    n: int,
    dim: int,
    heads: int,
    repeats: int,
    device: str = "cpu",
    dtype: str = "float32",
    what: str = "time",
) -> dict:
    """One (variant, N) in this process: ``time`` (median ms of fwd+bwd) or ``memory`` (peak MB of one).

    Both run one full-size step first. CPU memory is the peak growth of the resident set over a second
    step (``VmHWM`` after resetting it); the parent runs memory workers with
    ``MALLOC_MMAP_THRESHOLD_`` fixed so freed tensors leave the resident set at once (glibc otherwise
    keeps them, and the figure would measure the allocator). CUDA memory is ``max_memory_allocated``.
    ``dtype=bfloat16`` runs under autocast (fp32 weights), as training does.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    module = build(variant, dim, heads).to(device)
    math_only = sdpa_kernel(SDPBackend.MATH) if variant == "softmax_math" else contextlib.nullcontext()
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")

    def step(inp):
        module.zero_grad(set_to_none=True)
        inp.grad = None
        module(inp).float().sum().backward()
        if cuda:
            torch.cuda.synchronize()

    with math_only, autocast:
        x = torch.randn(1, n, dim, device=device, requires_grad=True)
        step(x)  # load kernels, start thread pools, size caches
        if what == "memory":
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                baseline = torch.cuda.memory_allocated()
                step(x)
                peak = torch.cuda.max_memory_allocated() - baseline
            else:
                reset_peak_rss()
                baseline = rss_bytes()
                step(x)
                peak = rss_bytes("VmHWM") - baseline
            return {"variant": variant, "n": n, "peak_mb": peak / 2**20}
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - start)
    return {"variant": variant, "n": n, "ms": 1e3 * statistics.median(times)}


def _worker(args: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "lina_pl.bench.attention", "--worker", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"benchmark worker {' '.join(args)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_timings(
    lengths: list[int], dim: int, heads: int, repeats: int, variants: list[str], device: str, dtype: str
) -> dict:
    rows = []
    for n in lengths:
        for variant in variants:
            if variant == "softmax_math" and n > MATH_SOFTMAX_MAX_TOKENS:
                continue
            slow = variant.startswith("softmax") and n >= 8192 and device == "cpu"
            common = [
                variant,
                str(n),
                "--dim",
                str(dim),
                "--heads",
                str(heads),
                "--device",
                device,
                "--dtype",
                dtype,
                "--repeats",
                str(1 if slow else repeats),
            ]
            row = _worker([*common, "--measure", "time"])
            row |= _worker(
                [*common, "--measure", "memory"], env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
            )
            rows.append(row)
            print(
                f"  {variant:>12} N={n:>6}: {row['ms']:10.1f} ms {row['peak_mb']:9.1f} MB",
                file=sys.stderr,
                flush=True,
            )
    table = {(r["variant"], r["n"]): r for r in rows}
    ratios = {}
    for n in lengths:
        entry = {}
        if ("lina", n) in table and ("softmax", n) in table:
            entry["time_vs_softmax"] = table["lina", n]["ms"] / table["softmax", n]["ms"]
            entry["peak_memory_vs_softmax"] = table["lina", n]["peak_mb"] / max(
                table["softmax", n]["peak_mb"], 1e-9
            )
        if ("lina", n) in table and ("softmax_math", n) in table:
            entry["time_vs_softmax_math"] = table["lina", n]["ms"] / table["softmax_math", n]["ms"]
            entry["peak_memory_vs_softmax_math"] = (
                table["lina", n]["peak_mb"] / table["softmax_math", n]["peak_mb"]
            )
        if ("lina", n) in table and ("projections", n) in table:
            entry["time_vs_projections"] = table["lina", n]["ms"] / table["projections", n]["ms"]
        ratios[str(n)] = entry
    return {
        "device": device,
        "dtype": dtype,
        "dim": dim,
        "heads": heads,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "lina_ratios": ratios,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="lina bench attention", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per (variant, N); median reported"
    )
    parser.add_argument("--variants", nargs="+", default=["lina", "softmax", "softmax_math", "projections"])
    parser.add_argument("--device", default="cpu", help="cpu (the targets' setting) or cuda")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16 runs under autocast with fp32 weights",
    )
    parser.add_argument("--skip-timing", action="store_true", help="FLOPs only (seconds instead of minutes)")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], default="time", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        row = measure(
            args.worker[0],
            int(args.worker[1]),
            args.dim,
            args.heads,
            args.repeats,
            args.device,
            args.dtype,
            args.measure,
        )
        print(json.dumps(row))
        return 0
    report = {
        "benchmark": "attention",
        "torch": torch.__version__,
        "targets": TARGETS,
        "flops": count_flops(),
    }
    if not args.skip_timing:
        report["timing"] = run_timings(
            args.lengths, args.dim, args.heads, args.repeats, args.variants, args.device, args.dtype
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
