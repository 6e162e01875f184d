"""``lrd-dist prepare``: a real dataset to WebDataset shards (and the options every command that
writes a dataset shares)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrd_dist.config import DataConfig
from lrd_dist.errors import InputError

HELP = (
    "convert a dataset (ReChorus/LRD, MovieLens, Amazon 2014/2018/2023, any table, Hugging Face) into shards"
)
SOURCES = ("rechorus", "movielens", "amazon", "amazon2023", "table", "hf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=SOURCES)
    parser.add_argument("--input", type=Path, help="source directory (rechorus, movielens)")
    parser.add_argument(
        "--name", help="rechorus: the <name> of <name>.text / <name>.item2index; amazon2023 official: <Cat>"
    )
    parser.add_argument(
        "--reviews", type=Path, help="amazon: reviews_<Cat>_5.json.gz (2014) or <Cat>_5.json.gz"
    )
    parser.add_argument("--meta", type=Path, help="amazon: meta_<Cat>.json.gz")
    parser.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
    amazon2023 = parser.add_argument_group(
        "amazon2023 (--reviews <Cat>.jsonl[.gz], --meta meta_<Cat>.jsonl[.gz])"
    )
    amazon2023.add_argument("--split", choices=["loo", "timestamp", "official"], default="loo")
    amazon2023.add_argument(
        "--benchmark", type=Path, help="--split official: the directory of <Cat>.train/valid/test.csv"
    )
    table = parser.add_argument_group("table and hf: an interaction log and an item table")
    table.add_argument(
        "--interactions", help="table: CSV/TSV/Parquet/JSON lines; hf: a hub id, builder or save_to_disk dir"
    )
    table.add_argument("--items", type=Path, help="item table: a file, or a save_to_disk directory")
    table.add_argument("--hf-split", default="train", help="hf: the split that holds the log")
    table.add_argument("--hf-data-files", nargs="+", help="hf with a builder (parquet, json, csv): its files")
    table.add_argument("--user-column", default="user_id")
    table.add_argument("--item-column", default="item_id", help="the item id, in the log")
    table.add_argument("--time-column", default="timestamp")
    table.add_argument(
        "--time-unit", choices=["auto", "s", "ms", "iso"], default="auto", help="auto: from the magnitude"
    )
    table.add_argument("--item-id-column", default="item_id", help="the item id, in the item table")
    table.add_argument("--text-column", default="text")
    table.add_argument("--text-template", help='item text over item-table columns, e.g. "{title} by {brand}"')
    table.add_argument(
        "--attribute-columns", nargs="*", default=[], help="item-table columns of attribute values"
    )
    table.add_argument(
        "--relation-columns", nargs="*", default=[], help="item-table columns listing related item ids"
    )
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
    parser.add_argument(
        "--cold-items",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="a cold-start split: hold this fraction of the items out of training (seeded by --seed); "
        "users whose dev or test target is one stay, so evaluation reports warm and cold targets apart",
    )


def run(args: argparse.Namespace) -> None:
    if args.source == "rechorus":
        from lrd_dist.data.sources.rechorus import load_rechorus

        need(args, "input")
        catalog, interactions, stats = load_rechorus(args.input, args.name)
    elif args.source == "movielens":
        from lrd_dist.data.sources.movielens import load_movielens

        need(args, "input")
        catalog, interactions, stats = load_movielens(args.input, args.min_interactions)
    elif args.source == "amazon":
        from lrd_dist.data.sources.amazon import load_amazon

        need(args, "reviews")
        need(args, "meta")
        catalog, interactions, stats = load_amazon(args.reviews, args.meta, args.min_interactions)
    elif args.source == "amazon2023":
        from lrd_dist.data.sources.amazon2023 import DEFAULT_TEMPLATE, load_amazon2023

        need(args, "meta")
        if args.split != "official":
            need(args, "reviews")
        catalog, interactions, stats = load_amazon2023(
            args.reviews,
            args.meta,
            args.min_interactions,
            args.split,
            args.benchmark,
            args.name,
            args.text_template or DEFAULT_TEMPLATE,
        )
    else:
        from lrd_dist.data.sources.logs import ItemColumns, LogColumns, hf_table, load_table_source

        need(args, "interactions")
        need(args, "items")
        log_columns = LogColumns(args.user_column, args.item_column, args.time_column, args.time_unit)
        item_columns = ItemColumns(
            args.item_id_column,
            args.text_column,
            args.text_template,
            args.attribute_columns,
            args.relation_columns,
        )
        log = (
            args.interactions
            if args.source == "table"
            else hf_table(args.interactions, args.hf_split, args.hf_data_files)
        )
        catalog, interactions, stats = load_table_source(
            log, args.items, log_columns, item_columns, args.min_interactions, args.interactions
        )
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
        cold_items=args.cold_items,
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
