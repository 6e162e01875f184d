"""One model file out of a checkpoint, and scoring such a file.

A DeepSpeed ZeRO checkpoint keeps the fp32 weights sharded across the ranks that wrote it;
``export_checkpoint`` rebuilds them with DeepSpeed's own ``zero_to_fp32`` (on CPU, no process group)
and writes one safetensors file whose metadata carries the run config, so ``lrd-dist eval`` can
rebuild the model from the file alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrd_dist.config import RunConfig, load_config, to_yaml
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG, Manifest
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.encoders.item_text import build_item_text
from lrd_dist.errors import InputError
from lrd_dist.evaluation.evaluate import evaluate
from lrd_dist.models import build_model, load_weights
from lrd_dist.train.checkpoint import ACCELERATE_DIR, COMPLETE, TRAINER

log = logging.getLogger(__name__)
CONFIG_KEY = "lrd_dist.config"
DEEPSPEED_TAG = "pytorch_model"  # the tag accelerate gives DeepSpeed checkpoints


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    if not (checkpoint / COMPLETE).is_file():
        raise InputError(
            checkpoint, "not a complete checkpoint (no COMPLETE marker)", "pass a step-* directory"
        )
    saved = checkpoint / ACCELERATE_DIR
    if (saved / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(saved), tag=DEEPSPEED_TAG)
    else:
        weights = load_file(str(saved / "model.safetensors"))
    config = OmegaConf.create(json.loads((checkpoint / TRAINER).read_text())["config"])
    weights = {k: v.detach().float().contiguous().clone() for k, v in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(weights, str(partial), metadata={CONFIG_KEY: OmegaConf.to_yaml(config)})
    partial.replace(out)
    return out


def config_of(weights: Path) -> str | None:
    with safe_open(str(weights), framework="pt") as handle:
        return (handle.metadata() or {}).get(CONFIG_KEY)


def evaluate_weights(
    weights: Path, config_path: Path | None, overrides: list[str], splits: list[str]
) -> dict[str, dict[str, float]]:
    """Score a model file on the dataset of its config (or of ``--config``), in one process."""
    if not weights.is_file():
        raise InputError(weights, "no such weights file", "pass a .safetensors from lrd-dist export or a run")
    if config_path is None:
        embedded = config_of(weights)
        if embedded is None:
            raise InputError(weights, "carries no run config", "pass --config with the run's config.yaml")
        with tempfile.TemporaryDirectory() as scratch:
            config_path = Path(scratch) / "config.yaml"
            config_path.write_text(embedded)
            config: RunConfig = load_config(config_path, overrides)
        config_path = weights  # named in messages below
    else:
        config = load_config(config_path, overrides)
    data = Path(config.data.dir)
    manifest = Manifest.load(data)
    catalog = Catalog.read(data / CATALOG)
    latent = config.model.latent_relations if config.model.name != "sasrec" else 0
    graph = KnowledgeGraph(catalog, latent=latent)
    model = build_model(config, manifest.num_users, graph, build_item_text(config, catalog))
    misfit = load_weights(model, load_file(str(weights)))
    if misfit:
        raise InputError(
            weights,
            f"does not fit the model of {config_path} ({', '.join(misfit)})",
            "evaluate with the config the weights were trained with",
        )
    if config.eval.compile:
        model.compile_scoring()
    torch.set_flush_denormal(True)  # see train(): denormal floats are several times slower on a CPU
    known = UserItems.from_dataset(data) if config.eval.full_ranking else None
    results = {}
    for split in splits:
        loader = LoaderConfig(
            batch_size=config.data.eval_batch_size, max_history=config.data.max_history, shuffle=False
        )
        results[split] = evaluate(
            model,
            make_loader(SequenceStream(data, split, loader)),
            config.eval.ks,
            config.eval.ties,
            config.eval.full_ranking,
            manifest.num_items,
            known=known,
            split=split,
        )
    log.info("evaluated %s with %s", weights, to_yaml(config).splitlines()[0])
    return results
