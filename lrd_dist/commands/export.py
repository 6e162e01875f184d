"""``lrd-dist export``: one safetensors model file out of a (ZeRO-sharded) checkpoint, or the
vectors of a trained run for a retrieval index.

    lrd-dist export --checkpoint runs/x/checkpoints/step-00001200 --out model.safetensors
    lrd-dist export --embeddings vectors/ --run runs/office/sasrec [--index auto|flat|hnsw|ivf]

A DeepSpeed ZeRO checkpoint keeps the fp32 weights sharded across the ranks that wrote it; they
are rebuilt with DeepSpeed's own ``zero_to_fp32`` (on CPU, no process group). The file's metadata
carries the run config, so ``lrd-dist eval`` can rebuild the model from the file alone.

``--embeddings`` writes ``items.safetensors`` + ``items.parquet`` (item vectors with their source
ids) and, for SASRec, whose scores are dot products, ``users.safetensors`` + ``users.parquet`` (the
known users' vectors from their latest history) and a FAISS inner-product index ``index.faiss``:
exact up to 200,000 items, HNSW beyond, with its recall@10/100 against exact search in
``index.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lrd_dist.commands import STORED_NOTE
from lrd_dist.errors import InputError

HELP = "one safetensors model file (config inside) from a checkpoint, or item/user vectors and a FAISS index"
DEEPSPEED_TAG = "pytorch_model"  # the tag accelerate gives DeepSpeed checkpoints


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="a checkpoints/step-* directory")
    parser.add_argument("--out", type=Path, help="with --checkpoint: FILE.safetensors")
    parser.add_argument(
        "--embeddings",
        type=Path,
        help="write the trained catalog's item vectors (and for SASRec a FAISS index) into DIR; "
        "items added with recommend --new-items are not part of it",
    )
    parser.add_argument("--run", type=Path, help="with --embeddings: a run directory")
    parser.add_argument("--weights", type=Path, help="with --embeddings: a weight file instead of --run")
    parser.add_argument(
        "--config", type=Path, help="with --weights: its config (default: the one inside)." + STORED_NOTE
    )
    parser.add_argument(
        "--index", default="auto", choices=["auto", "flat", "hnsw", "ivf"], help="FAISS index kind"
    )


def run(args: argparse.Namespace) -> None:
    if args.embeddings is not None:
        from lrd_dist.run_dir import load_trained
        from lrd_dist.serving.retrieval import export_embeddings

        info = export_embeddings(
            load_trained(args.run, args.weights, args.config), args.embeddings, args.index
        )
        print(f"wrote {args.embeddings}: {json.dumps(info)}")
        return
    if args.checkpoint is None or args.out is None:
        raise InputError(
            "command line",
            "nothing to export",
            "pass --checkpoint DIR --out FILE, or --embeddings DIR --run RUN",
        )
    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")


def export_checkpoint(checkpoint: Path, out: Path) -> Path:
    import yaml
    from safetensors.torch import load_file, save_file

    from lrd_dist.run_dir import CONFIG_KEY
    from lrd_dist.runtime import refuse_unsafe_checkpoint, weights_only_loading
    from lrd_dist.train.checkpoint import ACCELERATE_DIR, COMPLETE, TRAINER

    if not (checkpoint / COMPLETE).is_file():
        raise InputError(
            checkpoint, "not a complete checkpoint (no COMPLETE marker)", "pass a step-* directory"
        )
    saved = checkpoint / ACCELERATE_DIR
    refuse_unsafe_checkpoint(checkpoint)
    if (saved / DEEPSPEED_TAG).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loading():
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
