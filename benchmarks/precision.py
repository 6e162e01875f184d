"""bf16 autocast against fp32 on the CPU: accuracy and speed of the same runs, seed by seed.

    python benchmarks/precision.py --data data/office --config configs/office/kda_lrd.yaml --epochs 8

Each (seed, precision) is a fresh ``lrd-dist train`` of ``--epochs`` epochs (model selection on dev
as the config says, evaluation in fp32 either way), run one after another with nothing else on the
machine. Reports per run the best dev epoch, test HR/NDCG@5/10, the median training samples/s of
the run's log windows after the first epoch and the mean epoch seconds; then the mean +- sample std
per precision and the paired differences (bf16 - fp32, same seed). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")


def run(args: argparse.Namespace, seed: int, precision: str) -> dict:
    out = args.work / f"{precision}_seed{seed}"
    results = out / "results.json"
    if not results.is_file():
        command = [sys.executable, "-m", "lrd_dist.cli", "train", "--config", str(args.config)]
        command += [
            f"data.dir={args.data}",
            f"train.out_dir={out}",
            f"train.seed={seed}",
            f"train.epochs={args.epochs}",
            f"train.mixed_precision='{precision}'",  # quoted: YAML reads a bare no as false
            "train.tracker=none",
            "train.log_every=20",
            "checkpoint.resume=auto",
        ]
        env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    report = json.loads(results.read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["samples_per_s"] for e in lines if "samples_per_s" in e and e["epoch"] >= 1]
    epochs = [e["epoch_seconds"] for e in lines if "epoch_seconds" in e]
    return {
        "seed": seed,
        "precision": precision,
        "best_epoch": report["best_epoch"],
        "test": {k: report["test"][k] for k in METRICS},
        "samples_per_s": statistics.median(rates),
        "epoch_seconds": statistics.mean(epochs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "office" / "kda_lrd.yaml")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "precision")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision.json")
    args = parser.parse_args()
    runs = [run(args, seed, precision) for seed in args.seeds for precision in ("no", "bf16")]
    summary = {}
    for precision in ("no", "bf16"):
        mine = [r for r in runs if r["precision"] == precision]
        summary[precision] = {
            key: (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            for key, values in {
                **{m: [r["test"][m] for r in mine] for m in METRICS},
                "samples_per_s": [r["samples_per_s"] for r in mine],
                "epoch_seconds": [r["epoch_seconds"] for r in mine],
            }.items()
        }
    paired = {
        m: [
            b["test"][m] - a["test"][m]
            for a, b in zip(runs[0::2], runs[1::2], strict=True)  # (fp32, bf16) of one seed
        ]
        for m in METRICS
    }
    report = {
        "config": str(args.config),
        "epochs": args.epochs,
        "threads": args.threads,
        "runs": runs,
        "summary": summary,
        "paired_bf16_minus_fp32": paired,
        "speedup": summary["bf16"]["samples_per_s"][0] / summary["no"]["samples_per_s"][0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'precision':<10}" + "".join(f"{m:>18}" for m in METRICS) + f"{'samples/s':>16}")
    for precision, values in summary.items():
        cells = "".join(f"{values[m][0]:>11.4f}±{values[m][1]:.4f}" for m in METRICS)
        print(f"{precision:<10}{cells}{values['samples_per_s'][0]:>10,.0f}±{values['samples_per_s'][1]:,.0f}")
    print("paired bf16 - fp32:", {m: [round(d, 4) for d in v] for m, v in paired.items()})
    print(f"bf16 speed-up: {report['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
