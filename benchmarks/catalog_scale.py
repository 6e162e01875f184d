"""Scale: training cost against the catalog and the data, dense and row-wise id-table updates.

    python benchmarks/catalog_scale.py --work /tmp/scale            # every part, about 1.5 h on 1 thread
    python benchmarks/catalog_scale.py --work /tmp/scale --part catalog --items 10000 1000000

Synthetic datasets (``lrd-dist synth``; LRD reads a random 64-d frozen text table, see
``synthetic.py``), each measurement a fresh process at one thread per process, nothing else
running. Parts:

- ``catalog``: 20,000 users (about 240k interactions) and 10k ... 10M items; SASRec, KDA and
  KDA+LRD with ``train.embedding_updates`` dense and sparse: training samples/s at batch 256,
  peak RSS of the run, and one dev evaluation (the first 2,048 dev users, 100 candidates each).
- ``interactions``: 100k users, 100k items and 1M ... 50M interactions (longer histories, the same
  tables): prepare time and peak RSS, training samples/s and peak RSS (KDA, sparse).
- ``ranks``: KDA at 10k and 1M items with 2 processes (gloo): DDP dense and sparse, ZeRO-2 dense
  (ZeRO refuses row-wise gradients).
- ``full_ranking``: one full-ranking dev evaluation over the 1M-item catalog (chunked over items,
  the known history masked): SASRec on 1,024 users, KDA on 4.

Training samples/s are read from the run's own metrics.jsonl after its first windows (steps of a
model that has trained, denormals flushed), so start-up is not counted. Peak RSS is the largest sum
of resident memory over the run's process tree (a launcher's processes included), polled every
0.1 s. Writes JSON, prints a table, and draws samples/s and peak RSS against the catalog (log-log).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from synthetic import REPO, random_text_table

CONFIGS = {"sasrec": "sasrec.yaml", "kda": "kda.yaml", "kda_lrd": "kda_lrd.yaml"}
TEXT_DIM = 64


class PeakRSS:
    """The largest resident set of a process and its descendants, polled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def measured(command: list[str]) -> dict:
    """Run ``command`` to completion: wall seconds, peak RSS GiB of its tree, its output."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread per process
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rss = PeakRSS(process.pid)
    out, err = process.communicate()
    peak = rss.stop()
    if process.returncode == -9:  # the kernel's OOM killer: a result, not a failure of the benchmark
        return {"killed": f"SIGKILL (out of memory) at {peak:.1f} GiB", "peak_rss_gib": peak}
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_rss_gib": peak, "stdout": out}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lrd_dist.cli", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dataset(work: Path, users: int, items: int, mean_length: float = 12.0) -> tuple[Path, dict]:
    """The synthetic dataset (made once) and what making it cost."""
    longest = max(50, int(4 * mean_length))  # the generator caps a user's length at this
    data = work / f"synth_u{users}_i{items}_l{mean_length:g}_m{longest}"
    cost_file = data / "prepare_cost.json"
    if not cost_file.is_file():
        if data.exists():
            shutil.rmtree(data)
        synth = cli("synth", "--out", str(data), "--users", str(users), "--items", str(items))
        result = measured(
            [*synth, "--mean-length", str(mean_length), "--max-length", str(longest), "--max-history", "20"]
        )
        manifest = json.loads((data / "manifest.json").read_text())
        samples = sum(manifest["samples"].values())
        cost = {
            "interactions": manifest["num_interactions"],
            "samples": samples,
            "prepare_seconds": result["seconds"],
            "prepare_samples_per_s": samples / result["seconds"],
            "prepare_peak_rss_gib": result["peak_rss_gib"],
        }
        cost_file.write_text(json.dumps(cost))
    return data, json.loads(cost_file.read_text())


def train_speed(
    data: Path, model: str, updates: str, work: Path, steps: int, launcher: str | None = None
) -> dict:
    """Samples/s (all ranks) over steps after the first windows, peak RSS, of ``steps`` steps."""
    if model == "kda_lrd":
        random_text_table(data, TEXT_DIM)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    log_every = max(1, steps // 5)
    command = cli()
    if launcher:
        command += ["launch", "--config_file", str(REPO / "launchers" / f"{launcher}.yaml")]
        command += ["--main_process_port", str(free_port()), "--"]
    command += ["train", "--config", str(REPO / "configs" / "office" / CONFIGS[model])]
    command += [
        f"data.dir={data}",
        f"train.out_dir={out}",
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        f"train.embedding_updates={updates}",
        "train.epochs=1",
        "train.tracker=none",
        "eval.enabled=false",
        "checkpoint.keep=1",
    ]
    result = measured(command)
    if "killed" in result:
        shutil.rmtree(out, ignore_errors=True)
        return result
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["samples_per_s"] for e in entries if "samples_per_s" in e][2:]  # after 2 windows
    shutil.rmtree(out, ignore_errors=True)
    return {
        "samples_per_s": statistics.median(rates),
        "windows": len(rates),
        "peak_rss_gib": result["peak_rss_gib"],
        "seconds": result["seconds"],
    }


def eval_worker(data: str, model: str, users: int, full_ranking: bool) -> None:
    """In a fresh process: one dev evaluation of a fresh model over the first ``users`` users."""
    from lrd_dist.assembly import build_dataset_and_model
    from lrd_dist.config import load_config
    from lrd_dist.data.user_items import UserItems
    from lrd_dist.evaluation.evaluate import evaluate
    from lrd_dist.runtime import CompiledScoring, flush_denormals, scoring_context, select_attention

    overrides = [f"data.dir={data}", "train.tracker=none", f"eval.full_ranking={full_ranking}"]
    if full_ranking:
        overrides.append("data.eval_batch_size=4" if model != "sasrec" else "data.eval_batch_size=256")
    config = load_config(REPO / "configs" / "office" / CONFIGS[model], overrides)
    flush_denormals()
    run = build_dataset_and_model(config, select_attention(config.model.fused_attention))
    known = UserItems.from_dataset(run.data_dir) if full_ranking else None
    scorer = CompiledScoring(run.model) if config.eval.compile and not full_ranking else None
    batches = list(itertools.islice(run.loader("dev"), max(1, users // config.data.eval_batch_size)))
    with scoring_context(scorer):  # the first call compiles: time the second
        timings = []
        for _ in range(1 if full_ranking else 2):
            started = time.perf_counter()
            evaluate(run.model, batches, config.eval.ks, config.eval.ties, full_ranking,
                     run.manifest.num_items, known=known, split="dev")  # fmt: skip
            timings.append(time.perf_counter() - started)
    scored = sum(int(b["valid"].sum()) for b in batches)
    print(json.dumps({"users": scored, "seconds": timings[-1], "users_per_s": scored / timings[-1]}))


def eval_speed(data: Path, model: str, users: int, full_ranking: bool = False) -> dict:
    if model == "kda_lrd":
        random_text_table(data, TEXT_DIM)
    command = [sys.executable, __file__, "--eval-worker", str(data), model, str(users), str(full_ranking)]
    result = measured(command)
    report = json.loads(result["stdout"].strip().splitlines()[-1])
    report["peak_rss_gib"] = result["peak_rss_gib"]  # polled (ru_maxrss can carry over an exec)
    return report


def part_catalog(args, report: dict) -> None:
    for items in args.items:
        data, cost = dataset(args.work, 20_000, items)
        entry = report.setdefault("catalog", {}).setdefault(str(items), {"data": cost})
        for model in args.models:
            for updates in ("dense", "sparse"):
                key = f"{model}/{updates}"
                huge_dense = updates == "dense" and items >= 10_000_000
                if key in entry or (huge_dense and model != "kda"):
                    continue  # dense at 10M items: a step takes half a minute; KDA shows it
                steps = 15 if huge_dense else args.steps
                entry[key] = train_speed(data, model, updates, args.work, steps)
                print(items, key, entry[key], flush=True)
                save(args, report)
            if f"{model}/eval" not in entry:
                entry[f"{model}/eval"] = eval_speed(data, model, 2048)
                save(args, report)


def part_interactions(args, report: dict) -> None:
    for interactions in args.interactions:
        data, cost = dataset(args.work, 100_000, 100_000, mean_length=interactions / 100_000)
        entry = report.setdefault("interactions", {}).setdefault(str(interactions), {"data": cost})
        if "kda/sparse" not in entry:
            entry["kda/sparse"] = train_speed(data, "kda", "sparse", args.work, args.steps)
            print(interactions, entry, flush=True)
            save(args, report)


def part_ranks(args, report: dict) -> None:
    for items in (10_000, 1_000_000):
        data, _ = dataset(args.work, 20_000, items)
        entry = report.setdefault("ranks", {}).setdefault(str(items), {})
        for launcher, updates in (("cpu_2proc", "dense"), ("cpu_2proc", "sparse"), ("cpu_zero2", "dense")):
            key = f"{launcher}/{updates}"
            if key not in entry:
                entry[key] = train_speed(data, "kda", updates, args.work, args.steps, launcher)
                print(items, key, entry[key], flush=True)
                save(args, report)


def part_full_ranking(args, report: dict) -> None:
    data, _ = dataset(args.work, 20_000, 1_000_000)
    entry = report.setdefault("full_ranking", {})
    for model, users in (("sasrec", 1024), ("kda", 4)):
        if model not in entry:
            entry[model] = eval_speed(data, model, users, full_ranking=True)
            save(args, report)


def save(args, report: dict) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


def print_tables(report: dict) -> None:
    catalog = report.get("catalog", {})
    if catalog:
        base = catalog.get("10000", {})
        print(f"\n{'items':>11} {'model/updates':<16}{'samples/s':>11}{'vs 10k':>8}{'peak GiB':>10}")
        for items, entry in catalog.items():
            for key, value in entry.items():
                if "/eval" in key or key == "data":
                    continue
                if "killed" in value:
                    print(f"{int(items):>11,} {key:<16}{value['killed']}")
                    continue
                ratio = value["samples_per_s"] / base[key]["samples_per_s"] if key in base else float("nan")
                rate, peak = value["samples_per_s"], value["peak_rss_gib"]
                print(f"{int(items):>11,} {key:<16}{rate:>11,.0f}{ratio:>8.2f}{peak:>10.2f}")
    for name in ("interactions", "ranks", "full_ranking"):
        for key, value in report.get(name, {}).items():
            print(name, key, json.dumps(value))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    catalog = report.get("catalog", {})
    if not catalog:
        return
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = sorted({k for e in catalog.values() for k in e if k != "data" and "/eval" not in k})
    for key in keys:
        points = [(int(n), e[key]) for n, e in catalog.items() if key in e and "killed" not in e[key]]
        style = "-" if key.endswith("sparse") else "--"
        speed.plot(
            [p[0] for p in points], [p[1]["samples_per_s"] for p in points], style, marker="o", label=key
        )
        memory.plot(
            [p[0] for p in points], [p[1]["peak_rss_gib"] for p in points], style, marker="o", label=key
        )
    for axis, label in ((speed, "training samples/s (1 thread, batch 256)"), (memory, "peak RSS (GiB)")):
        (
            axis.set_xscale("log"),
            axis.set_yscale("log"),
            axis.set_xlabel("catalog (items)"),
            axis.set_ylabel(label),
        )
        axis.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--eval-worker":
        data, model, users, full = sys.argv[2:6]
        eval_worker(data, model, int(users), full == "True")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="where datasets are made (kept for reruns)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "catalog_scale.json")
    parser.add_argument("--part", nargs="+", default=["catalog", "interactions", "ranks", "full_ranking"],
                        choices=["catalog", "interactions", "ranks", "full_ranking"])  # fmt: skip
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--interactions", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=50, help="training steps per measurement")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    report = json.loads(args.out.read_text()) if args.out.is_file() else {}  # resumes a partial run
    report["threads_per_process"] = 1
    parts = {"catalog": part_catalog, "interactions": part_interactions, "ranks": part_ranks,
             "full_ranking": part_full_ranking}  # fmt: skip
    for part in args.part:
        parts[part](args, report)
    save(args, report)
    plot(report, args.out.with_suffix(".png"))
    print_tables(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
