"""Training throughput with 1 and 2 processes on CPU (weak scaling: the per-rank batch is fixed).

Runs the real trainer for a fixed number of optimizer steps in each setting, side by side in one
invocation, and reads samples/s (all ranks) from each run's metrics.jsonl, skipping the first log
window (start-up). Writes JSON and prints a table.

    python benchmarks/process_scaling.py --data data/office --config configs/office/kda_lrd.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SETTINGS = {
    # name: (launcher config or None for a plain process, OMP threads per process, processes)
    "1 process, 1 thread": (None, 1, 1),
    "1 process, 2 threads": (None, 2, 1),
    "2 processes DDP (gloo), 1 thread each": ("cpu_2proc", 1, 2),
    "2 processes ZeRO-2 (gloo), 1 thread each": ("cpu_zero2", 1, 2),
}


def run(setting: str, data: Path, config: Path, steps: int, out: Path) -> dict:
    launcher, threads, processes = SETTINGS[setting]
    overrides = [
        f"data.dir={data}",
        f"train.out_dir={out}",
        f"train.max_steps={steps}",
        "train.log_every=10",
        "train.tracker=none",
        "eval.enabled=false",
    ]
    command = [sys.executable, "-m", "lrd_dist.cli"]
    if launcher:
        command += ["launch", "--config_file", str(REPO / "launchers" / f"{launcher}.yaml")]
        command += ["--main_process_port", str(free_port()), "--"]
    command += ["train", "--config", str(config), *overrides]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{result.stderr[-3000:]}")
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["samples_per_s"] for e in entries if "samples_per_s" in e][1:]
    return {"processes": processes, "threads": threads, "samples_per_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset with item embeddings")
    parser.add_argument("--config", type=Path, default=REPO / "configs/office/kda_lrd.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/process_scaling.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, setting in enumerate(args.settings):
            results[setting] = run(
                setting, args.data.resolve(), args.config.resolve(), args.steps, Path(scratch) / str(index)
            )
    base = results.get("1 process, 1 thread", {}).get("samples_per_s")
    for entry in results.values():
        if base:
            entry["speedup_vs_1x1"] = entry["samples_per_s"] / base
            entry["scaling_efficiency"] = entry["samples_per_s"] / (
                base * entry["processes"] * entry["threads"]
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"config": str(args.config), "steps": args.steps, "results": results}, indent=2)
    )
    print(f"{'setting':<42}{'samples/s':>12}{'speedup':>10}{'efficiency':>12}")
    for setting, entry in results.items():
        print(
            f"{setting:<42}{entry['samples_per_s']:>12.0f}"
            f"{entry.get('speedup_vs_1x1', float('nan')):>10.2f}"
            f"{entry.get('scaling_efficiency', float('nan')):>12.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
