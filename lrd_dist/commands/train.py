"""``lrd-dist train``: train a recommender from a YAML config and dotted overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "train a recommender from a YAML config (--help-config lists every key)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help="the training config, YAML (configs/...): with the command line, the only source "
        "from which a pipe: data.dir, train.callbacks or llm.trust_remote_code take effect",
    )
    parser.add_argument("--help-config", action="store_true", help="print every config key with its meaning")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seed=2 model.name=rcf")


def run(args: argparse.Namespace) -> None:
    from lrd_dist.config import describe_config, load_config

    if args.help_config:
        print(describe_config())
        return
    from accelerate import PartialState

    from lrd_dist.train.trainer import train

    results = train(load_config(args.config, args.overrides))
    if PartialState().is_main_process:
        shown = {k: results[k] for k in ("steps", "best_epoch", "dev", "test") if k in results}
        json.dump(shown, sys.stdout, indent=2)
        print()
