"""``lina evaluate fid | kid | is | pr | all``: sample quality against real images, printed as JSON.

Each reads the samples' ``arr_0`` (uint8 N×H×W×C, as ``lina sample`` writes it; labels or prompts beside it
are ignored), computes their features with ``--features`` (``digits``: the small network trained on real
digits, for the digits demo and digit scenes; ``inception``: the FID Inception, from a local weights file)
and compares them with the reference ``--ref``: a shard directory (split ``--ref-split``), an images
``.npz`` (``arr_0``), a statistics ``.npz`` an earlier run cached (its path is printed as
``reference.stats``), or an ADM reference batch (``mu`` / ``sigma``: FID and sFID as published).
"""

from __future__ import annotations

import argparse

#: metric -> (help, whether it compares with real images)
METRICS = {
    "fid": ("Fréchet distance of features (FID, and sFID where the features have spatial maps)", True),
    "kid": ("Kernel Inception Distance (unbiased MMD², subsets of up to 1000 samples)", True),
    "is": ("Inception Score of the samples' class logits (no reference)", False),
    "pr": ("improved precision and recall (k-NN manifolds, Kynkäänniemi et al. 2019)", True),
    "all": ("fid, kid, is and pr from one pass of the feature network", True),
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the metrics of :data:`METRICS` as subcommands of ``lina evaluate``."""
    from lina_pl.metrics import generative
    from lina_pl.metrics.features import NETWORKS

    for name, (help_text, needs_ref) in METRICS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}.")
        p.add_argument(
            "--samples", required=True, metavar="S.npz", help="samples.npz with arr_0 (uint8 NHWC)"
        )
        if needs_ref:
            p.add_argument(
                "--ref",
                required=True,
                metavar="R",
                help="real images: a shard directory, an images .npz (arr_0), a cached statistics .npz, "
                "or an ADM reference batch (mu, sigma)",
            )
            p.add_argument(
                "--ref-split",
                default="train",
                metavar="SPLIT",
                help="the shard split to read (default: train)",
            )
        p.add_argument("--features", required=True, choices=NETWORKS, help="the feature network")
        p.add_argument(
            "--inception-weights",
            metavar="FILE.pth",
            help="torch-fidelity's Inception weights (default: in torch.hub's checkpoints directory)",
        )
        p.add_argument("--device", help="where the features run (default: cuda if available, else cpu)")
        p.add_argument("--batch-size", type=int, default=256, metavar="B", help="images per feature batch")
        if name in ("kid", "all"):
            p.add_argument("--kid-subsets", type=int, default=generative.KID_SUBSETS, metavar="N")
            p.add_argument("--kid-subset-size", type=int, default=generative.KID_SUBSET_SIZE, metavar="N")
        if name in ("is", "all"):
            p.add_argument("--splits", type=int, default=generative.IS_SPLITS, metavar="N", help="IS splits")
        if name in ("pr", "all"):
            p.add_argument("--k", type=int, default=generative.PR_K, help="neighbourhood size")
        p.set_defaults(run=run, parser=p)


def _positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    import torch

    from lina_pl.metrics import generative as g
    from lina_pl.metrics.features import extract_features, feature_network
    from lina_pl.metrics.reference import load_reference, read_images_npz

    _positive(parser, args, "batch_size", "kid_subsets", "kid_subset_size", "splits", "k")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r} is not a device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")
    metric = args.metric
    images = read_images_npz(args.samples, "samples file")
    net = feature_network(args.features, inception_weights=args.inception_weights).to(device)
    fake = extract_features(net, images, args.batch_size)
    result: dict = {"samples": len(images), "features": net.key}
    if metric in ("is", "all"):
        result["is"], result["is_std"] = g.inception_score(fake.logits, args.splits)
    if metric == "is":
        return result

    need_features = metric in ("kid", "pr", "all")
    ref = load_reference(
        args.ref, net, split=args.ref_split, need_features=need_features, batch_size=args.batch_size
    )
    result["reference"] = {"source": ref.source, "stats": None if ref.path is None else str(ref.path)}
    if ref.features is not None:
        result["reference"]["count"] = len(ref.features)
    if need_features and ref.features is None:
        raise ValueError(
            f"{args.ref} holds only FID statistics (mu, sigma); {metric} needs reference images: pass "
            "shards, an images .npz or a reference batch that also holds arr_0"
        )
    if metric in ("fid", "all"):
        result["fid"] = g.fid(ref.stats, fake.pool)
        if ref.spatial is not None and fake.spatial is not None:
            result["sfid"] = g.fid(ref.spatial, fake.spatial)
    real = None if ref.features is None else ref.features.to(device)
    if metric in ("kid", "all"):
        result["kid"], result["kid_std"], result["kid_subset_size"] = g.kid(
            real, fake.pool, args.kid_subsets, args.kid_subset_size
        )
    if metric in ("pr", "all"):
        result["precision"], result["recall"] = g.precision_recall(real, fake.pool, args.k)
        result["k"] = args.k
    return result
