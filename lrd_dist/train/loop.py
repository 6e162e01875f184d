"""The training loop, top to bottom: accelerator, data, model and optimiser, resume, then epochs of
steps with checkpoints, dev evaluation and early stopping; the best weights are scored on test.

The same function runs in one process, under DDP and under DeepSpeed ZeRO 1-3: ``accelerate launch``
decides which (see ``launchers/``). Writes into ``train.out_dir``: ``config.yaml``, ``metrics.jsonl``
(one JSON line per log step and per evaluation), ``best.safetensors``, ``checkpoints/``,
``results.json``, ``curves.png``, TensorBoard events under ``tensorboard/`` and, with a live LLM
item encoder (``llm.mode: lora | full``), the tuned encoder under ``encoder/``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from lrd_dist.config import RunConfig, to_yaml
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG, MANIFEST, Manifest, sha256_of
from lrd_dist.data.graph import KnowledgeGraph, PredecessorTable
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.encoders.item_text import LiveTextEncoder, build_item_text
from lrd_dist.errors import InputError
from lrd_dist.evaluation.evaluate import evaluate
from lrd_dist.evaluation.relations import relation_agreement
from lrd_dist.models import build_model, frozen_parameter_names, load_weights, weights_to_save
from lrd_dist.train.checkpoint import (
    BEST,
    ENCODER_DIR,
    TrainerState,
    find_resume_point,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    skip_frozen_weights,
)
from lrd_dist.train.encoder_state import encoder_summary, save_encoder
from lrd_dist.train.gather import full_parameters
from lrd_dist.train.plots import plot_curves
from lrd_dist.train.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from lrd_dist.train.sampling import TrainingSampler

log = logging.getLogger(__name__)
COLLAPSE_SHARE = 0.95  # warn when one relation takes this share of the (history, target) pairs
FAULT_STEP_ENV = "LRD_DIST_FAULT_KILL_AT_STEP"  # test hook: "STEP:RANK" SIGKILLs that rank after STEP


def make_accelerator(config: RunConfig) -> Accelerator:
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if config.train.tracker in available and not available[config.train.tracker]():
        # accelerate would drop the tracker with a warning and the run would log nowhere
        raise InputError(
            "config",
            f"train.tracker={config.train.tracker} is not installed",
            "pip install it or set train.tracker=none",
        )
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not cuda else []
    # Our buffers are constants (text table, token ids, value entities): no per-step broadcast.
    handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
    return Accelerator(
        # On CPU, accelerate only sees the gloo process group when told it is CPU work (DDP) or
        # given the backend (DeepSpeed); otherwise each process silently trains alone.
        cpu=not cuda and not deepspeed,
        kwargs_handlers=handlers,
        mixed_precision=config.train.mixed_precision,
        log_with=None if config.train.tracker == "none" else config.train.tracker,
        project_config=ProjectConfiguration(
            project_dir=config.train.out_dir, logging_dir=str(Path(config.train.out_dir) / "tensorboard")
        ),
    )


def train(config: RunConfig) -> dict:
    started = time.perf_counter()
    accelerator = make_accelerator(config)
    if accelerator.device.type == "cpu":
        # A trained model's weights and activations reach denormal floats, which the CPU computes
        # with microcode assists: a KDA+LRD step measured 5.5x slower after a few epochs. Flushing
        # them to zero changes no result that a float32 rounding would not.
        torch.set_flush_denormal(True)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    set_seed(config.train.seed)
    out = Path(config.train.out_dir)
    main_process = accelerator.is_main_process  # the only writer of files under out/ (checkpoints aside)
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(config))
    preemption = PreemptionFlag()

    # ---- data -------------------------------------------------------------------------------------
    data = Path(config.data.dir)
    manifest = Manifest.load(data)
    data_checksum = sha256_of(data / MANIFEST)
    catalog = Catalog.read(data / CATALOG)
    relational = config.model.name != "sasrec"
    graph = KnowledgeGraph(catalog, latent=config.model.latent_relations if relational else 0)
    item_text = build_item_text(config, catalog)
    live_encoder = isinstance(item_text, LiveTextEncoder)

    def stream(split: str, shuffle: bool) -> SequenceStream:
        loader = LoaderConfig(
            batch_size=config.data.batch_size if shuffle else config.data.eval_batch_size,
            max_history=config.data.max_history,
            shuffle=shuffle,
            shuffle_buffer=config.data.shuffle_buffer,
            seed=config.train.seed,
            num_workers=config.data.num_workers,
            on_corrupt=config.data.on_corrupt,
        )
        return SequenceStream(data, split, loader, accelerator.process_index, accelerator.num_processes)

    train_stream, dev_stream, test_stream = stream("train", True), stream("dev", False), stream("test", False)
    batches_per_epoch = len(train_stream)
    steps_per_epoch = math.ceil(batches_per_epoch / config.train.grad_accum)
    total_steps = config.train.max_steps or config.train.epochs * steps_per_epoch

    # ---- model, optimiser, schedule ---------------------------------------------------------------
    model = build_model(config, manifest.num_users, graph, item_text)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {
            "params": [p for n, p in trainable if not n.startswith("item_text.") and "bias" not in n],
            "weight_decay": config.train.weight_decay,
        },
        {"params": [p for n, p in trainable if not n.startswith("item_text.") and "bias" in n]},
        {
            "params": [p for n, p in trainable if n.startswith("item_text.")],
            "lr": config.llm.lr or config.train.lr,
        },
    ]
    optimizer = torch.optim.Adam(
        [{"weight_decay": 0.0, **g} for g in groups if g["params"]], lr=config.train.lr
    )
    # Stepped by hand at optimizer-step boundaries and saved as JSON in the trainer state.
    scheduler = get_scheduler(
        config.train.schedule if config.train.schedule != "constant" else "constant_with_warmup",
        optimizer,
        num_warmup_steps=config.train.warmup_steps,
        num_training_steps=total_steps,
    )
    if deepspeed:
        _fill_deepspeed_auto(accelerator, config)
    frozen = frozen_parameter_names(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    skip_frozen_weights(accelerator, frozen)
    zero3 = deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3
    if live_encoder and zero3:
        core.item_text.lockstep = True
    if config.eval.compile:
        if zero3:  # parameters are re-gathered on every call there, which compiled graphs do not follow
            log.warning("eval.compile is ignored under ZeRO-3; scoring runs eagerly")
        else:
            core.compile_scoring()
    gamma = graph.num_triples / manifest.num_interactions if config.kg.gamma < 0 else config.kg.gamma
    use_kg = relational and gamma > 0 and graph.num_triples > 0
    predecessors = None
    if config.lrd.enabled and config.lrd.hard_negatives > 0:
        predecessors = PredecessorTable(make_loader(stream("train", False)), manifest.num_items)
    known = None  # every item of each user: full-ranking masks and the official negatives
    if config.eval.full_ranking or config.train.negatives == "official":
        known = UserItems.from_dataset(data)
    official_negatives = known if config.train.negatives == "official" else None
    sampler = TrainingSampler(
        config, graph, predecessors, use_kg, accelerator.process_index, official_negatives
    )
    with full_parameters(core, deepspeed, trainable_only=True):
        parameters = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log.info(
        "rank %d of %d (%s), model %s: %d trainable parameters, %d relation slots, gamma %.4f",
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.distributed_type,
        config.model.name,
        parameters,
        graph.slots.total if relational else 0,
        gamma,
    )

    # ---- resume -----------------------------------------------------------------------------------
    state = TrainerState()
    resume_from = find_resume_point(config)
    if resume_from is not None:
        state, rank_state = load_checkpoint(accelerator, resume_from, config, data_checksum)
        scheduler.load_state_dict(state.scheduler)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            sampler.load_state_dict(rank_state["sampler"])
        elif state.batches:  # another world size: continue at the same fraction of the epoch
            state.batches = state.batches * batches_per_epoch // rank_state_batches(resume_from)
            state.batches -= state.batches % config.train.grad_accum

    def checkpoint() -> None:
        state.scheduler = scheduler.state_dict()
        rank_state = {
            "rng": rng_state(),
            "sampler": sampler.state_dict(),
            "data": {"epoch": state.epoch, "batches": state.batches, "batches_per_epoch": batches_per_epoch},
        }
        save_checkpoint(
            accelerator,
            config,
            state,
            rank_state,
            data_checksum,
            config.checkpoint.keep,
            # the adapter (or tuned encoder) in PEFT/transformers' own format, beside the shards
            save_extra=(lambda d: save_encoder(core.item_text, deepspeed, d / ENCODER_DIR, main_process))
            if live_encoder
            else None,
        )

    forward_only = core.item_text if live_encoder else None  # see full_parameters

    def evaluate_split(split_stream: SequenceStream) -> dict[str, float]:
        with full_parameters(core, deepspeed, skip=forward_only):
            return evaluate(
                core,
                make_loader(split_stream),
                config.eval.ks,
                config.eval.ties,
                config.eval.full_ranking,
                manifest.num_items,
                gather=gather_object if accelerator.num_processes > 1 else None,
                known=known,
                split=split_stream.split,
            )

    # ---- logging ----------------------------------------------------------------------------------
    metrics_path = out / "metrics.jsonl"
    if main_process:
        _truncate_metrics(metrics_path, state.step if resume_from else 0)
    metrics_file = open(metrics_path, "a") if main_process else None  # noqa: SIM115 - closed below
    if config.train.tracker != "none":
        accelerator.init_trackers("lrd_dist", config=_flat_config(config))

    def record(entry: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()
        scalars = {
            k: v for k, v in entry.items() if isinstance(v, int | float) and k not in ("step", "epoch")
        }
        if config.train.tracker != "none":
            accelerator.log(scalars, step=entry["step"])

    # ---- epochs -----------------------------------------------------------------------------------
    fault = _fault_injection(accelerator.process_index)
    preempted = False
    done = state.step >= total_steps or (
        config.train.early_stop == "patience" and state.waited >= config.train.patience
    )
    while state.epoch < config.train.epochs and not done and not preempted:
        epoch = state.epoch
        train_stream.set_position(epoch, state.batches)
        window: dict[str, list] = {}
        warned_collapse = False  # once per epoch
        window_samples, window_started = 0, time.perf_counter()
        epoch_started = time.perf_counter()
        bar = tqdm(
            make_loader(train_stream),
            total=batches_per_epoch,
            initial=state.batches,
            desc=f"epoch {epoch}",
            disable=not main_process,
            leave=False,
        )
        model.train()
        for batch in bar:
            inputs = sampler.draw(batch)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            inputs = _to_device(inputs, accelerator.device)
            state.batches += 1
            # Accumulation windows end at the epoch end, so a checkpoint never holds half a window.
            boundary = state.batches % config.train.grad_accum == 0 or state.batches == batches_per_epoch
            with _sync_context(accelerator, model, boundary, deepspeed):
                with accelerator.autocast():
                    losses = model(batch, **inputs)  # through the wrapper, so gradients synchronise
                    total = (
                        losses["rec"]
                        + gamma * losses.get("kg", 0.0)
                        + config.lrd.weight * losses.get("lrd", 0.0)
                    )
                # DeepSpeed divides by its own accumulation steps; the plain path does it here.
                accelerator.backward(total if deepspeed else total / config.train.grad_accum)
            for name, value in losses.items():
                window.setdefault(name, []).append(value.detach().float().cpu())
            window.setdefault("loss", []).append(total.detach().float().cpu())
            window_samples += int(batch["valid"].sum())
            if not boundary:
                continue
            if config.train.max_grad_norm > 0 and not deepspeed:  # DeepSpeed clips from its config
                accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state.step += 1
            if state.step % config.train.log_every == 0:
                now = time.perf_counter()
                entry = {"step": state.step, "epoch": epoch, "lr": scheduler.get_last_lr()[0]}
                # training samples per second over all ranks (loader padding rows not counted)
                entry["samples_per_s"] = window_samples * accelerator.num_processes / (now - window_started)
                entry.update({k: torch.stack(v).mean(0).tolist() for k, v in window.items()})
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                if main_process and not warned_collapse:
                    warned_collapse = _warn_on_collapse(entry)
                window, window_samples, window_started = {}, 0, now
            if fault is not None and state.step == fault:
                os.kill(os.getpid(), signal.SIGKILL)
            preempted = preemption.any_rank(accelerator)
            done = state.step >= total_steps
            every = config.checkpoint.every_steps
            if preempted or (every and state.step % every == 0 and state.batches < batches_per_epoch):
                checkpoint()
            if preempted or done:
                break
        bar.close()
        if preempted:
            break

        # ---- end of epoch (or of max_steps): dev evaluation, early stopping, checkpoint ----------
        dev = evaluate_split(dev_stream) if config.eval.enabled else {}
        record(
            {
                "epoch": epoch,
                "step": state.step,
                "epoch_seconds": time.perf_counter() - epoch_started,
                **{f"dev/{k}": v for k, v in dev.items()},
            }
        )
        stop = False
        if dev:
            value = dev[config.eval.metric]
            log.info("epoch %d: dev %s %.4f", epoch, config.eval.metric, value)
            official = config.train.early_stop == "official"
            state.dev_history.append(value)
            if value > state.best or (official and value == state.best):  # official: a tie overwrites
                state.best, state.best_epoch, state.waited = value, epoch, 0
                weights = weights_to_save(_full_state_dict(core, deepspeed), core)
                if main_process:
                    save_file(weights, str(out / BEST))
            else:
                state.waited += 1
            stop = official_stop(state.dev_history) if official else state.waited >= config.train.patience
        if stop:
            log.info(
                "early stop after epoch %d (best epoch %d, %s)",
                epoch,
                state.best_epoch,
                config.train.early_stop,
            )
        state.epoch, state.batches = epoch + 1, 0
        checkpoint()
        done = done or stop

    if metrics_file is not None:
        metrics_file.close()
    if preempted:
        log.warning("stopped for a signal at step %d; resume with checkpoint.resume=auto", state.step)
        if main_process:
            PreemptionFlag.announce()
        accelerator.end_training()
        sys.exit(REQUEUE_EXIT_CODE)

    # ---- best weights on test ---------------------------------------------------------------------
    accelerator.wait_for_everyone()  # the best weights are written
    results = {
        "model": config.model.name,
        "lrd": config.lrd.enabled,
        "seed": config.train.seed,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "steps": state.step,
        "parameters": parameters,
    }
    if live_encoder:
        results["encoder"] = encoder_summary(core.item_text, deepspeed, gather_object)
    if config.eval.enabled:
        best_weights = load_file(str(out / BEST))
        with full_parameters(core, deepspeed, modify=True):  # under ZeRO-3, rank 0's copy is scattered
            misfit = load_weights(core, best_weights)
        if misfit:
            raise RuntimeError(f"{out / BEST} does not fit the model: {misfit}")
        results["dev"], results["test"] = evaluate_split(dev_stream), evaluate_split(test_stream)
    results["seconds"] = time.perf_counter() - started
    if config.lrd.enabled and "planted_relation" in manifest.extra_fields:
        with full_parameters(core, deepspeed, skip=forward_only):
            results["relation_discovery"] = relation_agreement(core, make_loader(stream("train", False)))
    if live_encoder:  # the best weights' encoder: `lrd-dist embed --adapter <out>/encoder`
        save_encoder(core.item_text, deepspeed, out / ENCODER_DIR, main_process)
    if main_process:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_curves(metrics_path, out / "curves.png", config.eval.metric)
    accelerator.end_training()
    return results


def official_stop(history: list[float], patience: int = 5, horizon: int = 20) -> bool:
    """LRD/ReChorus ``eval_termination``: more than ``horizon`` evaluations and the last
    ``patience`` non-increasing, or the (first) best more than ``horizon`` evaluations old."""
    recent = history[-patience:]
    if len(history) > horizon and all(a >= b for a, b in itertools.pairwise(recent)):
        return True
    return len(history) - history.index(max(history)) > horizon


def _full_state_dict(core: torch.nn.Module, deepspeed: bool) -> dict[str, torch.Tensor]:
    with full_parameters(core, deepspeed):
        return {k: v.detach().cpu().clone().contiguous() for k, v in core.state_dict().items()}


def _sync_context(accelerator: Accelerator, model, boundary: bool, deepspeed: bool):
    if deepspeed:
        # The engine steps its optimizer only at a boundary; say where the boundary is.
        model.set_gradient_accumulation_boundary(boundary)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if boundary else accelerator.no_sync(model)


def _fill_deepspeed_auto(accelerator: Accelerator, config: RunConfig) -> None:
    """ds_configs/ leave batch size, accumulation and clipping "auto": they come from the run config,
    so they live in one place. (Precision is filled by accelerate from train.mixed_precision.)"""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": config.train.grad_accum,
        "gradient_clipping": config.train.max_grad_norm,
        "train_batch_size": config.data.batch_size * config.train.grad_accum * accelerator.num_processes,
    }
    for key, value in values.items():
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds_config:
            raise ValueError(f"the DeepSpeed config sets '{key}'; the trainer builds it from train.*")


def rank_state_batches(checkpoint_dir: Path) -> int:
    """Batches per epoch per rank in the run that wrote the checkpoint."""
    saved = json.loads((checkpoint_dir / "rank-00000.json").read_text())
    return saved["data"]["batches_per_epoch"]


def _truncate_metrics(path: Path, keep_through_step: int) -> None:
    """A resumed run rewrites what came after its checkpoint, so the log reads as one run."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= keep_through_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def _flat_config(config: RunConfig) -> dict:
    flat = {}
    for section, values in asdict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


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


def _fault_injection(rank: int) -> int | None:
    spec = os.environ.get(FAULT_STEP_ENV)
    if not spec:
        return None
    step, target_rank = (int(x) for x in spec.split(":"))
    return step if rank == target_rank else None


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
