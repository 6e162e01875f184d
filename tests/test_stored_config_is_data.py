"""A model file, a run directory or a checkpoint someone hands you is data: loading it never runs a
program, imports a module or runs a model's own code because a file said so. Each command that reads
one is probed with files that would touch a marker if their acting values were honoured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from lrd_dist.cli import main
from lrd_dist.config import load_config
from lrd_dist.run_dir import CONFIG_KEY
from lrd_dist.train.checkpoint import complete_checkpoints
from lrd_dist.train.trainer import train
from tests.conftest import TINY_LRD
from tests.helpers import relist


@pytest.fixture(scope="module")
def trained(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("stored") / "run"
    overrides = [
        f"data.dir={synth_with_embeddings}",
        f"train.out_dir={run}",
        "data.batch_size=128",
        *TINY_LRD,
        "train.epochs=1",
    ]
    train(load_config(None, overrides))
    return run


def _hostile(tree: dict, marker: Path, data: Path) -> dict:
    tree = json.loads(json.dumps(tree))
    tree["data"]["dir"] = f"pipe:sh -c 'touch {marker}; cat {data}/$0' {{path}}"
    tree["train"]["callbacks"] = ["tests.faults:kill_at_step"]
    tree["llm"]["trust_remote_code"] = True
    return tree


def test_every_command_reads_a_stored_config_as_data(
    trained: Path, synth_with_embeddings: Path, tmp_path: Path, caplog, monkeypatch
) -> None:
    # from an empty directory: a dropped data.dir falls back to the default `runs/demo/data`, which
    # the README's demo creates in the checkout (another catalog, so a weight file would not fit)
    monkeypatch.chdir(tmp_path)
    marker, data = tmp_path / "pwned", synth_with_embeddings
    run = tmp_path / "hostile_run"
    shutil.copytree(trained, run)
    tree = _hostile(yaml.safe_load((trained / "config.yaml").read_text()), marker, data)
    (run / "config.yaml").write_text(yaml.safe_dump(tree))
    weights = tmp_path / "hostile.safetensors"
    save_file(
        load_file(str(trained / "best.safetensors")),
        str(weights),
        metadata={CONFIG_KEY: yaml.safe_dump(tree)},
    )
    # the stored values are dropped, each with a notice; the command line still decides
    config = load_config(run / "config.yaml", [f"data.dir={data}"], stored=True)
    assert config.train.callbacks == [] and not config.llm.trust_remote_code
    assert str(config.data.dir) == str(data)
    for dotted in ("data.dir", "train.callbacks", "llm.trust_remote_code"):
        assert f"stored {dotted}=" in caplog.text
    out = tmp_path / "out"
    commands = [
        ["eval", "--weights", str(weights)],
        ["eval", "--weights", str(trained / "best.safetensors"), "--config", str(run / "config.yaml")],
        ["recommend", "--run", str(run), "--out", str(out / "recs.parquet")],
        [
            "recommend",
            "--run",
            str(trained),
            "--retrieve",
            str(run),
            "--out",
            str(out / "r.parquet"),
            f"data.dir={data}",
        ],
        ["recommend", "--weights", str(weights), "--out", str(out / "w.parquet")],
        ["export", "--embeddings", str(out / "vectors"), "--run", str(run)],
        ["export", "--embeddings", str(out / "vectors2"), "--weights", str(weights)],
        ["relations", "--run", str(run)],
    ]
    for command in commands:
        code = main(command)
        assert code in (0, 2), command  # refused (the stored location is gone) or done; never run
        assert not marker.exists(), command


def test_a_checkpoint_and_an_adapter_config_are_data_too(
    trained: Path, synth_with_embeddings: Path, tmp_path: Path
) -> None:

    marker, data = tmp_path / "pwned", synth_with_embeddings
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(complete_checkpoints(trained / "checkpoints")[-1], checkpoint)
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    trainer["config"] = _hostile(trainer["config"], marker, data)
    (checkpoint / "trainer.json").write_text(json.dumps(trainer))
    relist(checkpoint, "trainer.json")
    resume = [
        "train",
        f"data.dir={data}",
        f"train.out_dir={tmp_path / 'resumed'}",
        "data.batch_size=128",
        *TINY_LRD,
        "train.epochs=2",
        f"checkpoint.resume={checkpoint}",
    ]
    assert main(resume) == 0
    assert not marker.exists()
    # a saved encoder's description never turns on a model's own code: a model directory whose
    # code would touch the marker on import is refused, not run
    from lrd_dist.encoders.text import resolve_model

    model_dir = tmp_path / "model"
    shutil.copytree(resolve_model("sentence-transformers/all-MiniLM-L6-v2")[0], model_dir)
    (model_dir / "pwn.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    model_config = json.loads((model_dir / "config.json").read_text())
    model_config["auto_map"] = {"AutoConfig": "pwn.Config", "AutoModel": "pwn.Model"}
    model_config["model_type"] = "pwn"
    (model_dir / "config.json").write_text(json.dumps(model_config))
    adapter = tmp_path / "encoder"
    adapter.mkdir()
    (adapter / "lrd_encoder.json").write_text(
        json.dumps({"model": str(model_dir), "trust_remote_code": True, "adapter": False})
    )
    embed = [
        "embed",
        "--data",
        str(data),
        "--adapter",
        str(adapter),
        "--out",
        str(tmp_path / "t.safetensors"),
    ]
    assert main(embed) == 2
    assert not marker.exists()
