import json
from pathlib import Path

import pytest

from lrd_dist.data.format import Manifest
from tests.integration.launch import accelerate_cpu


@pytest.mark.slow
def test_two_processes_two_workers_each_see_every_sample_once_and_resume(
    synth_dataset: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = accelerate_cpu(Path(__file__).with_name("stream_ranks.py"), str(synth_dataset), str(report), "7")
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(report.read_text())
    assert outcome["world_size"] == 2  # really two ranks, not two lone processes
    ranks = outcome["ranks"]
    assert all(r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["batches"] == ranks[1]["batches"] > 7
    ids = [tuple(i) for r in ranks for i in r["ids"]]
    assert len(ids) == len(set(ids)) == Manifest.load(synth_dataset).samples["train"]
    assert all(r["resume_ok"] for r in ranks)
