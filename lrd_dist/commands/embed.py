"""``lrd-dist embed``: the frozen item-text table of a dataset (one slice per rank under
``accelerate launch``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from lrd_dist.config import TextEncoderConfig
from lrd_dist.errors import InputError

HELP = "encode a dataset's item texts with a Hugging Face model into item_embeddings.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TextEncoderConfig()
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    parser.add_argument("--model", help=f"local path or hub id (default: {defaults.model})")
    parser.add_argument("--gguf-file", help="a GGUF file inside the model directory")
    parser.add_argument(
        "--adapter",
        type=Path,
        help="a trained encoder (<run>/encoder or a checkpoint's encoder/): LoRA adapter or tuned model; "
        "model, pooling, template and max length default to the ones it was trained with",
    )
    parser.add_argument("--pooling", choices=["mean", "cls", "last"], help=f"default: {defaults.pooling}")
    parser.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    parser.add_argument("--template", help="prompt around each item text (default: {text})")
    parser.add_argument("--max-length", type=int, help=f"default: {defaults.max_length} (as llm.max_length)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage dtype")
    parser.add_argument("--trust-remote-code", action="store_true", help="only for models you trust")
    parser.add_argument("--out", type=Path, help="default: DATA/item_embeddings.safetensors")


def run(args: argparse.Namespace) -> None:
    from lrd_dist.encoders.embed_catalog import embed_catalog, trained_encoder_config

    # Precedence: command line, then what the adapter was trained with, then the defaults.
    saved = trained_encoder_config(args.adapter) if args.adapter else {}
    given = {
        "model": args.model,
        "gguf_file": args.gguf_file,
        "pooling": args.pooling,
        "template": args.template,
        "max_length": args.max_length,
        "normalize": False if args.no_normalize else None,
    }
    defaults = TextEncoderConfig()
    chosen = {
        f.name: given[f.name]
        if given.get(f.name) is not None
        else saved.get(f.name, getattr(defaults, f.name))
        for f in fields(TextEncoderConfig)
        if f.name != "trust_remote_code"  # only ever from this command line, never from a saved file
    }
    chosen["gguf_file"] = chosen["gguf_file"] or None
    config = TextEncoderConfig(**chosen, trust_remote_code=args.trust_remote_code)
    if "{text}" not in config.template:
        raise InputError("--template", f"{config.template!r} has no {{text}}", "put {text} in the template")
    print(f"wrote {embed_catalog(args.data, config, args.out, args.adapter, args.batch_size, args.dtype)}")
