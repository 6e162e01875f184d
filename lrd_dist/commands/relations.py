"""``lrd-dist relations --run RUN_DIR``: the relation report of an LRD run
(``lrd_dist/evaluation/relation_report.py``): per slot its most confident pairs, usage, and a
heatmap against the predefined relations, as ``RUN_DIR/relations/index.html`` with PNGs and
``summary.json``."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "HTML/PNG report of the relations an LRD run discovered (usage, heatmap, confident pairs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run directory of lrd-dist train")
    parser.add_argument("--top", type=int, default=10, help="pairs shown per relation")


def run(args: argparse.Namespace) -> None:
    from lrd_dist.evaluation.relation_report import relation_report

    print(f"wrote {relation_report(args.run, top=args.top)}")
