"""``lrd-dist synth``: synthetic data with planted latent relations (the embedded default's data)."""

from __future__ import annotations

import argparse

from lrd_dist.commands.prepare import add_write_options, write

HELP = "write synthetic data with planted latent relations (users, items, relations to recover)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--relations", type=int, default=4, help="planted relations")
    parser.add_argument("--mean-length", type=float, default=12.0, help="mean interactions per user")
    parser.add_argument("--max-length", type=int, default=50, help="most interactions of one user")
    add_write_options(parser)


def run(args: argparse.Namespace) -> None:
    from lrd_dist.data.format import PLANTED_PAIRS
    from lrd_dist.data.synth import SynthConfig, generate

    config = SynthConfig(
        users=args.users,
        items=args.items,
        relations=args.relations,
        seed=args.seed,
        mean_length=args.mean_length,
        max_length=args.max_length,
    )
    catalog, interactions, planted = generate(config)
    stats = {"synth_relations": args.relations}
    write(args, "synth", catalog, interactions, stats=stats, extra_tables={PLANTED_PAIRS: planted})
