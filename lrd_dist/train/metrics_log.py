"""``metrics.jsonl``: one JSON line per log step and per evaluation, and the same scalars to the
tracker (TensorBoard or W&B). Only the main process writes the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from lrd_dist.config import RunConfig


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
