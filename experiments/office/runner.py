"""The Office table, trained to convergence: every (model, seed), resumable, one command.

    python -m experiments.office.runner --office ../shared/datasets/office --runs ~/runs/office

Prepares Office and its frozen all-MiniLM-L6-v2 table if they are missing, then trains each
(model, seed) under the official model-selection rule (dev NDCG@5, LRD/ReChorus early stopping, at
most 200 epochs) with ``checkpoint.resume=auto``: a finished run is skipped, an interrupted one
continues from its last checkpoint in ``--runs`` (keep it outside the repository), so the table
survives interruptions. After each run the best weights are also scored on test by full ranking over
all items (the whole known history masked) and, for LRD runs, ``lrd-dist relations`` writes its report
into the run directory; its summary joins the run's entry. Every finished run lands in
``OUT/office.json`` at once (config, seed, best epoch, epochs run, dev and test HR/NDCG@5/10/20/50, tie
rate, wall time, commit, CPU), with ``OUT/office_dev_ndcg5.png`` (dev NDCG@5 against epoch per model)
and the table as Markdown in ``RUNS/office.md`` (a generated report: it stays beside the runs).

Each run is a fresh ``lrd-dist train`` process of the code this script is run from; run it from a
clean checkout (the commit and the CPU are recorded per attempt). ``--jobs 2`` trains two runs at a
time (one per core of a 2-core machine at ``--threads 1``). Copies may also be started by hand, with
any ``--only``/``--seeds``: a run is claimed by a lock for as long as it trains, and each finished run
is merged into ``office.json`` under another. A table trained elsewhere joins with
``--merge OTHER/office.json``. SIGTERM or SIGUSR1 stops the table: the run in flight checkpoints and is
recorded as stopped, no other starts, exit 75; the next call continues it from ``--runs``.

The dated record of what this runner produced, and what it means, is ``experiments/office/RECORD.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import yaml

from lrd_dist.data.format import Manifest, sha256_of
from lrd_dist.encoders.embed_catalog import TABLE_NAME
from lrd_dist.train.preemption import REQUEUE_EXIT_CODE, STOP_SIGNALS

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "office"
OFFICIAL = ["train.early_stop=official", "eval.metric=NDCG@5", "train.epochs=200", "eval.ks=[5,10,20,50]"]
# name -> (label, config file, extra overrides); the order is the order they are trained in
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "kda_lrd": ("KDA+LRD", "kda_lrd.yaml", []),
    "kda": ("KDA", "kda.yaml", []),
    "sasrec": ("SASRec", "sasrec.yaml", []),
    "rcf": ("RCF", "rcf.yaml", []),
    "rcf_lrd": ("RCF+LRD", "rcf_lrd.yaml", []),
    "kda_lrd_discovery": ("KDA+LRD, discovery settings", "kda_lrd_discovery.yaml", []),
    "rcf_lrd_discovery": ("RCF+LRD, discovery settings", "rcf_lrd_discovery.yaml", []),
    "kda_lrd_official_negatives": (
        "KDA+LRD, official negatives (leak)",
        "kda_lrd.yaml",
        ["train.negative_rule=official"],
    ),
    "rcf_lrd_official_negatives": (
        "RCF+LRD, official negatives (leak)",
        "rcf_lrd.yaml",
        ["train.negative_rule=official"],
    ),
}
SOFTMAX8 = ["train.loss=sampled_softmax", "train.num_negatives=8"]
# MiniLM's top layer LoRA-tuned on a cached trunk, bf16 autocast, no encoder dropout (the fast setting
# of benchmarks/tuned_encoder.py)
TOP1_LORA = ["llm.mode=lora", "llm.tune_layers=1", "llm.autocast=bf16", "llm.dropout=false"]
# Why our KDA+LRD falls short of the authors' figure: each probe changes one thing of the official
# KDA+LRD (or KDA, or SASRec) run. Trained only when named (--probes or --only); "{data}" is --data.
PROBES: dict[str, tuple[str, str, list[str]]] = {
    "kda_lrd_smollm2_last": (
        "KDA+LRD, SmolLM2-135M last-token table",
        "kda_lrd.yaml",
        ["llm.table={data}/item_embeddings_smollm2_last.safetensors"],
    ),
    "kda_lrd_smollm2_mean": (
        "KDA+LRD, SmolLM2-135M mean-pooled table",
        "kda_lrd.yaml",
        ["llm.table={data}/item_embeddings_smollm2_mean.safetensors"],
    ),
    "kda_lrd_latent4": ("KDA+LRD, 4 latent relations", "kda_lrd.yaml", ["model.latent_relations=4"]),
    "kda_lrd_latent16": ("KDA+LRD, 16 latent relations", "kda_lrd.yaml", ["model.latent_relations=16"]),
    "kda_lrd_lambda1": ("KDA+LRD, lambda 1", "kda_lrd.yaml", ["lrd.weight=1.0"]),
    "kda_lrd_lambda100": ("KDA+LRD, lambda 100", "kda_lrd.yaml", ["lrd.weight=100.0"]),
    "kda_lrd_lambda01": ("KDA+LRD, lambda 0.1", "kda_lrd.yaml", ["lrd.weight=0.1"]),
    "kda_lrd_sampled_softmax": (
        "KDA+LRD, sampled softmax over 64 negatives",
        "kda_lrd.yaml",
        ["train.loss=sampled_softmax", "train.num_negatives=64"],
    ),
    # The same lever at a cost a 2-core CPU affords: a training row's cost grows with its candidates
    # (1 + negatives), 30x BPR's at 64 negatives (~22 min per epoch), ~4.5x at 8 (docs/results.md)
    "kda_lrd_sampled_softmax8": (
        "KDA+LRD, sampled softmax over 8 negatives",
        "kda_lrd.yaml",
        ["train.loss=sampled_softmax", "train.num_negatives=8"],
    ),
    # The two levers that each moved the sampled figure (lambda 1 under BPR, the softmax over 8) together
    "kda_lrd_softmax8_lambda1": (
        "KDA+LRD, sampled softmax over 8 negatives, lambda 1",
        "kda_lrd.yaml",
        ["train.loss=sampled_softmax", "train.num_negatives=8", "lrd.weight=1.0"],
    ),
    # Goal (a) under that objective: KDA without LRD, trained the same way
    "kda_sampled_softmax8": (
        "KDA, sampled softmax over 8 negatives",
        "kda.yaml",
        ["train.loss=sampled_softmax", "train.num_negatives=8"],
    ),
    "sasrec_full_softmax": ("SASRec, softmax over all items", "sasrec.yaml", ["train.loss=full_softmax"]),
    # The LLM in the loop: the best configuration with MiniLM's top layer LoRA-tuned on a cached trunk
    # (bf16 autocast and no encoder dropout: the fast setting of benchmarks/tuned_encoder.py)
    "kda_lrd_softmax8_top1_lora": (
        "KDA+LRD, sampled softmax over 8 negatives, MiniLM top-1 LoRA",
        "kda_lrd_softmax8.yaml",
        ["llm.mode=lora", "llm.tune_layers=1", "llm.autocast=bf16", "llm.dropout=false"],
    ),
    # Text where the recommender scores (issue 33): the item vector is the ID embedding plus a learned
    # projection of the MiniLM item vector (id+text), or the projection alone (text); frozen and with
    # the top layer tuned by the recommendation loss. On a --cold-items split these give the
    # warm/cold-target figures.
    "kda_softmax8_id_text": (
        "KDA, sampled softmax over 8 negatives, ID + text (frozen MiniLM)",
        "kda.yaml",
        [*SOFTMAX8, "model.item_representation=id+text"],
    ),
    "kda_lrd_softmax8_id_text": (
        "KDA+LRD, sampled softmax over 8 negatives, ID + text (frozen MiniLM)",
        "kda_lrd_softmax8.yaml",
        ["model.item_representation=id+text"],
    ),
    "kda_softmax8_id_text_top1_lora": (
        "KDA, sampled softmax over 8 negatives, ID + text, MiniLM top-1 LoRA",
        "kda.yaml",
        [*SOFTMAX8, "model.item_representation=id+text", *TOP1_LORA],
    ),
    "kda_lrd_softmax8_id_text_top1_lora": (
        "KDA+LRD, sampled softmax over 8 negatives, ID + text, MiniLM top-1 LoRA",
        "kda_lrd_softmax8.yaml",
        ["model.item_representation=id+text", *TOP1_LORA],
    ),
    "kda_softmax8_text": (
        "KDA, sampled softmax over 8 negatives, text only (frozen MiniLM)",
        "kda.yaml",
        [*SOFTMAX8, "model.item_representation=text"],
    ),
    "sasrec_softmax8": ("SASRec, sampled softmax over 8 negatives", "sasrec.yaml", SOFTMAX8),
    "sasrec_softmax8_id_text": (
        "SASRec, sampled softmax over 8 negatives, ID + text (frozen MiniLM)",
        "sasrec.yaml",
        [*SOFTMAX8, "model.item_representation=id+text"],
    ),
    "sasrec_softmax8_id_text_top1_lora": (
        "SASRec, sampled softmax over 8 negatives, ID + text, MiniLM top-1 LoRA",
        "sasrec.yaml",
        [*SOFTMAX8, "model.item_representation=id+text", *TOP1_LORA],
    ),
}
# The item-text tables the probes read: file stem under --data -> `lrd-dist embed` options
TABLES = {
    "item_embeddings_smollm2_last": ["--model", "smollm2-135m", "--pooling", "last"],
    "item_embeddings_smollm2_mean": ["--model", "smollm2-135m", "--pooling", "mean"],
}
SETTINGS = RUNS | PROBES
# The authors' own logs (official repository history, seed 2019, closed 1536-d embeddings, one run)
AUTHORS = {
    "KDA+LRD": {"HR@5": 0.4826, "NDCG@5": 0.3403, "HR@10": 0.6302, "NDCG@10": 0.3881, "best_epoch": 56},
    "RCF+LRD": {"HR@5": 0.4381, "NDCG@5": 0.3127, "HR@10": 0.5761, "NDCG@10": 0.3573, "best_epoch": 192},
}
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "HR@50", "NDCG@50")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--office", type=Path, help="the ReChorus-layout Office directory (to prepare)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "office")
    parser.add_argument(
        "--runs",
        type=Path,
        default=REPO.parent / "runs" / "office",
        help="run directories (outside the repo)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), help="a subset of the runs")
    parser.add_argument("--probes", action="store_true", help="also train every gap probe (PROBES)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once (copies of this script sharing the list)"
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from office.json")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=[], help="office.json files of tables trained elsewhere"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table_file = args.out / "office.json"
    for other in args.merge:
        merge(other, args.out, args.runs)
    if not args.report_only and not args.merge:
        names = args.only or [*RUNS, *(PROBES if args.probes else [])]
        prepare(args, names)
        if args.jobs > 1:
            return run_copies(args.jobs)
        STOP.install()
        for name, seed in itertools.product(names, args.seeds):
            if STOP.signal is not None:
                break
            key, run = f"{name}/seed{seed}", args.runs / name / f"seed{seed}"
            with claim(run) as ours:
                if not ours:
                    print(f"{key}: claimed by another copy of this script, skipped", flush=True)
                    continue
                previous = load_table(table_file)["runs"].get(key, {})
                if previous.get("status") != "done":
                    record(table_file, {key: run_one(args, name, seed, previous)}, args.runs)
                    continue
                print(f"{key}: done, skipped", flush=True)
                if "train_seconds" not in previous and (run / "metrics.jsonl").is_file():  # older entry
                    record(
                        table_file,
                        {key: previous | {"train_seconds": train_seconds(run / "metrics.jsonl")}},
                        args.runs,
                    )
    write_report(load_table(table_file), args.out, args.runs)
    if STOP.signal is not None:
        print(f"stopped for {signal.Signals(STOP.signal).name}: the next call resumes it", flush=True)
        return REQUEUE_EXIT_CODE
    return 0


class Stop:
    """SIGTERM or SIGUSR1 to the table (a scheduler's preemption, or a session about to end): the
    training in flight gets the same signal, so it checkpoints and exits 75; its attempt is recorded
    as stopped, no further run starts, and the table exits 75.
    A full-ranking evaluation or relation report in flight finishes first: it takes minutes, and a
    run is only recorded whole."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.children: list[subprocess.Popen] = []  # the training in flight, or the copies of --jobs

    def install(self) -> None:
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number: int, _frame) -> None:
        self.signal = number
        for child in self.children:
            if child.poll() is None:
                child.send_signal(number)

    @contextlib.contextmanager
    def forwarding_to(self, child: subprocess.Popen) -> Iterator[None]:
        self.children.append(child)
        if self.signal is not None:  # it came between the check before the run and the start
            child.send_signal(self.signal)
        try:
            yield
        finally:
            self.children.remove(child)


STOP = Stop()


def run_copies(jobs: int) -> int:
    """``jobs`` copies of this command walk the same list of runs; each run's lock (``claim``) gives it
    to the first copy that reaches it, so the copies share the list like workers of one queue."""
    command = [
        sys.executable,
        "-m",
        __spec__.name,
        *sys.argv[1:],
        "--jobs",
        "1",
    ]  # argparse keeps the last --jobs
    STOP.install()
    copies = [subprocess.Popen(command, cwd=REPO) for _ in range(jobs)]
    STOP.children += copies  # each copy forwards the signal to its own training
    return max(copy.wait() for copy in copies)


@contextlib.contextmanager
def claim(run: Path) -> Iterator[bool]:
    """Whether this copy may train ``run``: an exclusive lock on ``RUN.lock`` held for the whole run,
    so two copies given overlapping ``--only``/``--seeds`` never train one run directory at once.
    The lock goes with the process, so a killed copy leaves none behind."""
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def load_table(table_file: Path) -> dict:
    return json.loads(table_file.read_text()) if table_file.is_file() else {"runs": {}}


def record(table_file: Path, entries: dict[str, dict], runs: Path) -> dict:
    """Merge ``entries`` into the table on disk under a lock (other copies of this script may be
    writing theirs) and write it whole through a temporary file, so a crash leaves the old table."""
    with open(table_file.parent / ".office.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = load_table(table_file)
        table["runs"].update(entries)
        partial = table_file.with_suffix(".json.partial")
        partial.write_text(json.dumps(table, indent=1) + "\n")
        partial.replace(table_file)
    write_report(table, table_file.parent, runs)
    return table


def merge(other: Path, out: Path, runs: Path) -> None:
    """Add the finished runs of another table; a run finished here too is kept as it is here."""
    if not other.is_file():
        raise SystemExit(f"--merge {other}: no such file (the office.json of another table)")
    try:
        theirs = json.loads(other.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise SystemExit(f"--merge {other}: not an office.json table ({error})") from error
    ours = load_table(out / "office.json")["runs"]
    new = {}
    for key, entry in theirs.items():
        if entry.get("status") != "done":
            continue
        if ours.get(key, {}).get("status") == "done":
            print(f"{key}: finished in both tables; kept the one in {out / 'office.json'}", flush=True)
            continue
        new[key] = entry
    record(out / "office.json", new, runs)
    print(f"merged {len(new)} finished runs from {other}: {', '.join(sorted(new)) or 'none'}", flush=True)


def lrd_dist(*command: str, threads: int, stoppable: bool = False) -> subprocess.CompletedProcess:
    """One ``lrd-dist`` command; a ``stoppable`` one (a training) receives the table's stop signal."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "lrd_dist.cli", *command]
    with (
        subprocess.Popen(
            argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as child,
        STOP.forwarding_to(child) if stoppable else contextlib.nullcontext(),
    ):
        stdout, stderr = child.communicate()
    return subprocess.CompletedProcess(argv, child.returncode, stdout, stderr)


def checked(result: subprocess.CompletedProcess, what: str) -> str:
    if result.returncode != 0:
        raise SystemExit(f"{what} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def prepare(args: argparse.Namespace, names: list[str]) -> None:
    if not (args.data / "manifest.json").is_file():
        if args.office is None:
            raise SystemExit(
                f"{args.data} is not prepared: pass --office DIR (the ReChorus-layout Office data)"
            )
        command = ["prepare", "--source", "rechorus", "--input", str(args.office), "--out", str(args.data)]
        checked(lrd_dist(*command, "--max-history", "20", threads=2), "prepare")
    if not (args.data / "item_embeddings.safetensors").is_file():
        checked(lrd_dist("embed", "--data", str(args.data), threads=2), "embed")
    wanted = {o.split("{data}/")[1].split(".")[0] for n in names for o in SETTINGS[n][2] if "{data}/" in o}
    for stem in sorted(wanted):
        table = args.data / f"{stem}.safetensors"
        if not table.is_file():
            options = ["--data", str(args.data), *TABLES[stem], "--out", str(table)]
            checked(lrd_dist("embed", *options, threads=2), f"embed {stem}")


def commit() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout
    return head + ("-dirty" if dirty.strip() else "")


def machine() -> dict:
    """The CPU an attempt ran on: sessions land on different machines (an AVX-512 Xeon ran Office
    epochs about 5x faster than a 2.0 GHz AVX2 EPYC), so a wall time means nothing without it."""
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    isa = next((name for name in ("avx512f", "avx2", "avx") if name in flags), "other")
    return {"cpu": info.get("model name", "unknown"), "isa": isa, "cpus": os.cpu_count()}


def data_used(data: Path, overrides: list[str]) -> dict:
    """What an attempt trained on: the dataset's fingerprint (the checkpoints record it too) and the
    sha256 of its item-text table, which each session embeds anew and may differ in the last bits
    from one CPU to another."""
    tables = [o.split("=", 1)[1] for o in overrides if o.startswith("llm.table=")]
    table = Path(tables[-1]) if tables else data / TABLE_NAME
    return {"fingerprint": Manifest.load(data).fingerprint(), "item_table_sha256": sha256_of(table)}


def run_one(args: argparse.Namespace, name: str, seed: int, previous: dict) -> dict:
    label, config, extra = SETTINGS[name]
    extra = [o.replace("{data}", str(args.data)) for o in extra]
    run = args.runs / name / f"seed{seed}"
    overrides = [
        f"data.dir={args.data}",
        f"train.out_dir={run}",
        f"train.seed={seed}",
        "checkpoint.resume=auto",
        "train.tracker=none",
        *OFFICIAL,
        *extra,
    ]
    command = ["train", "--config", str(CONFIGS / config), *overrides]
    print(f"{name}/seed{seed}: lrd-dist {' '.join(command)}", flush=True)
    started, code = time.perf_counter(), commit()  # at the start: the checkout may move while it trains
    data = data_used(args.data, overrides)
    result = lrd_dist(*command, threads=args.threads, stoppable=True)
    attempt = {"seconds": time.perf_counter() - started, "commit": code, "machine": machine(), "data": data}
    attempts = [*previous.get("attempts", []), attempt]
    if result.returncode == REQUEUE_EXIT_CODE:
        print(f"{name}/seed{seed}: stopped with a checkpoint; it resumes from it", flush=True)
        return {"status": "stopped", "attempts": attempts}
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        return {"status": "failed", "attempts": attempts}
    results = json.loads((run / "results.json").read_text())
    weights, resolved = run / "best.safetensors", run / "config.yaml"
    full = json.loads(
        checked(
            lrd_dist(
                "eval",
                "--weights",
                str(weights),
                "--config",
                str(resolved),
                "--split",  # the table reports test; a KDA dev split by full ranking costs ~25 min on AVX2
                "test",
                "eval.full_ranking=true",
                threads=args.threads,
            ),
            "full-ranking eval",
        )
    )
    entry = {
        "status": "done",
        "label": label,
        "model": name,
        "seed": seed,
        "command": "lrd-dist " + " ".join(command),
        "config": yaml.safe_load(resolved.read_text()),
        "best_epoch": results["best_epoch"],
        "epochs_run": results["epochs_run"],
        "steps": results["steps"],
        "dev": results["dev"],
        "test": results["test"],
        "full_ranking": full,
        "dev_curve": dev_curve(run / "metrics.jsonl"),
        "train_seconds": train_seconds(run / "metrics.jsonl"),
        "seconds": sum(a["seconds"] for a in attempts),
        "attempts": attempts,
        "commit": attempts[-1]["commit"],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if results.get("lrd"):
        entry["relations"] = relation_summary(run)
    return entry


def epoch_entries(metrics: Path) -> list[dict]:
    return epoch_entries_of(metrics.read_text())


def epoch_entries_of(log: str) -> list[dict]:
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    return [e for e in entries if "epoch_seconds" in e]


def dev_curve(metrics: Path) -> list[float]:
    return dev_curve_of(metrics.read_text())


def dev_curve_of(log: str) -> list[float]:
    return [e["dev/NDCG@5"] for e in epoch_entries_of(log) if "dev/NDCG@5" in e]


def train_seconds(metrics: Path) -> float:
    """Wall time of every epoch with its dev evaluation, over all attempts: ``metrics.jsonl`` keeps the
    epochs of earlier processes on resume, so this holds where a runner that was stopped lost its timing."""
    return sum(e["epoch_seconds"] for e in epoch_entries(metrics))


def relation_summary(run: Path) -> dict:
    """``lrd-dist relations`` on the best weights; the report stays in the run directory."""
    checked(lrd_dist("relations", "--run", str(run), threads=2), "relation report")
    summary = json.loads((run / "relations" / "summary.json").read_text())
    return summary


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


HEADER = [
    "| model | seeds | test HR@5 | test NDCG@5 | test HR@10 | test NDCG@10 | full-ranking test NDCG@10 | "
    "best epoch | epochs run | training hours per run (CPU ISA) |",
    "|---|---|---|---|---|---|---|---|---|---|",
]


def table_row(label: str, runs: list[dict]) -> str:
    test = {m: [r["test"][m] for r in runs] for m in METRICS}
    return (
        f"| {label} | {len(runs)} | "
        + " | ".join(mean_std(test[m]) for m in ("HR@5", "NDCG@5", "HR@10", "NDCG@10"))
        + f" | {mean_std([r['full_ranking']['test']['NDCG@10'] for r in runs])}"
        + f" | {', '.join(str(r['best_epoch'] + 1) for r in runs)}"
        + f" | {', '.join(str(r['epochs_run']) for r in runs)}"
        + f" | {', '.join(run_hours(r) for r in runs)} |"
    )


def run_hours(run: dict) -> str:
    """One run's training hours and, where its attempts recorded them (since 2026-12-03), the vector
    ISAs of their CPUs: runs of one setting may have trained on different machines, so no mean."""
    hours = f"{run.get('train_seconds', run['seconds']) / 3600:.2f}"
    isas = sorted({a["machine"]["isa"] for a in run.get("attempts", []) if "machine" in a})
    return f"{hours} ({'/'.join(isas)})" if isas else hours


# Goal (a) of the table: each LRD model against the same model without LRD
LRD_GAINS = {
    "kda_lrd": "kda",
    "rcf_lrd": "rcf",
    "kda_lrd_discovery": "kda",
    "rcf_lrd_discovery": "rcf",
    "kda_lrd_sampled_softmax8": "kda_sampled_softmax8",
}
# Settings trained with the official training negatives, which also reject the user's dev and test
# items (a leak): the authors' figures used them, so goal (b) is stated with and without them.
LEAKY = {"kda_lrd_official_negatives", "rcf_lrd_official_negatives"}


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Difference of means, Welch's t and its Welch-Satterthwaite degrees of freedom: the seed
    spreads of two settings differ (KDA's is twice KDA+LRD's on Office), so no pooled variance."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return diff, math.copysign(math.inf, diff) if diff else 0.0, math.inf
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return diff, diff / math.sqrt(va + vb), dof


def seeds(count: int) -> str:
    return f"{count} seed{'s' if count != 1 else ''}"


def goal_lines(by_setting: dict[str, list[dict]]) -> list[str]:
    """The table's goals, stated from the finished runs whichever way they go: (a) an LRD model beats
    its model without LRD by more than the seed spread (the larger sample std of the two rows), on
    both protocols; (b) the best open KDA+LRD setting reaches the authors' test NDCG@10."""
    rows = []
    for with_lrd, without in LRD_GAINS.items():
        a, b = by_setting[with_lrd], by_setting[without]
        if len(a) < 2 or len(b) < 2:
            continue
        for protocol, value in (
            ("99 sampled negatives", lambda r: r["test"]["NDCG@10"]),
            ("full ranking", lambda r: r["full_ranking"]["test"]["NDCG@10"]),
        ):
            x, y = [value(r) for r in a], [value(r) for r in b]
            diff, t, dof = welch(x, y)
            spread = max(statistics.stdev(x), statistics.stdev(y))
            rows.append(
                f"| (a) | {SETTINGS[with_lrd][0]} ({seeds(len(a))}) "
                f"| {SETTINGS[without][0]} ({seeds(len(b))}) "
                f"| {protocol} | {diff:+.4f} | {spread:.4f} | {t:.2f} ({dof:.1f}) "
                f"| {'yes' if diff > spread else 'no'} |"
            )
    kda_lrd_ndcg = {
        name: [r["test"]["NDCG@10"] for r in runs]
        for name, runs in by_setting.items()
        if name.startswith("kda_lrd") and runs
    }
    for leaky, which in ((False, "best open KDA+LRD setting"), (True, "with the official negatives")):
        candidates = {name: v for name, v in kda_lrd_ndcg.items() if (name in LEAKY) == leaky}
        if not candidates:
            continue
        best = max(candidates, key=lambda name: statistics.mean(candidates[name]))
        ndcg, authors = candidates[best], AUTHORS["KDA+LRD"]["NDCG@10"]
        rows.append(
            f"| (b) | {which}: {SETTINGS[best][0]} ({seeds(len(ndcg))}) | the authors' "
            f"{authors:.4f} | 99 sampled negatives | {statistics.mean(ndcg) - authors:+.4f} "
            f"| {f'{statistics.stdev(ndcg):.4f}' if len(ndcg) > 1 else '– (one seed)'} | – "
            f"| {'yes' if statistics.mean(ndcg) >= authors else 'no'} |"
        )
    if not rows:
        return []
    return [
        "",
        "Goals, from the finished runs (seed spread: the larger sample std of the two rows; "
        "Welch's t with its degrees of freedom):",
        "",
        "| goal | setting | against | protocol | difference of mean test NDCG@10 | seed spread "
        "| Welch t (dof) | met |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


# Text where the recommender scores: each setting's (model, item vector, item encoder) and the frozen
# ID setting it is stated against (None: it is that reference). All under the sampled softmax over 8.
TEXT_ROWS: dict[str, tuple[str, str, str, str | None]] = {
    "kda_sampled_softmax8": ("KDA", "id", "–", None),
    "kda_softmax8_id_text": ("KDA", "id+text", "frozen", "kda_sampled_softmax8"),
    "kda_softmax8_id_text_top1_lora": ("KDA", "id+text", "top-1 LoRA", "kda_sampled_softmax8"),
    "kda_softmax8_text": ("KDA", "text", "frozen", "kda_sampled_softmax8"),
    "kda_lrd_sampled_softmax8": ("KDA+LRD", "id", "frozen (q only)", None),
    "kda_lrd_softmax8_top1_lora": ("KDA+LRD", "id", "top-1 LoRA (q only)", "kda_lrd_sampled_softmax8"),
    "kda_lrd_softmax8_id_text": ("KDA+LRD", "id+text", "frozen", "kda_lrd_sampled_softmax8"),
    "kda_lrd_softmax8_id_text_top1_lora": (
        "KDA+LRD",
        "id+text",
        "top-1 LoRA",
        "kda_lrd_sampled_softmax8",
    ),
    "sasrec_softmax8": ("SASRec", "id", "–", None),
    "sasrec_softmax8_id_text": ("SASRec", "id+text", "frozen", "sasrec_softmax8"),
    "sasrec_softmax8_id_text_top1_lora": ("SASRec", "id+text", "top-1 LoRA", "sasrec_softmax8"),
}


def text_lines(by_setting: dict[str, list[dict]]) -> list[str]:
    """Text where the recommender scores, stated from the finished runs: each text-reading or tuned
    setting against its frozen ID setting, by 99 sampled negatives and by full ranking, with the
    verdict the comparison allows: beyond the seed spread (the larger sample std of the two rows,
    from the rows with two or more seeds) higher or lower, within it, or no spread yet (one seed
    each). On a cold-start split (entries with ``cold/`` metrics) a second table gives warm- and
    cold-target NDCG@10 of every setting, the cold figures beside their chance level."""
    present = [name for name in TEXT_ROWS if by_setting.get(name)]
    if not any(TEXT_ROWS[name][3] for name in present):
        return []

    def ndcg(run: dict, protocol: str, group: str = "") -> float:
        metrics = run["test"] if protocol == "sampled" else run["full_ranking"]["test"]
        return metrics[f"{group}NDCG@10"]

    lines = [
        "",
        "Text where the recommender scores: each setting against the same model with ID item vectors "
        "and the frozen table (sampled softmax over 8 negatives; test NDCG@10; spread: the larger "
        "sample std of the two rows):",
        "",
        "| model | item vector | item encoder | seeds | sampled | full ranking | hours per run "
        "| against | difference sampled / full | spread sampled / full | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in present:
        model, vector, encoder, reference = TEXT_ROWS[name]
        runs = by_setting[name]
        cells = [
            model,
            vector,
            encoder,
            str(len(runs)),
            mean_std([ndcg(r, "sampled") for r in runs]),
            mean_std([ndcg(r, "full") for r in runs]),
            ", ".join(run_hours(r) for r in runs),
        ]
        base = by_setting.get(reference, []) if reference else []
        if not reference:
            cells += ["(reference)", "–", "–", "–"]
        elif not base:
            cells += [f"{TEXT_ROWS[reference][0]} id: not trained", "–", "–", "–"]
        else:
            diffs, spreads = [], []
            for protocol in ("sampled", "full"):
                x, y = [ndcg(r, protocol) for r in runs], [ndcg(r, protocol) for r in base]
                diffs.append(statistics.mean(x) - statistics.mean(y))
                stds = [statistics.stdev(v) for v in (x, y) if len(v) > 1]
                spreads.append(max(stds) if stds else None)
            cells += [
                f"{TEXT_ROWS[reference][0]} id ({seeds(len(base))})",
                " / ".join(f"{d:+.4f}" for d in diffs),
                " / ".join("–" if s is None else f"{s:.4f}" for s in spreads),
                " / ".join(verdict(d, s) for d, s in zip(diffs, spreads, strict=True)),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    cold = [name for name in present if "cold/NDCG@10" in by_setting[name][0]["test"]]
    if cold:
        lines += [
            "",
            "Warm and cold targets (cold: items held out of training; chance: a uniformly random "
            "ranking of the same candidates; test NDCG@10, mean over seeds):",
            "",
            "| model | item vector | item encoder | seeds | warm sampled | cold sampled | cold chance "
            "sampled | warm full | cold full | cold chance full |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name in cold:
            runs = by_setting[name]
            cells = [*TEXT_ROWS[name][:3], str(len(runs))]
            for protocol in ("sampled", "full"):
                cells += [
                    f"{statistics.mean(ndcg(r, protocol, group) for r in runs):.4f}"
                    for group in ("warm/", "cold/", "cold/chance/")
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdict(difference: float, spread: float | None) -> str:
    if spread is None:
        return "no spread yet"
    if abs(difference) <= spread:
        return "within"
    return "higher" if difference > 0 else "lower"


def plot_dev_curves(by_setting: dict[str, list[dict]], path: Path) -> None:
    """Dev NDCG@5 against epoch, one panel per setting of the table and per probe that has runs, on
    a grid of three columns sharing the y axis."""
    panels = [n for n in SETTINGS if n in RUNS or by_setting[n]]
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns, 3.0 * rows), sharey=True, squeeze=False
    )
    for axis, name in itertools.zip_longest(axes.flat, panels):
        if name is None:
            axis.set_visible(False)
            continue
        axis.set_title(SETTINGS[name][0], fontsize=8)
        for r in by_setting[name]:
            axis.plot(range(1, len(r["dev_curve"]) + 1), r["dev_curve"], label=f"seed {r['seed']}")
        if by_setting[name]:
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel("dev NDCG@5")
    for axis in axes[-1]:
        axis.set_xlabel("epoch")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(table: dict, out: Path, runs: Path) -> None:
    """The dev-curve figure into ``out`` (beside office.json) and the Markdown table into ``runs``."""
    done = [r for r in table["runs"].values() if r.get("status") == "done"]
    by_setting = {
        name: sorted((r for r in done if r["model"] == name), key=lambda r: r["seed"]) for name in SETTINGS
    }
    lines = [
        *HEADER,
        *(table_row(label, by_setting[n]) for n, (label, _, _) in RUNS.items() if by_setting[n]),
    ]
    plot_dev_curves(by_setting, out / "office_dev_ndcg5.png")
    for label, figures in AUTHORS.items():
        lines.append(
            f"| {label}, authors' log (1536-d closed embeddings, seed 2019, one run) | 1 | "
            + " | ".join(f"{figures[m]:.4f}" for m in ("HR@5", "NDCG@5", "HR@10", "NDCG@10"))
            + f" | – | {figures['best_epoch']} | – | – |"
        )
    probes = [
        table_row(label, by_setting[name]) for name, (label, _, _) in PROBES.items() if by_setting[name]
    ]
    if probes:
        lines += [
            "",
            "Gap probes: each changes one thing of the official KDA+LRD (or KDA, or SASRec) run.",
            "",
        ]
        lines += [*HEADER, *probes]
    lines += goal_lines(by_setting)
    lines += text_lines(by_setting)
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "office.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
