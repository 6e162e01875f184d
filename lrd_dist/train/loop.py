"""The training loop: data, model, optimiser, then epochs of steps with dev evaluation and early
stopping; the best weights are kept and scored on test. Writes into ``train.out_dir``:
``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON line per log step and per
evaluation), ``best.safetensors`` and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lrd_dist.config import RunConfig, to_yaml
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG, Manifest
from lrd_dist.data.graph import KnowledgeGraph, PredecessorTable
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.encoders.embed_catalog import TABLE_NAME
from lrd_dist.encoders.text import load_table
from lrd_dist.evaluation.evaluate import evaluate
from lrd_dist.evaluation.relations import relation_agreement
from lrd_dist.models import build_model
from lrd_dist.train.sampling import TrainingSampler

log = logging.getLogger(__name__)
COLLAPSE_SHARE = 0.95  # warn when one relation takes this share of the (history, target) pairs


def train(config: RunConfig) -> dict:
    started = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(config.train.seed)
    out = Path(config.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_process = accelerator.is_main_process  # the only writer of files under out/
    if main_process:
        (out / "config.yaml").write_text(to_yaml(config))

    # ---- data -------------------------------------------------------------------------------------
    data = Path(config.data.dir)
    manifest = Manifest.load(data)
    catalog = Catalog.read(data / CATALOG)
    relational = config.model.name != "sasrec"
    graph = KnowledgeGraph(catalog, latent=config.model.latent_relations if relational else 0)
    item_text = None
    if config.lrd.enabled:
        item_text, _ = load_table(config.lrd.embeddings or data / TABLE_NAME, catalog.texts.to_pylist())
        if config.lrd.standardize_text:
            # Sentence vectors share a large common direction; what tells relations apart is in
            # the rest. Without this the encoder sees almost the same input for every pair.
            real = item_text[1:]
            item_text[1:] = (real - real.mean(0)) / real.std(0).clamp(min=1e-6)

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

    # ---- model and optimiser ----------------------------------------------------------------------
    model = build_model(config, manifest.num_users, graph, item_text)
    decayed = [p for n, p in model.named_parameters() if "bias" not in n]
    undecayed = [p for n, p in model.named_parameters() if "bias" in n]
    optimizer = torch.optim.Adam(
        [
            {"params": decayed, "weight_decay": config.train.weight_decay},
            {"params": undecayed, "weight_decay": 0.0},
        ],
        lr=config.train.lr,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    gamma = graph.num_triples / manifest.num_interactions if config.kg.gamma < 0 else config.kg.gamma
    use_kg = relational and gamma > 0 and graph.num_triples > 0
    predecessors = None
    if config.lrd.enabled and config.lrd.hard_negatives > 0:
        predecessors = PredecessorTable(make_loader(stream("train", False)), manifest.num_items)
    sampler = TrainingSampler(config, graph, predecessors, use_kg, accelerator.process_index)
    parameters = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log.info(
        "rank %d of %d, model %s: %d trainable parameters, %d relation slots, gamma %.4f",
        accelerator.process_index,
        accelerator.num_processes,
        config.model.name,
        parameters,
        graph.slots.total if relational else 0,
        gamma,
    )

    def evaluate_split(split_stream: SequenceStream) -> dict[str, float]:
        return evaluate(
            core,
            make_loader(split_stream),
            config.eval.ks,
            config.eval.ties,
            config.eval.full_ranking,
            manifest.num_items,
            gather=gather_object if accelerator.num_processes > 1 else None,
        )

    # ---- epochs -----------------------------------------------------------------------------------
    metrics_file = open(out / "metrics.jsonl", "w") if main_process else None  # noqa: SIM115 - closed below

    def record(entry: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    best, best_epoch, waited, step = -math.inf, -1, 0, 0
    for epoch in range(config.train.epochs):
        train_stream.set_position(epoch)
        window: dict[str, list] = {}
        epoch_started = time.perf_counter()
        bar = tqdm(
            make_loader(train_stream),
            total=len(train_stream),
            desc=f"epoch {epoch}",
            disable=not accelerator.is_main_process,
            leave=False,
        )
        for batch in bar:
            inputs = sampler.draw(batch)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            inputs = _to_device(inputs, accelerator.device)
            with accelerator.autocast():
                losses = model(batch, **inputs)  # through the wrapper, so DDP synchronises gradients
                total = (
                    losses["rec"] + gamma * losses.get("kg", 0.0) + config.lrd.weight * losses.get("lrd", 0.0)
                )
            optimizer.zero_grad()
            accelerator.backward(total)
            optimizer.step()
            step += 1
            for name, value in losses.items():
                window.setdefault(name, []).append(value.detach().float().cpu())
            window.setdefault("loss", []).append(total.detach().float().cpu())
            if step % config.train.log_every == 0:
                entry = {"step": step, "epoch": epoch}
                entry.update({k: torch.stack(v).mean(0).tolist() for k, v in window.items()})
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                usage = entry.get("lrd_usage")
                if usage and max(usage) > COLLAPSE_SHARE:
                    log.warning(
                        "relation collapse: slot %d takes %.1f%% of the pairs (entropy %.3f)",
                        int(np.argmax(usage)),
                        100 * max(usage),
                        entry["lrd_entropy"],
                    )
                window = {}
        dev = evaluate_split(dev_stream)
        record(
            {
                "epoch": epoch,
                "step": step,
                "epoch_seconds": time.perf_counter() - epoch_started,
                **{f"dev/{k}": v for k, v in dev.items()},
            }
        )
        log.info(
            "epoch %d: dev %s %.4f (%.1f s)",
            epoch,
            config.eval.metric,
            dev[config.eval.metric],
            time.perf_counter() - epoch_started,
        )
        if dev[config.eval.metric] > best:
            best, best_epoch, waited = dev[config.eval.metric], epoch, 0
            if main_process:
                save_file(core.state_dict(), str(out / "best.safetensors"))
        else:
            waited += 1
            if waited >= config.train.patience:
                log.info("early stop: no dev improvement for %d evaluations", waited)
                break
    if metrics_file is not None:
        metrics_file.close()

    # ---- best weights on test ---------------------------------------------------------------------
    accelerator.wait_for_everyone()  # the best weights are written
    core.load_state_dict(load_file(str(out / "best.safetensors")))
    results = {
        "model": config.model.name,
        "lrd": config.lrd.enabled,
        "seed": config.train.seed,
        "best_epoch": best_epoch,
        "epochs_run": epoch + 1,
        "steps": step,
        "parameters": parameters,
        "dev": evaluate_split(dev_stream),
        "test": evaluate_split(test_stream),
        "seconds": time.perf_counter() - started,
    }
    if config.lrd.enabled and "planted_relation" in manifest.extra_fields:
        results["relation_discovery"] = relation_agreement(core, make_loader(stream("train", False)))
    if main_process:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value
