"""The item catalog: one row per item with its text, discrete attributes and item-item relations.

Item ids are dense, 1..num_items, in row order (0 is the padding id everywhere). Stored as Parquet so
that a catalog of millions of items is read column-wise without a Python object per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lrd_dist.errors import InputError


@dataclass
class Catalog:
    """Items 1..n. ``attributes[name]`` holds an id per item (0 = missing); ``relations[name]``
    holds, per item, the list of related item ids."""

    source_ids: pa.Array  # string, the id in the source data (ASIN, movie id)
    texts: pa.Array  # string
    attributes: dict[str, np.ndarray]
    relations: dict[str, pa.ListArray]

    @property
    def num_items(self) -> int:
        return len(self.texts)

    def to_table(self) -> pa.Table:
        columns = {
            "item_id": pa.array(np.arange(1, self.num_items + 1, dtype=np.int32)),
            "source_id": self.source_ids,
            "text": self.texts,
        }
        columns.update({f"attr_{k}": pa.array(v.astype(np.int32)) for k, v in self.attributes.items()})
        columns.update({f"rel_{k}": v.cast(pa.list_(pa.int32())) for k, v in self.relations.items()})
        return pa.table(columns)

    def write(self, path: Path) -> None:
        pq.write_table(self.to_table(), path)

    @classmethod
    def read(cls, path: str | Path) -> Catalog:
        path = Path(path)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(path, f"cannot read the catalog ({exc})", "re-run the preparation") from exc
        ids = table.column("item_id").to_numpy()
        if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
            raise InputError(path, "item ids are not 1..n in order", "re-run the preparation")
        return cls(
            source_ids=table.column("source_id").combine_chunks(),
            texts=table.column("text").combine_chunks(),
            attributes={
                name[5:]: table.column(name).to_numpy()
                for name in table.column_names
                if name.startswith("attr_")
            },
            relations={
                name[4:]: table.column(name).combine_chunks()
                for name in table.column_names
                if name.startswith("rel_")
            },
        )

    def num_relation_pairs(self) -> dict[str, int]:
        return {name: int(pc.sum(pc.list_value_length(v)).as_py() or 0) for name, v in self.relations.items()}


def check_texts(texts: pa.Array, path: Path, first_line: int = 1) -> None:
    """Refuse empty or whitespace-only item texts, naming the first offending line."""
    stripped = pc.utf8_trim_whitespace(texts)
    empty = pc.fill_null(pc.equal(pc.utf8_length(stripped), 0), True)
    bad = np.flatnonzero(empty.to_numpy(zero_copy_only=False))
    if len(bad):
        raise InputError(
            path,
            f"empty item text ({len(bad)} item(s) in all)",
            "give every item a non-empty text",
            line=int(bad[0]) + first_line,
        )


def read_cold_items(directory: Path) -> np.ndarray:
    """The ids of the items a cold-start split held out of training (empty for a plain split)."""
    from lrd_dist.data.format import COLD_ITEMS

    path = Path(directory) / COLD_ITEMS
    if not path.is_file():
        return np.zeros(0, dtype=np.int64)
    return pq.read_table(path).column("item_id").to_numpy().astype(np.int64)
