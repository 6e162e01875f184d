"""The run directory: the one place that names a run's files, checks them, and loads the trained
model out of them.

    runs/office/kda_lrd/
      config.yaml         the resolved run config
      metrics.jsonl       one JSON line per log window and per evaluation
      best.safetensors    the best dev weights (frozen LLM weights left out)
      results.json        dev and test metrics of the best weights, and what the run cost
      curves.png          training and dev curves
      checkpoints/        step-* checkpoints (``train/checkpoint.py``)
      encoder/            a tuned LLM item encoder in PEFT / transformers format
      relations/          ``lrd-dist relations``'s report
      tensorboard/        TensorBoard events
      .lock               held by the run training here: its host, process and SLURM job

The trainer writes it; ``eval``, ``export``, ``recommend`` and the relation report read it through
``RunDir`` (or a single weight file through ``load_trained``, the config inside the file).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lrd_dist.assembly import DatasetAndModel, build_dataset_and_model
from lrd_dist.config import RunConfig, load_config
from lrd_dist.errors import InputError
from lrd_dist.models import load_weights
from lrd_dist.models.slot_attention import SlotAttention, torch_slot_attention

log = logging.getLogger(__name__)
CONFIG_KEY = "lrd_dist.config"  # the run config (YAML) in a weight file's safetensors metadata


class RunDir:
    LOCK = ".lock"
    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    BEST = "best.safetensors"
    RESULTS = "results.json"
    CURVES = "curves.png"
    CHECKPOINTS = "checkpoints"
    ENCODER = "encoder"
    RELATIONS = "relations"
    TENSORBOARD = "tensorboard"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def best_weights(self) -> Path:
        return self.path / self.BEST

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def encoder(self) -> Path:
        return self.path / self.ENCODER

    @property
    def relations(self) -> Path:
        return self.path / self.RELATIONS

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    def lock(self) -> RunLock:
        """The exclusive right to train here (``RunLock.acquire``)."""
        return RunLock(self.path / self.LOCK)

    def is_run(self) -> bool:
        return self.config_file.is_file()

    def require_trained(self) -> None:
        """A finished ``lrd-dist train`` left its config and best weights here."""
        for path in (self.config_file, self.best_weights):
            if not path.is_file():
                raise InputError(path, "missing", "pass the run directory of a finished `lrd-dist train`")

    def config(self, overrides: list[str] | None = None) -> RunConfig:
        return load_config(self.config_file, overrides, stored=True)

    def load(
        self, overrides: list[str] | None = None, attention: SlotAttention = torch_slot_attention
    ) -> DatasetAndModel:
        """The run's dataset and its best weights, ready to score."""
        self.require_trained()
        built = build_dataset_and_model(self.config(overrides), attention)
        load_weights_file(built, self.best_weights, self.config_file)
        built.model.eval()
        return built


class RunLock:
    """One run per directory. ``fcntl.flock`` on ``.lock``: the kernel releases it when the process
    ends, however it ends, so a lock that is free while its file still names a holder was left by a
    run that died (reported, then taken over; a requeued attempt of the same SLURM job is expected)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.descriptor: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(descriptor)
            os.close(descriptor)
            raise InputError(
                self.path.parent,
                f"another run is training here ({_describe(holder)})",
                "wait for it to finish, or give this run its own train.out_dir",
            ) from None
        previous = self._holder(descriptor)
        if previous:
            same_job = previous.get("slurm_job") and previous.get("slurm_job") == _me()["slurm_job"]
            log.warning(
                "%s: %s ended without releasing the run directory; %s",
                self.path.parent,
                _describe(previous),
                "this requeued attempt of its job takes over" if same_job else "taking it over",
            )
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(_me()) + "\n").encode(), 0)
        os.fsync(descriptor)
        self.descriptor = descriptor

    def release(self) -> None:
        if self.descriptor is None:
            return
        os.ftruncate(self.descriptor, 0)
        fcntl.flock(self.descriptor, fcntl.LOCK_UN)
        os.close(self.descriptor)
        self.descriptor = None

    @staticmethod
    def _holder(descriptor: int) -> dict:
        text = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {"unreadable": text[:80]}


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(holder: dict) -> str:
    if not holder:
        return "a run"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"process {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def stored_config(weights: Path) -> dict | None:
    """The run config a weight file carries (``lrd-dist export`` writes it), as plain data."""
    with safe_open(str(weights), framework="pt") as handle:
        text = (handle.metadata() or {}).get(CONFIG_KEY)
    return yaml.safe_load(text) if text else None


def config_of_weights(weights: Path, config_file: Path | None, overrides: list[str] | None) -> RunConfig:
    """``config_file`` if given, else the config the weight file carries."""
    if not Path(weights).is_file():
        raise InputError(
            weights, "no such weights file", "pass best.safetensors of a run, or lrd-dist export's output"
        )
    if config_file is not None:
        return load_config(config_file, overrides, stored=True)
    stored = stored_config(weights)
    if stored is None:
        raise InputError(weights, "carries no run config", "pass --config with the run's config.yaml")
    return load_config(weights, overrides, tree=stored, stored=True)


def load_weights_file(built: DatasetAndModel, weights: Path, config_source: str | Path) -> None:
    """Load a weight file into the built model, refused with the reason if it does not fit."""
    if not Path(weights).is_file():
        raise InputError(
            weights, "no such weights file", "pass best.safetensors of a run, or lrd-dist export's output"
        )
    misfit = load_weights(built.model, load_file(str(weights)))
    if misfit:
        raise InputError(
            weights,
            f"does not fit the model built from {config_source} and the data at {built.data_dir}"
            f" ({'; '.join(misfit)})",
            "use the config and the data (data.dir=DIR) the weights were trained with",
        )


def load_trained(
    run_dir: Path | None = None,
    weights: Path | None = None,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    attention: SlotAttention = torch_slot_attention,
) -> DatasetAndModel:
    """A trained model ready to score: a run directory, or a weight file with ``config_file`` or
    the config it carries (``lrd-dist export``)."""
    if run_dir is not None:
        return RunDir(run_dir).load(overrides, attention)
    if weights is None:
        raise InputError(
            "command line", "no model given", "pass --run DIR, or --weights FILE [--config FILE]"
        )
    built = build_dataset_and_model(config_of_weights(weights, config_file, overrides), attention)
    load_weights_file(built, weights, config_file or weights)
    built.model.eval()
    return built
