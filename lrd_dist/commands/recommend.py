"""``lrd-dist recommend``: the top k items for each user from a trained run, as Parquet.

    lrd-dist recommend --run runs/office/kda_lrd --k 20 --out recs.parquet
    lrd-dist recommend --run runs/office/kda_lrd --histories sessions.jsonl --out recs.parquet
    lrd-dist recommend --run runs/big/kda_lrd --retrieve runs/big/sasrec --candidates 500 --out recs.parquet
    lrd-dist launch --config_file launchers/cpu_2proc.yaml -- recommend --run ... --out recs.parquet

For every user of the dataset (or those of ``--users``, or the histories of ``--histories``), the
model reads the most recent ``data.max_history`` items of everything known and scores the whole
catalog in chunks (or, with ``--retrieve``, only the retriever's candidates: retrieve, then
rerank); items the user already has are left out unless ``--include-seen``. Rows: ``user`` (the
source's id), ``rank`` (1 = best), ``item`` (source id), ``score``, ``text``. Order within a user:
score descending, equal scores by smaller item id (deterministic, whatever the chunking or the
number of processes). Under ``lrd-dist launch`` each rank scores a contiguous share of the users
and the main process merges the parts, in user order, into the one output file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lrd_dist.commands import STORED_NOTE

HELP = "top-k recommendations over the whole catalog (or retrieve then rerank) from a trained run, as Parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", type=Path, help="run directory of lrd-dist train (config.yaml, best.safetensors)"
    )
    parser.add_argument("--weights", type=Path, help="a weight file instead of --run (lrd-dist export's)")
    parser.add_argument(
        "--config",
        type=Path,
        help="with --weights: the run's config (default: the one inside)." + STORED_NOTE,
    )
    parser.add_argument("--out", type=Path, required=True, help="FILE.parquet")
    parser.add_argument("--k", type=int, default=20, help="items per user")
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--users", type=Path, help="a text file of user source ids, one per line (default: all users)"
    )
    who.add_argument("--histories", type=Path, help='JSON lines {"user", "items": [source ids], "times"}')
    parser.add_argument("--include-seen", action="store_true", help="keep items the user already has")
    parser.add_argument(
        "--retrieve",
        help="two stages: candidates from 'popularity', 'relations', a SASRec run directory or its "
        "`lrd-dist export --embeddings` directory, reranked by the model",
    )
    parser.add_argument("--candidates", type=int, default=200, help="with --retrieve: candidates per user")
    parser.add_argument(
        "--new-items",
        type=Path,
        help='JSON lines {"id", "text", "attributes"?} of items the run never saw, ranked with the rest '
        "(a run with model.item_representation id+text or text; the run directory is not changed)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="users scored together")
    parser.add_argument("--item-chunk", type=int, default=2048, help="catalog items scored per call")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.dir=...")


def run(args: argparse.Namespace) -> None:
    from lrd_dist.serving.recommend import RecommendRequest, recommend

    options = {name: getattr(args, name) for name in RecommendRequest.__dataclass_fields__}
    recommend(RecommendRequest(**options))
