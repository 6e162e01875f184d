"""Steps of a model that has trained, with and without denormal floats flushed to zero.

    python benchmarks/denormals.py --data data/office --config configs/office/kda_lrd.yaml --epochs 4

A fresh model's first steps are not what a long run pays: after a few epochs of KDA+LRD some weights
and activations are denormal floats, which a CPU computes with microcode assists. This trains
``--epochs`` epochs with denormals kept (as torch does by default), then times the same
``--steps`` training steps of the trained model and of a fresh one, with flushing off and on, in
alternating rounds (each round restores the weights and optimizer state first, so every round does
the same arithmetic); the fastest round of each is reported. The trainer flushes denormals on the
CPU (``lrd_dist/runtime.py``); this shows why.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch


def denormal_count(model: torch.nn.Module) -> int:
    tiny = torch.finfo(torch.float32).tiny
    return sum(int(((p != 0) & (p.abs() < tiny)).sum()) for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/office/kda_lrd.yaml"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs trained before timing")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", type=Path, help="also time a converged model (a run's best.safetensors)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/denormals.json"))
    args = parser.parse_args()

    from lrd_dist.config import load_config
    from lrd_dist.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as scratch:
        overrides = [
            f"data.dir={args.data}",
            f"train.out_dir={scratch}",
            "eval.enabled=false",
            "train.tracker=none",
        ]
        trainer = Trainer(load_config(args.config, [*overrides, f"train.epochs={args.epochs}"]))
        trainer.setup()
        fresh = (copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizers[0].state_dict()))
        torch.set_flush_denormal(False)  # train the way torch does by default
        started = time.perf_counter()
        while not trainer.finished:
            trainer.train_epoch()
            trainer.state.epoch, trainer.state.batches = trainer.state.epoch + 1, 0
        training_seconds = time.perf_counter() - started
        trained = (
            copy.deepcopy(trainer.model.state_dict()),
            copy.deepcopy(trainer.optimizers[0].state_dict()),
        )
        denormal_weights = denormal_count(trainer.model)
        states = {"fresh": fresh, "trained": trained}
        if args.weights:
            from safetensors.torch import load_file

            converged = {**trainer.model.state_dict(), **load_file(str(args.weights))}
            states["converged"] = (converged, fresh[1])
        batches = []
        for batch in trainer.run.loader("train"):
            batches.append(batch)
            if len(batches) == args.steps:
                break

        def timed(state, flush: bool) -> float:
            trainer.model.load_state_dict(state[0])
            trainer.optimizers[0].load_state_dict(state[1])
            torch.set_flush_denormal(flush)
            trainer.sampler.load_state_dict(sampler_state)
            started = time.perf_counter()
            for batch in batches:
                trainer.train_step(batch)
                trainer.optimizers[0].step()
                trainer.optimizers[0].zero_grad()
            return (time.perf_counter() - started) / len(batches)

        sampler_state = trainer.sampler.state_dict()
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, state in states.items():
                for flush in (False, True):
                    key = f"{name}_{'flushed' if flush else 'denormals'}"
                    best[key] = min(best.get(key, float("inf")), timed(state, flush))
        torch.set_flush_denormal(True)
    report = {
        "config": str(args.config),
        "epochs_trained": args.epochs,
        "training_seconds": training_seconds,
        "threads": torch.get_num_threads(),
        "denormal_weights_after_training": denormal_weights,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        **{f"step_ms_{k}": 1000 * v for k, v in best.items()},
        **{
            f"{name}_slowdown_with_denormals": best[f"{name}_denormals"] / best[f"{name}_flushed"]
            for name in states
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"after {args.epochs} epochs: {denormal_weights} denormal weights of {report['parameters']:,}")
    print(f"{'step ms':<10}{'denormals':>11}{'flushed':>10}{'ratio':>8}")
    for name in states:
        kept, flushed = best[f"{name}_denormals"], best[f"{name}_flushed"]
        print(f"{name:<10}{1000 * kept:>11.0f}{1000 * flushed:>10.0f}{kept / flushed:>7.2f}x")


if __name__ == "__main__":
    main()
