"""The on-disk format of a prepared dataset directory, and its manifest.

A dataset directory holds::

    manifest.json          schema version, source, counts, shard list with sample counts and sha256
    catalog.parquet        one row per item: item_id, source_id, text, attr_* ids, rel_* id lists
    users.parquet          one row per user: user_id, source_id (the id in the source data)
    train/ dev/ test/      WebDataset tar shards of sequence samples
    planted_pairs.parquet  (synthetic data only) the hidden relation graph

A shard holds *blocks*: one tar record per block of up to ``block_size`` consecutive samples, stored
column-wise as ``.npy`` members (``KEY.user.npy``, ``KEY.history_items.npy``, ...). Blocks keep the
tar overhead (a 512-byte header per member) and the per-record Python cost negligible, so writing
and streaming run at hundreds of thousands of samples per second; the loader unbatches blocks
into samples before shuffling.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lrd_dist.errors import InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
CATALOG = "catalog.parquet"
USERS = "users.parquet"
PLANTED_PAIRS = "planted_pairs.parquet"
COLD_ITEMS = "cold_items.parquet"  # a cold-start split: items held out of training (``--cold-items``)
SPLITS = ("train", "dev", "test")

# Columns of one block record, in the order the loader packs them. Per-sample scalars first, then
# the fixed-width arrays. ``negatives`` only exists in dev/test; extras (e.g. planted relations of
# synthetic data) follow and are named in the manifest.
SCALAR_FIELDS = ("user", "target", "target_time", "history_length")
ARRAY_FIELDS = ("history_items", "history_times")
# Stats that measure the preparation that wrote a dataset, not the data: two preparations of the same
# data differ in them, so a dataset's fingerprint leaves them out.
PREPARATION_STATS = frozenset({"prepare_seconds"})


@dataclass
class ShardInfo:
    split: str
    path: str  # relative to the dataset directory
    samples: int
    blocks: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    source: str
    num_users: int
    num_items: int
    num_interactions: int
    max_history: int
    num_negatives: int
    block_size: int
    attributes: list[str]
    relations: list[str]
    extra_fields: list[str]
    samples: dict[str, int]
    shards: list[ShardInfo]
    stats: dict[str, Any] = field(default_factory=dict)  # counts of the source and the preparation
    schema_version: int = SCHEMA_VERSION

    def fingerprint(self) -> str:
        """sha256 of what the dataset is: the manifest (counts, shards with their sha256, stats) without
        ``PREPARATION_STATS``, so the same data prepared again, on another day or machine, has the
        same fingerprint and a checkpoint trained on one resumes on the other."""
        content = asdict(self)
        content["stats"] = {k: v for k, v in self.stats.items() if k not in PREPARATION_STATS}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def shards_of(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def save(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise InputError(
                path,
                "no manifest.json: this is not a prepared dataset directory, or its preparation was "
                "interrupted",
                "run `lrd-dist prepare` or `lrd-dist synth` with --out pointing here",
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(path, f"not valid JSON ({exc})", "re-run the preparation") from exc
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(
                path,
                f"schema version {version!r}, this lrd_dist reads version {SCHEMA_VERSION}",
                "re-run `lrd-dist prepare` with this version of lrd_dist",
            )
        try:
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            manifest = cls(**raw)
        except TypeError as exc:
            raise InputError(path, f"unexpected manifest content ({exc})", "re-run the preparation") from exc
        for number, shard in enumerate(manifest.shards, start=1):
            if not is_inside(shard.path):
                raise InputError(
                    path,
                    f"path {shard.path!r} is not a relative path inside the dataset",
                    "use the manifest `lrd-dist prepare` wrote (shard paths such as train/train-000000.tar)",
                    record=f"shard {number}",
                )
        return manifest


@dataclass(frozen=True)
class DataIdentity:
    """What a checkpoint records of the dataset it was trained on, and what a resume compares."""

    fingerprint: str  # Manifest.fingerprint(): the data, not the preparation's own timing

    @classmethod
    def of(cls, directory: Path, manifest: Manifest) -> DataIdentity:
        return cls(manifest.fingerprint())

    def matches(self, recorded: str) -> bool:
        return recorded == self.fingerprint


def is_inside(relative: str) -> bool:
    """A plain relative path that stays inside the directory it is joined to: no absolute path,
    no ``..``, no empty or dot components, nothing a shell or a URL would read differently."""
    parts = relative.split("/")
    return (
        bool(relative)
        and not relative.startswith("/")
        and all(part not in ("", ".", "..") for part in parts)
        and all(c.isalnum() or c in "-_." for part in parts for c in part)
    )


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
