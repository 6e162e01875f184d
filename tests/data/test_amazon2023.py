"""Amazon Reviews 2023 from fixtures in its own format: raw JSON lines (gzipped) with its dirt, the
timestamp split at the benchmark's cut points, and the published last_out split files."""

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lrd_dist.cli import main
from lrd_dist.data.format import Manifest
from lrd_dist.data.sources.amazon2023 import TIMESTAMP_CUTS_MS, load_amazon2023

ITEMS = [f"P{i}" for i in range(6)]
BASE_MS = 1_600_000_000_000


def _meta_record(i: int) -> dict:
    return {
        "main_category": "Office Products",
        "title": f"Pen {i}",
        "average_rating": 4.5,
        "rating_number": 10,
        "features": [f"feature {i}a", f"feature {i}b"],
        "description": ["desc"],
        "price": "None" if i % 2 else 9.99,
        "images": [],
        "videos": [],
        "store": "Acme" if i < 3 else "Bolt",
        "categories": ["Office Products", "Writing", f"Pens {i % 2}"],
        "details": {"Brand": "Acme", "Color": "blue"},
        "parent_asin": ITEMS[i],
        "bought_together": [ITEMS[1], "NOT-IN-CATALOG"] if i == 0 else None,
    }


def write_raw(directory: Path, times=None) -> tuple[Path, Path]:
    """6 users x 6 items, every user reviews items in order; plus the known dirt."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(6):
        for i in range(6):
            t = times[u][i] if times else BASE_MS + (u * 10 + i) * 86_400_000
            rows.append(
                {
                    "rating": 4.0,
                    "title": "ok",
                    "text": "fine",
                    "images": [],
                    "asin": f"A{i}",
                    "parent_asin": ITEMS[i],
                    "user_id": f"U{u}",
                    "timestamp": t,
                    "helpful_vote": 0,
                    "verified_purchase": True,
                }
            )
    rows.append({**rows[0], "timestamp": rows[0]["timestamp"] + 5})  # duplicate (user, item): later, dropped
    rows.append({**rows[1], "rating": 0.0})  # a rating of 0 (kept), also a duplicate
    rows.append({**rows[2], "user_id": "U9", "timestamp": -1000})  # a negative timestamp
    rows.append({**rows[3], "parent_asin": "NO-META", "user_id": "U8"})
    reviews = directory / "Office_Products.jsonl.gz"
    with gzip.open(reviews, "wt") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    meta = directory / "meta_Office_Products.jsonl"
    meta.write_text("".join(json.dumps(_meta_record(i)) + "\n" for i in range(6)))
    return reviews, meta


def test_raw_files_with_their_dirt(tmp_path: Path) -> None:
    reviews, meta = write_raw(tmp_path)
    catalog, interactions, stats = load_amazon2023(reviews, meta, min_interactions=2)
    assert stats["raw_reviews"] == 40 and stats["reviews_without_meta"] == 1
    assert stats["rows_with_negative_time"] == 1 and stats["duplicate_user_item_rows"] == 2
    assert stats["rating_zero_rows"] == 1 and stats["rows_kept"] == 36
    assert len(interactions) == 36 and catalog.num_items == 6
    names = interactions.user_source_ids.tolist()
    assert sorted(names) == [f"U{u}" for u in range(6)]
    assert interactions.time.min() == BASE_MS // 1000  # milliseconds become seconds
    texts = dict(zip(catalog.source_ids.to_pylist(), catalog.texts.to_pylist(), strict=True))
    assert texts["P0"] == "Pen 0 | Acme | Office Products, Writing, Pens 0 | feature 0a, feature 0b"
    ids = catalog.source_ids.to_pylist()
    related = catalog.relations["bought_together"].to_pylist()[ids.index("P0")]
    assert [ids[j - 1] for j in related] == ["P1"]  # the unknown id is dropped
    assert set(catalog.attributes) == {"main_category", "store", "leaf_category"}
    store = catalog.attributes["store"]
    assert store[ids.index("P0")] == store[ids.index("P2")] != store[ids.index("P4")]


def test_timestamp_split_uses_the_benchmark_cut_points(tmp_path: Path) -> None:
    first, second = TIMESTAMP_CUTS_MS
    times = [[first - 10_000 * (6 - i) for i in range(4)] + [first + 5, second + 5] for _ in range(6)]
    reviews, meta = write_raw(tmp_path, times)
    _, interactions, stats = load_amazon2023(reviews, meta, min_interactions=2, split="timestamp")
    assert (stats["timestamp_split_train"], stats["timestamp_split_dev"], stats["timestamp_split_test"]) == (
        24,
        6,
        6,
    )
    assert interactions.split is not None and interactions.split.tolist().count(2) == 6


@pytest.mark.parametrize("header", [True, False])
def test_official_last_out_files_are_kept_row_for_row(tmp_path: Path, header: bool) -> None:
    _, meta = write_raw(tmp_path / "raw")
    bench = tmp_path / "bench"
    bench.mkdir()
    rows = {"train": [], "valid": [], "test": []}
    for u in range(5):
        for i in range(3):
            rows["train"].append(f"U{u},{ITEMS[i]},5.0,{BASE_MS + i * 1000}," + " ".join(ITEMS[:i]))
        rows["valid"].append(f"U{u},{ITEMS[3 + u % 2]},4.0,{BASE_MS + 5000}," + " ".join(ITEMS[:3]))
        rows["test"].append(f"U{u},UNSEEN-ASIN,3.0,{BASE_MS + 6000}," + " ".join(ITEMS[:4]))
    for name, lines in rows.items():
        head = "user_id,parent_asin,rating,timestamp,history\n" if header else ""
        (bench / f"Office_Products.{name}.csv").write_text(head + "\n".join(lines) + "\n")
    out = tmp_path / "ds"
    command = [
        "prepare",
        "--source",
        "amazon2023",
        "--split",
        "official",
        "--benchmark",
        str(bench),
        "--name",
        "Office_Products",
        "--meta",
        str(meta),
        "--out",
        str(out),
        "--negatives",
        "1",
    ]
    assert main(command) == 0
    manifest = Manifest.load(out)
    assert manifest.samples == {"train": 5 * 2, "dev": 5, "test": 5}  # every published row (a user's first
    # train row is no sample: it has no history), none filtered
    assert manifest.stats["items_without_meta"] == 1  # UNSEEN-ASIN keeps its rows, text = its id
    catalog = pq.read_table(out / "catalog.parquet").to_pylist()
    assert {r["source_id"]: r["text"] for r in catalog}["UNSEEN-ASIN"].startswith("UNSEEN-ASIN")


def test_bad_amazon2023_input_is_named(tmp_path: Path, capsys) -> None:
    reviews, meta = write_raw(tmp_path)
    broken = tmp_path / "broken.jsonl"
    with gzip.open(reviews, "rt") as handle:
        lines = handle.read().splitlines()
    lines[4] = '{"user_id": "U1", "parent_asin": '
    broken.write_text("\n".join(lines) + "\n")
    out = ["--out", str(tmp_path / "o")]
    assert (
        main(["prepare", "--source", "amazon2023", "--reviews", str(broken), "--meta", str(meta), *out]) == 2
    )
    assert "broken.jsonl, line 5: not JSON" in capsys.readouterr().err
    assert main(["prepare", "--source", "amazon2023", "--reviews", str(meta), "--meta", str(meta), *out]) == 2
    assert "no record has user_id" in capsys.readouterr().err
    other = tmp_path / "other_meta.jsonl"
    other.write_text(json.dumps({**_meta_record(0), "parent_asin": "ZZZ"}) + "\n")
    assert (
        main(["prepare", "--source", "amazon2023", "--reviews", str(reviews), "--meta", str(other), *out])
        == 2
    )
    assert "no review's parent_asin is in the metadata" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
