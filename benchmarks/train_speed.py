"""Training and evaluation speed of a model on a prepared dataset (default: KDA+LRD on Office).

Measures one training epoch (samples/s), one full dev evaluation, and peak RSS, in this process,
and compares with the official implementation's figures measured on the same 2-core machine
(../shared/LRD_METHOD.md). Writes JSON and prints a table.

    python benchmarks/train_speed.py --data data/office --config configs/office/kda_lrd.yaml
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from lrd_dist.config import load_config

# Official implementation on this machine (LRD_METHOD.md): epoch, dev evaluation, peak RSS.
OFFICIAL = {
    "kda_lrd": (43.3, 165.0, 10.0),
    "kda": (16.8, 38.4, 7.2),
    "rcf_lrd": (29.5, 41.0, 2.3),
    "rcf": (13.7, 18.9, 1.3),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/office/kda_lrd.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_speed.json"))
    args = parser.parse_args()
    from lrd_dist.data.catalog import Catalog
    from lrd_dist.data.format import CATALOG, Manifest
    from lrd_dist.data.graph import KnowledgeGraph
    from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
    from lrd_dist.encoders.embed_catalog import TABLE_NAME
    from lrd_dist.encoders.text import load_table
    from lrd_dist.evaluation.evaluate import evaluate
    from lrd_dist.models import build_model
    from lrd_dist.train.sampling import draw_uniform_negatives

    config = load_config(args.config, [f"data.dir={args.data}"])
    manifest = Manifest.load(args.data)
    catalog = Catalog.read(args.data / CATALOG)
    graph = KnowledgeGraph(catalog, latent=config.model.latent_relations)
    text = load_table(args.data / TABLE_NAME, catalog.texts.to_pylist())[0] if config.lrd.enabled else None
    model = build_model(config, manifest.num_users, graph, text)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    gamma = graph.num_triples / manifest.num_interactions
    import numpy as np

    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    train = SequenceStream(
        args.data,
        "train",
        LoaderConfig(batch_size=config.data.batch_size, max_history=config.data.max_history),
    )
    started = time.perf_counter()
    samples = 0
    for batch in make_loader(train):
        negatives = draw_uniform_negatives(batch, (len(batch["user"]),), manifest.num_items, generator)
        lrd_negatives = (
            draw_uniform_negatives(batch, tuple(batch["history_items"].shape), manifest.num_items, generator)
            if config.lrd.enabled
            else None
        )
        losses = model(batch, negatives, lrd_negatives, graph.sample(len(batch["user"]), rng))
        total = losses["rec"] + gamma * losses["kg"] + config.lrd.weight * losses.get("lrd", 0.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        samples += int(batch["valid"].sum())
    epoch_seconds = time.perf_counter() - started
    dev = SequenceStream(
        args.data,
        "dev",
        LoaderConfig(
            batch_size=config.data.eval_batch_size, shuffle=False, max_history=config.data.max_history
        ),
    )
    started = time.perf_counter()
    metrics = evaluate(model, make_loader(dev), [10], "pessimistic")
    eval_seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    name = f"{config.model.name}{'_lrd' if config.lrd.enabled else ''}"
    official = OFFICIAL.get(name)
    report = {
        "model": name,
        "threads": torch.get_num_threads(),
        "epoch_seconds": epoch_seconds,
        "train_samples_per_s": samples / epoch_seconds,
        "dev_eval_seconds": eval_seconds,
        "dev_examples": metrics["examples"],
        "peak_rss_gib": rss,
    }
    if official:
        report.update(
            official_epoch_seconds=official[0],
            official_dev_eval_seconds=official[1],
            official_peak_rss_gb=official[2],
            epoch_speedup=official[0] / epoch_seconds,
            eval_speedup=official[1] / eval_seconds,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':<18}{'ours':>10}{'official':>10}{'speedup':>10}")
    if official:
        print(f"{'epoch (s)':<18}{epoch_seconds:>10.1f}{official[0]:>10.1f}{report['epoch_speedup']:>9.1f}x")
        print(f"{'dev eval (s)':<18}{eval_seconds:>10.1f}{official[1]:>10.1f}{report['eval_speedup']:>9.1f}x")
        print(f"{'peak RSS (GiB)':<18}{rss:>10.2f}{official[2]:>10.1f}")
    print(f"train samples/s: {report['train_samples_per_s']:,.0f}")


if __name__ == "__main__":
    main()
