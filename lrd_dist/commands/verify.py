"""``lrd-dist verify``: every shard of a dataset against its manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from lrd_dist.errors import InputError

HELP = "check every shard of a dataset against its manifest (sha256, sample counts)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="prepared dataset directory")


def run(args: argparse.Namespace) -> None:
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
