"""McAuley Lab's Amazon Reviews 2023 (hyp1231/AmazonReviews2023), from its raw JSON-lines files.

    review_categories/<Cat>.jsonl[.gz]       rating, title, text, images, asin, parent_asin,
                                             user_id, timestamp (milliseconds), verified_purchase,
                                             helpful_vote
    meta_categories/meta_<Cat>.jsonl[.gz]    main_category, title, average_rating, rating_number,
                                             features, description, price, images, videos, store,
                                             categories, details, parent_asin, bought_together

Items are ``parent_asin`` (what joins the metadata). Item text: ``DEFAULT_TEMPLATE`` over the
metadata (``{title} | {store} | {categories} | {features}``, lists joined by ", ", empty parts
dropped; any metadata field can be named instead). Attributes: main category, store, leaf category.
Item-item relations: ``bought_together`` where present (usually null). Dirt handled and counted in
the manifest: negative timestamps (dropped), duplicate (user, item) rows (the earliest kept), a
rating of 0 (kept: the log is implicit feedback), reviews of items without metadata (dropped).

Splits: ``loo`` (leave-one-out by time after the k-core, as for the other sources); ``timestamp``
(the benchmark's global cut points: before 1628643414042 ms train, before 1658002729837 ms dev,
then test); ``official``: the published ``last_out`` files of ``--benchmark DIR``
(``<Cat>.train.csv``, ``<Cat>.valid.csv``, ``<Cat>.test.csv``, columns ``user_id,parent_asin,
rating,timestamp`` and in the ``_w_his`` variants a ``history``; with or without a header row), kept
row for row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.sequences import DEV, TEST, TRAIN, Interactions
from lrd_dist.data.sources.logs import (
    ItemColumns,
    Log,
    Vocabulary,
    bad_line,
    build_catalog,
    check_times,
    clean,
    dense_ids,
)
from lrd_dist.errors import InputError

DEFAULT_TEMPLATE = "{title} | {store} | {categories} | {features}"
TIMESTAMP_CUTS_MS = (1628643414042, 1658002729837)
REVIEWS = pa.schema(
    [
        ("user_id", pa.string()),
        ("parent_asin", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float64()),
    ]
)
META = pa.schema(
    [
        ("parent_asin", pa.string()),
        ("main_category", pa.string()),
        ("title", pa.string()),
        ("store", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("features", pa.list_(pa.string())),
        ("description", pa.list_(pa.string())),
        ("bought_together", pa.list_(pa.string())),
    ]
)
OFFICIAL_COLUMNS = ["user_id", "parent_asin", "rating", "timestamp"]


def read_jsonl(path: Path, schema: pa.Schema) -> pa.Table:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file", "pass the review or meta JSON-lines file of the category")
    stream = pa.input_stream(str(path), compression="gzip" if path.name.endswith(".gz") else None)
    options = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pajson.read_json(stream, pajson.ReadOptions(block_size=1 << 24), options)
    except pa.ArrowInvalid as exc:
        raise bad_line(path, "json", None, exc) from exc
    return table


def load_amazon2023(
    reviews: Path,
    meta: Path,
    min_interactions: int = 5,
    split: Literal["loo", "timestamp", "official"] = "loo",
    benchmark: Path | None = None,
    category: str | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> tuple[Catalog, Interactions, dict]:
    items = metadata(meta)
    item_columns = ItemColumns(
        id="parent_asin",
        text=None,
        template=template,
        attributes=["main_category", "store", "leaf_category"],
        relations=["bought_together"],
    )
    if split == "official":
        return official_split(benchmark, category or category_of(reviews), items, item_columns, meta)
    table = read_jsonl(reviews, REVIEWS)
    if len(table) and table["user_id"].null_count == len(table):
        raise InputError(
            reviews, "no record has user_id", "pass the review file <Cat>.jsonl (not the meta file)"
        )
    stats: dict[str, int | str] = {
        "raw_reviews": len(table),
        "rating_zero_rows": int(pc.sum(pc.equal(table["rating"], 0.0)).as_py() or 0),
    }
    valid = pc.and_(
        pc.is_valid(table["user_id"]),
        pc.and_(pc.is_valid(table["parent_asin"]), pc.is_valid(table["timestamp"])),
    )
    stats["reviews_with_missing_fields"] = len(table) - int(pc.sum(valid).as_py() or 0)
    table = table.filter(valid)
    with_meta = pc.is_in(table["parent_asin"], value_set=items["parent_asin"]).to_numpy(zero_copy_only=False)
    stats["reviews_without_meta"] = int((~with_meta).sum())
    table = table.filter(pa.array(with_meta))
    if not len(table):
        raise InputError(
            reviews, "no review's parent_asin is in the metadata", "pass the meta file of the same category"
        )
    users, asins = Vocabulary(), Vocabulary()
    milliseconds = table["timestamp"].to_numpy()
    log = Log(
        users.encode(table["user_id"].combine_chunks()).astype(np.int64),
        asins.encode(table["parent_asin"].combine_chunks()).astype(np.int64),
        milliseconds.copy(),  # cleaned in ms, converted below
        np.array(users.values.to_pylist(), dtype=object),
        np.array(asins.values.to_pylist(), dtype=object),
        stats,
    )
    check_times(milliseconds // 1000, reviews, "milliseconds")
    kept = clean(log, min_interactions)
    user, item, user_names, item_names = dense_ids(log, kept)
    catalog, _ = build_catalog(item_names, items, item_columns, meta, stats)
    kept_ms = log.time[kept]
    given = None
    if split == "timestamp":
        given = np.where(
            kept_ms < TIMESTAMP_CUTS_MS[0], TRAIN, np.where(kept_ms < TIMESTAMP_CUTS_MS[1], DEV, TEST)
        ).astype(np.int8)
        order = np.lexsort(
            (np.arange(len(kept_ms)), kept_ms, user)
        )  # per user in time: the split keeps file order
        user, item, kept_ms, given = user[order], item[order], kept_ms[order], given[order]
        stats.update(
            {
                f"timestamp_split_{n}": int((given == s).sum())
                for n, s in (("train", TRAIN), ("dev", DEV), ("test", TEST))
            }
        )
    interactions = Interactions(
        user=user, item=item.astype(np.int32), time=kept_ms // 1000, split=given, user_source_ids=user_names
    )
    stats["split"] = split
    return catalog, interactions, stats


def metadata(meta: Path) -> pa.Table:
    """The meta file's fields the catalog uses, one row per parent_asin (the first), plus the
    leaf category."""
    table = read_jsonl(meta, META)
    if table["parent_asin"].null_count == len(table):
        raise InputError(meta, "no record has parent_asin", "pass the meta_<Cat>.jsonl file")
    _, first = np.unique(table["parent_asin"].to_numpy(zero_copy_only=False).astype(str), return_index=True)
    table = table.take(pa.array(np.sort(first)))
    categories = table["categories"].to_pylist()
    return table.append_column(
        "leaf_category", pa.array([c[-1] if c else "" for c in categories], pa.string())
    )


def category_of(reviews: Path | None) -> str:
    if reviews is None:
        raise InputError("command line", "no category", "pass --name <Cat> with --benchmark")
    return Path(reviews).name.split(".")[0]


def official_split(
    benchmark: Path | None, category: str, items: pa.Table, item_columns: ItemColumns, meta: Path
) -> tuple[Catalog, Interactions, dict]:
    if benchmark is None:
        raise InputError(
            "command line", "--split official needs the published split files", "pass --benchmark DIR"
        )
    parts = []
    for split, name in ((TRAIN, "train"), (DEV, "valid"), (TEST, "test")):
        path = Path(benchmark) / f"{category}.{name}.csv"
        if not path.is_file():
            raise InputError(
                path, "missing", f"pass --benchmark DIR holding {category}.train/valid/test.csv (last_out)"
            )
        parts.append((split, path, read_official(path)))
    users, asins = Vocabulary(), Vocabulary()
    user = np.concatenate([users.encode(t["user_id"].combine_chunks()) for _, _, t in parts]).astype(np.int64)
    item = np.concatenate([asins.encode(t["parent_asin"].combine_chunks()) for _, _, t in parts]).astype(
        np.int64
    )
    milliseconds = np.concatenate([t["timestamp"].to_numpy() for _, _, t in parts])
    check_times(milliseconds // 1000, parts[0][1], "milliseconds")
    given = np.concatenate([np.full(len(t), s, dtype=np.int8) for s, _, t in parts])
    item_names = np.array(asins.values.to_pylist(), dtype=object)
    with_meta = pc.is_in(pa.array(item_names.tolist(), pa.string()), value_set=items["parent_asin"]).to_numpy(
        zero_copy_only=False
    )
    stats: dict[str, int | str] = {
        f"official_{n}_rows": len(t) for (_, _, t), n in zip(parts, ("train", "valid", "test"), strict=True)
    }
    stats["items_without_meta"] = int((~with_meta).sum())  # kept: the rows stay as published
    if (~with_meta).any():  # their text is their id
        extra = pa.table({"parent_asin": pa.array(item_names[~with_meta].tolist(), pa.string())})
        items = pa.concat_tables([items, extra], promote_options="default")
        items = items.set_column(
            items.column_names.index("title"), "title", pc.coalesce(items["title"], items["parent_asin"])
        )
    catalog, _ = build_catalog(item_names, items, item_columns, meta, stats)
    interactions = Interactions(
        user=user + 1,
        item=(item + 1).astype(np.int32),
        time=milliseconds // 1000,
        split=given,
        user_source_ids=np.array(users.values.to_pylist(), dtype=object),
    )
    stats["split"] = "official"
    return catalog, interactions, stats


def read_official(path: Path) -> pa.Table:
    """A last_out split file, with or without its header row; a ``history`` column is ignored."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    header = first.startswith("user_id")
    names = first.strip().split(",") if header else None
    if names is not None and names[:4] != OFFICIAL_COLUMNS:
        raise InputError(
            path, f"header {names}", f"expected {OFFICIAL_COLUMNS} (and optionally history)", line=1
        )
    if names is None:
        width = len(first.rstrip("\r\n").split(","))
        names = [*OFFICIAL_COLUMNS, "history"][:width]
    read = pacsv.ReadOptions(column_names=None if header else names)
    convert = pacsv.ConvertOptions(
        include_columns=OFFICIAL_COLUMNS,
        column_types={
            "user_id": pa.string(),
            "parent_asin": pa.string(),
            "timestamp": pa.int64(),
            "rating": pa.float64(),
        },
    )
    try:
        return pacsv.read_csv(path, read, pacsv.ParseOptions(), convert)
    except pa.ArrowInvalid as exc:
        raise bad_line(path, "csv", None, exc) from exc
