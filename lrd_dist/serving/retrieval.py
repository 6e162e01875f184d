"""Candidate retrieval for large catalogs, and the vectors and FAISS index it reads.

RCF and KDA score each candidate with its own attention over the history, so scoring a million
items per user is costly. The standard answer is two stages: a cheap retriever proposes a few
hundred candidates per user, and the relation-aware model reranks them (``lrd-dist recommend
--retrieve``). Retrievers:

- ``popularity``: the most frequent training targets;
- ``relations``: the catalog's item-item relations (and shared attribute values) of the history's
  items, the most recent first, then popularity;
- a SASRec run or its exported embeddings: the user vector's nearest items by inner product, through
  a FAISS index (exact for small catalogs, HNSW for large ones; its recall against exact search is
  measured when it is built).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from lrd_dist.assembly import DatasetAndModel
from lrd_dist.data.format import sha256_of
from lrd_dist.data.histories import Histories
from lrd_dist.data.user_items import UserItems
from lrd_dist.errors import InputError
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec

log = logging.getLogger(__name__)
ITEMS, USERS, INDEX, INDEX_INFO = "items.safetensors", "users.safetensors", "index.faiss", "index.json"
EXACT_UP_TO = 200_000  # items searched exactly; an HNSW graph beyond


@torch.inference_mode()
def item_vectors(run: DatasetAndModel) -> torch.Tensor:
    """[num_items, V]: the vectors the model reads for its items: SASRec's (its scores are dot
    products with the user state), RCF/KDA's input to the relation-aware scoring; with text in the
    representation, ID + projected text (the catalog encoded once)."""
    if run.model.reads_text:
        with run.model.text_read_once():
            ids = torch.arange(1, run.manifest.num_items + 1)
            return run.model.item_vectors(ids).detach().float().contiguous()
    backbone = run.model.backbone
    table: torch.nn.Embedding = (
        backbone.entity_embeddings
        if isinstance(backbone, RelationalRecommender)
        else backbone.item_embeddings
    )
    return table.weight[1 : run.manifest.num_items + 1].detach().float().contiguous()


@torch.inference_mode()
def user_vectors(run: DatasetAndModel, histories: Histories, batch_size: int = 1024) -> torch.Tensor:
    """SASRec's user state from each history: [U, V], the query of its dot-product retrieval."""
    if run.model.relational:
        raise InputError(
            run.data_dir, "an RCF/KDA model has no user vector for retrieval", "use a SASRec run to retrieve"
        )
    backbone, model = run.model.backbone, run.model
    assert isinstance(backbone, SASRec)
    vectors = model.item_vectors if model.reads_text else None
    with model.text_read_once():
        parts = [
            backbone.user_state(batch["history_items"], batch["history_length"], vectors)
            for batch in (
                histories.batch(slice(s, s + batch_size)) for s in range(0, len(histories), batch_size)
            )
        ]
    return torch.cat(parts).float().contiguous()


def build_index(vectors: np.ndarray, kind: str = "auto"):
    """Inner-product FAISS index: ``flat`` (exact), ``hnsw`` or ``ivf``; ``auto``: exact up to
    ``EXACT_UP_TO`` items, HNSW beyond."""
    import faiss

    if kind == "auto":
        kind = "flat" if len(vectors) <= EXACT_UP_TO else "hnsw"
    dim = vectors.shape[1]
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    elif kind == "ivf":
        lists = max(1, int(4 * np.sqrt(len(vectors))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = max(1, lists // 32)
    else:
        raise InputError("--index", f"{kind!r}", "use auto, flat, hnsw or ivf")
    index.add(vectors)
    return index, kind


def recall_against_exact(index, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact top k that ``index`` returns for ``queries``."""
    import faiss

    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found, strict=True))
    return hits / truth.size


def export_embeddings(
    run: DatasetAndModel, out: Path, kind: str = "auto", recall_queries: int = 1000
) -> dict:
    """Item vectors (and for SASRec the known users' vectors and a FAISS index) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = item_vectors(run)
    item_ids = np.arange(1, run.manifest.num_items + 1)
    save_file({"vectors": items}, str(out / ITEMS))
    pq.write_table(
        pa.table({"item_id": item_ids, "source_id": run.catalog.source_ids}), out / "items.parquet"
    )
    info: dict[str, Any] = {"model": run.config.model.name, "items": len(items), "dim": int(items.shape[1])}
    if not run.model.relational:
        histories = Histories.from_dataset(run.data_dir, run.config.data.max_history)
        users = user_vectors(run, histories)
        save_file({"vectors": users}, str(out / USERS))
        pq.write_table(
            pa.table({"user_id": histories.user, "source_id": histories.names}), out / "users.parquet"
        )
        import faiss

        index, kind = build_index(items.numpy(), kind)
        faiss.write_index(index, str(out / INDEX))
        sample = users.numpy()[np.random.default_rng(0).permutation(len(users))[:recall_queries]]
        info.update(
            index=kind,
            index_sha256=sha256_of(out / INDEX),  # what a retriever checks before it reads the index
            users=len(users),
            metric="inner product",
            **{f"recall@{k}": recall_against_exact(index, items.numpy(), sample, k) for k in (10, 100)},
        )
    (out / INDEX_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


class Retriever:
    """Proposes ``count`` candidate item ids per history row: [B, count], 0 where it has fewer."""

    def candidates(self, histories: Histories, rows: np.ndarray, count: int) -> torch.Tensor:
        raise NotImplementedError


class PopularityRetriever(Retriever):
    def __init__(self, known: UserItems, num_items: int) -> None:
        counts = np.bincount(known.item, minlength=num_items + 1)
        counts[0] = -1
        self.ranked = np.argsort(-counts, kind="stable")[:-1]  # most frequent first, then by id

    def candidates(self, histories: Histories, rows: np.ndarray, count: int) -> torch.Tensor:
        top = torch.from_numpy(self.ranked[:count].astype(np.int64))
        return top.expand(len(rows), -1).clone()


class RelationRetriever(Retriever):
    """Items related to the history's items (item-item relations and same attribute value), the
    neighbours of recent items first; popularity fills the rest."""

    def __init__(self, run: DatasetAndModel, popularity: PopularityRetriever, per_item: int = 50) -> None:
        catalog, n = run.catalog, run.catalog.num_items
        heads, tails = [], []
        for lists in catalog.relations.values():
            lengths = pc.list_value_length(lists).to_numpy()
            source = np.repeat(np.arange(1, n + 1), lengths)
            target = pc.list_flatten(lists).to_numpy().astype(np.int64)
            heads += [source, target]
            tails += [target, source]
        for values in catalog.attributes.values():  # the first few items sharing each value
            items = np.flatnonzero(values > 0) + 1
            items = items[np.lexsort((items, values[items - 1]))]
            groups = values[items - 1]
            start, end = np.searchsorted(groups, groups, "left"), np.searchsorted(groups, groups, "right")
            for offset in range(per_item // 4):
                partner = start + offset
                ok = partner < end
                heads.append(items[ok])
                tails.append(items[partner[ok]])
        head = np.concatenate(heads) if heads else np.zeros(0, np.int64)
        tail = np.concatenate(tails) if tails else np.zeros(0, np.int64)
        keep = head != tail
        pairs = np.unique(head[keep] * (n + 1) + tail[keep])
        self.neighbours_of, self.neighbours = pairs // (n + 1), pairs % (n + 1)
        self.offsets = np.searchsorted(self.neighbours_of, np.arange(n + 2))
        self.per_item = per_item
        self.popularity = popularity

    def candidates(self, histories: Histories, rows: np.ndarray, count: int) -> torch.Tensor:
        out = np.zeros((len(rows), count), dtype=np.int64)
        fallback = self.popularity.ranked
        for position, row in enumerate(rows.tolist()):
            history = histories.items[row, : histories.length[row]][::-1]  # the most recent first
            found = [self.neighbours[self.offsets[i] : self.offsets[i + 1]][: self.per_item] for i in history]
            chain = np.concatenate([*found, fallback[: count + len(history)]]) if found else fallback[:count]
            _, first = np.unique(chain, return_index=True)
            picked = chain[np.sort(first)][:count]
            out[position, : len(picked)] = picked
        return torch.from_numpy(out)


class EmbeddingRetriever(Retriever):
    """SASRec user vectors against a FAISS index of its item vectors: from a SASRec run (vectors
    computed from each history) or from ``lrd-dist export --embeddings`` (known users only)."""

    def __init__(self, source: Path, run: DatasetAndModel | None, kind: str = "auto") -> None:
        import faiss

        self.run = run
        if run is not None:  # a SASRec run: build the index now
            self.index, self.kind = build_index(item_vectors(run).numpy(), kind)
            self.user_table = None
        else:
            if not (source / INDEX).is_file():
                raise InputError(
                    source, f"no {INDEX}", "pass a SASRec run or `lrd-dist export --embeddings` of one"
                )
            info = json.loads((source / INDEX_INFO).read_text()) if (source / INDEX_INFO).is_file() else {}
            if info.get("index_sha256") != sha256_of(source / INDEX):
                raise InputError(
                    source / INDEX,
                    f"its sha256 is not the one {INDEX_INFO} beside it records",
                    "export the vectors again with `lrd-dist export --embeddings` (an index is read only "
                    "from an export of lrd_dist, unchanged)",
                )
            self.index = faiss.read_index(str(source / INDEX))
            self.kind = info.get("index", "?")
            self.user_table = load_file(str(source / USERS))["vectors"].numpy()
            self.user_ids = {name: i for i, name in enumerate(user_names_of(source))}

    def candidates(self, histories: Histories, rows: np.ndarray, count: int) -> torch.Tensor:
        if self.run is not None:
            queries = user_vectors(self.run, histories.select(rows)).numpy()
        else:
            missing = [histories.names[r] for r in rows.tolist() if histories.names[r] not in self.user_ids]
            if missing:
                raise InputError(
                    "--retrieve",
                    f"the exported embeddings have no vector of users {missing[:5]}",
                    "retrieve with the SASRec run itself for histories of other users",
                )
            assert self.user_table is not None  # exported with user vectors (SASRec)
            queries = self.user_table[[self.user_ids[histories.names[r]] for r in rows.tolist()]]
        _, found = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), count)
        return torch.from_numpy(found.astype(np.int64) + 1).clamp(min=0)  # FAISS rows -> item ids; -1 -> 0


def user_names_of(directory: Path) -> list[str]:
    return pq.read_table(Path(directory) / "users.parquet").column("source_id").to_pylist()
