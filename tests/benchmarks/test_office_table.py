"""The Office table runner's bookkeeping: copies running side by side, and tables merged from
elsewhere, must neither lose a finished run nor take an unfinished one."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.integration.launch import REPO

spec = importlib.util.spec_from_file_location("office_table", REPO / "benchmarks" / "office_table.py")
office_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(office_table)


def _entry(model: str, seed: int, ndcg: float) -> dict:
    metrics = {m: ndcg for m in office_table.METRICS}
    return {
        "status": "done",
        "model": model,
        "seed": seed,
        "best_epoch": 9,
        "epochs_run": 30,
        "test": metrics,
        "full_ranking": {"test": {"NDCG@10": ndcg / 5}},
        "dev_curve": [0.1, 0.2],
        "seconds": 3600.0,
    }


def test_record_merges_into_what_another_copy_wrote(tmp_path: Path) -> None:
    table = tmp_path / "office.json"
    office_table.record(table, {"kda/seed0": _entry("kda", 0, 0.30)})
    office_table.record(table, {"sasrec/seed1": _entry("sasrec", 1, 0.25)})  # another copy's run
    runs = json.loads(table.read_text())["runs"]
    assert sorted(runs) == ["kda/seed0", "sasrec/seed1"]
    report = (tmp_path / "office.md").read_text()
    assert "| KDA | 1 | 0.3000 |" in report and "| SASRec | 1 | 0.2500 |" in report
    assert not list(tmp_path.glob("*.partial"))


def test_merge_takes_finished_runs_and_their_reports_only(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    office_table.record(ours / "office.json", {"kda/seed0": _entry("kda", 0, 0.30)})
    theirs.mkdir()
    (theirs / "relations" / "kda_lrd_seed1").mkdir(parents=True)
    (theirs / "relations" / "kda_lrd_seed1" / "summary.json").write_text("{}")
    other = {
        "kda/seed0": _entry("kda", 0, 0.99),  # finished in both: ours stays
        "kda_lrd/seed1": _entry("kda_lrd", 1, 0.35),
        "rcf/seed2": {"status": "failed", "attempts": []},
    }
    (theirs / "office.json").write_text(json.dumps({"runs": other}))
    office_table.merge(theirs / "office.json", ours)
    runs = json.loads((ours / "office.json").read_text())["runs"]
    assert sorted(runs) == ["kda/seed0", "kda_lrd/seed1"]
    assert runs["kda/seed0"]["test"]["NDCG@10"] == 0.30
    assert (ours / "relations" / "kda_lrd_seed1" / "summary.json").is_file()


def test_merge_refuses_what_is_not_a_table(tmp_path: Path) -> None:
    bad = tmp_path / "office.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not an office"):
        office_table.merge(bad, tmp_path / "out")
    with pytest.raises(SystemExit, match="no such file"):
        office_table.merge(tmp_path / "missing.json", tmp_path / "out")


def test_training_time_and_dev_curve_come_from_every_epoch_of_the_metrics_log(tmp_path: Path) -> None:
    # step lines, and epoch lines of two processes (the second resumed at epoch 2): all epochs count
    lines = [
        {"step": 50, "epoch": 0, "loss": 0.7},
        {"epoch": 0, "step": 150, "epoch_seconds": 30.0, "dev/NDCG@5": 0.20},
        {"epoch": 1, "step": 300, "epoch_seconds": 31.5, "dev/NDCG@5": 0.25},
        {"step": 350, "epoch": 2, "loss": 0.5},
        {"epoch": 2, "step": 450, "epoch_seconds": 45.0, "dev/NDCG@5": 0.24},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert office_table.train_seconds(metrics) == pytest.approx(106.5)
    assert office_table.dev_curve(metrics) == [0.20, 0.25, 0.24]


def test_the_table_names_the_cpus_its_hours_were_measured_on(tmp_path: Path) -> None:
    older = _entry("sasrec", 0, 0.30)  # recorded before attempts named their machine
    newer = _entry("sasrec", 1, 0.28) | {
        "attempts": [{"seconds": 1.0, "commit": "abc", "machine": office_table.machine()}],
        "train_seconds": 7200.0,
    }
    row = office_table.table_row("SASRec", [older, newer])
    hours = row.rstrip(" |").rsplit("| ", 1)[1]
    assert hours == f"1.00, 2.00 ({office_table.machine()['isa']})"  # per run: machines differ
    assert office_table.table_row("SASRec", [older]).endswith("| 1.00 |")


def test_a_run_being_trained_by_another_copy_is_not_claimed_twice(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "kda" / "seed0"
    with office_table.claim(run) as first:
        with office_table.claim(run) as second:
            assert first and not second
        with office_table.claim(tmp_path / "runs" / "kda" / "seed1") as other_seed:
            assert other_seed
    with office_table.claim(run) as after:  # released when the first copy is done with it
        assert after
