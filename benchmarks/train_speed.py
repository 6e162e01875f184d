"""Training and evaluation speed of a model on a prepared dataset (default: KDA+LRD on Office).

Measures one training epoch (samples/s), one full dev evaluation, and peak RSS, in this process,
and compares with the official implementation's figures measured on the same 2-core machine
(../shared/LRD_METHOD.md). Writes JSON and prints a table.

It also prints a compute bound: the FLOPs of the relation interaction (the per-candidate attention
across relation slots, which dominates) divided by the GEMM throughput of this machine measured in
the same run on the same matrix shape. No exact implementation of the model can be faster than
that bound, so it says which speedup targets this hardware allows at all.

    python benchmarks/train_speed.py --data data/office --config configs/office/kda_lrd.yaml
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from lrd_dist.config import load_config

# Official implementation on this machine (LRD_METHOD.md): epoch, dev evaluation, peak RSS.
OFFICIAL = {
    "kda_lrd": (43.3, 165.0, 10.0),
    "kda": (16.8, 38.4, 7.2),
    "rcf_lrd": (29.5, 41.0, 2.3),
    "rcf": (13.7, 18.9, 1.3),
}


def interaction_flops(rows: int, slots: int, size: int, layers: int) -> float:
    """Forward FLOPs of the relation interaction over ``rows`` candidate rows: per layer and slot
    token five V x V projections (q, k, v, hidden, output), and per head the R x R attention."""
    projections = 2 * 5 * size * size * rows * slots
    attention = 2 * 2 * slots * slots * size * rows
    return float(layers * (projections + attention))


def gemm_flops_per_s(tokens: int, size: int, repeats: int = 5) -> float:
    """Best throughput of this machine on the interaction's largest GEMM, [tokens, V] x [V, 3V]."""
    x, w = torch.randn(tokens, size), torch.randn(3 * size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - started)
    return 2 * tokens * size * 3 * size / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/office/kda_lrd.yaml"))
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/train_speed_MODEL.json")
    parser.add_argument(
        "--compare-steps", type=int, default=20, help="training steps timed with and without the fused kernel"
    )
    args = parser.parse_args()
    from lrd_dist.assembly import build_dataset_and_model
    from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
    from lrd_dist.evaluation.evaluate import evaluate
    from lrd_dist.models import slot_attention
    from lrd_dist.models.relational import RelationalRecommender
    from lrd_dist.runtime import CompiledScoring, flush_denormals, scoring_context, select_attention
    from lrd_dist.train.sampling import draw_uniform_negatives

    config = load_config(args.config, [f"data.dir={args.data}"])
    flush_denormals()  # as the trainer does on a CPU
    run = build_dataset_and_model(config, select_attention(config.model.fused_attention))
    model, manifest, graph = run.model, run.manifest, run.graph
    scorer = CompiledScoring(model) if config.eval.compile else None  # as the trainer does
    optimizer = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    gamma = run.kg_weight
    import numpy as np

    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    train = SequenceStream(
        args.data,
        "train",
        LoaderConfig(batch_size=config.data.batch_size, max_history=config.data.max_history),
    )

    def draw(batch: dict) -> tuple:
        negatives = draw_uniform_negatives(batch, (len(batch["user"]),), manifest.num_items, generator)
        lrd_negatives = (
            draw_uniform_negatives(batch, tuple(batch["history_items"].shape), manifest.num_items, generator)
            if config.lrd.enabled
            else None
        )
        return negatives, lrd_negatives, graph.sample(len(batch["user"]), rng)

    def train_step(batch: dict, inputs: tuple) -> None:
        losses = model(batch, *inputs)
        total = losses["rec"] + gamma * losses.get("kg", 0.0) + config.lrd.weight * losses.get("lrd", 0.0)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()

    started = time.perf_counter()
    samples = steps = 0
    kept = []  # a few batches for the side-by-side comparison below
    for batch in make_loader(train):
        steps += 1
        inputs = draw(batch)
        train_step(batch, inputs)
        samples += int(batch["valid"].sum())
        if len(kept) < args.compare_steps:
            kept.append((batch, inputs))
    epoch_seconds = time.perf_counter() - started
    dev = SequenceStream(
        args.data,
        "dev",
        LoaderConfig(
            batch_size=config.data.eval_batch_size, shuffle=False, max_history=config.data.max_history
        ),
    )
    # Three times: the first evaluation of a run also pays for torch.compile (eval.compile); every
    # later one (each epoch's) runs at the speed of the others, of which the faster is reported.
    eval_times = []
    for _ in range(3):
        started = time.perf_counter()
        with scoring_context(scorer):
            metrics = evaluate(model, make_loader(dev), [10], "pessimistic")
        eval_times.append(time.perf_counter() - started)
    first_eval_seconds, eval_seconds = eval_times[0], min(eval_times[1:])

    # The fused attention kernel against torch ops, side by side: the same training steps in
    # alternating rounds (faster round of each), and a steady dev evaluation each.
    interaction = model.backbone.interaction if model.relational else None
    attention = {}
    kernels = {True: slot_attention.fused_slot_attention, False: slot_attention.torch_slot_attention}
    if interaction is not None and interaction.attention is kernels[True] and args.compare_steps:
        step_times = {True: float("inf"), False: float("inf")}
        for _ in range(3):
            for fused in (True, False):
                interaction.attention = kernels[fused]
                started = time.perf_counter()
                for batch, inputs in kept:
                    train_step(batch, inputs)
                step_times[fused] = min(step_times[fused], (time.perf_counter() - started) / len(kept))
        interaction.attention = kernels[False]
        torch_scorer = CompiledScoring(model) if config.eval.compile else None
        torch_eval = []
        for _ in range(2):  # the first pays for compiling the torch-ops graph
            started = time.perf_counter()
            with scoring_context(torch_scorer):
                evaluate(model, make_loader(dev), [10], "pessimistic")
            torch_eval.append(time.perf_counter() - started)
        interaction.attention = kernels[True]
        attention = {
            "train_step_seconds_fused": step_times[True],
            "train_step_seconds_torch": step_times[False],
            "train_step_speedup_fused": step_times[False] / step_times[True],
            "dev_eval_seconds_torch": torch_eval[-1],
            "dev_eval_speedup_fused": torch_eval[-1] / eval_seconds,
        }
    eval_batches = -(-int(metrics["examples"]) // config.data.eval_batch_size)

    # Compute bound: interaction FLOPs at the GEMM throughput measured now (training: forward +
    # backward = 3 x forward). Everything else the model does is left out, so it is a lower bound.
    slots, size, layers = graph.value_entity.shape[1], config.model.emb_size, config.model.num_layers
    candidates = 1 + manifest.num_negatives
    train_rows, eval_rows = config.data.batch_size * 2, config.data.eval_batch_size * candidates
    train_flops = 3 * steps * interaction_flops(train_rows, slots, size, layers)
    eval_flops = eval_batches * interaction_flops(eval_rows, slots, size, layers)
    train_gemm = gemm_flops_per_s(train_rows * slots, size)
    # evaluation scores candidates in blocks of about BLOCK_ROWS rows (RelationalRecommender.forward)
    eval_block = config.data.eval_batch_size * min(
        candidates, RelationalRecommender.candidates_per_block(config.data.eval_batch_size)
    )
    eval_gemm = gemm_flops_per_s(eval_block * slots, size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    name = f"{config.model.name}{'_lrd' if config.lrd.enabled else ''}"
    official = OFFICIAL.get(name)
    report = {
        "model": name,
        "threads": torch.get_num_threads(),
        "epoch_seconds": epoch_seconds,
        "train_samples_per_s": samples / epoch_seconds,
        "dev_eval_seconds": eval_seconds,
        "first_dev_eval_seconds": first_eval_seconds,
        "eval_compile": config.eval.compile,
        "dev_examples": metrics["examples"],
        "peak_rss_gib": rss,
        "relation_slots": slots,
        "epoch_interaction_gflop": train_flops / 1e9,
        "dev_eval_interaction_gflop": eval_flops / 1e9,
        "gemm_gflop_per_s_train_shape": train_gemm / 1e9,
        "gemm_gflop_per_s_eval_shape": eval_gemm / 1e9,
        "epoch_seconds_bound": train_flops / train_gemm,
        "dev_eval_seconds_bound": eval_flops / eval_gemm,
        **attention,
    }
    if official:
        report.update(
            official_epoch_seconds=official[0],
            official_dev_eval_seconds=official[1],
            official_peak_rss_gb=official[2],
            epoch_speedup=official[0] / epoch_seconds,
            eval_speedup=official[1] / eval_seconds,
            epoch_speedup_bound=official[0] / report["epoch_seconds_bound"],
            eval_speedup_bound=official[1] / report["dev_eval_seconds_bound"],
        )
    out = args.out or Path(f"benchmarks/results/train_speed_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':<16}{'ours':>8}{'official':>10}{'speedup':>9}{'bound':>8}{'max speedup':>13}")
    if official:
        for label, ours, theirs, bound in (
            ("epoch (s)", epoch_seconds, official[0], report["epoch_seconds_bound"]),
            ("dev eval (s)", eval_seconds, official[1], report["dev_eval_seconds_bound"]),
        ):
            speedups = f"{theirs / ours:>8.1f}x{bound:>8.1f}{theirs / bound:>12.1f}x"
            print(f"{label:<16}{ours:>8.1f}{theirs:>10.1f}{speedups}")
        print(f"{'peak RSS (GiB)':<16}{rss:>8.2f}{official[2]:>10.1f}")
    compiled = " (includes torch.compile)" if config.eval.compile else ""
    print(f"first dev eval of a run: {first_eval_seconds:.1f} s{compiled}")
    if attention:
        fused, plain = attention["train_step_seconds_fused"], attention["train_step_seconds_torch"]
        print(
            f"fused attention kernel vs torch ops: training step {fused:.3f} vs {plain:.3f} s"
            f" ({plain / fused:.2f}x), dev eval {eval_seconds:.1f} vs"
            f" {attention['dev_eval_seconds_torch']:.1f} s ({attention['dev_eval_speedup_fused']:.2f}x)"
        )
    print(
        f"train samples/s: {report['train_samples_per_s']:,.0f}; GEMM GFLOP/s measured: "
        f"{train_gemm / 1e9:.0f} (training shape), {eval_gemm / 1e9:.0f} (evaluation shape)"
    )


if __name__ == "__main__":
    main()
