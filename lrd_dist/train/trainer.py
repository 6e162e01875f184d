"""Training a recommender: ``train(config)``, or the ``Trainer`` whose steps it calls.

The same code runs in one process, under DDP and under DeepSpeed ZeRO 1-3: ``accelerate launch``
decides which (see ``launchers/``), and everything that depends on it lives in ``backend.py``.
A run writes into ``train.out_dir``: ``config.yaml``, ``metrics.jsonl`` (one JSON line per log
step and per evaluation), ``best.safetensors``, ``checkpoints/``, ``results.json``, ``curves.png``,
TensorBoard events under ``tensorboard/`` and, with a live LLM item encoder (``llm.mode: lora |
full``), the tuned encoder under ``encoder/``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_file, save_file

from lrd_dist.config import RunConfig, to_yaml
from lrd_dist.data.stream import make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.encoders.item_text import LiveTextEncoder
from lrd_dist.evaluation.evaluate import evaluate
from lrd_dist.evaluation.relations import relation_agreement
from lrd_dist.models import frozen_parameter_names, load_weights, weights_to_save
from lrd_dist.run import build_run
from lrd_dist.train import callbacks as hooks
from lrd_dist.train.backend import Backend, scoring_context
from lrd_dist.train.checkpoint import (
    BEST,
    ENCODER_DIR,
    TrainerState,
    find_resume_point,
    load_checkpoint,
    position_for_world_size,
    rng_state,
    save_checkpoint,
    saved_batches_per_epoch,
    set_rng_state,
    skip_frozen_weights,
)
from lrd_dist.train.encoder_state import encoder_summary, save_encoder
from lrd_dist.train.metrics_log import MetricsLog, flat_config
from lrd_dist.train.optimizer import Schedules, build_optimizers
from lrd_dist.train.plots import plot_curves
from lrd_dist.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from lrd_dist.train.progress import progress
from lrd_dist.train.sampling import TrainingSampler

log = logging.getLogger(__name__)
COLLAPSE_SHARE = 0.95  # warn when one relation takes this share of the (history, target) pairs


def train(config: RunConfig, callbacks: list | None = None) -> dict:
    """Train, select on dev, score the best weights on test; returns what results.json holds.
    Exits with ``REQUEUE_EXIT_CODE`` after a checkpoint when the job is asked to stop."""
    trainer = Trainer(config, callbacks)
    trainer.setup()
    while not trainer.finished:
        trainer.train_epoch()
        if trainer.preempted:
            trainer.stop_for_requeue()
        trainer.end_epoch()
    return trainer.finish()


class Trainer:
    def __init__(self, config: RunConfig, callbacks: list | None = None) -> None:
        self.config = config
        self.callbacks = [*hooks.load_callbacks(config.train.callbacks), *(callbacks or [])]
        self.out = Path(config.train.out_dir)
        self.state = TrainerState()
        self.preempted = False
        self.done = False  # max_steps reached or early stop

    # ---- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        config = self.config
        self.started = time.perf_counter()
        self.backend = backend = Backend(config)
        self.accelerator = accelerator = backend.accelerator
        set_seed(config.train.seed)
        self.main = accelerator.is_main_process  # the only writer under out/ (checkpoints aside)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(config))
        self.preemption = PreemptionFlag()

        self.run = run = build_run(config, backend.attention, backend.lockstep)
        rank, world = accelerator.process_index, accelerator.num_processes
        self.train_stream = run.stream("train", rank=rank, world_size=world)
        self.dev_stream = run.stream("dev", rank=rank, world_size=world)
        self.test_stream = run.stream("test", rank=rank, world_size=world)
        self.batches_per_epoch = len(self.train_stream)
        steps_per_epoch = math.ceil(self.batches_per_epoch / config.train.grad_accum)
        self.total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch

        model = run.model
        optimizers = build_optimizers(model, config)
        # Stepped by hand at optimizer-step boundaries and saved as JSON in the trainer state.
        self.schedules = Schedules(optimizers, config, self.total_steps)
        backend.fill_deepspeed_auto()
        frozen = frozen_parameter_names(model)
        self.model, *self.optimizers = accelerator.prepare(model, *optimizers)
        self.core = accelerator.unwrap_model(self.model)
        skip_frozen_weights(accelerator, frozen)
        self.scorer = backend.scoring(self.core)
        self.live_encoder = isinstance(self.core.item_text, LiveTextEncoder)
        # ZeRO-3: the live encoder is only called through its forward (see full_parameters)
        self.forward_only = self.core.item_text if self.live_encoder else None

        # every item of each user: full-ranking masks and the official negatives
        need_known = config.eval.full_ranking or config.train.negative_rule == "official"
        self.known = UserItems.from_dataset(run.data_dir) if need_known else None
        self.kg_weight = run.kg_weight
        self.sampler = TrainingSampler(
            config,
            run.graph,
            self.kg_weight > 0,
            rank,
            self.known if config.train.negative_rule == "official" else None,
        )
        with backend.full_parameters(self.core, trainable_only=True):
            self.parameters = sum(p.numel() for p in self.core.parameters() if p.requires_grad)
        log.info(
            "rank %d of %d (%s), model %s: %d trainable parameters, %d relation slots, gamma %.4f",
            rank,
            world,
            accelerator.distributed_type,
            config.model.name,
            self.parameters,
            run.graph.slots.total if run.relational else 0,
            self.kg_weight,
        )
        resumed = self.resume()
        metrics_path = self.out / "metrics.jsonl"
        if self.main:
            MetricsLog.truncate(metrics_path, self.state.step if resumed else 0)
        track = None
        if config.train.tracker != "none":
            accelerator.init_trackers("lrd_dist", config=flat_config(config))
            track = lambda scalars, step: accelerator.log(scalars, step=step)  # noqa: E731
        self.metrics = MetricsLog(metrics_path, self.main, track)
        # A resumed run that had stopped early stays stopped (the official rule reads the dev history).
        self.done = self.state.step >= self.total_steps or self._stopped_early()

    def resume(self) -> bool:
        """Continue from ``checkpoint.resume``, as if the run had never stopped; False if fresh."""
        checkpoint = find_resume_point(self.config)
        if checkpoint is None:
            return False
        self.state, rank_state = load_checkpoint(
            self.accelerator, checkpoint, self.config, self.run.data_identity
        )
        self.schedules.load_state_dict(self.state.scheduler)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            self.sampler.load_state_dict(rank_state["sampler"])
        elif self.state.batches:  # another world size: continue at the same fraction of the epoch
            self.state.batches = position_for_world_size(
                self.state.batches,
                saved_batches_per_epoch(checkpoint),
                self.batches_per_epoch,
                self.config.train.grad_accum,
            )
        return True

    # ---- the loop -----------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.done or self.state.epoch >= self.config.train.epochs

    def train_epoch(self) -> None:
        """Steps until the epoch ends, ``max_steps`` is reached or the job is asked to stop."""
        config, state = self.config, self.state
        self.epoch_started = time.perf_counter()
        self.train_stream.set_position(state.epoch, state.batches)
        self.window: dict[str, list] = {}
        self.window_samples, self.window_started = 0, time.perf_counter()
        self.warned_collapse = False  # once per epoch
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
        inputs = _to_device(self.sampler.draw(batch), self.accelerator.device)
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        with self.backend.sync_context(self.model, boundary):
            with self.accelerator.autocast():
                losses = self.model(batch, **inputs)  # through the wrapper, so gradients synchronise
                total = (
                    losses["rec"]
                    + self.kg_weight * losses.get("kg", 0.0)
                    + self.config.lrd.weight * losses.get("lrd", 0.0)
                )
            # DeepSpeed divides by its own accumulation steps; the plain path does it here.
            self.accelerator.backward(
                total if self.backend.deepspeed else total / self.config.train.grad_accum
            )
        for name, value in losses.items():
            self.window.setdefault(name, []).append(value.detach().float().cpu())
        self.window.setdefault("loss", []).append(total.detach().float().cpu())
        self.window_samples += int(batch["valid"].sum())
        return losses

    def optimizer_step(self) -> None:
        config, state = self.config, self.state
        if config.train.max_grad_norm and not self.backend.deepspeed:  # DeepSpeed clips from its config
            self.accelerator.clip_grad_norm_(self.model.parameters(), config.train.max_grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        self.schedules.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        state.step += 1
        if state.step % config.train.log_every == 0:
            self._log_window()
        hooks.call(self.callbacks, "on_step_end", self)
        self.preempted = self.preemption.any_rank(self.accelerator)
        self.done = state.step >= self.total_steps
        every = config.checkpoint.every_steps
        if self.preempted or (every and state.step % every == 0 and state.batches < self.batches_per_epoch):
            self.save_checkpoint()

    def _log_window(self) -> None:
        now = time.perf_counter()
        state = self.state
        entry = {"step": state.step, "epoch": state.epoch, "lr": self.schedules.lr}
        # training samples per second over all ranks (loader padding rows not counted)
        entry["samples_per_s"] = (
            self.window_samples * self.accelerator.num_processes / (now - self.window_started)
        )
        entry.update({k: torch.stack(v).mean(0).tolist() for k, v in self.window.items()})
        self.metrics.record(entry)
        if self.main and not self.warned_collapse:
            self.warned_collapse = _warn_on_collapse(entry)
        self.window, self.window_samples, self.window_started = {}, 0, now

    # ---- end of epoch: dev evaluation, model selection, checkpoint ------------------------------
    def evaluate(self, split: str) -> dict[str, float]:
        """HR/NDCG of the current weights on ``dev`` or ``test`` (collective)."""
        config = self.config
        stream = {"dev": self.dev_stream, "test": self.test_stream}[split]
        with self.backend.full_parameters(self.core, skip=self.forward_only), scoring_context(self.scorer):
            return evaluate(
                self.core,
                make_loader(stream),
                config.eval.ks,
                config.eval.ties,
                config.eval.full_ranking,
                self.run.manifest.num_items,
                gather=gather_object if self.accelerator.num_processes > 1 else None,
                known=self.known,
                split=split,
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
            state.dev_history.append(value)
            official = config.train.early_stop == "official"
            if value > state.best or (official and value == state.best):  # official: a tie overwrites
                state.best, state.best_epoch, state.waited = value, epoch, 0
                weights = weights_to_save(self.backend.full_state_dict(self.core), self.core)
                if self.main:
                    save_file(weights, str(self.out / BEST))
            else:
                state.waited += 1
            stop = self._stopped_early()
        if stop:
            log.info(
                "early stop after epoch %d (best epoch %d, %s)",
                epoch,
                state.best_epoch,
                config.train.early_stop,
            )
        state.epoch, state.batches = epoch + 1, 0
        self.save_checkpoint()
        self.done = self.done or stop
        hooks.call(self.callbacks, "on_epoch_end", self)

    def _stopped_early(self) -> bool:
        """The early-stop rule on the dev history so far: ``official`` (LRD/ReChorus) or ``patience``."""
        if self.config.train.early_stop == "official":
            return official_stop(self.state.dev_history)
        return self.config.train.early_stop == "patience" and self.state.waited >= self.config.train.patience

    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part (see ``checkpoint.py``)."""
        state = self.state
        state.scheduler = self.schedules.state_dict()
        rank_state = {
            "rng": rng_state(),
            "sampler": self.sampler.state_dict(),
            "data": {
                "epoch": state.epoch,
                "batches": state.batches,
                "batches_per_epoch": self.batches_per_epoch,
            },
        }
        save_extra = None
        if self.live_encoder:  # the adapter (or tuned encoder) in PEFT/transformers' own format
            save_extra = lambda d: save_encoder(  # noqa: E731
                self.core.item_text, self.backend.deepspeed, d / ENCODER_DIR, self.main
            )
        save_checkpoint(
            self.accelerator,
            self.config,
            state,
            rank_state,
            self.run.data_identity.fingerprint,
            self.config.checkpoint.keep,
            save_extra,
        )

    # ---- the end ------------------------------------------------------------------------------
    def stop_for_requeue(self) -> None:
        """Stopped for a signal (the checkpoint is written): exit for the scheduler to requeue."""
        self.metrics.close()
        log.warning("stopped for a signal at step %d; resume with checkpoint.resume=auto", self.state.step)
        if self.main:
            PreemptionFlag.announce()
        self.end_training()
        sys.exit(REQUEUE_EXIT_CODE)

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
            "best_epoch": state.best_epoch,
            "epochs_run": state.epoch,
            "steps": state.step,
            "parameters": self.parameters,
        }
        if self.live_encoder:
            results["encoder"] = encoder_summary(core.item_text, self.backend.deepspeed, gather_object)
        if config.eval.enabled:
            best_weights = load_file(str(self.out / BEST))
            with self.backend.full_parameters(core, modify=True):  # under ZeRO-3 rank 0's copy is scattered
                misfit = load_weights(core, best_weights)
            if misfit:
                raise RuntimeError(f"{self.out / BEST} does not fit the model: {misfit}")
            results["dev"], results["test"] = self.evaluate("dev"), self.evaluate("test")
        results["seconds"] = time.perf_counter() - self.started
        if config.lrd.enabled and "planted_relation" in self.run.manifest.extra_fields:
            with self.backend.full_parameters(core, skip=self.forward_only):
                loader = make_loader(self.run.stream("train", shuffle=False))
                results["relation_discovery"] = relation_agreement(core, loader)
        if self.live_encoder:  # the best weights' encoder: `lrd-dist embed --adapter <out>/encoder`
            save_encoder(core.item_text, self.backend.deepspeed, self.out / ENCODER_DIR, self.main)
        if self.main:
            (self.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png", config.eval.metric)
        self.end_training()
        return results

    def end_training(self) -> None:
        """Every rank reaches this point before any tears the process group down, so none closes
        its gloo pairs while a peer may still use them (the suspected cause of one rank aborting
        at exit with "terminate called without an active exception", once in a SLURM requeue test,
        which turned the requeue into a failed job)."""
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def official_stop(history: list[float], patience: int = 5, horizon: int = 20) -> bool:
    """LRD/ReChorus ``eval_termination``: more than ``horizon`` evaluations and the last
    ``patience`` non-increasing, or the (first) best more than ``horizon`` evaluations old."""
    if not history:
        return False
    recent = history[-patience:]
    if len(history) > horizon and all(a >= b for a, b in itertools.pairwise(recent)):
        return True
    return len(history) - history.index(max(history)) > horizon


def _warn_on_collapse(entry: dict) -> bool:
    usage = entry.get("lrd_usage")
    collapsed = bool(usage) and max(usage) > COLLAPSE_SHARE
    if collapsed:
        log.warning(
            "relation collapse: slot %d takes %.1f%% of the pairs (entropy %.3f)",
            int(np.argmax(usage)),
            100 * max(usage),
            entry["lrd_entropy"],
        )
    return collapsed


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
