"""``lina data verify DIR``: read every shard of a shard directory as training and validation would, and
report per split what is readable; exits 1 when anything is lost.

    lina data verify data/shards/digits

Each shard is checked against the manifest's SHA-256 (a mismatch loses the whole shard), its samples are
decoded and checked (shape, label, NaN/inf), and their count is compared with the manifest's. Manifests of
older builds have no checksums: their shards are still parsed and counted, but a changed byte inside a
sample (a label, a pixel) cannot be found.
"""

from __future__ import annotations

import argparse

from lina_pl.data import shards
from lina_pl.data.reader import Examples, ShardRead, read_shard


def verify(root: str) -> tuple[dict, dict[str, list[ShardRead]]]:
    """The manifest and, per split with shards, the read of every shard (a missing file lost everything)."""
    manifest = shards.load_manifest(root)
    examples = Examples(manifest)
    return manifest, {
        split: [read_shard(entry, examples) for entry in shards.shard_entries(root, manifest, split, False)]
        for split in shards.SPLITS
        if manifest["shards"].get(split)
    }


def split_summary(split: str, reads: list[ShardRead], expected: int) -> tuple[str, bool]:
    """``(text, damaged)``: a line for the split, then one per damaged shard."""
    good = sum(len(read.items) for read in reads)
    damaged = [read for read in reads if read.lost or read.damage]
    lost = sum(read.lost for read in damaged)
    line = f"{split}: {_shards(len(reads))}, {good} of {expected} samples readable"
    if damaged or good != expected:
        line += f", {max(lost, expected - good)} lost in {len(damaged)} damaged {_shards(len(damaged))[2:]}"
    else:
        line += ", no damage"
    return "\n".join([line, *(f"  {read.describe()}" for read in damaged)]), bool(damaged) or good != expected


def _shards(n: int) -> str:
    return f"{n} shard" + ("" if n == 1 else "s")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check every shard of a shard directory (checksums, sample counts, decoding)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(command_parser=p)
    p.add_argument("root", metavar="DIR", help="directory written by `lina data build` (holds manifest.json)")


def run(args: argparse.Namespace) -> int:
    try:
        manifest, reads = verify(args.root)
    except (OSError, ValueError) as exn:
        args.command_parser.error(str(exn))
    damaged = False
    for split, split_reads in reads.items():
        text, bad = split_summary(split, split_reads, manifest["counts"].get(split, 0))
        print(text)
        damaged |= bad
    if "files" not in manifest:
        print("note: the manifest has no shard checksums (an older build); changed bytes cannot be found")
    if damaged:
        print(f"{args.root} is damaged: rebuild it with `lina data build ... --overwrite`")
    return 1 if damaged else 0
