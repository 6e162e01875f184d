"""Checkpoints a killed job can trust.

One checkpoint is a directory ``<out_dir>/checkpoints/step-00000120/``:

- ``accelerate/``: ``accelerator.save_state`` (model, optimizer; ZeRO shards under DeepSpeed);
- ``trainer.json``: the format version, the ``state_dict`` of every part registered as shared (the
  loop's position, the learning-rate schedules, model selection), the world size, the run config
  and the dataset's fingerprint;
- ``rank-00001.json``: one per rank, the ``state_dict`` of every per-rank part (RNG states, the
  training sampler's generators), as JSON, so nothing of ours is unpickled on resume;
- ``best.safetensors``: the best weights so far, so a resumed run keeps the right ones;
- ``encoder/``: with a live LLM item encoder, its LoRA adapter in PEFT's format (or the tuned model);
- ``COMPLETE``: written last, by the main process, after every rank has written its part; it lists
  every file with its size and sha256.

The trainer registers its parts with a ``Checkpointer`` once (torchtitan's ``Stateful`` contract:
``state_dict()`` / ``load_state_dict()``), so this module never needs to know the trainer's fields.
A checkpoint is built under ``.incomplete-step-...`` and renamed when complete, and old checkpoints
are pruned only after the new one is complete, so a crash during a save never leaves the run without
one (accelerate's own retention deletes first, and DeepSpeed writes its ``latest`` file even when a
rank's shard is missing). A checkpoint without ``COMPLETE``, with a file that does not match it, of
another format version, or made with another model config or dataset is refused with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from lrd_dist.config import RunConfig
from lrd_dist.data.format import DataIdentity, sha256_of
from lrd_dist.errors import InputError
from lrd_dist.run_dir import RunDir
from lrd_dist.runtime import refuse_unsafe_checkpoint, weights_only_loading

log = logging.getLogger(__name__)

FORMAT = 2  # trainer.json's "format": checkpoints of another version are refused, not converted
COMPLETE = "COMPLETE"
TRAINER = "trainer.json"
ACCELERATE_DIR = "accelerate"
# Config sections that define the model: a checkpoint from another value cannot be resumed...
MODEL_SECTIONS = ("model", "lrd", "kg", "llm")
# ...except these keys, which change how it trains, not what it is.
RESUMABLE_CHANGES = {
    "llm.lr",
    "llm.chunk_size",
    "llm.max_pairs_per_step",
    "llm.dedup",
    "llm.gradient_checkpointing",
    "llm.autocast",
    "llm.dropout",
    "llm.cache_dir",  # where the trunk cache lives; its key is checked apart
    "model.fused_attention",  # how the attention is computed, not what
}
# Keys that decide which optimizers a checkpoint holds, the data order or the objective: a run that
# continued with another value would not be the run that was stopped.
TRAINING_KEYS = (
    "train.embedding_updates",
    "train.seed",
    "train.loss",
    "train.num_negatives",
    "train.negative_rule",
    "train.grad_accum",
    "data.batch_size",
    "data.max_history",
)
# With a frozen table (both runs), only these keys of the llm section define the model.
FROZEN_LLM_KEYS = {"mode", "table", "shuffle_table"}


class DamagedCheckpoint(InputError):
    """A checkpoint whose files are not what its save wrote (``resume=auto`` falls back past it)."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class TrainState:
    """Where the loop is: enough to continue as if it had never stopped."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch to continue
    batches: int = 0  # micro-batches of that epoch already consumed (per rank)
    batches_per_epoch: int = 0  # per rank, in the run that saved it (another world size re-splits)
    skipped_nonfinite: int = 0  # optimizer steps skipped for a NaN/inf loss (train.skip_nonfinite_steps)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batches = state["step"], state["epoch"], state["batches"]
        self.batches_per_epoch = state["batches_per_epoch"]
        self.skipped_nonfinite = state["skipped_nonfinite"]


class RNGState:
    """This process's global RNG states (python, numpy, torch, CUDA) as JSON-able values."""

    def state_dict(self) -> dict:
        state = {
            "python": _listify(random.getstate()),
            "numpy": _listify(np.random.get_state(legacy=False)),
            "torch": torch.get_rng_state().tolist(),
        }
        if torch.cuda.is_available():
            state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(state["numpy"])
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@dataclass
class Resumed:
    """What a resume found: the checkpoint, and whether this world size wrote it (if not, the
    per-rank parts were not restored and the epoch position must be re-split)."""

    path: Path
    same_world: bool
    saved_batches_per_epoch: int


class Checkpointer:
    """Saves and restores the registered parts of a training run (collective calls)."""

    def __init__(
        self, accelerator: Accelerator, config: RunConfig, run_dir: RunDir, data: DataIdentity
    ) -> None:
        self.accelerator, self.config, self.run_dir, self.data = accelerator, config, run_dir, data
        self.shared: dict[str, Stateful] = {}
        self.per_rank: dict[str, Stateful] = {}
        self.save_extra: Callable[[Path], None] | None = None

    def register(
        self,
        shared: dict[str, Stateful],
        per_rank: dict[str, Stateful],
        save_extra: Callable[[Path], None] | None = None,
    ) -> None:
        """``shared``: one state for all ranks (the main rank's is saved); ``per_rank``: each rank's
        own; ``save_extra(directory)``: files of a part in its own format (a PEFT adapter)."""
        self.shared, self.per_rank, self.save_extra = shared, per_rank, save_extra

    @property
    def root(self) -> Path:
        return self.run_dir.checkpoints

    def save(self, step: int) -> Path:
        accelerator = self.accelerator
        final = self.root / f"step-{step:08d}"
        staging = self.root / f".incomplete-step-{step:08d}"
        if accelerator.is_main_process:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        deepspeed = accelerator.state.deepspeed_plugin is not None
        # Frozen weights (a LoRA base model) are rebuilt from llm.model: not written.
        options = {"exclude_frozen_parameters": True} if deepspeed and _live(self.config) else {}
        accelerator.save_state(str(staging / ACCELERATE_DIR), **options)
        if self.save_extra is not None:
            self.save_extra(staging)
        _write_json(
            staging / f"rank-{accelerator.process_index:05d}.json",
            {name: part.state_dict() for name, part in self.per_rank.items()},
        )
        # Every rank confirms its part before the main process declares the checkpoint complete.
        confirmed = gather_object([accelerator.process_index])
        if accelerator.is_main_process:
            if sorted(confirmed) != list(range(accelerator.num_processes)):
                raise RuntimeError(f"checkpoint {final}: ranks confirmed {confirmed}")
            if self.run_dir.best_weights.is_file():
                shutil.copy2(self.run_dir.best_weights, staging / RunDir.BEST)
            trainer = {
                "format": FORMAT,
                "states": {name: part.state_dict() for name, part in self.shared.items()},
                "world_size": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type),
                "data_fingerprint": self.data.fingerprint,
                "config": asdict(self.config),
            }
            _write_json(staging / TRAINER, trainer)
            files = {
                str(p.relative_to(staging)): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                for p in sorted(staging.rglob("*"))
                if p.is_file()
            }
            _write_json(staging / COMPLETE, {"files": files})
            if final.exists():  # a previous attempt at the same step (resumed, then preempted again)
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(self.root)
            for old in complete_checkpoints(self.root)[: -self.config.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s written", final)
        accelerator.wait_for_everyone()
        return final

    def resume(self) -> Resumed | None:
        """Restore every registered part from ``checkpoint.resume`` (None: a fresh run). With
        ``auto``, a damaged newest checkpoint is skipped (said, with why) for the newest good one,
        so a requeue loop goes on; another config or dataset is refused, whichever checkpoint."""
        candidates = find_resume_points(self.config, self.root)
        if not candidates:
            return None
        accelerator = self.accelerator
        deepspeed = accelerator.state.deepspeed_plugin is not None
        error: InputError | None = None
        for path in candidates:
            try:
                trainer = verify_checkpoint(
                    path, self.config, self.data, accelerator.num_processes, deepspeed
                )
                error = None
                break
            except DamagedCheckpoint as exc:
                error = exc
                if self.config.checkpoint.resume == "auto" and path != candidates[-1]:
                    log.warning("resume=auto: skipping %s: %s", path.name, exc)
                    continue
                break
            except InputError as exc:
                error = exc
                break
        # All ranks agree before anyone loads: one refusing rank stops them all with the same message.
        errors = [e for e in gather_object([str(error) if error else ""]) if e]
        if error is not None:
            raise error
        if errors:
            raise InputError(
                path, f"another rank refused the checkpoint: {errors[0]}", "see that rank's message"
            )
        options: dict[str, bool] = {}
        if _live(self.config):  # frozen encoder weights are not in the checkpoint
            options = {"load_module_strict": False} if deepspeed else {"strict": False}
        with weights_only_loading():
            accelerator.load_state(str(path / ACCELERATE_DIR), **options)
        for name, part in self.shared.items():
            part.load_state_dict(trainer["states"][name])
        same_world = trainer["world_size"] == accelerator.num_processes
        rank_file = path / f"rank-{accelerator.process_index:05d}.json"
        if same_world and rank_file.is_file():
            saved = json.loads(rank_file.read_text())
            for name, part in self.per_rank.items():
                part.load_state_dict(saved[name])
        else:
            log.warning(
                "resuming a %d-process checkpoint with %d processes: model and optimizer continue "
                "exactly; the data order of the current epoch is re-split (see docs/training.md)",
                trainer["world_size"],
                accelerator.num_processes,
            )
        best = path / RunDir.BEST
        if accelerator.is_main_process and best.is_file():
            shutil.copy2(best, self.run_dir.best_weights)
        accelerator.wait_for_everyone()
        position = trainer["states"]["train_state"]
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            position["step"],
            position["epoch"],
            position["batches"],
        )
        return Resumed(path, same_world, position["batches_per_epoch"])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def skip_frozen_weights(accelerator: Accelerator, frozen: set[str]) -> None:
    """Leave weights that never train out of every checkpoint's model file (DDP / one process;
    DeepSpeed is told by ``exclude_frozen_parameters``): a LoRA-tuned 7B model would otherwise
    write its 14 GB base each time."""
    if not frozen:
        return

    def drop(models, weights, output_dir) -> None:
        for state in weights:
            for key in [k for k in state if k.removeprefix("module.") in frozen]:
                del state[key]

    accelerator.register_save_state_pre_hook(drop)


def _live(config: RunConfig) -> bool:
    return config.lrd.enabled and config.llm.mode != "frozen"


def find_resume_points(config: RunConfig, root: Path) -> list[Path]:
    """The checkpoints ``checkpoint.resume`` may continue from, the one to try first first: none,
    the complete ones newest first (``auto``), or the one named."""
    resume = config.checkpoint.resume
    if resume == "never":
        return []
    if resume == "auto":
        found = complete_checkpoints(root)
        partial = sorted(root.glob(".incomplete-step-*")) if root.is_dir() else []
        for path in partial:
            log.warning("ignoring %s: its save did not finish", path)
        if not found:
            log.info("resume=auto: no complete checkpoint under %s, starting fresh", root)
        return found[::-1]
    path = Path(resume)
    if not path.is_dir():
        raise InputError(
            path, "no such checkpoint directory", "pass checkpoint.resume=auto or an existing step-* dir"
        )
    return [path]


def verify_checkpoint(
    path: Path, config: RunConfig, data: DataIdentity, world_size: int, deepspeed: bool
) -> dict:
    """Refuse a checkpoint that is incomplete, damaged, of another format, or from another model
    or dataset. Returns its trainer.json."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise InputError(
            path,
            "incomplete checkpoint (no COMPLETE marker): its save was interrupted",
            "resume from an earlier step-* directory, or checkpoint.resume=auto which skips it",
        )
    try:
        listed = json.loads(marker.read_text())["files"]
        expected_files = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in listed.items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DamagedCheckpoint(
            marker,
            f"damaged: not the list of files its save wrote ({exc.__class__.__name__})",
            "resume from another checkpoint (checkpoint.resume=auto falls back to the newest good one)",
        ) from exc
    for name, (size, digest) in expected_files.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(file, "missing from the checkpoint", "resume from another checkpoint")
        if file.stat().st_size != size or sha256_of(file) != digest:
            raise DamagedCheckpoint(
                file,
                "differs from the checksum recorded when it was written",
                "resume from another checkpoint",
            )
    refuse_unsafe_checkpoint(path)
    trainer = json.loads((path / TRAINER).read_text())
    if trainer.get("format") != FORMAT:
        raise InputError(
            path / TRAINER,
            f"checkpoint format {trainer.get('format', 1)}, this lrd_dist reads format {FORMAT}",
            "retrain, or resume it with the lrd_dist release that wrote it",
        )
    if not config.checkpoint.force:
        if not data.matches(trainer["data_fingerprint"]):
            raise InputError(
                path,
                f"made with another dataset (fingerprint {trainer['data_fingerprint'][:12]}, "
                f"now {data.fingerprint[:12]})",
                "point data.dir at the dataset it was trained on, or set checkpoint.force=true",
            )
        changed = config_changes(trainer["config"], config, path)
        if changed:
            raise InputError(
                path,
                "made with another model config (" + "; ".join(changed) + ")",
                "resume with the checkpoint's config (its trainer.json has it), or set checkpoint.force=true",
            )
    if deepspeed and trainer["world_size"] != world_size:
        raise InputError(
            path,
            f"DeepSpeed ZeRO checkpoint of {trainer['world_size']} ranks, resumed with {world_size}",
            "resume with the same number of processes, or `lrd-dist export` it and start from the weights",
        )
    return trainer


def config_changes(saved: dict, config: RunConfig, where: Path) -> list[str]:
    """What differs between a checkpoint's model-defining config and ``config``, as ``key: old ->
    new`` lines; a key the checkpoint lacks or this release does not know is refused."""
    now = asdict(config)
    for section in (*MODEL_SECTIONS, "train", "data"):
        unknown = sorted(set(saved.get(section, {})) ^ set(now[section]))
        if unknown:
            raise InputError(
                where / TRAINER,
                f"config key {section}.{unknown[0]} is not one of this release's",
                "retrain, or resume it with the lrd_dist release that wrote it",
            )
    frozen = now["llm"]["mode"] == saved["llm"]["mode"] == "frozen"
    changes = [
        f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
        for section in MODEL_SECTIONS
        for key, value in now[section].items()
        if saved[section][key] != value
        and f"{section}.{key}" not in RESUMABLE_CHANGES
        and not (section == "llm" and frozen and key not in FROZEN_LLM_KEYS)
    ]
    for dotted in TRAINING_KEYS:
        section, key = dotted.split(".")
        if saved[section][key] != now[section][key]:
            changes.append(f"{dotted}: {saved[section][key]!r} -> {now[section][key]!r}")
    return changes


def position_for_world_size(batches: int, saved_per_epoch: int, per_epoch: int, grad_accum: int) -> int:
    """Where a checkpoint of another world size continues its epoch: at the same fraction of it,
    rounded down to an accumulation boundary (the model and optimizer continue exactly; which
    samples remain in that epoch is re-split, see docs/training.md)."""
    position = batches * per_epoch // saved_per_epoch
    return position - position % grad_accum


def _listify(value):
    if isinstance(value, tuple | list):
        return [_listify(v) for v in value]
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _write_json(path: Path, value: dict) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
