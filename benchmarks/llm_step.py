"""Cost of a training step with a live LoRA item encoder: per-batch deduplication against encoding
every occurrence, and peak memory with and without gradient checkpointing.

Each setting runs in its own process (so its peak memory is its own) on the same batches: the
real recommender + KG + LRD step (forward, backward, Adam) of ``configs/office/kda_lrd.yaml`` with
``llm.mode=lora`` on MiniLM, batch 256, history 20. Time is the median over the timed steps after
one warm-up step; memory is the peak resident set above what the process held before its first
step (model and data loaded). Writes JSON and prints a table.

    python benchmarks/llm_step.py --data data/office --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTING = "llm.gradient_checkpointing=true"
SETTINGS = {
    # name: overrides. Encoding every occurrence of a full batch without gradient checkpointing
    # does not fit in 24 GiB here (the process was killed), so the speed comparison is made with
    # checkpointing on both sides, and memory is compared with and without it under dedup.
    "dedup": ["llm.dedup=true"],
    "dedup + checkpointing": ["llm.dedup=true", CHECKPOINTING],
    "every occurrence + checkpointing": ["llm.dedup=false", CHECKPOINTING],
}


def measure(data: Path, config_path: Path, steps: int, overrides: list[str]) -> dict:
    """One setting, in this process."""
    import psutil
    import torch

    from lrd_dist.assembly import build_dataset_and_model
    from lrd_dist.config import load_config
    from lrd_dist.runtime import flush_denormals, select_attention
    from lrd_dist.train.sampling import TrainingSampler

    config = load_config(config_path, [f"data.dir={data}", "llm.mode=lora", *overrides])
    torch.manual_seed(0)
    flush_denormals()
    run = build_dataset_and_model(config, select_attention(config.model.fused_attention))
    model, item_text = run.model.train(), run.model.item_text
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = TrainingSampler(config, run.graph, True, 0)
    batches = run.loader("train")
    baseline = psutil.Process().memory_info().rss
    times, encoded, occurrences = [], [], []
    for index, batch in enumerate(batches):
        if index > steps:
            break
        inputs = sampler.draw(batch)
        started = time.perf_counter()
        losses = model(batch, **inputs)
        total = losses["rec"] + losses.get("kg", 0.0) + config.lrd.weight * losses["lrd"]
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        if index > 0:  # the first step warms up
            times.append(time.perf_counter() - started)
        encoded.append(item_text.last_encoded)
        positions = torch.arange(batch["history_items"].shape[1])
        real = (positions < batch["history_length"][:, None]) & batch["valid"][:, None]
        occurrences.append(2 * int(real.sum()))  # history item and target of each pair
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {
        "step_seconds": statistics.median(times),
        "encoded_per_step": statistics.mean(encoded),
        "pair_items_per_step": statistics.mean(occurrences),
        "peak_rss_above_start_gib": (peak - baseline) / 2**30,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (Office)")
    parser.add_argument("--config", type=Path, default=REPO / "configs/office/kda_lrd.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/llm_step.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.data, args.config, args.steps, SETTINGS[args.one])))
        return
    results = {}
    for name in SETTINGS:
        command = [sys.executable, __file__, "--data", str(args.data), "--config", str(args.config)]
        command += ["--steps", str(args.steps), "--one", name]
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["dedup + checkpointing"]
    for row in results.values():
        row["time_vs_dedup_checkpointing"] = row["step_seconds"] / base["step_seconds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"data": str(args.data), "steps": args.steps, "settings": results}, indent=2)
    )
    print(
        f"{'setting':34} {'step s':>8} {'time ratio':>10} {'encoded':>8} {'pair items':>10} {'peak GiB':>9}"
    )
    for name, row in results.items():
        print(
            f"{name:34} {row['step_seconds']:8.2f} {row['time_vs_dedup_checkpointing']:9.2f}x "
            f"{row['encoded_per_step']:8.0f} {row['pair_items_per_step']:10.0f} "
            f"{row['peak_rss_above_start_gib']:9.2f}"
        )


if __name__ == "__main__":
    main()
