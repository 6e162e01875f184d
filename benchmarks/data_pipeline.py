"""Data-layer benchmark: prepare time, peak RSS, and loader throughput.

Each measurement runs in a fresh subprocess so its peak RSS is its own. Writes JSON and prints a
table. Not a test: the targets (prepare >= 200k samples/s, < 4 GiB peak RSS for 10M interactions,
streaming RSS flat in data size and < 1 GiB) are compared here, side by side in one run.

    python benchmarks/data_pipeline.py --interactions 10000000 --out benchmarks/results/data_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFFICE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "office"


def _peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def step_office(out: Path) -> dict:
    from lrd_dist.data.prepare import write_dataset
    from lrd_dist.data.sources.rechorus import load_rechorus

    started = time.perf_counter()
    catalog, interactions, _ = load_rechorus(OFFICE)
    manifest = write_dataset(
        out, source="rechorus", catalog=catalog, interactions=interactions, max_history=20
    )
    seconds = time.perf_counter() - started
    samples = sum(manifest.samples.values())
    return {
        "seconds": seconds,
        "samples": samples,
        "samples_per_s": samples / seconds,
        "peak_rss_mib": _peak_rss_mib(),
    }


def step_synth(out: Path, interactions: int) -> dict:
    from lrd_dist.data.format import PLANTED_PAIRS
    from lrd_dist.data.prepare import write_dataset
    from lrd_dist.data.synth import SynthConfig, generate

    users = max(1, int(interactions / 12.7))  # the generator's mean sequence length is ~12.7
    started = time.perf_counter()
    catalog, inter, planted = generate(SynthConfig(users=users, items=max(1000, interactions // 50), seed=0))
    generated = time.perf_counter()
    manifest = write_dataset(
        out,
        source="synth",
        catalog=catalog,
        interactions=inter,
        max_history=20,
        extra_tables={PLANTED_PAIRS: planted},
    )
    written = time.perf_counter()
    samples = sum(manifest.samples.values())
    return {
        "interactions": len(inter),
        "samples": samples,
        "generate_seconds": generated - started,
        "write_seconds": written - generated,
        "samples_per_s": samples / (written - generated),
        "peak_rss_mib": _peak_rss_mib(),
    }


def step_stream(data: Path, workers: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader

    stream = SequenceStream(
        data,
        "train",
        LoaderConfig(batch_size=256, num_workers=workers, max_history=20, verify_checksums=False),
    )
    started = time.perf_counter()
    samples = 0
    for batch in make_loader(stream):
        samples += int(batch["valid"].sum())
    seconds = time.perf_counter() - started
    return {
        "workers": workers,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "peak_rss_mib": _peak_rss_mib(),
        "worker_peak_rss_mib": _peak_rss_mib(resource.RUSAGE_CHILDREN),
    }


def _run(*args: str) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, __file__, "--step", *args], capture_output=True, text=True, env=env
    )
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--small-interactions", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_pipeline.json"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        name, *rest = args.step
        result = {
            "office": lambda: step_office(Path(rest[0])),
            "synth": lambda: step_synth(Path(rest[0]), int(rest[1])),
            "stream": lambda: step_stream(Path(rest[0]), int(rest[1])),
        }[name]()
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lrd-bench-"))
    results: dict = {}
    if OFFICE.is_dir():
        results["office_prepare"] = _run("office", str(workdir / "office"))
    for label, size in (("small", args.small_interactions), ("large", args.interactions)):
        results[f"synth_prepare_{label}"] = _run("synth", str(workdir / label), str(size))
    for workers in (0, 1, 2):
        results[f"stream_large_w{workers}"] = _run("stream", str(workdir / "large"), str(workers))
    results["stream_small_w0"] = _run("stream", str(workdir / "small"), "0")
    results["stream_rss_growth_large_over_small"] = (
        results["stream_large_w0"]["peak_rss_mib"] / results["stream_small_w0"]["peak_rss_mib"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"{'measurement':<26}{'samples':>12}{'seconds':>10}{'samples/s':>12}{'peak RSS MiB':>14}")
    for name, value in results.items():
        if isinstance(value, dict):
            seconds = value.get("seconds", value.get("write_seconds", 0.0))
            print(
                f"{name:<26}{value['samples']:>12,}{seconds:>10.2f}{value['samples_per_s']:>12,.0f}"
                f"{value['peak_rss_mib']:>14,.0f}"
            )
    print(
        f"stream RSS, {args.interactions:,} over {args.small_interactions:,} interactions: "
        f"{results['stream_rss_growth_large_over_small']:.2f}x"
    )


if __name__ == "__main__":
    main()
