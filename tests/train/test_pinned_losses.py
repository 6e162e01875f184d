"""Pinned numbers: a tiny run of each model logs exactly these losses and ends at this test NDCG@10.

The guard that lets a restructuring prove it changed no number (torchtune's recipe tests do the
same). Seed 0, one process, one thread (conftest), the synthetic fixture with MiniLM embeddings,
through the ``lrd-dist train`` command so that moving code around cannot change what is called.
A change that moves these values on purpose (a new default, a fixed bug) updates them in the same
commit and says why.
"""

import json
from pathlib import Path

import pytest
import torch

from lrd_dist.cli import main

COMMON = [
    "data.batch_size=128",
    "model.emb_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "train.epochs=2",
    "train.patience=2",
    "train.log_every=4",
    "train.seed=0",
    "train.tracker=none",
]
RUNS = {
    "kda_lrd": ["model.name=kda", "model.latent_relations=3", "lrd.enabled=true"],
    "kda_lrd_discovery": [
        "model.name=kda",
        "model.latent_relations=3",
        "lrd.enabled=true",
        "lrd.alpha=1.0",
        "lrd.balance=1.0",
        "lrd.pair_features=absdiff",
        "lrd.decoder_text=true",
        "lrd.slots=latent",
    ],
    "rcf": ["model.name=rcf"],
    "sasrec": ["model.name=sasrec", "model.num_layers=2", "model.dropout=0.1"],
}
# (first logged total losses, final test NDCG@10), produced by this test on commit 451176a
PINNED: dict[str, tuple[list[float], float]] = {
    "kda_lrd": (
        [
            8.0219049,
            8.0168715,
            8.0078516,
            8.0048199,
            7.9953628,
            7.9701691,
            7.9639235,
            7.9675765,
            7.9634638,
            7.9298744,
        ],
        0.1947069,
    ),
    "kda_lrd_discovery": (
        [
            0.4195388,
            0.4127935,
            0.4009079,
            0.3934656,
            0.3760451,
            0.3387204,
            0.3230774,
            0.3093613,
            0.2925080,
            0.2362313,
        ],
        0.1962844,
    ),
    "rcf": (
        [
            0.7975426,
            0.7867811,
            0.7767578,
            0.7676201,
            0.7553378,
            0.7362900,
            0.7357760,
            0.7223022,
            0.7183263,
            0.7050225,
        ],
        0.5548517,
    ),
    "sasrec": (
        [
            0.6927005,
            0.6874344,
            0.6813287,
            0.6751828,
            0.6736765,
            0.6553793,
            0.6554676,
            0.6455904,
            0.6369550,
            0.6285065,
        ],
        0.3300262,
    ),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_and_test_ndcg_equal_the_pinned_values(
    synth_with_embeddings: Path, tmp_path: Path, name: str
) -> None:
    overrides = [f"data.dir={synth_with_embeddings}", f"train.out_dir={tmp_path}", *COMMON, *RUNS[name]]
    assert main(["train", *overrides]) == 0
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in entries if "loss" in entry][:10]
    ndcg = json.loads((tmp_path / "results.json").read_text())["test"]["NDCG@10"]
    expected_losses, expected_ndcg = PINNED[name]
    assert len(losses) == len(expected_losses) == 10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ndcg, expected_ndcg, rtol=1e-5, atol=1e-5)
