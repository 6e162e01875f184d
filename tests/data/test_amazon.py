import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lrd_dist.data.sources.amazon import load_amazon
from lrd_dist.errors import InputError

ASINS = [f"B0{i:08d}" for i in range(8)]


def _reviews(extra_item: bool = True) -> list[dict]:
    rows = []
    for user in range(10):
        for k in range(6):
            asin = ASINS[(user + k) % 8]
            rows.append(
                {
                    "reviewerID": f"U{user}",
                    "asin": asin,
                    "unixReviewTime": 1_300_000_000 + 86_400 * (user + 3 * k),
                    "overall": 5.0,
                    "reviewText": "fine",
                    "helpful": [0, 0],
                }
            )
    if extra_item:  # an item without meta: dropped, though it would survive the 5-core on its own
        rows += [{"reviewerID": f"U{u}", "asin": "NOMETA", "unixReviewTime": 1_400_000_000} for u in range(5)]
    return rows


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def write_2014(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    reviews = _write_gz(directory / "reviews_Office_Products_5.json.gz", [json.dumps(r) for r in _reviews()])
    metas = []
    for i, asin in enumerate(ASINS):
        record = {
            "asin": asin,
            "title": f"Pen &amp; &quot;Ink&quot; set {i}",
            "brand": "Acme" if i % 2 else "",
            "categories": [["Office Products", "Writing", f"Pens{i % 3}"]],
            "related": {
                "also_bought": [ASINS[(i + 1) % 8], "UNKNOWN"],
                "also_viewed": [ASINS[(i + 2) % 8]],
                "bought_together": [ASINS[(i + 3) % 8]],
            },
        }
        metas.append(repr(record))  # the 2014 meta dumps are Python literals, not JSON
    metas.append(repr({"asin": "UNRELATED", "title": "Not reviewed"}))
    meta = _write_gz(directory / "meta_Office_Products.json.gz", metas)
    return reviews, meta


def write_2018(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    reviews = _write_gz(directory / "Office_Products_5.json.gz", [json.dumps(r) for r in _reviews(False)])
    metas = [
        json.dumps(
            {
                "asin": a,
                "title": f"Stapler {i}",
                "brand": "Bostitch",
                "category": ["Office Products", "Staplers"],
                "also_buy": [ASINS[(i + 1) % 8]],
                "also_view": [],
            }
        )
        for i, a in enumerate(ASINS)
    ]
    return reviews, _write_gz(directory / "meta_Office_Products.json.gz", metas)


def test_amazon_2014(tmp_path: Path) -> None:
    reviews, meta = write_2014(tmp_path)
    catalog, interactions, stats = load_amazon(reviews, meta)
    assert catalog.num_items == 8 and len(interactions) == 60
    assert stats["items_without_meta_or_text"] == 1
    texts = catalog.texts.to_pylist()
    source = catalog.source_ids.to_pylist()
    index = source.index(ASINS[1])
    assert texts[index] == "Pen & Ink set 1 Pens1 Acme"  # unescaped, quotes removed, leaf category, brand
    assert catalog.attributes["brand"][source.index(ASINS[0])] == 0  # missing brand
    complement = catalog.relations["complement"].to_pylist()[index]
    assert sorted(source[j - 1] for j in complement) == sorted([ASINS[2], ASINS[4]])  # also_bought + together
    substitute = catalog.relations["substitute"].to_pylist()[index]
    assert [source[j - 1] for j in substitute] == [ASINS[3]]
    # ids by first appearance in time: U0's first review is the earliest
    assert interactions.user[interactions.time.argmin()] == 1
    # the source's user ids travel with the dense ids (users.parquet names users by them)
    names = interactions.user_source_ids
    assert len(names) == interactions.user.max() and names[0] == "U0"
    first = interactions.user[np.flatnonzero(interactions.time == interactions.time.min())[0]]
    assert names[first - 1] == "U0"


def test_amazon_2018(tmp_path: Path) -> None:
    reviews, meta = write_2018(tmp_path)
    catalog, _, _ = load_amazon(reviews, meta)
    assert catalog.texts[0].as_py().endswith("Staplers Bostitch")
    assert sum(len(x) for x in catalog.relations["complement"].to_pylist()) == 8
    assert sum(len(x) for x in catalog.relations["substitute"].to_pylist()) == 0


def test_bad_review_line_is_named(tmp_path: Path) -> None:
    reviews, meta = write_2014(tmp_path)
    lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
    lines[6] = '{"reviewerID": "U1", "asin": '
    _write_gz(reviews, lines)
    with pytest.raises(InputError, match=r"line 7"):
        load_amazon(reviews, meta)


def test_bad_meta_line_is_named(tmp_path: Path) -> None:
    reviews, meta = write_2014(tmp_path)
    lines = gzip.decompress(meta.read_bytes()).decode().splitlines()
    lines[2] = "{'asin': __import__('os').getcwd()}"  # literal_eval refuses code
    _write_gz(meta, lines)
    with pytest.raises(InputError, match=r"meta_Office_Products.json.gz, line 3"):
        load_amazon(reviews, meta)
