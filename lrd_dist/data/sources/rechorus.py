"""The ReChorus/LRD layout: train/dev/test csv, item_meta.csv, <name>.text and <name>.item2index.

The split and the dev/test candidate lists are the source's own and are kept as given (the shipped
Office lists were drawn with replacement; the manifest counts the rows that repeat a negative).
Histories follow ReChorus: per user, train rows in file order, then the dev row, then the test row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lrd_dist.data.catalog import Catalog, check_texts
from lrd_dist.data.sequences import DEV, TEST, TRAIN, Interactions
from lrd_dist.data.sources.tabular import (
    check_id_range,
    parse_id_lists,
    read_delimited,
    require_file,
)
from lrd_dist.errors import InputError

ID_COLUMNS = {"user_id": pa.int64(), "item_id": pa.int64(), "time": pa.int64()}


def _refuse_duplicates(
    values: np.ndarray, labels: pa.Array | np.ndarray, path: Path, first_line: int
) -> None:
    """Refuse the first value that already occurred earlier, naming its line."""
    _, first = np.unique(values, return_index=True)
    repeated = np.ones(len(values), dtype=bool)
    repeated[first] = False
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise InputError(
            path, f"id {labels[row]} appears twice", "keep one line per item", line=row + first_line
        )


def _read_meta(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, pa.ListArray]]:
    with open(path, "rb") as handle:
        header = handle.readline().decode("utf8", errors="replace").rstrip("\r\n").split("\t")
    if "item_id" not in header:
        raise InputError(path, f"no item_id column in the header {header}", "add an item_id column", line=1)
    attributes = [c for c in header if c.startswith("i_")]
    relations = [c for c in header if c.startswith("r_")]
    types = (
        {"item_id": pa.int64()} | {c: pa.int64() for c in attributes} | {c: pa.string() for c in relations}
    )
    table = read_delimited(path, types)
    ids = table.column("item_id").to_numpy()
    _refuse_duplicates(ids, ids, path, 2)
    check_id_range(ids, 1, np.iinfo(np.int32).max, path, "item id", "ids start at 1", 2)
    attrs = {c[2:]: table.column(c).to_numpy() for c in attributes}
    rels = {c[2:]: parse_id_lists(table.column(c), path, c, 2) for c in relations}
    return ids, attrs, rels


def _read_texts(directory: Path, name: str | None) -> tuple[Path, pa.Table] | None:
    candidates = [directory / f"{name}.text"] if name else sorted(directory.glob("*.text"))
    if not candidates or not candidates[0].is_file():
        if name:
            require_file(directory / f"{name}.text", "item text file")
        return None
    if len(candidates) > 1:
        raise InputError(directory, f"several text files {[c.name for c in candidates]}", "pass --name")
    text_path = candidates[0]
    texts = read_delimited(text_path, {"id": pa.string(), "text": pa.string()})
    index_path = require_file(text_path.with_suffix(".item2index"), "item2index file (ASIN<TAB>item_id)")
    index = read_delimited(
        index_path,
        {"source_id": pa.string(), "item_id": pa.int64()},
        header=False,
        column_names=["source_id", "item_id"],
    )
    for table, path, column, first in ((texts, text_path, "id", 2), (index, index_path, "source_id", 1)):
        keys = table.column(column).combine_chunks()
        _refuse_duplicates(pc.dictionary_encode(keys).indices.to_numpy(), keys, path, first)
    item_ids = index.column("item_id").to_numpy()
    _refuse_duplicates(item_ids, item_ids, index_path, 1)
    position = pc.fill_null(pc.index_in(texts.column("id"), value_set=index.column("source_id")), -1)
    position = position.to_numpy()
    unknown = np.flatnonzero(position < 0)
    if len(unknown):
        raise InputError(
            text_path,
            f"id {texts.column('id')[int(unknown[0])]} has no entry in {index_path.name}",
            f"add it to {index_path.name} or remove the line",
            line=int(unknown[0]) + 2,
        )
    check_texts(texts.column("text").combine_chunks(), text_path, first_line=2)
    return text_path, pa.table(
        {"item_id": item_ids[position], "source_id": texts.column("id"), "text": texts.column("text")}
    )


def _read_eval(path: Path) -> tuple[pa.Table, np.ndarray]:
    table = read_delimited(path, ID_COLUMNS | {"neg_items": pa.string()})
    if not len(table):  # no users to select on or to report: refused here, not after an epoch
        raise InputError(path, "has no rows: this split would be empty", "give it one row per user", line=2)
    negatives = parse_id_lists(table.column("neg_items"), path, "neg_items", 2)
    lengths = pc.list_value_length(negatives).to_numpy()
    wrong = np.flatnonzero(lengths != lengths[0]) if len(lengths) else np.zeros(0, dtype=np.int64)
    if len(wrong):
        raise InputError(
            path,
            f"neg_items has {lengths[wrong[0]]} ids where line 2 has {lengths[0]}",
            "give every row the same number of negatives",
            line=int(wrong[0]) + 2,
        )
    matrix = pc.list_flatten(negatives).to_numpy().reshape(len(table), -1).astype(np.int32)
    return table, matrix


def load_rechorus(directory: Path, name: str | None = None) -> tuple[Catalog, Interactions, dict]:
    directory = Path(directory)
    train = read_delimited(require_file(directory / "train.csv", "train.csv"), ID_COLUMNS)
    dev, dev_neg = _read_eval(require_file(directory / "dev.csv", "dev.csv"))
    test, test_neg = _read_eval(require_file(directory / "test.csv", "test.csv"))

    meta_path = directory / "item_meta.csv"
    meta_ids, attributes, relations = (
        _read_meta(meta_path) if meta_path.is_file() else (np.zeros(0, np.int64), {}, {})
    )
    texts = _read_texts(directory, name)
    train_items = train.column("item_id").to_numpy()
    check_id_range(
        train_items, 1, np.iinfo(np.int32).max, directory / "train.csv", "item id", "ids start at 1", 2
    )
    known = [meta_ids, train_items] + ([texts[1].column("item_id").to_numpy()] if texts else [])
    num_items = int(max(int(k.max()) for k in known if len(k)))
    if meta_path.is_file():
        # item_meta is the catalog when present; items only in train.csv would have no attributes
        num_items = max(num_items, int(meta_ids.max()))

    for path, table, negs in (
        (directory / "dev.csv", dev, dev_neg),
        (directory / "test.csv", test, test_neg),
    ):
        fix = "every dev/test item must be a catalog item (train.csv, item_meta.csv or the text file)"
        check_id_range(table.column("item_id").to_numpy(), 1, num_items, path, "item id", fix, 2)
        rows = np.repeat(np.arange(len(table)), negs.shape[1])
        check_id_range(negs.ravel(), 1, num_items, path, "negative item id", fix, 2, row_of=rows)
    for rel_name, lists in relations.items():
        flat = pc.list_flatten(lists).to_numpy()
        owner = np.repeat(np.arange(len(lists)), pc.list_value_length(lists).to_numpy())
        check_id_range(
            flat,
            1,
            num_items,
            meta_path,
            f"r_{rel_name} item id",
            "refer to catalog items only",
            2,
            row_of=owner,
        )

    # Scatter meta rows (in file order) into dense catalog order.
    catalog_attributes = {}
    for attr, values in attributes.items():
        dense = np.zeros(num_items, dtype=np.int64)
        dense[meta_ids - 1] = values
        catalog_attributes[attr] = dense
    catalog_relations = {}
    for rel_name, lists in relations.items():
        slot = np.full(num_items, -1, dtype=np.int64)
        slot[meta_ids - 1] = np.arange(len(meta_ids))
        present = slot >= 0
        taken = lists.take(pa.array(np.where(present, slot, 0)))
        catalog_relations[rel_name] = pc.if_else(
            pa.array(present), taken, pa.scalar([], pa.list_(pa.int32()))
        )
    if texts is not None:
        text_path, text_table = texts
        item_of_text = text_table.column("item_id").to_numpy()
        order = np.full(num_items, -1, dtype=np.int64)
        check_id_range(item_of_text, 1, num_items, text_path, "item id", "fix the item2index file", 2)
        order[item_of_text - 1] = np.arange(len(item_of_text))
        missing = np.flatnonzero(order < 0)
        if len(missing):
            raise InputError(
                text_path,
                f"item {int(missing[0]) + 1} has no text ({len(missing)} items in all)",
                "add a line for every catalog item",
            )
        source_ids = text_table.column("source_id").take(pa.array(order))
        item_texts = text_table.column("text").take(pa.array(order))
    else:
        source_ids = pa.array([str(i) for i in range(1, num_items + 1)])
        item_texts = pa.array([f"item {i}" for i in range(1, num_items + 1)])
    catalog = Catalog(
        source_ids=source_ids.combine_chunks() if isinstance(source_ids, pa.ChunkedArray) else source_ids,
        texts=item_texts.combine_chunks() if isinstance(item_texts, pa.ChunkedArray) else item_texts,
        attributes=catalog_attributes,
        relations=catalog_relations,
    )

    parts = [(train, TRAIN), (dev, DEV), (test, TEST)]
    interactions = Interactions(
        user=np.concatenate([t.column("user_id").to_numpy() for t, _ in parts]),
        item=np.concatenate([t.column("item_id").to_numpy() for t, _ in parts]).astype(np.int32),
        time=np.concatenate([t.column("time").to_numpy() for t, _ in parts]),
        split=np.concatenate([np.full(len(t), s, dtype=np.int8) for t, s in parts]),
        negatives={DEV: dev_neg, TEST: test_neg},
        negative_row=np.concatenate([np.full(len(train), -1), np.arange(len(dev)), np.arange(len(test))]),
    )
    stats = {"has_text": texts is not None}
    return catalog, interactions, stats
