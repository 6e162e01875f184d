"""Turn a source's catalog and interactions into a dataset directory (format in ``format.py``).

The directory is built under a temporary name beside the target and renamed into place only when
everything, manifest last, is written: an interrupted run never leaves a directory that looks
complete, and an existing dataset is replaced only by a finished one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG, COLD_ITEMS, SPLITS, USERS, Manifest
from lrd_dist.data.sequences import (
    DEV,
    SPLIT_NAMES,
    TEST,
    TRAIN,
    Interactions,
    OrderedInteractions,
    iter_sample_chunks,
    order_and_split,
    sample_negatives,
    user_item_keys,
)
from lrd_dist.data.shards import SplitShardWriter
from lrd_dist.errors import InputError

log = logging.getLogger(__name__)


@contextmanager
def atomic_directory(out: Path, overwrite: bool):
    """Yield a temporary directory that becomes ``out`` only if the block completes."""
    out = out.resolve()
    if out.exists() and not overwrite:
        raise InputError(
            out, "the output directory already exists", "choose another --out or pass --overwrite"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def repeated_negative_rows(negatives: np.ndarray) -> int:
    """Rows whose candidate list holds some item twice (the shipped Office lists were drawn with
    replacement)."""
    if negatives.size == 0:
        return 0
    ordered = np.sort(negatives, axis=1)
    return int((ordered[:, 1:] == ordered[:, :-1]).any(axis=1).sum())


def write_users(path: Path, interactions: Interactions) -> None:
    """user_id -> the source's id, so that recommendations and user vectors name users as the
    source did (datasets without it fall back to the dense id)."""
    count = int(interactions.user.max(initial=0))
    ids = interactions.user_source_ids
    source = [str(i) for i in range(1, count + 1)] if ids is None else [str(i) for i in ids.tolist()]
    pq.write_table(
        pa.table({"user_id": pa.array(np.arange(1, count + 1, dtype=np.int64)), "source_id": source}), path
    )


def hold_out_cold_items(
    ordered: OrderedInteractions, interactions: Interactions, num_items: int, fraction: float, seed: int
) -> tuple[Interactions, np.ndarray]:
    """(interactions without the training rows of a held-out ``fraction`` of the items, their ids).
    The split of every kept row is the one it had (given, or leave-one-out by time)."""
    if not 0.0 < fraction < 1.0:
        raise InputError("--cold-items", f"{fraction}", "give a fraction of the items between 0 and 1")
    rng = np.random.default_rng([seed, 0xC01D])
    cold = np.sort(
        rng.choice(np.arange(1, num_items + 1), size=max(1, round(fraction * num_items)), replace=False)
    )
    keep = ~np.isin(ordered.item, cold) | (ordered.split != TRAIN)
    kept = Interactions(
        user=ordered.user[keep],
        item=ordered.item[keep],
        time=ordered.time[keep],
        split=ordered.split[keep],
        negatives=interactions.negatives,
        negative_row=None if ordered.negative_row is None else ordered.negative_row[keep],
        extras={k: v[keep] for k, v in ordered.extras.items()},
        user_source_ids=interactions.user_source_ids,
    )
    return kept, cold.astype(np.int64)


def write_dataset(
    out: Path,
    *,
    source: str,
    catalog: Catalog,
    interactions: Interactions,
    max_history: int = 50,
    num_negatives: int = 99,
    seed: int = 0,
    samples_per_shard: int = 100_000,
    block_size: int = 1024,
    overwrite: bool = False,
    extra_tables: dict[str, pa.Table] | None = None,
    stats: dict | None = None,
    progress: Callable[[str], None] = log.info,
    cold_items: float = 0.0,
) -> Manifest:
    """Write catalog, shards and manifest for ``interactions`` into ``out``.

    Dev/test candidates are the source's own lists when it gives them, else ``num_negatives``
    items per row drawn without replacement outside the user's items (seeded). Training samples are
    shuffled within each conversion chunk so that shards do not hold one user after another.

    ``cold_items``: the fraction of the catalog held out as cold items (seeded): every interaction
    with one is dropped except where it is a user's dev or test target, so no cold item is a target,
    a history item or (through the trainer) a negative or a KG triple in training, and evaluation can
    tell warm targets from cold ones (``cold_items.parquet``).
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    with atomic_directory(out, overwrite) as staging:
        catalog.write(staging / CATALOG)
        write_users(staging / USERS, interactions)
        for name, table in (extra_tables or {}).items():
            pq.write_table(table, staging / name)
        ordered = order_and_split(interactions)
        everything = ordered  # what each user did, cold items included: negatives avoid all of it
        cold = np.zeros(0, dtype=np.int64)
        if cold_items:
            interactions, cold = hold_out_cold_items(
                ordered, interactions, catalog.num_items, cold_items, seed
            )
            ordered = order_and_split(interactions)
            pq.write_table(pa.table({"item_id": cold}), staging / COLD_ITEMS)
        clicked = None
        if not interactions.negatives:
            clicked = user_item_keys(everything.user, everything.item, catalog.num_items)
            most_clicked = int(np.bincount(everything.user).max())
            if catalog.num_items - most_clicked < num_negatives:
                raise InputError(
                    "interactions",
                    f"a user has {most_clicked} items, leaving fewer than {num_negatives} unseen items "
                    f"of {catalog.num_items} to sample negatives from",
                    "lower --negatives or filter such users",
                )
        else:
            num_negatives = next(iter(interactions.negatives.values())).shape[1]
        writers = {
            split: SplitShardWriter(staging, SPLIT_NAMES[split], samples_per_shard, block_size)
            for split in (TRAIN, DEV, TEST)
        }
        repeated = {DEV: 0, TEST: 0}
        try:
            # training rows come shuffled within each conversion chunk
            for split, rows, columns in iter_sample_chunks(ordered, max_history, shuffle_train=rng):
                if split != TRAIN and interactions.negatives:  # the source's own candidates
                    assert ordered.negative_row is not None  # ordered with the source's candidates
                    columns["negatives"] = interactions.negatives[split][ordered.negative_row[rows]]
                    repeated[split] += repeated_negative_rows(columns["negatives"])
                elif split != TRAIN:  # drawn outside the user's items
                    assert clicked is not None
                    columns["negatives"] = sample_negatives(
                        columns["user"], num_negatives, catalog.num_items, clicked, rng
                    )
                writers[split].add(columns)
            shards = [info for split in (TRAIN, DEV, TEST) for info in writers[split].close()]
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        samples = {s: sum(i.samples for i in shards if i.split == s) for s in SPLITS}
        empty = [s for s in SPLITS if not samples[s]]
        if empty:  # nothing to select or report on: refused here, not after the first epoch
            raise InputError(
                out,
                f"the {empty[0]} split is empty (samples per split: {samples})",
                "give every user at least 3 interactions (--min-interactions), or check the source's "
                "split columns",
            )
        all_stats: dict[str, Any] = {
            **(
                {
                    "cold_items": len(cold),
                    "cold_dev_targets": int(np.isin(ordered.item[ordered.split == DEV], cold).sum()),
                    "cold_test_targets": int(np.isin(ordered.item[ordered.split == TEST], cold).sum()),
                }
                if len(cold)
                else {}
            ),
            "dev_rows_with_repeated_negative": repeated[DEV],
            "test_rows_with_repeated_negative": repeated[TEST],
            "eval_rows_without_history": int(((ordered.split != TRAIN) & (ordered.position == 0)).sum()),
            "relation_pairs": catalog.num_relation_pairs(),
            "prepare_seconds": round(time.perf_counter() - started, 3),
        }
        all_stats.update(stats or {})
        manifest = Manifest(
            source=source,
            num_users=len(np.unique(ordered.user)),
            num_items=catalog.num_items,
            num_interactions=len(interactions),
            max_history=max_history,
            num_negatives=num_negatives,
            block_size=block_size,
            attributes=list(catalog.attributes),
            relations=list(catalog.relations),
            extra_fields=list(interactions.extras),
            samples=samples,
            shards=shards,
            stats=all_stats,
        )
        manifest.save(staging)
        progress(
            f"wrote {sum(samples.values())} samples in {len(shards)} shards "
            f"({samples['train']} train, {samples['dev']} dev, {samples['test']} test)"
        )
    return manifest
