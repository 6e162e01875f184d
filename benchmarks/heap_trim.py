"""What the C library's heap costs a tuned encoder: speed and memory of a MiniLM top-1 LoRA run on
Office under each way of handing freed memory back to the system.

    python benchmarks/heap_trim.py --data data/office

A tuned encoder's steps allocate buffers of a new size each step (the gather of cached trunk states
is set by the step's longest item), so glibc's heap grows unless told otherwise. Each setting is a
fresh ``lrd-dist train`` process of ``configs/office/kda_lrd_softmax8.yaml`` with ``llm.mode=lora
llm.tune_layers=1`` in its fast setting (bf16 autocast, no encoder dropout), on the same batches for
``--steps`` steps at ``--threads`` threads, the dev evaluation off; nothing else should run. It
reports the median samples/s of the log windows (one step each) after the first, the last tenth's
median (the heap's growth slows later steps) and the peak RSS (the JSON has RSS by second). Settings:
``$LRD_MALLOC_TRIM_STEPS`` (the trainer's ``malloc_trim`` every N optimizer steps; 0 never; 10 is
the default) and glibc's ``MALLOC_MMAP_THRESHOLD_`` (every block of 1 MiB or more its own mapping,
returned when freed; what lrd_dist did before the trim). The frozen table, with and without the
default trim, shows what the default costs where nothing fragments. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from tuned_encoder import FAST, provenance, run  # noqa: E402

TOP1 = ["llm.mode=lora", "llm.tune_layers=1", *FAST]
MMAP = {"MALLOC_MMAP_THRESHOLD_": "1048576"}
# name -> (overrides, environment of the training process); the frozen table shows the default's
# cost where nothing fragments
SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "no trim (glibc default)": (TOP1, {"LRD_MALLOC_TRIM_STEPS": "0"}),
    "trim every 10 steps (default)": (TOP1, {"LRD_MALLOC_TRIM_STEPS": "10"}),
    "trim every step": (TOP1, {"LRD_MALLOC_TRIM_STEPS": "1"}),
    "1 MiB mmap threshold, no trim": (TOP1, {"LRD_MALLOC_TRIM_STEPS": "0", **MMAP}),
    "frozen table, no trim": ([], {"LRD_MALLOC_TRIM_STEPS": "0"}),
    "frozen table, trim every 10 steps": ([], {"LRD_MALLOC_TRIM_STEPS": "10"}),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Office prepared, with its MiniLM table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150, help="training steps per setting (an epoch: 151)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "heap_trim.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="heap-trim-") as scratch:
        cache = Path(scratch) / "trunks"
        for index, (name, (overrides, env)) in enumerate(SETTINGS.items()):
            out = Path(scratch) / f"run{index}"
            result = run(args.data, out, cache, overrides, args.steps, args.threads, env)
            rates = result["samples_per_s_windows"]
            result["env"] = env
            result["samples_per_s_last_tenth"] = statistics.median(rates[-max(1, len(rates) // 10) :])
            results[name] = result
            print(f"{name}: {result['samples_per_s']:.0f} samples/s", flush=True)
    report = {**provenance(args.threads), "steps": args.steps, "settings": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    bases = {"frozen": results["frozen table, no trim"], "top1": results["no trim (glibc default)"]}
    print("\n| heap setting | samples/s | vs no trim | last tenth | peak RSS GiB |\n|---|---|---|---|---|")
    for name, r in results.items():
        base = bases["frozen" if name.startswith("frozen") else "top1"]["samples_per_s"]
        print(
            f"| {name} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f}x"
            f" | {r['samples_per_s_last_tenth']:.0f} | {r['peak_rss_gib']:.2f} |"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
