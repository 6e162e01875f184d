"""Item encoding throughput: length-sorted batches against a naive loop (catalog order, every batch
padded to max_length), same model, same texts, measured side by side in one run.

    python benchmarks/embed_speed.py --data DATASET_DIR --limit 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from lrd_dist.config import TextEncoderConfig
from lrd_dist.data.catalog import Catalog
from lrd_dist.encoders.text import encode_texts, load_encoder, pool

BATCH = 64


@torch.inference_mode()
def naive(texts: list[str], tokenizer, model, config: TextEncoderConfig) -> np.ndarray:
    out = []
    for start in range(0, len(texts), BATCH):
        batch = tokenizer(
            texts[start : start + BATCH],
            padding="max_length",
            truncation=True,
            max_length=config.max_length,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        out.append(
            torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1).numpy()
        )
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/embed_speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = Catalog.read(args.data / "catalog.parquet").texts.to_pylist()[: args.limit]
    config = TextEncoderConfig(max_length=128)
    tokenizer, model = load_encoder(config)
    timings = {}
    results = {}
    for name, run in (
        ("sorted", lambda: encode_texts(texts, tokenizer, model, config, BATCH)),
        ("naive", lambda: naive(texts, tokenizer, model, config)),
    ):
        started = time.perf_counter()
        results[name] = run()
        timings[name] = time.perf_counter() - started
    report = {
        "items": len(texts),
        "threads": torch.get_num_threads(),
        "sorted_items_per_s": len(texts) / timings["sorted"],
        "naive_items_per_s": len(texts) / timings["naive"],
        "speedup": timings["naive"] / timings["sorted"],
        "max_abs_difference": float(np.abs(results["sorted"] - results["naive"]).max()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'loop':<8}{'items/s':>10}")
    print(
        f"{'sorted':<8}{report['sorted_items_per_s']:>10.1f}\n{'naive':<8}{report['naive_items_per_s']:>10.1f}"
    )
    print(f"speedup {report['speedup']:.2f}x, max abs difference {report['max_abs_difference']:.2e}")


if __name__ == "__main__":
    main()
