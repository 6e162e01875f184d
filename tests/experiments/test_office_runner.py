"""The Office table runner's bookkeeping: copies running side by side, and tables merged from
elsewhere, must neither lose a finished run nor take an unfinished one."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.office import runner
from lrd_dist.data.format import Manifest, sha256_of
from lrd_dist.train.checkpoint import complete_checkpoints
from tests.integration.launch import REPO


def _entry(model: str, seed: int, ndcg: float) -> dict:
    metrics = {m: ndcg for m in runner.METRICS}
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
    table, run_dirs = tmp_path / "office.json", tmp_path / "runs"
    runner.record(table, {"kda/seed0": _entry("kda", 0, 0.30)}, run_dirs)
    runner.record(table, {"sasrec/seed1": _entry("sasrec", 1, 0.25)}, run_dirs)  # another copy's
    runs = json.loads(table.read_text())["runs"]
    assert sorted(runs) == ["kda/seed0", "sasrec/seed1"]
    report = (run_dirs / "office.md").read_text()  # the generated table stays beside the runs
    assert "| KDA | 1 | 0.3000 |" in report and "| SASRec | 1 | 0.2500 |" in report
    assert not list(tmp_path.glob("*.partial"))


def test_merge_takes_finished_runs_only(tmp_path: Path) -> None:
    ours, theirs, runs = tmp_path / "ours", tmp_path / "theirs", tmp_path / "runs"
    ours.mkdir()
    runner.record(ours / "office.json", {"kda/seed0": _entry("kda", 0, 0.30)}, runs)
    theirs.mkdir()
    other = {
        "kda/seed0": _entry("kda", 0, 0.99),  # finished in both: ours stays
        "kda_lrd/seed1": _entry("kda_lrd", 1, 0.35),
        "rcf/seed2": {"status": "failed", "attempts": []},
    }
    (theirs / "office.json").write_text(json.dumps({"runs": other}))
    runner.merge(theirs / "office.json", ours, runs)
    merged = json.loads((ours / "office.json").read_text())["runs"]
    assert sorted(merged) == ["kda/seed0", "kda_lrd/seed1"]
    assert merged["kda/seed0"]["test"]["NDCG@10"] == 0.30


def test_merge_refuses_what_is_not_a_table(tmp_path: Path) -> None:
    bad = tmp_path / "office.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not an office"):
        runner.merge(bad, tmp_path / "out", tmp_path / "runs")
    with pytest.raises(SystemExit, match="no such file"):
        runner.merge(tmp_path / "missing.json", tmp_path / "out", tmp_path / "runs")


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
    assert runner.train_seconds(metrics) == pytest.approx(106.5)
    assert runner.dev_curve(metrics) == [0.20, 0.25, 0.24]


def test_the_table_names_the_cpus_its_hours_were_measured_on(tmp_path: Path) -> None:
    older = _entry("sasrec", 0, 0.30)  # recorded before attempts named their machine
    newer = _entry("sasrec", 1, 0.28) | {
        "attempts": [{"seconds": 1.0, "commit": "abc", "machine": runner.machine()}],
        "train_seconds": 7200.0,
    }
    row = runner.table_row("SASRec", [older, newer])
    hours = row.rstrip(" |").rsplit("| ", 1)[1]
    assert hours == f"1.00, 2.00 ({runner.machine()['isa']})"  # per run: machines differ
    assert runner.table_row("SASRec", [older]).endswith("| 1.00 |")


def test_a_run_being_trained_by_another_copy_is_not_claimed_twice(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "kda" / "seed0"
    with runner.claim(run) as first:
        with runner.claim(run) as second:
            assert first and not second
        with runner.claim(tmp_path / "runs" / "kda" / "seed1") as other_seed:
            assert other_seed
    with runner.claim(run) as after:  # released when the first copy is done with it
        assert after


def test_the_goals_are_stated_from_the_runs_whichever_way_they_go() -> None:
    def setting(model: str, ndcgs: list[float]) -> list[dict]:
        return [_entry(model, seed, ndcg) for seed, ndcg in enumerate(ndcgs)]

    by_setting = {name: [] for name in runner.SETTINGS}
    by_setting["kda_lrd"] = setting("kda_lrd", [0.36, 0.37, 0.38])  # +0.05 over KDA, spread 0.01
    by_setting["kda"] = setting("kda", [0.31, 0.32, 0.33])
    by_setting["rcf_lrd"] = setting("rcf_lrd", [0.30, 0.34, 0.38])  # +0.01 over RCF, spread 0.04
    by_setting["rcf"] = setting("rcf", [0.32, 0.33, 0.34])
    by_setting["kda_lrd_latent4"] = setting("kda_lrd_latent4", [0.39, 0.40])  # the best open KDA+LRD
    lines = runner.goal_lines(by_setting)
    rows = {
        tuple(cell.strip() for cell in line.split("|")[1:5]): line for line in lines if line.startswith("| (")
    }

    kda = rows[("(a)", "KDA+LRD (3 seeds)", "KDA (3 seeds)", "99 sampled negatives")]
    assert "| +0.0500 | 0.0100 | 6.12 (4.0) | yes |" in kda
    rcf = rows[("(a)", "RCF+LRD (3 seeds)", "RCF (3 seeds)", "full ranking")]
    assert "| +0.0020 | 0.0080 |" in rcf and rcf.endswith("| no |")  # full ranking is ndcg / 5 here
    (goal_b,) = (line for key, line in rows.items() if key[0] == "(b)")
    assert "4 latent relations (2 seeds)" in goal_b and "| +0.0069 |" in goal_b and goal_b.endswith("| yes |")
    # a setting with the leaky official negatives is stated apart, never as the open setting's best
    by_setting["kda_lrd_official_negatives"] = setting("kda_lrd_official_negatives", [0.40, 0.41])
    lines = runner.goal_lines(by_setting)
    goal_b = [line for line in lines if line.startswith("| (b) |")]
    assert len(goal_b) == 2 and "best open KDA+LRD setting: KDA+LRD, 4 latent relations" in goal_b[0]
    assert "with the official negatives: KDA+LRD, official negatives (leak) (2 seeds)" in goal_b[1]
    assert "| +0.0169 |" in goal_b[1]
    # one seed has no spread: no goal (a) row for it, and a table with none of the rows says nothing
    assert runner.goal_lines({name: [] for name in runner.SETTINGS}) == []


def test_a_stop_signal_checkpoints_the_run_in_flight_records_it_and_starts_no_other(
    tmp_path: Path, synth_with_embeddings: Path
) -> None:
    """How a session that must end (or a scheduler) stops the table; the next call continues it."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    table_command = [
        sys.executable,
        *("-m", "experiments.office.runner"),
        *("--data", str(synth_with_embeddings), "--runs", str(runs), "--out", str(out)),
        *("--only", "sasrec", "--seeds", "0", "1"),
    ]
    metrics = runs / "sasrec" / "seed0" / "metrics.jsonl"
    with subprocess.Popen(
        table_command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as table:
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and '"epoch_seconds"' in metrics.read_text()):  # one epoch in
            assert table.poll() is None and time.monotonic() < deadline, table.stdout.read()
            time.sleep(0.1)
        table.send_signal(signal.SIGTERM)
        output, _ = table.communicate(timeout=300)

    assert table.returncode == 75, output
    entry = json.loads((out / "office.json").read_text())["runs"]["sasrec/seed0"]
    assert entry["status"] == "stopped" and len(entry["attempts"]) == 1
    assert entry["attempts"][0]["data"] == {  # what it trained on, as the checkpoints record it
        "fingerprint": Manifest.load(synth_with_embeddings).fingerprint(),
        "item_table_sha256": sha256_of(synth_with_embeddings / "item_embeddings.safetensors"),
    }
    last_step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    (*_, checkpoint) = complete_checkpoints(runs / "sasrec" / "seed0" / "checkpoints")
    assert int(checkpoint.name.split("-")[1]) >= last_step  # written where it stopped
    assert not (runs / "sasrec" / "seed1").exists()  # the next run never started


def test_text_rows_are_stated_against_their_frozen_id_model_whichever_way_they_go() -> None:
    def setting(model: str, ndcgs: list[float]) -> list[dict]:
        return [_entry(model, seed, ndcg) for seed, ndcg in enumerate(ndcgs)]

    by_setting = {name: [] for name in runner.SETTINGS}
    assert runner.text_lines(by_setting) == []  # nothing to compare: nothing said
    by_setting["kda_sampled_softmax8"] = setting("kda_sampled_softmax8", [0.37, 0.38, 0.39])  # std 0.01
    by_setting["kda_softmax8_id_text"] = setting("kda_softmax8_id_text", [0.41])  # +0.03: beyond
    by_setting["kda_softmax8_text"] = setting("kda_softmax8_text", [0.375])  # -0.005: within
    by_setting["sasrec_softmax8_id_text"] = setting("sasrec_softmax8_id_text", [0.30])  # no reference run
    lines = [line for line in runner.text_lines(by_setting) if line.startswith(("| KDA |", "| SASRec |"))]
    rows = {"/".join(cell.strip() for cell in line.split("|")[2:0:-1]): line for line in lines}
    assert rows["id/KDA"].endswith("| (reference) | – | – | – |")
    assert "| +0.0300 / +0.0060 | 0.0100 / 0.0020 | higher / higher |" in rows["id+text/KDA"]
    assert "| -0.0050 / -0.0010 | 0.0100 / 0.0020 | within / within |" in rows["text/KDA"]
    assert "| SASRec id: not trained |" in rows["id+text/SASRec"]
    # one seed on both sides has no spread to judge by
    by_setting["sasrec_softmax8"] = setting("sasrec_softmax8", [0.28])
    (sasrec,) = (line for line in runner.text_lines(by_setting) if "| SASRec | id+text |" in line)
    assert sasrec.endswith("| +0.0200 / +0.0040 | – / – | no spread yet / no spread yet |")


def test_a_cold_start_table_gives_warm_and_cold_targets_beside_chance() -> None:
    entry = _entry("kda_softmax8_text", 0, 0.30)
    groups = {"warm/NDCG@10": 0.32, "cold/NDCG@10": 0.21, "cold/chance/NDCG@10": 0.19}
    entry["test"] |= groups
    entry["full_ranking"]["test"] |= {key: value / 10 for key, value in groups.items()}
    by_setting = {name: [] for name in runner.SETTINGS} | {"kda_softmax8_text": [entry]}
    lines = runner.text_lines(by_setting)
    (row,) = (line for line in lines if line.count("|") == 11 and "| KDA | text |" in line)
    assert row.endswith("| 1 | 0.3200 | 0.2100 | 0.1900 | 0.0320 | 0.0210 | 0.0190 |")
