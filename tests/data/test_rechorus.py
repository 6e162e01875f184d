from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lrd_dist.cli import main
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import Manifest
from lrd_dist.data.prepare import write_dataset
from lrd_dist.data.sources.rechorus import load_rechorus
from lrd_dist.data.stream import LoaderConfig, SequenceStream
from lrd_dist.errors import InputError
from tests.conftest import OFFICE, office


def _samples(directory: Path, split: str) -> dict[str, np.ndarray]:
    stream = SequenceStream(directory, split, LoaderConfig(batch_size=1000, shuffle=False, max_history=5))
    batch = next(iter(stream))  # the dataset itself yields numpy batches
    return {k: v[batch["valid"]] for k, v in batch.items()}


def test_toy_dataset_is_converted_with_rechorus_histories(rechorus_dir: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "prepare",
                "--source",
                "rechorus",
                "--input",
                str(rechorus_dir),
                "--out",
                str(tmp_path / "o"),
                "--max-history",
                "5",
            ]
        )
        == 0
    )
    manifest = Manifest.load(tmp_path / "o")
    assert manifest.samples == {"train": 5, "dev": 4, "test": 4}
    assert manifest.num_items == 6 and manifest.num_users == 4 and manifest.num_negatives == 3
    assert manifest.stats["dev_rows_with_repeated_negative"] == 1
    assert manifest.stats["test_rows_with_repeated_negative"] == 2
    test = _samples(tmp_path / "o", "test")
    row = int(np.flatnonzero(test["user"] == 1)[0])
    # user 1: train 1, 2, 3, dev 4 -> the test history holds the dev item last
    assert test["history_items"][row].tolist() == [1, 2, 3, 4, 0]
    assert test["history_length"][row] == 4 and test["target"][row] == 5
    assert test["negatives"][row].tolist() == [6, 6, 6]
    dev = _samples(tmp_path / "o", "dev")
    row = int(np.flatnonzero(dev["user"] == 3)[0])
    assert dev["history_items"][row].tolist() == [3, 4, 0, 0, 0]
    assert dev["history_times"][row].tolist()[:2] == [200, 400]
    train = _samples(tmp_path / "o", "train")
    pairs = sorted(zip(train["user"].tolist(), train["target"].tolist(), strict=True))
    assert pairs == [(1, 2), (1, 3), (2, 3), (3, 4), (4, 2)]

    catalog = Catalog.read(tmp_path / "o" / "catalog.parquet")
    assert catalog.texts.to_pylist()[2] == "Stapler heavy duty"
    assert catalog.attributes["category"].tolist() == [1, 2, 1, 2, 0, 1]
    assert catalog.relations["complement"].to_pylist()[3] == [5, 6]
    assert catalog.relations["substitute"].to_pylist()[0] == [3]
    assert pq.read_table(tmp_path / "o" / "catalog.parquet").num_rows == 6


@office
def test_office_counts_equal_the_source_files(tmp_path: Path) -> None:
    catalog, interactions, _ = load_rechorus(OFFICE)
    manifest = write_dataset(
        tmp_path / "office", source="rechorus", catalog=catalog, interactions=interactions, max_history=20
    )
    train_rows = len((OFFICE / "train.csv").read_text().splitlines()) - 1
    dev_rows = len((OFFICE / "dev.csv").read_text().splitlines()) - 1
    assert manifest.num_users == 4905 and manifest.num_items == 2420
    assert manifest.num_interactions == train_rows + 2 * dev_rows == 53258
    # every train row but each user's first is a sample
    assert manifest.samples == {"train": train_rows - 4905, "dev": 4905, "test": 4905}
    assert manifest.stats["dev_rows_with_repeated_negative"] == 4307
    assert manifest.stats["relation_pairs"] == {"complement": 38071, "substitute": 18345}
    text_of = dict(line.split("\t", 1) for line in (OFFICE / "Office.text").read_text().splitlines()[1:])
    for line in (OFFICE / "Office.item2index").read_text().splitlines()[::500]:
        asin, item_id = line.split()
        assert catalog.source_ids[int(item_id) - 1].as_py() == asin
        assert catalog.texts[int(item_id) - 1].as_py() == text_of[asin]


def _expect_error(directory: Path, tmp_path: Path, *fragments: str) -> InputError:
    with pytest.raises(InputError) as caught:
        load_rechorus(directory)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    return caught.value


def test_malformed_csv_line_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "train.csv"
    lines = path.read_text().splitlines()
    lines[4] = "3\t3"  # line 5: a field missing
    path.write_text("\n".join(lines) + "\n")
    error = _expect_error(rechorus_dir, tmp_path, "train.csv", "line 5", "expected 3")
    assert error.line == 5


def test_non_integer_field_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "train.csv"
    path.write_text(path.read_text().replace("4\t2\t400", "4\tx2\t400"))
    _expect_error(rechorus_dir, tmp_path, "train.csv", "line 10", "'x2'")


def test_unknown_item_in_dev_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "dev.csv"
    path.write_text(path.read_text().replace("3\t5\t500", "3\t77\t500"))
    _expect_error(rechorus_dir, tmp_path, "dev.csv", "line 4", "item id 77")


def test_unknown_negative_in_test_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "test.csv"
    path.write_text(path.read_text().replace("[1, 2, 5]", "[1, 99, 5]"))
    _expect_error(rechorus_dir, tmp_path, "test.csv", "line 4", "negative item id 99")


def test_negative_list_of_wrong_length_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "dev.csv"
    path.write_text(path.read_text().replace("[1, 5, 6]", "[1, 5]"))
    _expect_error(rechorus_dir, tmp_path, "dev.csv", "line 3", "neg_items has 2 ids")


def test_duplicate_catalog_id_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "item_meta.csv"
    path.write_text(path.read_text() + "2\t1\t1\t[]\t[]\n")
    _expect_error(rechorus_dir, tmp_path, "item_meta.csv", "line 8", "appears twice")


def test_non_utf8_text_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "Toy.text"
    path.write_bytes(path.read_bytes().replace(b"Stapler", b"St\xe4pler"))
    _expect_error(rechorus_dir, tmp_path, "Toy.text", "line 4", "UTF-8")


def test_empty_text_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "Toy.text"
    path.write_text(path.read_text().replace("Desk lamp LED", "  "))
    _expect_error(rechorus_dir, tmp_path, "Toy.text", "line 6", "empty item text")


def test_missing_file_is_named_and_cli_exits_2(rechorus_dir: Path, tmp_path: Path, capsys) -> None:
    (rechorus_dir / "test.csv").unlink()
    code = main(
        ["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert "test.csv" in message and "missing" in message and "Fix:" in message
    assert not (tmp_path / "o").exists()


def test_failed_prepare_keeps_the_existing_dataset(rechorus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert main(["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(out)]) == 0
    before = (out / "manifest.json").read_text()
    (rechorus_dir / "dev.csv").write_text("user_id\titem_id\ttime\tneg_items\n1\t4\n")
    code = main(
        ["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(out), "--overwrite"]
    )
    assert code == 2
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "toy"]  # no staging directory left behind


def test_interrupted_prepare_leaves_no_directory(rechorus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from lrd_dist.data import shards

    def interrupted(self, block):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.SplitShardWriter, "_write_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(tmp_path / "o")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]


def test_duplicate_text_id_is_named(rechorus_dir: Path, tmp_path: Path) -> None:
    path = rechorus_dir / "Toy.text"
    path.write_text(path.read_text() + "A3\tAnother stapler\n")
    _expect_error(rechorus_dir, tmp_path, "Toy.text", "line 8", "id A3 appears twice")


def test_an_empty_dev_split_is_refused_by_prepare(rechorus_dir: Path, tmp_path: Path, capsys) -> None:
    """Nothing to select the best epoch on: refused when the data is written, not after an epoch."""
    from lrd_dist.cli import main

    (rechorus_dir / "dev.csv").write_text("user_id\titem_id\ttime\tneg_items\n")
    out = tmp_path / "out"
    assert main(["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(out)]) == 2
    assert "dev.csv, line 2: has no rows: this split would be empty" in capsys.readouterr().err
    assert not out.exists()
