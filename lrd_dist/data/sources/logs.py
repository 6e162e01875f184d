"""Interaction logs and item tables in the formats people keep them: CSV/TSV, Parquet, JSON lines
(optionally gzipped), or a Hugging Face ``datasets`` table. Shared by ``--source table``, ``hf``
and ``amazon2023``.

Logs are read in chunks: user and item ids become integer codes against vocabularies that grow
chunk by chunk, so a 10M-row log holds three integer columns in memory, not its strings. Times
become seconds: numbers in seconds or milliseconds (``time_unit``, or detected from their
magnitude and reported), or ISO dates. Every rule that drops a row is counted in the stats that
land in the manifest.
"""

from __future__ import annotations

import gzip
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.sources.common import ids_by_first_appearance, k_core
from lrd_dist.errors import InputError

TimeUnit = Literal["auto", "s", "ms", "iso"]
YEAR_SECONDS = 365 * 86_400


@dataclass
class LogColumns:
    """Which columns of a log are the user, the item and the time."""

    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    time_unit: TimeUnit = "auto"


@dataclass
class ItemColumns:
    """Which columns of an item table are the id, the text, attributes and item-item relations."""

    id: str = "item_id"
    text: str | None = "text"
    template: str | None = None  # "{title} by {brand}": any columns; lists joined by ", "
    attributes: list[str] = field(default_factory=list)
    relations: list[str] = field(default_factory=list)


@dataclass
class Log:
    """A log as integer codes: ``user[i]`` indexes ``user_names``, ``item[i]`` ``item_names``."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray  # seconds
    user_names: np.ndarray
    item_names: np.ndarray
    stats: dict


# ---- reading files ------------------------------------------------------------------------------
def kind_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in (
        (".parquet", "parquet"),
        (".csv", "csv"),
        (".tsv", "tsv"),
        (".jsonl", "json"),
        (".json", "json"),
    ):
        if name.endswith(suffix):
            return kind
    raise InputError(path, "unknown file type", "use .csv, .tsv, .parquet, .jsonl or .json (optionally .gz)")


def batches(path: Path, columns: list[str] | None, chunk_rows: int = 1 << 20) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns`` (None: all) of a CSV/TSV/Parquet/JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file", "check the path")
    kind = kind_of(path)
    try:
        if kind == "parquet":
            handle = pq.ParquetFile(path)
            missing = [c for c in columns or [] if c not in handle.schema_arrow.names]
            if missing:
                raise InputError(
                    path,
                    f"no column(s) {missing}; it has {handle.schema_arrow.names}",
                    "name existing columns",
                )
            yield from handle.iter_batches(batch_size=chunk_rows, columns=columns)
        elif kind in ("csv", "tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            convert = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=True)
            reader = pacsv.open_csv(path, pacsv.ReadOptions(block_size=1 << 24), parse, convert)
            yield from reader
        else:
            stream = pa.input_stream(str(path), compression="gzip" if path.name.endswith(".gz") else None)
            table = pajson.read_json(stream, pajson.ReadOptions(block_size=1 << 24))
            missing = [c for c in columns or [] if c not in table.column_names]
            if missing:
                raise InputError(
                    path, f"no field(s) {missing}; records have {table.column_names}", "name existing fields"
                )
            yield from (table.select(columns) if columns else table).to_batches(chunk_rows)
    except pa.ArrowInvalid as exc:
        raise bad_line(path, kind, columns, exc) from exc
    except KeyError as exc:  # a CSV without an included column
        raise InputError(
            path, f"no column {exc}", "name an existing column (see the header)", line=1
        ) from exc


def bad_line(path: Path, kind: str, columns: list[str] | None, cause: Exception) -> InputError:
    """After pyarrow refused a file: find its first bad line for the message."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        if kind == "json":
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    return InputError(
                        path, f"not JSON ({exc.msg})", "repair or remove this line", line=number
                    )
                if not isinstance(record, dict):
                    return InputError(path, "not a JSON object", "write one object per line", line=number)
        elif kind in ("csv", "tsv"):
            delimiter = "\t" if kind == "tsv" else ","
            header = handle.readline().rstrip("\r\n").split(delimiter)
            for number, line in enumerate(handle, start=2):
                fields = line.rstrip("\r\n").split(delimiter)
                if '"' not in line and len(fields) != len(header):
                    return InputError(
                        path,
                        f"{len(fields)} fields where the header has {len(header)}",
                        "repair this line",
                        line=number,
                    )
    return InputError(path, f"cannot parse it ({str(cause).splitlines()[0]})", "check its format")


def read_items(path: Path) -> pa.Table:
    return pa.Table.from_batches(list(batches(path, None)))


# ---- logs -----------------------------------------------------------------------------------------
class Vocabulary:
    """Distinct string ids in order of first sight; codes of new values appended chunk by chunk."""

    def __init__(self) -> None:
        self.values = pa.array([], pa.string())

    def encode(self, column: pa.Array) -> np.ndarray:
        column = column.cast(pa.string())
        fresh = pc.unique(column)
        fresh = pc.filter(fresh, pc.invert(pc.is_in(fresh, value_set=self.values)))
        if len(fresh):
            self.values = pa.concat_arrays([self.values, fresh.drop_null()])
        return pc.index_in(column, value_set=self.values).to_numpy(zero_copy_only=False)


def to_seconds(column: pa.Array, unit: TimeUnit, where: Path) -> tuple[np.ndarray, str]:
    """Times as int64 seconds, and the unit they were read in."""
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64()).to_numpy(
            zero_copy_only=False
        ), "timestamp"
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or unit == "iso":
        try:
            parsed = pc.cast(column.cast(pa.string()), pa.timestamp("s"))
        except pa.ArrowInvalid as exc:
            raise InputError(
                where,
                f"times that are not numbers or ISO dates ({str(exc)[:80]})",
                "pass --time-unit s|ms or ISO dates",
            ) from exc
        return pc.cast(parsed, pa.int64()).to_numpy(zero_copy_only=False), "iso"
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    if unit == "auto":
        largest = np.nanmax(np.abs(values)) if len(values) else 0
        unit = "ms" if largest >= 1e11 else "s"  # 1e11 s is the year 5138; 1e11 ms is 1973
    scale = 1000 if unit == "ms" else 1
    return np.floor_divide(values, scale).astype(np.int64), unit


def read_log(path: Path, columns: LogColumns, chunk_rows: int = 1 << 20) -> Log:
    return log_of_batches(
        batches(path, [columns.user, columns.item, columns.time], chunk_rows), columns, path
    )


def log_of_batches(chunks, columns: LogColumns, path: Path | str) -> Log:
    """A ``Log`` from record batches holding the user, item and time columns."""
    users, items = Vocabulary(), Vocabulary()
    user_codes, item_codes, times = [], [], []
    unit: str = columns.time_unit
    nulls = 0
    for batch in chunks:
        table = pa.Table.from_batches([batch])
        valid = pc.and_(
            pc.and_(pc.is_valid(table[columns.user]), pc.is_valid(table[columns.item])),
            pc.is_valid(table[columns.time]),
        )
        nulls += len(table) - pc.sum(valid).as_py() if len(table) else 0
        table = table.filter(valid)
        user_codes.append(users.encode(table[columns.user].combine_chunks()))
        item_codes.append(items.encode(table[columns.item].combine_chunks()))
        seconds, unit = to_seconds(
            table[columns.time].combine_chunks(),
            cast(TimeUnit, unit if unit != "timestamp" else "auto"),
            Path(path),
        )
        times.append(seconds)
    if not user_codes or not sum(len(c) for c in user_codes):
        raise InputError(path, "no interactions", "check the file and the column names")
    time = np.concatenate(times)
    check_times(time, Path(path), unit)
    return Log(
        np.concatenate(user_codes).astype(np.int64),
        np.concatenate(item_codes).astype(np.int64),
        time,
        np.array(users.values.to_pylist(), dtype=object),
        np.array(items.values.to_pylist(), dtype=object),
        {"rows": len(time) + nulls, "rows_with_missing_fields": int(nulls), "time_unit": str(unit)},
    )


def check_times(seconds: np.ndarray, path: Path, unit: str) -> None:
    latest = int(seconds.max()) if len(seconds) else 0
    if latest < YEAR_SECONDS:
        raise InputError(
            path,
            f"every time falls in 1970 (the latest is {latest} s after the epoch, read as {unit})",
            "the unit is probably wrong: pass --time-unit s or ms (or write ISO dates)",
        )


def clean(log: Log, min_interactions: int, dedupe: bool = True) -> np.ndarray:
    """Mask of the rows kept: no negative time, the earliest of duplicate (user, item) rows,
    the k-core. Counts land in ``log.stats``."""
    keep = log.time >= 0
    log.stats["rows_with_negative_time"] = int((~keep).sum())
    if dedupe:
        rows = np.flatnonzero(keep)
        order = rows[np.lexsort((rows, log.time[rows], log.item[rows], log.user[rows]))]
        pairs = log.user[order] * (len(log.item_names) + 1) + log.item[order]
        first = np.r_[True, pairs[1:] != pairs[:-1]]
        duplicate = np.zeros(len(keep), dtype=bool)
        duplicate[order[~first]] = True
        log.stats["duplicate_user_item_rows"] = int(duplicate.sum())
        keep &= ~duplicate
    before = int(keep.sum())
    if min_interactions > 1:
        keep[keep] = k_core(log.user[keep], log.item[keep], min_interactions)
    log.stats[f"rows_dropped_by_{min_interactions}_core"] = before - int(keep.sum())
    log.stats["rows_kept"] = int(keep.sum())
    if not keep.any():
        raise InputError(
            "interactions",
            f"no rows left after the {min_interactions}-core filter",
            "lower --min-interactions",
        )
    return keep


def dense_ids(log: Log, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, item ids) from 1 by first appearance in time, and the source ids of each."""
    user, user_original = ids_by_first_appearance(log.user[keep], log.time[keep])
    item, item_original = ids_by_first_appearance(log.item[keep], log.time[keep])
    return user, item, log.user_names[user_original], log.item_names[item_original]


# ---- item tables ----------------------------------------------------------------------------------
def render_texts(table: pa.Table, template: str, where: Path) -> list[str]:
    """``template`` over each row's columns (lists joined by ", ", missing values empty),
    whitespace collapsed and empty separators dropped."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    unknown = [f for f in fields if f not in table.column_names]
    if unknown:
        raise InputError(
            where,
            f"the text template names {unknown}, not columns of the item table",
            f"use {table.column_names}",
        )
    columns = {name: table[name].to_pylist() for name in fields}
    out = []
    for row in range(len(table)):
        values = {name: as_text(columns[name][row]) for name in fields}
        text = template.format_map(values)
        text = re.sub(
            r"(\s*[|;,]\s*)+$", "", re.sub(r"^(\s*[|;,]\s*)+", "", re.sub(r"(\s*\|\s*)+", " | ", text))
        )
        out.append(re.sub(r"\s+", " ", text).strip())
    return out


def as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(as_text(v) for v in value if v not in (None, ""))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {as_text(v)}" for k, v in value.items() if v not in (None, ""))
    return str(value).strip()


def build_catalog(
    item_names: np.ndarray, table: pa.Table, columns: ItemColumns, where: Path, stats: dict
) -> tuple[Catalog, np.ndarray]:
    """The catalog of ``item_names`` (dense ids 1..n in that order) from the item table; returns it
    and the mask of ``item_names`` that have a row in the table."""
    if columns.id not in table.column_names:
        raise InputError(
            where, f"no column {columns.id!r}; it has {table.column_names}", "pass --item-id-column"
        )
    ids = table[columns.id].cast(pa.string()).to_pylist()
    row_of: dict[str, int] = {}
    for row, value in enumerate(ids):
        row_of.setdefault(value, row)
    stats["item_table_duplicate_ids"] = len(ids) - len(row_of)
    rows = np.array([row_of.get(str(name), -1) for name in item_names.tolist()])
    found = rows >= 0
    if not found.any():
        example = item_names[0] if len(item_names) else "?"
        raise InputError(
            where,
            f"no item of the log has a row here (the log's item {example!r}; the table's ids: {ids[:3]})",
            "point --items at the item table of this log, or name its id column with --item-id-column",
        )
    picked = table.take(pa.array(rows[found]))
    if columns.template:
        texts = render_texts(picked, columns.template, where)
    elif columns.text and columns.text in picked.column_names:
        texts = [as_text(v) for v in picked[columns.text].to_pylist()]
    else:
        raise InputError(where, f"no text column {columns.text!r}", "pass --text-column or --text-template")
    kept_names = item_names[found]
    id_of = {str(name): i + 1 for i, name in enumerate(kept_names.tolist())}
    attributes = {}
    for name in columns.attributes:
        if name not in picked.column_names:
            raise InputError(where, f"no attribute column {name!r}", f"use columns of {picked.column_names}")
        values = [as_text(v) for v in picked[name].to_pylist()]
        vocabulary = {v: i + 1 for i, v in enumerate(sorted(set(values) - {""}))}
        attributes[re.sub(r"\W", "_", name).lower()] = np.array(
            [vocabulary.get(v, 0) for v in values], dtype=np.int64
        )
    relations = {}
    for name in columns.relations:
        if name not in picked.column_names:
            raise InputError(where, f"no relation column {name!r}", f"use columns of {picked.column_names}")
        lists = []
        for own, value in zip(kept_names.tolist(), picked[name].to_pylist(), strict=True):
            related = value if isinstance(value, list) else re.split(r"[\s,;]+", value or "")
            lists.append(sorted({id_of[str(r)] for r in related if str(r) in id_of} - {id_of[str(own)]}))
        relations[re.sub(r"\W", "_", name).lower()] = pa.array(lists, type=pa.list_(pa.int32()))
    stats["items"] = len(kept_names)
    catalog = Catalog(
        source_ids=pa.array([str(n) for n in kept_names.tolist()]),
        texts=pa.array(texts),
        attributes=attributes,
        relations=relations,
    )
    return catalog, found


def log_to_dataset(
    log: Log, items: pa.Table, item_columns: ItemColumns, items_path: Path, min_interactions: int
):
    """(catalog, interactions, stats) of a log and its item table: rows whose item has no row in
    the table are dropped (counted), then the cleaning rules, then dense ids by first appearance."""
    from lrd_dist.data.sequences import Interactions

    if item_columns.id not in items.column_names:
        raise InputError(
            items_path, f"no column {item_columns.id!r}; it has {items.column_names}", "pass --item-id-column"
        )
    listed = pc.is_in(
        pa.array(log.item_names.tolist(), pa.string()), value_set=items[item_columns.id].cast(pa.string())
    )
    listed = listed.to_numpy(zero_copy_only=False)
    if not listed.any():
        raise InputError(
            items_path,
            f"no item of the log has a row here (the log's items look like {log.item_names[:3].tolist()}, "
            f"the table's {items[item_columns.id].cast(pa.string())[:3].to_pylist()})",
            "point --items at the item table of this log, or name its id column with --item-id-column",
        )
    in_table = listed[log.item]
    log.stats["rows_without_item_row"] = int((~in_table).sum())
    subset = Log(
        log.user[in_table], log.item[in_table], log.time[in_table], log.user_names, log.item_names, log.stats
    )
    kept = clean(subset, min_interactions)
    user, item, user_names, item_names = dense_ids(subset, kept)
    catalog, _ = build_catalog(item_names, items, item_columns, items_path, log.stats)
    interactions = Interactions(
        user=user, item=item.astype(np.int32), time=subset.time[kept], user_source_ids=user_names
    )
    return catalog, interactions, log.stats


def hf_table(source: str, split: str = "train", data_files: list[str] | None = None) -> pa.Table:
    """A Hugging Face dataset as an Arrow table: a directory written by ``save_to_disk``, a local
    builder (``parquet``, ``json``, ``csv`` with ``data_files``) or a hub id (needs the network)."""
    import datasets

    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise InputError(source, f"no split {split!r}; it has {list(loaded)}", "pass --hf-split")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(source, data_files=data_files, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise InputError(
            source,
            f"cannot load the dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "pass a save_to_disk directory, a builder (parquet, json, csv) with --hf-data-files, or a hub id",
        ) from exc
    return (
        loaded.data.table.combine_chunks()
        if hasattr(loaded.data, "table")
        else loaded.with_format("arrow")[:]
    )


def items_table(source: Path) -> pa.Table:
    """An item table from a file, or from a ``save_to_disk`` directory."""
    return hf_table(str(source)) if Path(source).is_dir() else read_items(Path(source))


def load_table_source(
    interactions: Path | pa.Table,
    items: Path,
    log_columns: LogColumns,
    item_columns: ItemColumns,
    min_interactions: int,
    where: str | Path,
):
    """``--source table`` (a file) and ``--source hf`` (an Arrow table): (catalog, interactions, stats)."""
    fields = [log_columns.user, log_columns.item, log_columns.time]
    if isinstance(interactions, pa.Table):
        missing = [f for f in fields if f not in interactions.column_names]
        if missing:
            raise InputError(
                where,
                f"no column(s) {missing}; it has {interactions.column_names}",
                "name columns with --user-column etc.",
            )
        log = log_of_batches(interactions.select(fields).to_batches(1 << 20), log_columns, where)
    else:
        log = read_log(Path(interactions), log_columns)
    return log_to_dataset(log, items_table(items), item_columns, Path(items), min_interactions)
