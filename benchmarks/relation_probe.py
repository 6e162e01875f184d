"""Can the LRD objective recover planted relations at all? A probe on pairs alone, no recommender.

Issue 3 asks for NMI >= 0.8 on the synthetic data, and the full KDA+LRD run collapses (NMI ~0).
This isolates the relation module: the planted (base, partner) edges of the synthetic catalog, in
both directions, each scored with ``LatentRelationDiscovery`` (its q encoder and its official
decoder loss, H = 1), item embeddings trained by that loss only. A grid over what the q encoder
sees (``concat``: official; ``absdiff``), what the decoder's items are (free ID embeddings, as
LRD; or ID + a projection of the item text) and the batch balance term, scored by NMI and purity of
argmax q against the planted relation. A supervised linear probe and k-means on text differences
show what the language vectors make possible.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/relation_probe.py
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrd_dist.config import TextEncoderConfig
from lrd_dist.data.synth import SynthConfig, generate
from lrd_dist.encoders.text import encode_texts, load_encoder
from lrd_dist.evaluation.relations import nmi, purity
from lrd_dist.models.lrd import LatentRelationDiscovery


class DecoderItems(nn.Module):
    """Item vectors of the decoder: free ID embeddings, plus (``with_text``) a projection of the text."""

    def __init__(self, text: torch.Tensor, dim: int, with_text: bool) -> None:
        super().__init__()
        self.text = text
        self.ids = nn.Embedding(len(text), dim)
        self.project = nn.Linear(text.shape[1], dim) if with_text else None
        if with_text:
            nn.init.zeros_(self.ids.weight)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        vectors = self.ids(items)
        return vectors + self.project(self.text[items]) if self.project is not None else vectors


def run(text, heads, tails, truth, features, with_text, balance, epochs, seed, alpha):
    torch.manual_seed(seed)
    relations_k, dim = int(truth.max()), 32
    lrd = LatentRelationDiscovery(
        text.shape[1], dim, relations_k, alpha, balance=balance, pair_features=features
    )
    items = DecoderItems(text, dim, with_text)
    relations = nn.Parameter(torch.randn(relations_k, dim) * 0.1)
    optimizer = torch.optim.Adam([*lrd.parameters(), *items.parameters(), relations], lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(heads)).split(256):
            h, t = heads[batch], tails[batch]
            q = lrd.relation_distribution(text[h], text[t])[:, None]  # [B, 1, R]
            negatives = items(torch.randint(0, len(text), h.shape))[:, None]
            loss, _ = lrd.loss(
                q, items(h)[:, None], negatives, items(t), relations, torch.ones(len(h), 1, dtype=torch.bool)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predicted = lrd.relation_distribution(text[heads], text[tails]).argmax(-1).numpy()
    return {"nmi": nmi(predicted, truth), "purity": purity(predicted, truth)}


def text_baselines(text: torch.Tensor, heads, tails, truth) -> dict[str, float]:
    """Held-out accuracy of a supervised linear probe on [h; i], and k-means NMI on |h - i|."""
    features = torch.cat([text[heads], text[tails]], -1)
    labels = torch.as_tensor(truth - 1)
    train = torch.arange(len(labels)) % 5 != 0
    probe = nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(300):
        loss = F.cross_entropy(probe(features[train]), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (probe(features[~train]).argmax(-1) == labels[~train]).float().mean().item()
    difference = (text[tails] - text[heads]).abs().numpy()
    rng = np.random.default_rng(0)
    centres = difference[rng.choice(len(difference), int(labels.max()) + 1, replace=False)]
    for _ in range(50):
        assigned = ((difference[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack(
            [
                difference[assigned == k].mean(0) if (assigned == k).any() else centres[k]
                for k in range(len(centres))
            ]
        )
    return {"linear_probe_accuracy": accuracy, "kmeans_absdiff_nmi": nmi(assigned, truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.1, help="entropy weight (lrd.alpha)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/relation_probe.json"))
    args = parser.parse_args()

    catalog, _, planted = generate(SynthConfig(users=2000, items=1000, relations=4, seed=0))
    config = TextEncoderConfig()
    tokenizer, model = load_encoder(config)
    text = torch.from_numpy(encode_texts(catalog.texts.to_pylist(), tokenizer, model, config)).float()
    base = np.asarray(planted["head"]) - 1
    partner = np.asarray(planted["tail"]) - 1
    heads = torch.as_tensor(np.concatenate([base, partner]), dtype=torch.long)
    tails = torch.as_tensor(np.concatenate([partner, base]), dtype=torch.long)
    truth = np.tile(np.asarray(planted["relation"], dtype=np.int64), 2)

    results = {
        "pairs": len(truth),
        "epochs": args.epochs,
        "alpha": args.alpha,
        **text_baselines(text, heads, tails, truth),
        "grid": [],
    }
    print(
        f"{len(truth)} planted pairs; supervised linear probe on [h; i]: "
        f"{results['linear_probe_accuracy']:.3f}; "
        f"k-means on |h - i|: NMI {results['kmeans_absdiff_nmi']:.3f}"
    )
    print(f"{'q features':10} {'decoder items':14} {'balance':>7} {'NMI':>6} {'purity':>7}")
    for features, with_text, balance in itertools.product(("concat", "absdiff"), (False, True), (0.0, 1.0)):
        scores = run(
            text, heads, tails, truth, features, with_text, balance, args.epochs, args.seed, args.alpha
        )
        results["grid"].append(
            {"pair_features": features, "decoder_text": with_text, "balance": balance, **scores}
        )
        items = "ID + text" if with_text else "ID"
        print(
            f"{features:10} {items:14} {balance:7.1f} {scores['nmi']:6.3f} {scores['purity']:7.3f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
