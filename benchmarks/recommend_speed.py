"""Recommendation throughput: full-catalog ranking, FAISS retrieval, and retrieve-then-rerank.

    python benchmarks/recommend_speed.py office --data data/office --kda-lrd RUN --sasrec RUN
    python benchmarks/recommend_speed.py large --work /tmp/large --items 1000000

``office``: on a trained KDA+LRD and SASRec of Office, users/s and peak RSS of (a) KDA+LRD over the
whole catalog, (b) SASRec over the whole catalog, (c) SASRec retrieval of N candidates reranked by
KDA+LRD, and how much of (a)'s top-10 the two-stage top-10 keeps (full ranking is affordable here).

``large``: a synthetic catalog of ``--items`` items (1M by default) prepared with ``lrd-dist synth``;
a SASRec trained for a few hundred steps gives the item and user vectors; FAISS HNSW against exact
search (build time, recall@10, users/s); then a KDA+LRD whose weights are untrained (speed does not
depend on them; denormals are flushed) reranks the FAISS candidates. Its item-text table is random:
encoding a million texts with MiniLM on this CPU would take over an hour, and speed does not depend
on the vectors' values.

Each measurement runs in this process one after the other; the machine must be otherwise idle.
JSON to ``--out`` and a printed table.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from synthetic import lrd_dist, random_text_table

REPO = Path(__file__).resolve().parents[1]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_recommend(run, histories, rows, k, candidates=None, retriever=None, batch_size=64, item_chunk=2048):
    """(items [U, k] of every user, seconds); one batch first, untimed (first-call costs)."""
    from lrd_dist.data.user_items import UserItems
    from lrd_dist.serving.recommend import seen_pairs
    from lrd_dist.serving.topk import top_k

    known = UserItems.from_dataset(run.data_dir)

    @torch.inference_mode()
    def recommend(chosen: np.ndarray) -> torch.Tensor:
        batch = histories.batch(chosen)
        excluded = seen_pairs(histories, chosen, batch, known)
        proposed = retriever.candidates(histories, chosen, candidates) if retriever else None
        score = run.model.item_scorer(batch)
        return top_k(score, len(chosen), run.manifest.num_items, k, excluded, item_chunk, proposed)[0]

    recommend(rows[:batch_size])
    started = time.perf_counter()
    out = [recommend(rows[s : s + batch_size]) for s in range(0, len(rows), batch_size)]
    return torch.cat(out), time.perf_counter() - started


def overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    return float(
        np.mean([len(set(x[:k].tolist()) & set(y[:k].tolist())) / k for x, y in zip(a, b, strict=True)])
    )


def office(args: argparse.Namespace) -> dict:
    from lrd_dist.data.histories import Histories
    from lrd_dist.run_dir import load_trained
    from lrd_dist.runtime import flush_denormals, select_attention
    from lrd_dist.serving.retrieval import EmbeddingRetriever

    flush_denormals()
    kda = load_trained(args.kda_lrd, overrides=[f"data.dir={args.data}"], attention=select_attention(True))
    sasrec = load_trained(args.sasrec, overrides=[f"data.dir={args.data}"])
    histories = Histories.from_dataset(kda.data_dir, kda.config.data.max_history)
    rows = np.random.default_rng(0).permutation(len(histories))[: args.users]
    report = {"users": len(rows), "items": kda.manifest.num_items, "threads": torch.get_num_threads()}
    full, seconds = timed_recommend(kda, histories, rows, 10)
    report["kda_lrd_full_users_per_s"] = len(rows) / seconds
    sas_full, seconds = timed_recommend(
        sasrec, Histories.from_dataset(sasrec.data_dir, sasrec.config.data.max_history), rows, 10
    )
    report["sasrec_full_users_per_s"] = len(rows) / seconds
    retriever = EmbeddingRetriever(args.sasrec, sasrec, "flat")
    for count in args.candidates:
        two_stage, seconds = timed_recommend(kda, histories, rows, 10, count, retriever)
        report[f"two_stage_{count}_users_per_s"] = len(rows) / seconds
        report[f"two_stage_{count}_top10_kept"] = overlap(two_stage, full)
    report["sasrec_top10_vs_kda_lrd_top10"] = overlap(sas_full, full)
    report["peak_rss_gib"] = peak_rss_gib()
    return report


def large(args: argparse.Namespace) -> dict:
    from lrd_dist.assembly import build_dataset_and_model
    from lrd_dist.config import load_config
    from lrd_dist.data.histories import Histories
    from lrd_dist.run_dir import load_trained
    from lrd_dist.runtime import flush_denormals, select_attention
    from lrd_dist.serving.retrieval import build_index, item_vectors, recall_against_exact, user_vectors

    work, data = args.work, args.work / "data"
    report: dict = {"items": args.items, "threads": torch.get_num_threads()}
    if not (data / "manifest.json").is_file():
        started = time.perf_counter()
        lrd_dist(
            "synth",
            "--out",
            str(data),
            "--users",
            str(args.synth_users),
            "--items",
            str(args.items),
            "--max-history",
            "20",
        )
        report["prepare_seconds"] = time.perf_counter() - started
    random_text_table(data, 384)  # the KDA+LRD reranker's frozen table (see synthetic.py)
    sasrec_dir = work / "sasrec"
    if not (sasrec_dir / "best.safetensors").is_file():
        lrd_dist(
            "train",
            "--config",
            str(REPO / "configs/office/sasrec.yaml"),
            f"data.dir={data}",
            f"train.out_dir={sasrec_dir}",
            "train.epochs=1",
            f"train.max_steps={args.sasrec_steps}",
            "train.tracker=none",
        )
    flush_denormals()
    sasrec = load_trained(sasrec_dir)
    histories = Histories.from_dataset(data, sasrec.config.data.max_history)
    rows = np.random.default_rng(0).permutation(len(histories))[: args.users]
    items = item_vectors(sasrec).numpy()
    queries = user_vectors(sasrec, histories.select(rows)).numpy()
    started = time.perf_counter()
    index, _ = build_index(items, "hnsw")
    report["hnsw_build_seconds"] = time.perf_counter() - started
    report["hnsw_recall@10"] = recall_against_exact(index, items, queries, 10)
    report["hnsw_recall@100"] = recall_against_exact(index, items, queries, 100)
    started = time.perf_counter()
    index.search(queries, 200)
    report["hnsw_users_per_s_200"] = len(rows) / (time.perf_counter() - started)
    exact, _ = build_index(items, "flat")
    started = time.perf_counter()
    exact.search(queries, 200)
    report["exact_faiss_users_per_s_200"] = len(rows) / (time.perf_counter() - started)
    _, seconds = timed_recommend(sasrec, histories, rows[: args.users // 4], 10, item_chunk=65536)
    report["sasrec_full_topk_users_per_s"] = (args.users // 4) / seconds

    config = load_config(REPO / "configs/office/kda_lrd.yaml", [f"data.dir={data}", "train.tracker=none"])
    kda = build_dataset_and_model(config, select_attention(True))
    kda.model.eval()

    class HnswRetriever:
        def candidates(self, histories_, chosen, count):
            found = index.search(user_vectors(sasrec, histories_.select(chosen)).numpy(), count)[1]
            return torch.from_numpy(found.astype(np.int64) + 1).clamp(min=0)

    for count in args.candidates:
        _, seconds = timed_recommend(kda, histories, rows, 10, count, HnswRetriever())
        report[f"kda_lrd_rerank_{count}_users_per_s"] = len(rows) / seconds
    report["peak_rss_gib"] = peak_rss_gib()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="part", required=True)
    office_parser = commands.add_parser("office")
    office_parser.add_argument("--data", type=Path, required=True)
    office_parser.add_argument("--kda-lrd", type=Path, required=True, help="a trained KDA+LRD run directory")
    office_parser.add_argument("--sasrec", type=Path, required=True, help="a trained SASRec run directory")
    office_parser.add_argument("--users", type=int, default=1000)
    large_parser = commands.add_parser("large")
    large_parser.add_argument("--work", type=Path, required=True)
    large_parser.add_argument("--items", type=int, default=1_000_000)
    large_parser.add_argument("--synth-users", type=int, default=20_000)
    large_parser.add_argument("--sasrec-steps", type=int, default=300)
    large_parser.add_argument("--users", type=int, default=1000)
    for sub in (office_parser, large_parser):
        sub.add_argument("--candidates", type=int, nargs="+", default=[100, 200])
        sub.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = office(args) if args.part == "office" else large(args)
    out = args.out or REPO / "benchmarks" / "results" / f"recommend_{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
