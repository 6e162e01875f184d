"""``lrd-dist demo``: the embedded default end to end, no download and no GPU: planted-relation
synthetic data written to shards, its item texts encoded with all-MiniLM-L6-v2 (shipped on PyPI),
and KDA+LRD trained on it with the packaged config ``lrd_dist/configs/demo.yaml``."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "the embedded default end to end: synthetic data, MiniLM item embeddings, KDA+LRD (no download, no GPU)"
)
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="data under OUT/data, run under OUT/kda_lrd"
    )
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--epochs", type=int, help="default: the demo config's")


def run(args: argparse.Namespace) -> None:
    from lrd_dist.config import DEMO_CONFIG, TextEncoderConfig, load_config
    from lrd_dist.data.format import PLANTED_PAIRS
    from lrd_dist.data.prepare import write_dataset
    from lrd_dist.data.synth import SynthConfig, generate
    from lrd_dist.encoders.embed_catalog import embed_catalog
    from lrd_dist.train.trainer import train

    data = args.out / "data"
    overrides = [f"data.dir={data}", f"train.out_dir={args.out / 'kda_lrd'}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    config = load_config(Path(str(DEMO_CONFIG)), overrides)
    catalog, interactions, planted = generate(SynthConfig(users=args.users, items=args.items, relations=4))
    write_dataset(
        data,
        source="synth",
        catalog=catalog,
        interactions=interactions,
        max_history=config.data.max_history,
        overwrite=True,
        stats={"synth_relations": 4},
        extra_tables={PLANTED_PAIRS: planted},
    )
    embed_catalog(data, TextEncoderConfig())
    results = train(config)
    best = results["best_epoch"]
    print(f"\nKDA+LRD on synthetic data ({args.users} users, {args.items} items), best epoch {best}")
    print(f"{'split':<6}" + "".join(f"{m:>10}" for m in METRICS))
    for split in ("dev", "test"):
        print(f"{split:<6}" + "".join(f"{results[split][m]:>10.4f}" for m in METRICS))
    discovery = results["relation_discovery"]
    print(
        f"relation discovery on {discovery['pairs']} planted pairs: NMI {discovery['nmi']:.3f}, "
        f"purity {discovery['purity']:.3f}"
    )
    print(f"run directory: {config.train.out_dir}")
