"""The ``lrd-dist`` command: prepare, synth, verify, demo.

Every subcommand validates its input at this boundary; an ``InputError`` is printed as one line that
names the file, the line or record and the fix, and the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lrd_dist.errors import InputError

log = logging.getLogger("lrd_dist")


def _write_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="dataset directory to create")
    parser.add_argument("--max-history", type=int, default=50, help="history length stored per sample")
    parser.add_argument(
        "--negatives", type=int, default=99, help="dev/test candidates per row (when sampled)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=100_000)
    parser.add_argument("--block-size", type=int, default=1024, help="samples per tar record")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lrd-dist", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="convert a real dataset into WebDataset shards")
    prepare.add_argument("--source", required=True, choices=["rechorus", "movielens", "amazon"])
    prepare.add_argument("--input", type=Path, help="source directory (rechorus, movielens)")
    prepare.add_argument("--name", help="rechorus: the <name> of <name>.text / <name>.item2index")
    prepare.add_argument(
        "--reviews", type=Path, help="amazon: reviews_<Cat>_5.json.gz (2014) or <Cat>_5.json.gz"
    )
    prepare.add_argument("--meta", type=Path, help="amazon: meta_<Cat>.json.gz")
    prepare.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
    _write_options(prepare)

    synth = commands.add_parser("synth", help="synthetic data with planted latent relations")
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=1000)
    synth.add_argument("--relations", type=int, default=4)
    synth.add_argument("--mean-length", type=float, default=12.0)
    _write_options(synth)

    verify = commands.add_parser("verify", help="check every shard against the manifest (sha256, counts)")
    verify.add_argument("--data", required=True, type=Path)

    embed = commands.add_parser("embed", help="encode catalog texts with a Hugging Face model")
    embed.add_argument("--data", required=True, type=Path, help="prepared dataset directory")
    embed.add_argument("--model", help="local path or hub id (default: all-MiniLM-L6-v2)")
    embed.add_argument("--gguf-file", help="a GGUF file inside the model directory")
    embed.add_argument(
        "--adapter",
        type=Path,
        help="a trained encoder (<run>/encoder or a checkpoint's encoder/): LoRA adapter or tuned model; "
        "model, pooling, template and max length default to the ones it was trained with",
    )
    embed.add_argument("--pooling", choices=["mean", "cls", "last"], help="default: mean")
    embed.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    embed.add_argument("--template", help="prompt around each item text (default: {text})")
    embed.add_argument("--max-length", type=int, help="default: 128")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    embed.add_argument("--trust-remote-code", action="store_true", help="only for models you trust")
    embed.add_argument("--out", type=Path, help="default: DATA/item_embeddings.safetensors")

    train = commands.add_parser("train", help="train a recommender from a YAML config")
    train.add_argument("--config", type=Path, help="YAML file (configs/...)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.seed=2 model.name=rcf")

    export = commands.add_parser("export", help="one safetensors model file from a (ZeRO-sharded) checkpoint")
    export.add_argument("--checkpoint", required=True, type=Path, help="a checkpoints/step-* directory")
    export.add_argument("--out", required=True, type=Path, help="FILE.safetensors")

    evaluate = commands.add_parser("eval", help="score a model file on dev/test")
    evaluate.add_argument(
        "--weights", required=True, type=Path, help="from lrd-dist export, or best.safetensors"
    )
    evaluate.add_argument("--config", type=Path, help="default: the config stored in the weights file")
    evaluate.add_argument("--split", action="append", choices=["dev", "test"], help="default: dev and test")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.full_ranking=true")

    commands.add_parser(
        "launch",
        help="accelerate launch with signal forwarding and a requeue exit code: "
        "lrd-dist launch [accelerate launch options] -- train --config ...",
    )

    relations = commands.add_parser(
        "relations", help="HTML/PNG report of the relations an LRD run discovered"
    )
    relations.add_argument("--run", required=True, type=Path, help="run directory of lrd-dist train")
    relations.add_argument("--top", type=int, default=10, help="pairs shown per relation")

    demo = commands.add_parser("demo", help="the embedded default: synthetic data, embeddings, KDA+LRD")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--users", type=int, default=2000)
    demo.add_argument("--items", type=int, default=1000)
    demo.add_argument("--epochs", type=int, default=10)
    return parser


def _prepare(args: argparse.Namespace) -> None:
    if args.source == "rechorus":
        from lrd_dist.data.sources.rechorus import load_rechorus

        _need(args, "input")
        catalog, interactions, stats = load_rechorus(args.input, args.name)
    elif args.source == "movielens":
        from lrd_dist.data.sources.movielens import load_movielens

        _need(args, "input")
        catalog, interactions, stats = load_movielens(args.input, args.min_interactions)
    else:
        from lrd_dist.data.sources.amazon import load_amazon

        _need(args, "reviews")
        _need(args, "meta")
        catalog, interactions, stats = load_amazon(args.reviews, args.meta, args.min_interactions)
    _write(args, args.source, catalog, interactions, stats=stats)


def _need(args: argparse.Namespace, name: str) -> None:
    if getattr(args, name) is None:
        raise InputError(
            "command line", f"--{name} is required with --source {args.source}", f"pass --{name}"
        )


def _synth(args: argparse.Namespace) -> None:
    from lrd_dist.data.format import PLANTED_PAIRS
    from lrd_dist.data.synth import SynthConfig, generate

    config = SynthConfig(
        users=args.users,
        items=args.items,
        relations=args.relations,
        seed=args.seed,
        mean_length=args.mean_length,
    )
    catalog, interactions, planted = generate(config)
    _write(
        args,
        "synth",
        catalog,
        interactions,
        stats={"synth_relations": args.relations},
        extra_tables={PLANTED_PAIRS: planted},
    )


def _write(args: argparse.Namespace, source: str, catalog, interactions, **extra) -> None:
    """Write the dataset with the options every writing subcommand shares."""
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
    _print_summary(args.out, manifest)


def _verify(args: argparse.Namespace) -> None:
    from lrd_dist.data.format import SPLITS
    from lrd_dist.data.stream import LoaderConfig, SequenceStream

    for split in SPLITS:
        stream = SequenceStream(args.data, split, LoaderConfig(batch_size=4096, shuffle=False, max_history=1))
        seen = sum(int(batch["valid"].sum()) for batch in stream)
        if seen != stream.num_samples:
            raise InputError(
                args.data,
                f"{split}: read {seen} samples, manifest says {stream.num_samples}",
                "prepare the dataset again",
            )
        print(f"{split}: {len(stream.shards)} shards, {seen} samples, sha256 and counts OK")


def _embed(args: argparse.Namespace) -> None:
    from lrd_dist.encoders.embed_catalog import embed_catalog, trained_encoder_config
    from lrd_dist.encoders.text import EmbedConfig

    # Precedence: command line, then what the adapter was trained with, then the defaults.
    saved = trained_encoder_config(args.adapter) if args.adapter else {}
    given = {
        "model": args.model,
        "gguf_file": args.gguf_file,
        "pooling": args.pooling,
        "template": args.template,
        "max_length": args.max_length,
    }
    chosen = {k: v if v is not None else saved.get(k, getattr(EmbedConfig, k)) for k, v in given.items()}
    config = EmbedConfig(
        **chosen,
        normalize=not args.no_normalize and saved.get("normalize", True),
        batch_size=args.batch_size,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"wrote {embed_catalog(args.data, config, args.out, args.adapter)}")


def _train(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from lrd_dist.config import load_config
    from lrd_dist.train.loop import train

    results = train(load_config(args.config, args.overrides))
    if PartialState().is_main_process:
        print(
            json.dumps(
                {k: results[k] for k in ("steps", "best_epoch", "dev", "test") if k in results}, indent=2
            )
        )


def _export(args: argparse.Namespace) -> None:
    from lrd_dist.train.export import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")


def _eval(args: argparse.Namespace) -> None:
    from lrd_dist.train.export import evaluate_weights

    results = evaluate_weights(args.weights, args.config, args.overrides, args.split or ["dev", "test"])
    print(json.dumps(results, indent=2))


def _relations(args: argparse.Namespace) -> None:
    from lrd_dist.evaluation.report import relation_report

    print(f"wrote {relation_report(args.run, top=args.top)}")


# Model and LRD settings of the demo (configs/synth/kda_lrd.yaml holds the same; a test keeps them
# equal): beyond the official objective, the LRD ones make relations discoverable (README, "Relation
# discovery"); emb 64 keeps the discovery stable across seeds (NMI >= 0.8 for seeds 0-2, 32: 0.78-1.0).
DEMO_SETTINGS = (
    "model.name=kda",
    "model.emb_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.latent_relations=4",
    "lrd.enabled=true",
    "lrd.alpha=1.0",
    "lrd.balance=1.0",
    "lrd.pair_features=absdiff",
    "lrd.decoder_text=true",
    "lrd.slots=latent",
)


def _demo(args: argparse.Namespace) -> None:
    """The embedded default end to end: planted-relation data, MiniLM item embeddings, KDA+LRD."""
    from lrd_dist.config import load_config
    from lrd_dist.train.loop import train

    data = args.out / "data"
    parser = build_parser()
    _synth(
        parser.parse_args(
            [
                "synth",
                "--out",
                str(data),
                "--users",
                str(args.users),
                "--items",
                str(args.items),
                "--relations",
                "4",
                "--max-history",
                "20",
                "--overwrite",
            ]
        )
    )
    _embed(parser.parse_args(["embed", "--data", str(data)]))
    config = load_config(
        None,
        [
            f"data.dir={data}",
            f"train.out_dir={args.out / 'kda_lrd'}",
            *DEMO_SETTINGS,
            f"train.epochs={args.epochs}",
            "train.lr=3e-3",
            "train.patience=3",
            "train.log_every=20",
        ],
    )
    results = train(config)
    best = results["best_epoch"]
    print(f"\nKDA+LRD on synthetic data ({args.users} users, {args.items} items), best epoch {best}")
    print(f"{'split':<6}" + "".join(f"{m:>10}" for m in ("HR@5", "NDCG@5", "HR@10", "NDCG@10")))
    for split in ("dev", "test"):
        print(
            f"{split:<6}"
            + "".join(f"{results[split][m]:>10.4f}" for m in ("HR@5", "NDCG@5", "HR@10", "NDCG@10"))
        )
    discovery = results["relation_discovery"]
    print(
        f"relation discovery on {discovery['pairs']} planted pairs: NMI {discovery['nmi']:.3f}, "
        f"purity {discovery['purity']:.3f}"
    )
    print(f"run directory: {config.train.out_dir}")


def _print_summary(out: Path, manifest) -> None:
    summary = {
        "out": str(out),
        "source": manifest.source,
        "users": manifest.num_users,
        "items": manifest.num_items,
        "interactions": manifest.num_interactions,
        "samples": manifest.samples,
        "shards": len(manifest.shards),
        "stats": manifest.stats,
    }
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        from lrd_dist.train.launch import launch

        return launch(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("accelerate", "deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    handlers = {
        "prepare": _prepare,
        "synth": _synth,
        "verify": _verify,
        "embed": _embed,
        "train": _train,
        "export": _export,
        "eval": _eval,
        "relations": _relations,
        "demo": _demo,
    }
    try:
        handlers[args.command](args)
    except InputError as exc:
        print(f"lrd-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
