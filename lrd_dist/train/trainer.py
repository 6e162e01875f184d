"""Training a recommender: ``train(config)``, or the ``Trainer`` whose steps it calls.

The same code runs in one process, under DDP and under DeepSpeed ZeRO 1-3: ``accelerate launch``
decides which (see ``launchers/``), and everything that depends on it lives in ``lrd_dist/runtime.py``.
A run writes into ``train.out_dir`` (``lrd_dist/run_dir.py`` names its files). The parts a checkpoint
saves (the loop's position, the schedules, model selection, the sampler, the RNG states) are handed to
the ``Checkpointer`` once; what is not the loop's business (the collapse warning, the recovery of
planted relations, fault injection in tests) is a callback.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_file, save_file

from lrd_dist.assembly import build_dataset_and_model
from lrd_dist.config import RunConfig, to_yaml
from lrd_dist.data.stream import make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.encoders.item_text import LiveTextEncoder
from lrd_dist.errors import InputError
from lrd_dist.evaluation.evaluate import evaluate
from lrd_dist.models import frozen_parameter_names, load_weights, weights_to_save
from lrd_dist.run_dir import RunDir
from lrd_dist.runtime import Backend, scoring_context, trim_heap_steps
from lrd_dist.train import callbacks as hooks
from lrd_dist.train.checkpoint import (
    Checkpointer,
    RNGState,
    Stateful,
    TrainState,
    complete_checkpoints,
    position_for_world_size,
    skip_frozen_weights,
)
from lrd_dist.train.encoder_state import encoder_summary, save_encoder
from lrd_dist.train.metrics_log import LogWindow, MetricsLog, flat_config
from lrd_dist.train.optimizer import Schedules, build_optimizers
from lrd_dist.train.plots import plot_curves
from lrd_dist.train.preemption import NonFiniteLoss, Preempted, PreemptionFlag
from lrd_dist.train.progress import progress
from lrd_dist.train.sampling import TrainingSampler
from lrd_dist.train.selection import ModelSelection

log = logging.getLogger(__name__)


def train(config: RunConfig, callbacks: list | None = None) -> dict:
    """Train, select on dev, score the best weights on test; returns what results.json holds.
    Raises ``Preempted`` after a checkpoint when the job is asked to stop."""
    trainer = Trainer(config, callbacks)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.lock.release()  # also when it fails: the directory is free for the next attempt


class Trainer:
    def __init__(self, config: RunConfig, callbacks: list | None = None) -> None:
        self.config = config
        trim_every = trim_heap_steps()  # (an environment variable: checked before anything is built)
        self.run_dir = RunDir(config.train.out_dir)
        self.lock = self.run_dir.lock()
        self.callbacks = [
            hooks.CollapseWarning(),
            hooks.RelationAgreement(),
            *hooks.load_callbacks(config.train.callbacks),
            *(callbacks or []),
            *([hooks.TrimHeap(trim_every)] if trim_every else []),
        ]
        self.state = TrainState()
        self.selection = ModelSelection(config.train.early_stop, config.train.patience)
        self.preempted = False
        self.done = False  # max_steps reached or early stop
        self.nonfinite: list[str] = []  # loss terms that went NaN/inf in this accumulation window
        self.started = time.perf_counter()
        self.epoch_started = self.started

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        config = self.config
        self.backend = backend = Backend(config)
        self.accelerator = accelerator = backend.accelerator
        set_seed(config.train.seed)
        self.main = accelerator.is_main_process  # the only writer under out/ (checkpoints aside)
        if self.main:
            self.lock.acquire()  # one run per directory
            self.claim_run_dir()
            self.run_dir.config_file.write_text(to_yaml(config))
        self.preemption = PreemptionFlag()

        self.built = built = build_dataset_and_model(config, backend.attention, backend.lockstep)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.train_stream = built.stream("train", rank=rank, world_size=world)
        self.dev_stream = built.stream("dev", rank=rank, world_size=world)
        self.test_stream = built.stream("test", rank=rank, world_size=world)
        self.batches_per_epoch = len(self.train_stream)
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.train.grad_accum)
        self.total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch

        optimizers = build_optimizers(built.model, config)
        # Stepped by hand at optimizer-step boundaries and saved as JSON in the checkpoint.
        self.schedules = Schedules(optimizers, config, self.total_steps)
        backend.fill_deepspeed_auto()
        frozen = frozen_parameter_names(built.model)
        self.model, *self.optimizers = accelerator.prepare(built.model, *optimizers)
        self.core = accelerator.unwrap_model(self.model)
        skip_frozen_weights(accelerator, frozen)
        self.scorer = backend.scoring(self.core)
        self.live_encoder = isinstance(self.core.item_text, LiveTextEncoder)
        # ZeRO-3: the live encoder is only called through its forward (see full_parameters)
        self.forward_only = self.core.item_text if self.live_encoder else None

        # every item of each user: full-ranking masks and the official negatives
        official = config.train.negative_rule == "official"
        self.known = UserItems.from_dataset(built.data_dir) if config.eval.full_ranking or official else None
        self.sampler = TrainingSampler(
            config, built.graph, built.kg_weight > 0, rank, self.known if official else None, built.cold
        )
        if len(built.cold):
            self.callbacks.append(hooks.KeepColdRows(self.core, built.cold, backend.deepspeed))
        if config.train.loss == "full_softmax" and self.core.reads_text and self.live_encoder:
            self.callbacks.append(hooks.RefreshCatalogText(config.train.catalog_refresh_steps))
        with backend.full_parameters(self.core, trainable_only=True):
            self.parameters = sum(p.numel() for p in self.core.parameters() if p.requires_grad)
        log.info(
            "rank %d of %d (%s), model %s: %d trainable parameters, %d relation slots, gamma %.4f",
            *(rank, world, accelerator.distributed_type, config.model.name, self.parameters),
            built.graph.slots.total if built.relational else 0,
            built.kg_weight,
        )
        self.checkpointer = Checkpointer(accelerator, config, self.run_dir, built.data_identity)
        shared: dict[str, Stateful] = {
            "train_state": self.state,
            "schedules": self.schedules,
            "selection": self.selection,
        }
        if self.live_encoder and self.core.item_text.trunk is not None:
            shared["trunk_cache"] = self.core.item_text.trunk  # its key: a changed cache is refused
        self.checkpointer.register(
            shared=shared,
            per_rank={"rng": RNGState(), "sampler": self.sampler},
            save_extra=self._save_encoder if self.live_encoder else None,
        )
        resumed_from = self.resume()
        track = None
        if config.train.tracker != "none":
            accelerator.init_trackers("lrd_dist", config=flat_config(config))
            track = lambda scalars, step: accelerator.log(scalars, step=step)  # noqa: E731
        self.metrics = MetricsLog(self.run_dir.metrics, self.main, track)
        if resumed_from is not None:  # the log says where this process took over (the tests check it)
            self.metrics.record(
                {"step": self.state.step, "epoch": self.state.epoch, "resumed_from": resumed_from.name}
            )
        self.window = LogWindow()
        # A resumed run that had stopped early stays stopped (the official rule reads the dev history).
        self.done = self.state.step >= self.total_steps or self.selection.should_stop()

    def claim_run_dir(self) -> None:
        """A fresh run (``checkpoint.resume=never``) into a directory that holds another run's
        checkpoints would interleave with them: refused, unless ``checkpoint.overwrite`` clears it."""
        if self.config.checkpoint.resume != "never":
            return
        found = complete_checkpoints(self.run_dir.checkpoints)
        if found and not self.config.checkpoint.overwrite:
            raise InputError(
                self.run_dir.path,
                f"holds the checkpoints of another run (the newest {found[-1].name})",
                "continue it with checkpoint.resume=auto, give this run its own train.out_dir, or set "
                "checkpoint.overwrite=true to delete them",
            )
        if found:
            log.warning(
                "checkpoint.overwrite: deleting the previous run's checkpoints in %s", self.run_dir.path
            )
            shutil.rmtree(self.run_dir.checkpoints)
            for stale in (self.run_dir.best_weights, self.run_dir.results, self.run_dir.metrics):
                stale.unlink(missing_ok=True)

    def resume(self) -> Path | None:
        """Continue from ``checkpoint.resume`` as if the run had never stopped; a fresh run starts
        its metrics log anew, a resumed one keeps it up to the checkpoint's step. Returns the
        checkpoint it continued from."""
        resumed = self.checkpointer.resume()
        if resumed is not None and not resumed.same_world and self.state.batches:
            # another world size: continue at the same fraction of the epoch
            self.state.batches = position_for_world_size(
                self.state.batches,
                resumed.saved_batches_per_epoch,
                self.batches_per_epoch,
                self.config.train.grad_accum,
            )
        self.state.batches_per_epoch = self.batches_per_epoch
        if self.main:
            MetricsLog.truncate(self.run_dir.metrics, self.state.step if resumed else 0)
        return resumed.path if resumed is not None else None

    # ---- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        while not self.finished:
            self.train_epoch()
            if self.preempted:
                self.stop_for_requeue()
            self.end_epoch()
        return self.finish()

    @property
    def finished(self) -> bool:
        return self.done or self.state.epoch >= self.config.train.epochs

    def train_epoch(self) -> None:
        """Steps until the epoch ends, ``max_steps`` is reached or the job is asked to stop."""
        config, state = self.config, self.state
        self.epoch_started = time.perf_counter()
        self.train_stream.set_position(state.epoch, state.batches)
        self.window = LogWindow()
        hooks.call(self.callbacks, "on_epoch_start", self)
        batches = progress(
            make_loader(self.train_stream),
            total=self.batches_per_epoch,
            initial=state.batches,
            desc=f"epoch {state.epoch}",
            enabled=self.main,
            seconds=config.train.progress_seconds,
        )
        self.model.train()
        for batch in batches:
            state.batches += 1
            # Accumulation windows end at the epoch end, so a checkpoint never holds half a window.
            boundary = state.batches % config.train.grad_accum == 0 or state.batches == self.batches_per_epoch
            self.train_step(batch, boundary)
            if not boundary:
                continue
            self.optimizer_step()
            if self.preempted or self.done:
                break

    def train_step(self, batch: dict[str, torch.Tensor], boundary: bool = True) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; gradients synchronise at a ``boundary``."""
        device = self.accelerator.device
        inputs = _to_device(self.sampler.draw(batch), device)
        batch = {k: v.to(device) for k, v in batch.items()}
        with self.backend.sync_context(self.model, boundary):
            with self.accelerator.autocast():
                losses = self.model(batch, **inputs)  # through the wrapper, so gradients synchronise
            # DeepSpeed divides by its own accumulation steps; the plain path does it here.
            total = losses["loss"]
            self.accelerator.backward(
                total if self.backend.deepspeed else total / self.config.train.grad_accum
            )
        if not torch.isfinite(total.detach()):
            terms = [n for n in ("rec", "kg", "lrd") if n in losses and not torch.isfinite(losses[n]).all()]
            self.nonfinite += [t for t in terms or ["loss"] if t not in self.nonfinite]
        else:
            self.window.add(losses, int(batch["valid"].sum()))
        return losses

    def optimizer_step(self) -> None:
        config, state = self.config, self.state
        if self.any_rank_nonfinite():
            return
        if config.train.max_grad_norm and not self.backend.deepspeed:  # DeepSpeed clips from its config
            self.accelerator.clip_grad_norm_(self.model.parameters(), config.train.max_grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        self.schedules.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        state.step += 1
        if state.step % config.train.log_every == 0:
            entry = self.window.close(
                state.step, state.epoch, self.schedules.lr, self.accelerator.num_processes
            )
            self.metrics.record(entry)
            if self.main:
                hooks.call(self.callbacks, "on_log", self, entry)
        hooks.call(self.callbacks, "on_step_end", self)
        self.preempted = self.preemption.any_rank(self.accelerator)
        self.done = state.step >= self.total_steps
        every = config.checkpoint.every_steps
        if self.preempted or (every and state.step % every == 0 and state.batches < self.batches_per_epoch):
            self.checkpointer.save(state.step)

    def any_rank_nonfinite(self) -> bool:
        """Collective: a NaN/inf loss on any rank in this window drops the window's gradients on every
        rank and skips the step (``train.skip_nonfinite_steps`` times at most; never under DeepSpeed,
        whose engine keeps its own gradients), or stops every rank with ``NonFiniteLoss``."""
        flag = torch.tensor([1.0 if self.nonfinite else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if not flag.item():
            return False
        state = self.state
        mine = [(self.accelerator.process_index, self.nonfinite)]
        found = [
            item for item in (gather_object(mine) if self.accelerator.num_processes > 1 else mine) if item[1]
        ]
        self.nonfinite = []
        if not self.backend.deepspeed and state.skipped_nonfinite < self.config.train.skip_nonfinite_steps:
            for optimizer in self.optimizers:
                optimizer.zero_grad()
            state.skipped_nonfinite += 1
            log.warning("non-finite loss after step %d (%s): step skipped", state.step, found)
            self.metrics.record(
                {"step": state.step, "epoch": state.epoch, "skipped_nonfinite": state.skipped_nonfinite}
            )
            return True
        last = complete_checkpoints(self.run_dir.checkpoints)
        self.metrics.close()
        self.end_training()
        raise NonFiniteLoss(state.step + 1, found, last[-1].name if last else None)

    # ---- end of epoch: dev evaluation, model selection, checkpoint ------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """HR/NDCG of the current weights on ``dev`` or ``test`` (collective)."""
        config = self.config
        stream = {"dev": self.dev_stream, "test": self.test_stream}[split]
        with (
            self.backend.full_parameters(self.core, skip=self.forward_only),
            scoring_context(self.scorer),
            self.core.text_read_once(),
        ):
            return evaluate(
                self.core,
                make_loader(stream),
                config.eval.ks,
                config.eval.ties,
                config.eval.full_ranking,
                self.built.manifest.num_items,
                gather=gather_object if self.accelerator.num_processes > 1 else None,
                known=self.known,
                split=split,
                cold=self.built.cold,
            )

    def end_epoch(self) -> None:
        config, state = self.config, self.state
        epoch = state.epoch
        dev = self.evaluate("dev") if config.eval.enabled else {}
        self.metrics.record(
            {
                "epoch": epoch,
                "step": state.step,
                "epoch_seconds": time.perf_counter() - self.epoch_started,
                **{f"dev/{k}": v for k, v in dev.items()},
            }
        )
        stop = False
        if dev:
            value = dev[config.eval.metric]
            log.info("epoch %d: dev %s %.4f", epoch, config.eval.metric, value)
            if self.selection.update(value, epoch):
                weights = weights_to_save(self.backend.full_state_dict(self.core), self.core)
                if self.main:
                    save_file(weights, str(self.run_dir.best_weights))
            stop = self.selection.should_stop()
        if stop:
            log.info(
                "early stop after epoch %d (best epoch %d, %s)",
                *(epoch, self.selection.best_epoch, config.train.early_stop),
            )
        state.epoch, state.batches = epoch + 1, 0
        self.checkpointer.save(state.step)
        self.done = self.done or stop
        hooks.call(self.callbacks, "on_epoch_end", self)

    def _save_encoder(self, directory) -> None:
        """The adapter (or tuned encoder) in PEFT/transformers' own format (collective)."""
        save_encoder(self.core.item_text, self.backend.deepspeed, directory / RunDir.ENCODER, self.main)

    # ---- the end ------------------------------------------------------------------------------
    def stop_for_requeue(self) -> None:
        """Stopped for a signal (the checkpoint is written): raise for the scheduler to requeue."""
        self.metrics.close()
        if self.main:
            PreemptionFlag.announce()
        self.end_training()
        raise Preempted(self.state.step)

    def finish(self) -> dict:
        """The best weights on dev and test; ``results.json``, ``curves.png``; the tuned encoder."""
        config, state, core = self.config, self.state, self.core
        self.metrics.close()
        self.accelerator.wait_for_everyone()  # the best weights are written
        results = {
            "model": config.model.name,
            "lrd": config.lrd.enabled,
            "seed": config.train.seed,
            "world_size": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type),
            "best_epoch": self.selection.best_epoch,
            "epochs_run": state.epoch,
            "steps": state.step,
            "parameters": self.parameters,
        }
        if self.live_encoder:
            results["encoder"] = encoder_summary(core.item_text, self.backend.deepspeed, gather_object)
        if config.eval.enabled:
            best_weights = load_file(str(self.run_dir.best_weights))
            with self.backend.full_parameters(core, modify=True):  # under ZeRO-3 rank 0's copy is scattered
                misfit = load_weights(core, best_weights)
            if misfit:
                raise RuntimeError(f"{self.run_dir.best_weights} does not fit the model: {misfit}")
            results["dev"], results["test"] = self.evaluate("dev"), self.evaluate("test")
        results["seconds"] = time.perf_counter() - self.started
        hooks.call(self.callbacks, "on_finish", self, results)
        if self.live_encoder:  # the best weights' encoder: `lrd-dist embed --adapter <out>/encoder`
            self._save_encoder(self.run_dir.path)
        if self.main:
            self.run_dir.results.write_text(json.dumps(results, indent=2) + "\n")
            plot_curves(self.run_dir.metrics, self.run_dir.curves, config.eval.metric)
        self.end_training()
        return results

    def end_training(self) -> None:
        """Every rank reaches this point before any tears the process group down, so none closes
        its gloo pairs while a peer may still use them (the suspected cause of one rank aborting
        at exit with "terminate called without an active exception", once in a SLURM requeue test,
        which turned the requeue into a failed job)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.lock.release()


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
