"""Top-K LoRA on a cached MiniLM trunk under DDP and ZeRO-2 (2 CPU processes, gloo): the ranks share
one cache build, only the top layer's adapter trains and the ranks agree, a SIGKILLed rank resumes
from its checkpoint with the losses of an uninterrupted run, a checkpoint of another cache is refused,
and ``lrd-dist embed --adapter`` gives the vectors the cached encoder gives."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from lrd_dist.cli import main
from lrd_dist.config import load_config
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG
from lrd_dist.encoders.item_text import build_item_text
from lrd_dist.encoders.text import load_table
from lrd_dist.errors import InputError
from lrd_dist.train.checkpoint import TRAINER, complete_checkpoints
from lrd_dist.train.trainer import train
from tests.conftest import TINY_LRD
from tests.faults import kill
from tests.helpers import relist, resumes
from tests.integration.launch import lrd_launch

pytestmark = pytest.mark.slow
STEPS = 4


def _overrides(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        f"data.dir={data}",
        f"train.out_dir={out}",
        "data.batch_size=32",
        *TINY_LRD,
        "llm.mode=lora",
        "llm.tune_layers=1",
        f"llm.cache_dir={cache}",
        "llm.chunk_size=16",
        "llm.lr=0.01",
        "train.epochs=2",
        f"train.max_steps={STEPS}",
        "checkpoint.every_steps=2",
        *extra,
    ]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _losses(run: Path) -> list[dict]:
    entries = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: e[k] for k in ("step", "loss", "lrd")} for e in entries if "loss" in e]


@pytest.fixture(scope="module")
def trunk_runs(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trunk")
    runs = {"cache": root / "cache"}
    for launcher in ("cpu_2proc", "cpu_zero2"):
        runs[launcher] = root / launcher
        overrides = _overrides(synth_with_embeddings, runs[launcher], runs["cache"])
        _ok(lrd_launch(launcher, "train", *overrides))
    return runs


@pytest.mark.parametrize("launcher", ["cpu_2proc", "cpu_zero2"])
def test_top_layer_lora_trains_on_every_rank_from_one_shared_cache(
    trunk_runs: dict[str, Path], launcher: str
) -> None:
    results = json.loads((trunk_runs[launcher] / "results.json").read_text())
    encoder = results["encoder"]
    assert results["world_size"] == 2 and results["steps"] == STEPS
    assert ("DEEPSPEED" in results["distributed_type"]) == (launcher == "cpu_zero2")
    assert encoder["trainable_parameters"] == 12_288  # r=8 on query and value of the top layer only
    assert encoder["ranks_agree"] and all(r["lora_B_norm"] > 1e-3 for r in encoder["per_rank"])
    caches = list(trunk_runs["cache"].glob("*/meta.json"))
    assert len(caches) == 1  # both runs (and both ranks of each) used one build
    checkpoint = complete_checkpoints(trunk_runs[launcher] / "checkpoints")[-1]
    saved = json.loads((checkpoint / TRAINER).read_text())["states"]["trunk_cache"]
    assert saved == {"key": caches[0].parent.name}


def test_a_killed_rank_resumes_from_its_checkpoint_with_identical_losses(
    synth_with_embeddings: Path, trunk_runs: dict[str, Path], tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    overrides = _overrides(synth_with_embeddings, killed, trunk_runs["cache"])
    fault, fault_env = kill(step=3, rank=1)
    crash = lrd_launch("cpu_2proc", "train", *overrides, *fault, env=fault_env)
    assert crash.returncode != 0
    assert complete_checkpoints(killed / "checkpoints")[-1].name == "step-00000002"
    resumed = lrd_launch("cpu_2proc", "train", *overrides, "checkpoint.resume=auto")
    _ok(resumed)
    assert re.search(r"resumed from \S+step-00000002 at step 2", resumed.stderr), resumed.stderr[-3000:]
    assert _losses(killed) == _losses(trunk_runs["cpu_2proc"]) and len(_losses(killed)) == STEPS
    assert resumes(killed) == ["step-00000002"]


def test_a_checkpoint_of_another_trunk_cache_is_refused(
    synth_with_embeddings: Path, trunk_runs: dict[str, Path], tmp_path: Path
) -> None:

    checkpoint = tmp_path / "other"
    shutil.copytree(complete_checkpoints(trunk_runs["cpu_2proc"] / "checkpoints")[-1], checkpoint)
    trainer = json.loads((checkpoint / TRAINER).read_text())
    trainer["states"]["trunk_cache"]["key"] = "0" * 64
    (checkpoint / TRAINER).write_text(json.dumps(trainer))
    relist(checkpoint, TRAINER)
    overrides = _overrides(synth_with_embeddings, tmp_path / "run", trunk_runs["cache"])
    with pytest.raises(InputError, match="trained on trunk cache 0000000000000000"):
        train(load_config(None, [*overrides, f"checkpoint.resume={checkpoint}"]))


def test_embed_with_the_top_layer_adapter_equals_the_cached_encoder(
    synth_with_embeddings: Path, trunk_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tuned.safetensors"
    adapter = trunk_runs["cpu_2proc"] / "encoder"
    embed = ["embed", "--data", str(synth_with_embeddings), "--adapter", str(adapter), "--out", str(out)]
    assert main(embed) == 0
    texts = Catalog.read(synth_with_embeddings / CATALOG).texts.to_pylist()
    tuned, _ = load_table(out, texts)
    config = load_config(
        None,
        [*_overrides(synth_with_embeddings, tmp_path / "r", trunk_runs["cache"]), "llm.trunk_dtype=fp32"],
    )
    live = build_item_text(config, Catalog.read(synth_with_embeddings / CATALOG)).eval()
    set_peft_model_state_dict(live.model, load_file(str(adapter / "adapter_model.safetensors")))
    with torch.no_grad():
        expected = live.catalog_vectors()
    assert (tuned[1:] - expected[1:]).abs().max() < 1e-5
