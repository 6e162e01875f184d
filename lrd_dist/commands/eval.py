"""``lrd-dist eval``: score a model file on dev/test, sampled or full ranking."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrd_dist.commands import STORED_NOTE

HELP = "score a model file (best.safetensors or lrd-dist export's) on dev and test"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weights", required=True, type=Path, help="from lrd-dist export, or best.safetensors"
    )
    parser.add_argument(
        "--config", type=Path, help="default: the config stored in the weights file." + STORED_NOTE
    )
    parser.add_argument("--split", action="append", choices=["dev", "test"], help="default: dev and test")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.full_ranking=true")


def run(args: argparse.Namespace) -> None:
    results = evaluate_weights(args.weights, args.config, args.overrides, args.split or ["dev", "test"])
    print(json.dumps(results, indent=2))


def evaluate_weights(
    weights: Path, config_path: Path | None, overrides: list[str], splits: list[str]
) -> dict[str, dict[str, float]]:
    """Score a model file on the dataset of its config (or of ``--config``), in one process."""
    from lrd_dist.assembly import build_dataset_and_model
    from lrd_dist.data.user_items import UserItems
    from lrd_dist.evaluation.evaluate import evaluate
    from lrd_dist.run_dir import config_of_weights, load_weights_file
    from lrd_dist.runtime import CompiledScoring, flush_denormals, scoring_context, select_attention

    config = config_of_weights(weights, config_path, overrides)
    flush_denormals()
    run = build_dataset_and_model(config, select_attention(config.model.fused_attention))
    load_weights_file(run, weights, config_path or weights)
    known = UserItems.from_dataset(run.data_dir) if config.eval.full_ranking else None
    scorer = CompiledScoring(run.model) if config.eval.compile else None
    results = {}
    run.model.eval()
    for split in splits:
        with scoring_context(scorer), run.model.text_read_once():
            results[split] = evaluate(
                run.model,
                run.loader(split),
                config.eval.ks,
                config.eval.ties,
                config.eval.full_ranking,
                run.manifest.num_items,
                known=known,
                split=split,
                cold=run.cold,
            )
    return results
