"""Top-k recommendations of a trained run over the whole catalog, or retrieve then rerank,
written as Parquet: the implementation of ``lrd-dist recommend`` (its options and the output
are described in ``lrd_dist/commands/recommend.py``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lrd_dist.assembly import DatasetAndModel
from lrd_dist.data.histories import Histories, user_names
from lrd_dist.data.user_items import UserItems
from lrd_dist.errors import InputError
from lrd_dist.run_dir import RunDir, load_trained
from lrd_dist.runtime import flush_denormals, select_attention
from lrd_dist.serving.topk import NO_ITEM, top_k

log = logging.getLogger(__name__)
SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("rank", pa.int32()),
        ("item", pa.string()),
        ("score", pa.float32()),
        ("text", pa.string()),
    ]
)


@dataclass
class RecommendRequest:
    """What ``lrd-dist recommend`` was asked (its options are described in
    ``lrd_dist/commands/recommend.py``): a trained model, who to recommend to, and how."""

    out: Path  # FILE.parquet
    run: Path | None = None  # a run directory, or
    weights: Path | None = None  # a weight file, with
    config: Path | None = None  # its config (default: the one inside)
    overrides: list[str] = field(default_factory=list)
    k: int = 20
    users: Path | None = None  # user source ids, one per line (default: every user)
    histories: Path | None = None  # JSON lines of histories instead of the dataset's users
    include_seen: bool = False
    retrieve: str | None = None  # popularity | relations | a SASRec run | its exported vectors
    candidates: int = 200
    batch_size: int = 64
    item_chunk: int = 2048
    new_items: Path | None = None  # JSON lines of items to add to the catalog (a text-reading run)


def recommend(request: RecommendRequest) -> None:
    """Write the top ``k`` items of every chosen user to ``request.out`` (one process, or a share of the
    users per rank under ``lrd-dist launch``, merged by the main process)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if request.k < 1:
        raise InputError("--k", f"{request.k}", "ask for 1 or more items")
    if request.out.suffix != ".parquet":
        raise InputError(request.out, "not a .parquet path", "name the output FILE.parquet")
    request.out.parent.mkdir(parents=True, exist_ok=True)
    flush_denormals()
    model_run = load_trained(
        request.run, request.weights, request.config, request.overrides, select_attention(True)
    )
    if request.new_items is not None:
        if request.retrieve:
            raise InputError(
                "--new-items",
                "with --retrieve: a retriever proposes items of the trained catalog only",
                "rank new items over the whole catalog (leave --retrieve out)",
            )
        from lrd_dist.serving.new_items import add_new_items, read_new_items

        added = add_new_items(model_run, read_new_items(request.new_items, model_run.catalog))
        log.info("%d new items added to the %d of the catalog", added - model_run.manifest.num_items, added)
    num_items = model_run.catalog.num_items
    if request.k > num_items:
        raise InputError(
            "--k",
            f"{request.k} is larger than the catalog ({num_items} items)",
            f"use --k {num_items} or less",
        )
    histories = choose_histories(request, model_run)
    known = None if request.include_seen or request.histories else UserItems.from_dataset(model_run.data_dir)
    retriever = make_retriever(request.retrieve, model_run, request.run, known) if request.retrieve else None
    rows = np.arange(
        state.process_index * len(histories) // state.num_processes,
        (state.process_index + 1) * len(histories) // state.num_processes,
    )
    part = (
        request.out.with_name(f"{request.out.name}.rank{state.process_index}")
        if state.num_processes > 1
        else None
    )
    started = time.perf_counter()
    written = write_recommendations(
        model_run,
        histories,
        rows,
        request,
        known,
        retriever,
        part or request.out.with_name(request.out.name + ".partial"),
    )
    seconds = time.perf_counter() - started
    log.info(
        "rank %d: %d users in %.1f s (%.1f users/s)",
        state.process_index,
        written,
        seconds,
        written / max(seconds, 1e-9),
    )
    if part is None:
        request.out.with_name(request.out.name + ".partial").replace(request.out)
    else:
        state.wait_for_everyone()
        if state.is_main_process:
            merge_parts(
                [request.out.with_name(f"{request.out.name}.rank{r}") for r in range(state.num_processes)],
                request.out,
            )
        state.wait_for_everyone()
    if state.is_main_process:
        print(f"wrote {request.out}: {len(histories)} users x {request.k} items")


def choose_histories(request: RecommendRequest, run: DatasetAndModel) -> Histories:
    max_history = run.config.data.max_history
    if request.histories:
        names = user_names(run.data_dir, run.manifest.num_users)
        known_users = {name: i + 1 for i, name in enumerate(names)}
        return Histories.from_jsonl(request.histories, run.catalog, max_history, known_users)
    histories = Histories.from_dataset(run.data_dir, max_history)
    if not request.users:
        return histories
    if not request.users.is_file():
        raise InputError(
            request.users, "no such users file", "pass a text file of user source ids, one per line"
        )
    index = {name: row for row, name in enumerate(histories.names)}
    wanted = [line.strip() for line in request.users.read_text().splitlines() if line.strip()]
    unknown = [(n, name) for n, name in enumerate(wanted, start=1) if name not in index]
    if unknown:
        line, name = unknown[0]
        raise InputError(
            request.users,
            f"unknown user {name!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
            "name users by their source ids (the dataset's users.parquet), or pass --histories",
            line=line,
        )
    return histories.select(np.array([index[name] for name in wanted], dtype=np.int64))


def make_retriever(source: str, run: DatasetAndModel, run_dir: Path | None, known: UserItems | None):
    from lrd_dist.serving.retrieval import EmbeddingRetriever, PopularityRetriever, RelationRetriever

    popularity = PopularityRetriever(known or UserItems.from_dataset(run.data_dir), run.manifest.num_items)
    if source == "popularity":
        return popularity
    if source == "relations":
        return RelationRetriever(run, popularity)
    path = Path(source)
    if RunDir(path).is_run():
        retrieval_run = RunDir(path).load()
        if retrieval_run.config.model.name != "sasrec":
            raise InputError(path, f"a {retrieval_run.config.model.name} run", "retrieve with a SASRec run")
        if retrieval_run.manifest.num_items != run.manifest.num_items:
            raise InputError(path, "trained on another catalog", "retrieve with a run of the same dataset")
        return EmbeddingRetriever(path, retrieval_run)
    if path.is_dir():
        return EmbeddingRetriever(path, None)
    raise InputError(
        source, "not a retriever", "use popularity, relations, a SASRec run or its embeddings directory"
    )


@torch.inference_mode()
def write_recommendations(
    run: DatasetAndModel,
    histories: Histories,
    rows: np.ndarray,
    request: RecommendRequest,
    known: UserItems | None,
    retriever,
    path: Path,
) -> int:
    """Score ``rows`` of ``histories`` batch by batch, appending each batch's rows to ``path``."""
    source_ids = np.array(run.catalog.source_ids.to_pylist(), dtype=object)
    texts = np.array(run.catalog.texts.to_pylist(), dtype=object)
    model = run.model
    # a tuned encoder's text vectors: the catalog encoded once for this call, not per batch
    with pq.ParquetWriter(path, SCHEMA) as writer, model.text_read_once():
        for start in range(0, len(rows), request.batch_size):
            chosen = rows[start : start + request.batch_size]
            batch = histories.batch(chosen)
            excluded = None if request.include_seen else seen_pairs(histories, chosen, batch, known)
            candidates = retriever.candidates(histories, chosen, request.candidates) if retriever else None
            items, scores = top_k(
                model.item_scorer(batch),
                len(chosen),
                run.catalog.num_items,
                request.k,
                excluded,
                request.item_chunk,
                candidates,
            )
            writer.write_table(to_table(histories, chosen, items, scores, source_ids, texts))
    return len(rows)


def seen_pairs(histories: Histories, rows: np.ndarray, batch, known: UserItems | None):
    """(row, item) pairs to leave out: everything a dataset user has, or every item of a given
    history (also those older than the window the model reads)."""
    window = torch.arange(batch["history_items"].shape[1])[None, :] < batch["history_length"][:, None]
    row, column = window.nonzero(as_tuple=True)
    pairs = [(row, batch["history_items"][row, column])]
    if known is not None:
        pairs.append(known.everything(batch["user"]))
    if histories.given is not None:
        given = [histories.given[r] for r in rows.tolist()]
        counts = torch.tensor([len(g) for g in given])
        pairs.append(
            (
                torch.repeat_interleave(torch.arange(len(given)), counts),
                torch.from_numpy(np.concatenate(given)),
            )
        )
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]).long()


def to_table(histories, rows, items, scores, source_ids, texts) -> pa.Table:
    users, ranks, item_ids, values = [], [], [], []
    for position, row in enumerate(rows.tolist()):
        found = items[position] != NO_ITEM
        count = int(found.sum())
        users += [histories.names[row]] * count
        ranks += list(range(1, count + 1))
        item_ids.append(items[position][:count].numpy())
        values.append(scores[position][:count].numpy())
    chosen = np.concatenate(item_ids) if item_ids else np.zeros(0, np.int64)
    return pa.table(
        {
            "user": pa.array(users, pa.string()),
            "rank": pa.array(ranks, pa.int32()),
            "item": pa.array(source_ids[chosen - 1] if len(chosen) else [], pa.string()),
            "score": pa.array(np.concatenate(values) if values else [], pa.float32()),
            "text": pa.array(texts[chosen - 1] if len(chosen) else [], pa.string()),
        },
        schema=SCHEMA,
    )


def merge_parts(parts: list[Path], out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    with pq.ParquetWriter(partial, SCHEMA) as writer:
        for part in parts:
            for batch in pq.ParquetFile(part).iter_batches():
                writer.write_batch(batch)
    partial.replace(out)
    for part in parts:
        part.unlink()
