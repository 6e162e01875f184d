"""Items the model was never trained on, recommended without retraining (``recommend --new-items``).

A text-reading model (``model.item_representation: id+text | text``) has a vector for any item that
has a text: its language vector through the learned projection. ``add_new_items`` extends a loaded
run in memory (the run directory is not touched) with items given as JSON lines,

    {"id": "B0NEW1", "text": "Stapler, heavy duty", "attributes": {"brand": 12}}

and gives each what a cold item of a cold-start split has: no ID embedding (zeros), a zero bias,
its text encoded as the catalog's was (the frozen table's encoder, or the tuned encoder, on top of
its cached trunk when it has one), and the attribute value entities of the codes given (the
catalog's codes, its ``attr_NAME`` columns; a code the catalog does not have, or none, is no value).
Item-item relations of new items are not known. ID-only runs are refused: they have no vector for
an item they have not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lrd_dist.assembly import DatasetAndModel
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.json_lines import json_records
from lrd_dist.errors import InputError
from lrd_dist.models.relational import RelationalRecommender


@dataclass
class NewItem:
    source_id: str
    text: str
    attributes: dict[str, int] = field(default_factory=dict)


def read_new_items(path: Path, catalog: Catalog) -> list[NewItem]:
    """Validated items of a JSON-lines file: ids new to the catalog and to the file, non-empty
    texts, attribute codes of the catalog's attributes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file", 'pass JSON lines {"id": ..., "text": ...}')
    known = set(catalog.source_ids.to_pylist())
    items: list[NewItem] = []
    seen: dict[str, int] = {}
    for number, record in json_records(path, 'write one {"id": ..., "text": ...} per line'):
        items.append(_item(record, path, number, known, seen, catalog))
    if not items:
        raise InputError(path, "no items", 'write one {"id": ..., "text": ...} per line')
    return items


def _item(record, path: Path, line: int, known: set, seen: dict, catalog: Catalog) -> NewItem:
    if not isinstance(record, dict):
        raise InputError(path, "not a JSON object", 'write {"id": ..., "text": ...}', line=line)
    source_id, text = record.get("id"), record.get("text")
    if not isinstance(source_id, str | int) or isinstance(source_id, bool) or not str(source_id).strip():
        raise InputError(
            path, f"id {source_id!r} is not a non-empty string", "give each item an id", line=line
        )
    source_id = str(source_id)
    if source_id in known:
        raise InputError(
            path, f"id {source_id!r} is already in the catalog", "new items need ids of their own", line=line
        )
    if source_id in seen:
        raise InputError(
            path, f"id {source_id!r} repeats line {seen[source_id]}", "give each item once", line=line
        )
    seen[source_id] = line
    if not isinstance(text, str) or not text.strip():
        raise InputError(
            path, "no text", "give each new item a non-empty text: the model reads it", line=line
        )
    attributes = record.get("attributes", {})
    if not isinstance(attributes, dict):
        raise InputError(path, "attributes is not an object", 'write "attributes": {"name": code}', line=line)
    for name, code in attributes.items():
        if name not in catalog.attributes:
            raise InputError(
                path,
                f"attribute {name!r} is not one of the catalog's ({sorted(catalog.attributes)})",
                "name the catalog's attributes",
                line=line,
            )
        if not isinstance(code, int) or isinstance(code, bool) or code < 0:
            raise InputError(
                path,
                f"attribute {name}={code!r} is not a code",
                "give the catalog's integer codes",
                line=line,
            )
    return NewItem(source_id, text, dict(attributes))


def add_new_items(built: DatasetAndModel, items: list[NewItem]) -> int:
    """Extend the loaded model and its catalog with ``items`` (ids num_items+1..); returns how many
    items there now are."""
    model = built.model
    if not model.reads_text or model.item_text is None:
        raise InputError(
            "--new-items",
            "this run reads items by their ID only "
            f"(model.item_representation={built.config.model.item_representation})",
            "train with model.item_representation=id+text or text to rank items it has not seen",
        )
    count = built.catalog.num_items
    model.id_items = count
    text_encoder: Any = model.item_text  # a frozen table or a live encoder: both extend
    with torch.no_grad():
        text_encoder.extend([item.text for item in items])
    if isinstance(model.backbone, RelationalRecommender):
        values = np.stack([built.graph.value_entities(item.attributes) for item in items])
        model.backbone.add_items(torch.from_numpy(values))
    catalog = built.catalog
    attributes = {
        name: np.concatenate([codes, [item.attributes.get(name, 0) for item in items]])
        for name, codes in catalog.attributes.items()
    }
    built.catalog = Catalog(
        source_ids=pa.concat_arrays(
            [catalog.source_ids, pa.array([i.source_id for i in items], pa.string())]
        ),
        texts=pa.concat_arrays([catalog.texts, pa.array([i.text for i in items], pa.string())]),
        attributes=attributes,
        relations={
            name: pa.concat_arrays([lists, pa.array([[]] * len(items), lists.type)])
            for name, lists in catalog.relations.items()
        },
    )
    return count + len(items)
