"""Synthetic datasets for the scale benchmarks: ``lrd-dist synth`` plus a random frozen text table.

Encoding a million item texts with MiniLM would take hours on a 2-core CPU, so the LRD runs of
these benchmarks read a table of random unit vectors instead, checked against the catalog like a
real one: the cost of a step does not depend on what the vectors say.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TABLE = "item_embeddings.safetensors"


def lrd_dist(*command: str) -> None:
    """Run an ``lrd-dist`` command in a fresh process (offline), failing loudly."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "lrd_dist.cli", *command], env=env, cwd=REPO, check=True)


def random_text_table(data: Path, dim: int, seed: int = 0) -> Path:
    """``data/item_embeddings.safetensors``: one random unit vector of ``dim`` per item (written
    once; a real table's format and catalog checksum)."""
    from lrd_dist.config import TextEncoderConfig
    from lrd_dist.data.catalog import Catalog
    from lrd_dist.encoders.text import catalog_checksum, save_table

    table = data / TABLE
    if not table.is_file():
        texts = Catalog.read(data / "catalog.parquet").texts.to_pylist()
        rng = np.random.default_rng(seed)
        vectors = np.empty((len(texts), dim), dtype=np.float32)
        for start in range(0, len(texts), 1 << 20):  # in blocks: no float64 copy of the whole table
            block = rng.standard_normal((min(1 << 20, len(texts) - start), dim), dtype=np.float32)
            vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        save_table(table, vectors, TextEncoderConfig(model="random"), catalog_checksum(texts))
    return table
