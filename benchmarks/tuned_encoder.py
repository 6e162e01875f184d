"""What tuning the LLM item encoder costs: the frozen table, the whole model, and the top layers on
a cached trunk (``llm.tune_layers``), in training samples/s and peak memory.

    python benchmarks/tuned_encoder.py --data data/office

Each setting is a fresh ``lrd-dist train`` process of ``configs/office/kda_lrd_softmax8.yaml`` (batch
256, every (history, target) pair of the LRD loss encoded: no ``llm.max_pairs_per_step``) on the same
batches (same seed and data), at ``--threads`` threads, the dev evaluation off; nothing else should
run. Samples/s is the median of the run's own log windows (one step each) after the first; peak RSS is
the largest resident memory of the process, polled every 0.1 s. Settings with a cached trunk build
their cache first, in a cache directory of this benchmark's own: its build time and size are
reported. Writes JSON and prints a table with each setting's ratio to the frozen table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "office" / "kda_lrd_softmax8.yaml"
SMOLLM2 = ["llm.model=HuggingFaceTB/SmolLM2-135M-Instruct", "llm.pooling=last"]
FAST = ["llm.autocast=bf16", "llm.dropout=false"]
# name -> (overrides, steps)
SETTINGS: dict[str, tuple[list[str], int]] = {
    "frozen MiniLM table": ([], 20),
    "MiniLM LoRA, whole model": (["llm.mode=lora"], 4),
    "MiniLM LoRA, top 1 of 6": (["llm.mode=lora", "llm.tune_layers=1"], 10),
    "MiniLM LoRA, top 2 of 6": (["llm.mode=lora", "llm.tune_layers=2"], 10),
    "MiniLM full, top 1 of 6": (["llm.mode=full", "llm.tune_layers=1"], 10),
    "MiniLM LoRA, top 1, bf16, no dropout": (["llm.mode=lora", "llm.tune_layers=1", *FAST], 10),
    "SmolLM2-135M LoRA, top 2 of 30": ([*SMOLLM2, "llm.mode=lora", "llm.tune_layers=2"], 6),
    "SmolLM2-135M LoRA, top 2, bf16, no dropout": (
        [*SMOLLM2, "llm.mode=lora", "llm.tune_layers=2", *FAST],
        6,
    ),
}


def run(
    data: Path,
    out: Path,
    cache: Path,
    overrides: list[str],
    steps: int,
    threads: int,
    env: dict[str, str] | None = None,
) -> dict:
    command = [
        sys.executable,
        *("-m", "lrd_dist.cli", "train", "--config", str(CONFIG)),
        f"data.dir={data}",
        f"train.out_dir={out}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "eval.enabled=false",
        "train.tracker=none",
        f"llm.cache_dir={cache}",
        *overrides,
    ]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"} | (env or {})
    started = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        process, rss = psutil.Process(child.pid), [0]
        while child.poll() is None:
            try:
                rss.append(process.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
    if child.returncode != 0:
        raise SystemExit(f"{overrides}: failed ({child.returncode}); see {out.with_suffix('.log')}")
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [w["samples_per_s"] for w in windows if "samples_per_s" in w][1:]
    return {
        "overrides": overrides,
        "steps": steps,
        "samples_per_s": statistics.median(rates),
        "samples_per_s_windows": rates,
        "peak_rss_gib": max(rss) / 2**30,
        "rss_gib_by_second": [r / 2**30 for r in rss[::10]],
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Office prepared, with its MiniLM table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="a subset of the settings")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tuned_encoder.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tuned-encoder-") as scratch:
        cache = Path(scratch) / "trunks"
        for index, name in enumerate(args.only or SETTINGS):
            overrides, steps = SETTINGS[name]
            results[name] = run(
                args.data, Path(scratch) / f"run{index}", cache, overrides, steps, args.threads
            )
            print(f"{name}: {results[name]['samples_per_s']:.0f} samples/s", flush=True)
        caches = [json.loads(p.read_text()) for p in sorted(cache.glob("*/meta.json"))]
    builds = [
        {
            "model": c["fields"]["model"],
            "cut": c["fields"]["cut"],
            "dtype": c["fields"]["dtype"],
            "items": c["fields"]["items"],
            "mib": c["bytes"] / 2**20,
            "build_seconds": c["build_seconds"],
        }
        for c in caches
    ]
    frozen = results.get("frozen MiniLM table", {}).get("samples_per_s")
    report = {
        **provenance(args.threads),
        "settings": results,
        "trunk_caches": builds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("\n| item encoder | samples/s | vs frozen | peak RSS GiB |\n|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['samples_per_s'] / frozen:.2f}x" if frozen else "-"
        print(f"| {name} | {r['samples_per_s']:.0f} | {ratio} | {r['peak_rss_gib']:.2f} |")
    print("\n| trunk cache | items | cut | dtype | MiB | build s |\n|---|---|---|---|---|---|")
    for b in builds:
        cells = (b["model"], b["items"], b["cut"], b["dtype"], f"{b['mib']:.1f}", f"{b['build_seconds']:.1f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nwrote {args.out}")
    return 0


def provenance(threads: int) -> dict:
    """Date, commit (``-dirty`` when the working tree differs from it), threads and CPU of a run."""
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit, "threads": threads, "cpu": _cpu()}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
