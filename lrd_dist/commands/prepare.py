"""``lrd-dist prepare``: a real dataset to WebDataset shards (and the options every command that
writes a dataset shares)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrd_dist.config import DataConfig
from lrd_dist.errors import InputError

HELP = "convert a real dataset (ReChorus/LRD layout, MovieLens, Amazon) into WebDataset shards"
SOURCES = ("rechorus", "movielens", "amazon")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--input", type=Path, help="source directory (rechorus, movielens)")
    parser.add_argument("--name", help="rechorus: the <name> of <name>.text / <name>.item2index")
    parser.add_argument(
        "--reviews", type=Path, help="amazon: reviews_<Cat>_5.json.gz (2014) or <Cat>_5.json.gz"
    )
    parser.add_argument("--meta", type=Path, help="amazon: meta_<Cat>.json.gz")
    parser.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
    add_write_options(parser)


def add_write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument(
        "--max-history",
        type=int,
        default=DataConfig.max_history,
        help="history length stored per sample (training reads at most this; default: data.max_history's)",
    )
    parser.add_argument(
        "--negatives", type=int, default=99, help="dev/test candidates per row (when sampled)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=1024, help="samples per tar record")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")


def run(args: argparse.Namespace) -> None:
    if args.source == "rechorus":
        from lrd_dist.data.sources.rechorus import load_rechorus

        need(args, "input")
        catalog, interactions, stats = load_rechorus(args.input, args.name)
    elif args.source == "movielens":
        from lrd_dist.data.sources.movielens import load_movielens

        need(args, "input")
        catalog, interactions, stats = load_movielens(args.input, args.min_interactions)
    else:
        from lrd_dist.data.sources.amazon import load_amazon

        need(args, "reviews")
        need(args, "meta")
        catalog, interactions, stats = load_amazon(args.reviews, args.meta, args.min_interactions)
    write(args, args.source, catalog, interactions, stats=stats)


def need(args: argparse.Namespace, name: str) -> None:
    if getattr(args, name) is None:
        raise InputError(
            "command line", f"--{name} is required with --source {args.source}", f"pass --{name}"
        )


def write(args: argparse.Namespace, source: str, catalog, interactions, **extra) -> None:
    """Write the dataset with the options every writing command shares, and print its summary."""
    from lrd_dist.data.prepare import write_dataset

    manifest = write_dataset(
        args.out,
        source=source,
        catalog=catalog,
        interactions=interactions,
        max_history=args.max_history,
        num_negatives=args.negatives,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        block_size=args.block_size,
        overwrite=args.overwrite,
        **extra,
    )
    summary = {
        "out": str(args.out),
        "source": manifest.source,
        "users": manifest.num_users,
        "items": manifest.num_items,
        "interactions": manifest.num_interactions,
        "samples": manifest.samples,
        "shards": len(manifest.shards),
        "stats": manifest.stats,
    }
    print(json.dumps(summary, indent=2))
