"""``lrd-dist export`` and ``lrd-dist eval`` in one process: a checkpoint becomes one weight file
that carries its config, and scoring that file reproduces the run's own evaluation."""

import json
from pathlib import Path

import pytest

from lrd_dist.cli import main
from lrd_dist.run_dir import stored_config
from lrd_dist.train.checkpoint import complete_checkpoints
from tests.conftest import TINY_LRD


@pytest.fixture(scope="module")
def one_epoch_run(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    overrides = [f"data.dir={synth_with_embeddings}", f"train.out_dir={run}", "data.batch_size=64", *TINY_LRD]
    assert main(["train", *overrides, "train.epochs=1"]) == 0
    return run


def test_export_writes_the_checkpoint_weights_with_the_config_and_eval_scores_them(
    one_epoch_run: Path, tmp_path: Path, capsys
) -> None:
    checkpoint = complete_checkpoints(one_epoch_run / "checkpoints")[-1]
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert stored_config(out)["model"]["latent_relations"] == 2
    capsys.readouterr()
    assert main(["eval", "--weights", str(out), "--split", "test"]) == 0
    scored = json.loads(capsys.readouterr().out)
    # one epoch: the last checkpoint holds the best weights, which results.json scored
    expected = json.loads((one_epoch_run / "results.json").read_text())["test"]
    assert scored["test"] == pytest.approx(expected, abs=1e-12)


def test_eval_full_ranking_ranks_against_the_whole_catalog(one_epoch_run: Path, capsys) -> None:
    weights, config = one_epoch_run / "best.safetensors", one_epoch_run / "config.yaml"
    capsys.readouterr()
    assert main(["eval", "--weights", str(weights), "--config", str(config), "eval.full_ranking=true"]) == 0
    full = json.loads(capsys.readouterr().out)
    sampled = json.loads((one_epoch_run / "results.json").read_text())
    for split in ("dev", "test"):
        assert full[split]["examples"] == 301
        # 150 items (history masked) are harder competition than 49 sampled negatives
        assert full[split]["HR@10"] < sampled[split]["HR@10"]


def test_export_and_eval_refuse_what_is_not_theirs(one_epoch_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", "--checkpoint", str(one_epoch_run), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["eval", "--weights", str(one_epoch_run / "best.safetensors")]) == 2
    assert "carries no run config" in capsys.readouterr().err  # a run's best weights: pass --config
    assert main(["eval", "--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "no such weights file" in capsys.readouterr().err
