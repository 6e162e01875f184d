"""``metrics.jsonl``: one JSON line per log step and per evaluation, and the same scalars to the
tracker (TensorBoard or W&B). Only the main process writes the file."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from lrd_dist.config import RunConfig


class LogWindow:
    """The steps since the last ``metrics.jsonl`` line: their losses (averaged when logged) and the
    training samples they consumed (samples/s over all ranks; loader padding rows not counted)."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], samples: int) -> None:
        for name, value in losses.items():
            self.values.setdefault(name, []).append(value.detach().float().cpu())
        self.samples += samples

    def close(self, step: int, epoch: int, lr: float, world_size: int) -> dict:
        """The window's log entry; the next window starts now."""
        now = time.perf_counter()
        entry: dict[str, object] = {"step": step, "epoch": epoch, "lr": lr}
        entry["samples_per_s"] = self.samples * world_size / (now - self.started)
        entry.update({k: torch.stack(v).mean(0).tolist() for k, v in self.values.items()})
        self.values, self.samples, self.started = {}, 0, now
        return entry


class MetricsLog:
    def __init__(self, path: Path, writer: bool, track: Callable[[dict, int], None] | None = None) -> None:
        self.path = path
        self.track = track
        self.file = open(path, "a") if writer else None  # noqa: SIM115 - closed by close()

    @staticmethod
    def truncate(path: Path, keep_through_step: int) -> None:
        """A resumed run rewrites what came after its checkpoint, so the log reads as one run."""
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_through_step
        ]
        path.write_text("".join(line + "\n" for line in kept))

    def record(self, entry: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.track is not None:
            scalars = {
                k: v for k, v in entry.items() if isinstance(v, int | float) and k not in ("step", "epoch")
            }
            self.track(scalars, entry["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def flat_config(config: RunConfig) -> dict:
    """``section.key: value`` for trackers, which take flat scalars."""
    flat = {}
    for section, values in asdict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
