"""Amazon review dumps: 2014 (``reviews_<Cat>_5.json.gz`` + ``meta_<Cat>.json.gz``, meta as Python
literals) and 2018 (JSON lines for both), as the LRD authors built Office and Electronics.

Reviews are read column-wise by pyarrow; meta lines are parsed one at a time (with ``json`` or, for
2014, ``ast.literal_eval``, which evaluates no code) but only for items that occur in the reviews.
Item text: the title cut to 32 words, HTML-unescaped, quotes and newlines removed, then the leaf
category and the brand. Attributes: ``category`` (leaf category) and ``brand``. Relations:
``complement`` from also_bought + bought_together (2018: also_buy) and ``substitute`` from
also_viewed (2018: also_view), restricted to catalog items.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.sequences import Interactions
from lrd_dist.data.sources.common import dedupe, ids_by_first_appearance, k_core
from lrd_dist.data.sources.tabular import require_file
from lrd_dist.errors import InputError

REVIEW_SCHEMA = pa.schema(
    [("reviewerID", pa.string()), ("asin", pa.string()), ("unixReviewTime", pa.int64())]
)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_reviews(path: Path) -> pa.Table:
    require_file(path, "review file")
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            table = pajson.read_json(
                stream,
                parse_options=pajson.ParseOptions(
                    explicit_schema=REVIEW_SCHEMA, unexpected_field_behavior="ignore"
                ),
            )
    except (pa.ArrowInvalid, OSError) as exc:
        _raise_bad_review_line(path, exc)
    for column in REVIEW_SCHEMA.names:
        nulls = np.flatnonzero(table.column(column).is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            raise InputError(
                path,
                f"record without {column!r}",
                "give every review reviewerID, asin and unixReviewTime",
                line=int(nulls[0]) + 1,
            )
    return table


def _raise_bad_review_line(path: Path, cause: Exception) -> None:
    with _open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or not isinstance(record.get("unixReviewTime", 0), int):
                    raise ValueError("not a review object with an integer unixReviewTime")
            except (ValueError, UnicodeDecodeError) as exc:
                raise InputError(
                    path, f"not a JSON review record ({exc})", "repair or remove the line", line=number
                ) from cause
    raise InputError(path, f"cannot read the reviews ({cause})", "check the file is a review dump") from cause


def _parse_meta_line(raw: bytes) -> dict:
    text = raw.decode("utf8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)  # 2014 dumps are Python literals; literal_eval runs no code


def _leaf_category(record: dict) -> str:
    paths = record.get("categories")  # 2014: list of category paths
    if paths and isinstance(paths[0], list) and paths[0]:
        return str(paths[0][-1])
    path = record.get("category")  # 2018: one path
    return str(path[-1]) if path else ""


def _clean_title(title: str) -> str:
    words = html.unescape(title).replace('"', "").replace("'", "").replace("\n", " ").split()
    return " ".join(words[:32])


def _read_meta(path: Path, wanted: set[str]) -> dict[str, dict]:
    require_file(path, "meta file")
    meta: dict[str, dict] = {}
    with _open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = _parse_meta_line(raw)
                asin = record["asin"]
            except (ValueError, SyntaxError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise InputError(
                    path,
                    f"not a meta record ({type(exc).__name__}: {exc})",
                    "repair or remove the line",
                    line=number,
                ) from exc
            if asin not in wanted:
                continue
            if asin in meta:
                raise InputError(
                    path, f"item {asin} appears twice", "keep one meta record per item", line=number
                )
            related = record.get("related") or {}
            meta[asin] = {
                "title": _clean_title(str(record.get("title") or "")),
                "category": _leaf_category(record),
                "brand": str(record.get("brand") or "").strip(),
                "complement": list(related.get("also_bought", []))
                + list(related.get("bought_together", []))
                + list(record.get("also_buy", [])),
                "substitute": list(related.get("also_viewed", [])) + list(record.get("also_view", [])),
            }
    return meta


def load_amazon(
    reviews: Path, meta_path: Path, min_interactions: int = 5
) -> tuple[Catalog, Interactions, dict]:
    table = _read_reviews(Path(reviews))
    user_raw = table.column("reviewerID").to_numpy(zero_copy_only=False)
    item_raw = table.column("asin").to_numpy(zero_copy_only=False)
    time = table.column("unixReviewTime").to_numpy()
    meta = _read_meta(Path(meta_path), set(np.unique(item_raw).tolist()))
    has_text = np.array(
        [
            bool(meta.get(a) and " ".join([meta[a]["title"], meta[a]["category"], meta[a]["brand"]]).strip())
            for a in item_raw
        ]
    )
    user_names, user_codes = np.unique(user_raw, return_inverse=True)
    _, item_codes = np.unique(item_raw, return_inverse=True)
    keep = has_text & dedupe(user_codes, item_codes, time)
    keep[keep] = k_core(user_codes[keep], item_codes[keep], min_interactions)
    if not keep.any():
        raise InputError(
            reviews,
            f"no interactions left after the {min_interactions}-core filter",
            "lower --min-interactions or use a larger dump",
        )
    time = time[keep]
    user, user_original = ids_by_first_appearance(user_codes[keep], time)
    item, item_original = ids_by_first_appearance(item_codes[keep], time)
    asins = np.unique(item_raw)[item_original]
    id_of = {a: i + 1 for i, a in enumerate(asins.tolist())}

    records = [meta[a] for a in asins.tolist()]
    texts = [" ".join(p for p in (r["title"], r["category"], r["brand"]) if p) for r in records]
    attributes = {}
    for name in ("category", "brand"):
        values = [r[name] for r in records]
        vocabulary = {v: i + 1 for i, v in enumerate(sorted(set(values) - {""}))}
        attributes[name] = np.array([vocabulary.get(v, 0) for v in values], dtype=np.int64)
    relations = {
        name: pa.array(
            [
                sorted({id_of[a] for a in r[name] if a in id_of} - {id_of[asin]})
                for r, asin in zip(records, asins.tolist(), strict=True)
            ],
            type=pa.list_(pa.int32()),
        )
        for name in ("complement", "substitute")
    }
    catalog = Catalog(
        source_ids=pa.array(asins.tolist()), texts=pa.array(texts), attributes=attributes, relations=relations
    )
    interactions = Interactions(
        user=user, item=item.astype(np.int32), time=time, user_source_ids=user_names[user_original]
    )
    stats = {
        "raw_reviews": len(keep),
        "kept_reviews": int(keep.sum()),
        "items_without_meta_or_text": len(np.unique(item_raw[~has_text])),
    }
    return catalog, interactions, stats
