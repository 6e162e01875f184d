"""Training curves from ``metrics.jsonl``: loss terms by step and the dev metric by epoch, one PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics: Path, out: Path, dev_metric: str) -> Path:
    import matplotlib  # here, not at module level: 0.5-0.7 s of every training process's start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [e for e in entries if "loss" in e]
    evals = [e for e in entries if f"dev/{dev_metric}" in e]
    figure, (losses, dev) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("loss", "rec", "kg", "lrd"):
        points = [(e["step"], e[name]) for e in steps if isinstance(e.get(name), int | float)]
        if points:
            losses.plot(*zip(*points, strict=True), label=name)
    losses.set(xlabel="optimizer step", ylabel="training loss", title="loss (mean per log window)")
    losses.set_yscale("log")
    if steps:
        losses.legend()
    if evals:
        dev.plot([e["step"] for e in evals], [e[f"dev/{dev_metric}"] for e in evals], marker="o")
    dev.set(xlabel="optimizer step", ylabel=dev_metric, title=f"dev {dev_metric}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
