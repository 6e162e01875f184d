"""Any interaction table (CSV, Parquet, JSON lines; seconds, milliseconds or ISO dates) with an item
table, and Hugging Face datasets (save_to_disk directories, local builders), from fixtures the
test writes; bad input named with the file, the line and the fix, and nothing written."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lrd_dist.cli import main
from lrd_dist.data.format import Manifest

USERS, ITEMS = 8, 12
BASE = 1_700_000_000  # seconds


def _log_rows() -> list[dict]:
    rows = []
    for u in range(USERS):
        for step in range(6):
            rows.append(
                {"uid": f"user-{u}", "sku": f"sku-{(u + step) % ITEMS}", "ts": BASE + u * 1000 + step * 60}
            )
    rows.append(dict(rows[0], ts=BASE + 999_999))  # a later duplicate (user, item): dropped
    rows.append({"uid": "user-0", "sku": "not-in-items", "ts": BASE + 5})
    return rows


def write_items(path: Path) -> Path:
    table = pa.table(
        {
            "sku": [f"sku-{i}" for i in range(ITEMS)],
            "title": [f"Notebook {i}" for i in range(ITEMS)],
            "brand": ["Acme" if i % 2 else "Bolt" for i in range(ITEMS)],
            "related": [[f"sku-{(i + 1) % ITEMS}", "nope"] for i in range(ITEMS)],
        }
    )
    pq.write_table(table, path)
    return path


def _prepare(tmp_path: Path, *args: str, out: str = "ds") -> int:
    common = [
        "--user-column",
        "uid",
        "--item-column",
        "sku",
        "--time-column",
        "ts",
        "--item-id-column",
        "sku",
        "--text-template",
        "{title} by {brand}",
        "--attribute-columns",
        "brand",
        "--relation-columns",
        "related",
        "--min-interactions",
        "2",
        "--negatives",
        "3",
    ]
    return main(["prepare", *args, *common, "--out", str(tmp_path / out)])


@pytest.mark.parametrize("form", ["csv", "parquet_ms", "jsonl_iso"])
def test_an_interaction_table_in_each_format(tmp_path: Path, form: str) -> None:
    rows = _log_rows()
    items = write_items(tmp_path / "items.parquet")
    if form == "csv":
        log = tmp_path / "log.csv"
        log.write_text("uid,sku,ts\n" + "".join(f"{r['uid']},{r['sku']},{r['ts']}\n" for r in rows))
    elif form == "parquet_ms":
        log = tmp_path / "log.parquet"
        pq.write_table(
            pa.table({k: [r[k] * 1000 if k == "ts" else r[k] for r in rows] for k in rows[0]}), log
        )
    else:
        import datetime

        log = tmp_path / "log.jsonl"
        iso = lambda t: datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")  # noqa: E731
        log.write_text("".join(json.dumps({**r, "ts": iso(r["ts"])}) + "\n" for r in rows))
    assert _prepare(tmp_path, "--source", "table", "--interactions", str(log), "--items", str(items)) == 0
    manifest = Manifest.load(tmp_path / "ds")
    stats = manifest.stats
    assert stats["time_unit"] == {"csv": "s", "parquet_ms": "ms", "jsonl_iso": "timestamp"}[form]
    assert stats["rows"] == len(rows) and stats["rows_without_item_row"] == 1
    assert stats["duplicate_user_item_rows"] == 1 and manifest.num_interactions == USERS * 6
    assert manifest.num_users == USERS and manifest.num_items == ITEMS
    catalog = pq.read_table(tmp_path / "ds" / "catalog.parquet").to_pylist()
    by_source = {r["source_id"]: r for r in catalog}
    assert by_source["sku-3"]["text"] == "Notebook 3 by Acme"
    ids = {r["item_id"]: r["source_id"] for r in catalog}
    assert [ids[j] for j in by_source["sku-3"]["rel_related"]] == ["sku-4"]
    users = pq.read_table(tmp_path / "ds" / "users.parquet").column("source_id").to_pylist()
    assert sorted(users) == sorted(f"user-{u}" for u in range(USERS))
    first_sample_time = min(t for t in (r["ts"] for r in rows))
    assert first_sample_time == BASE  # (the times are stored in seconds whatever the input unit)


def test_a_hugging_face_dataset_from_disk_and_from_a_builder(tmp_path: Path) -> None:
    import datasets

    rows = _log_rows()
    items = write_items(tmp_path / "items.parquet")
    saved = tmp_path / "hf_log"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    assert (
        _prepare(tmp_path, "--source", "hf", "--interactions", str(saved), "--items", str(items), out="a")
        == 0
    )
    parquet = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    command = [
        "--source",
        "hf",
        "--interactions",
        "parquet",
        "--hf-data-files",
        str(parquet),
        "--items",
        str(items),
    ]
    assert _prepare(tmp_path, *command, out="b") == 0
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert a.samples == b.samples and a.num_interactions == USERS * 6
    missing = tmp_path / "nowhere"
    assert (
        _prepare(tmp_path, "--source", "hf", "--interactions", str(missing), "--items", str(items), out="c")
        == 2
    )


def test_bad_tables_are_refused_with_the_file_line_and_fix(tmp_path: Path, capsys) -> None:
    items = write_items(tmp_path / "items.parquet")
    rows = _log_rows()
    log = tmp_path / "log.jsonl"

    def attempt(text: str, *extra: str) -> str:
        log.write_text(text)
        assert (
            _prepare(tmp_path, "--source", "table", "--interactions", str(log), "--items", str(items), *extra)
            == 2
        )
        return capsys.readouterr().err

    lines = [json.dumps(r) for r in rows]
    assert "log.jsonl, line 3: not JSON" in attempt("\n".join([*lines[:2], '{"uid": ', *lines[2:]]) + "\n")
    days = "\n".join(json.dumps({**r, "ts": 19_000 + i}) for i, r in enumerate(rows)) + "\n"
    error = attempt(days)
    assert "every time falls in 1970" in error and "pass --time-unit" in error
    other = "\n".join(json.dumps({**r, "sku": "other-" + r["sku"]}) for r in rows) + "\n"
    assert "items.parquet: no item of the log has a row here" in attempt(other)
    assert "no field(s) ['ts']" in attempt(
        "\n".join(json.dumps({"uid": "a", "sku": "sku-1", "when": 1}) for _ in range(3))
    )
    assert not (tmp_path / "ds").exists()
