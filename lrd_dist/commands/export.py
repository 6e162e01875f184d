"""``lrd-dist export``: one safetensors model file out of a (ZeRO-sharded) checkpoint.

A DeepSpeed ZeRO checkpoint keeps the fp32 weights sharded across the ranks that wrote it; they
are rebuilt with DeepSpeed's own ``zero_to_fp32`` (on CPU, no process group). The file's metadata
carries the run config, so ``lrd-dist eval`` can rebuild the model from the file alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from lrd_dist.errors import InputError
from lrd_dist.run import CONFIG_KEY
from lrd_dist.train.checkpoint import ACCELERATE_DIR, COMPLETE, TRAINER

HELP = "write one safetensors model file (config inside) from a checkpoint, ZeRO shards included"
DEEPSPEED_TAG = "pytorch_model"  # the tag accelerate gives DeepSpeed checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoints/step-* directory")
    parser.add_argument("--out", required=True, type=Path, help="FILE.safetensors")


def run(args: argparse.Namespace) -> None:
    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")


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
    config = json.loads((checkpoint / TRAINER).read_text())["config"]
    weights = {k: v.detach().float().contiguous().clone() for k, v in weights.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(weights, str(partial), metadata={CONFIG_KEY: yaml.safe_dump(config, sort_keys=False)})
    partial.replace(out)
    return out
