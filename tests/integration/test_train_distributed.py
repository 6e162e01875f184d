import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lrd_dist.assembly import build_dataset_and_model
from lrd_dist.config import load_config
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.evaluation.evaluate import evaluate
from tests.integration.launch import accelerate_cpu


@pytest.mark.slow
def test_two_process_training_evaluates_every_user_once(synth_with_embeddings: Path, tmp_path: Path) -> None:
    data, run = synth_with_embeddings, tmp_path / "run"
    overrides = [
        f"data.dir={data}",
        f"train.out_dir={run}",
        "data.batch_size=64",
        "model.emb_size=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.latent_relations=2",
        "lrd.enabled=true",
        "train.epochs=2",
    ]
    result = accelerate_cpu(Path(sys.modules["lrd_dist.cli"].__file__), "train", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2 (DistributedType.MULTI_CPU), model kda" in result.stderr
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["examples"] == 301  # 151 + 150 users, none twice, none lost to padding

    config = load_config(run / "config.yaml")
    model = build_dataset_and_model(config).model
    model.load_state_dict(load_file(str(run / "best.safetensors")))
    single = evaluate(
        model,
        make_loader(SequenceStream(data, "test", LoaderConfig(shuffle=False))),
        config.eval.ks,
        config.eval.ties,
    )
    assert single.keys() == results["test"].keys()
    for key, value in single.items():
        assert results["test"][key] == pytest.approx(value, abs=1e-12), key
