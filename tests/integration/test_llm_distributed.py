"""LoRA on a real MiniLM item encoder really trains under DDP, ZeRO-2 and ZeRO-3 (2 CPU processes,
gloo, gradient checkpointing on): the adapter moves from its zero initialisation on every rank, the
ranks agree, each checkpoint carries the adapter in PEFT's format without the frozen base, a killed
run resumes exactly, and ``lrd-dist embed --adapter`` re-encodes the catalog with the tuned encoder."""

import json
from pathlib import Path

import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from lrd_dist.cli import main
from lrd_dist.config import TextEncoderConfig, load_config
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG
from lrd_dist.encoders.item_text import build_item_text
from lrd_dist.encoders.text import load_encoder, load_table
from lrd_dist.train.checkpoint import complete_checkpoints
from tests.conftest import TINY_LRD
from tests.faults import kill
from tests.helpers import resumes
from tests.integration.launch import lrd_launch

pytestmark = pytest.mark.slow
STEPS = 4


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"data.dir={data}",
        f"train.out_dir={out}",
        "data.batch_size=32",
        *TINY_LRD,
        "llm.mode=lora",
        "llm.gradient_checkpointing=true",
        "llm.max_pairs_per_step=48",
        "llm.chunk_size=16",  # several encoder calls per step, except under ZeRO-3 (lockstep: one)
        "llm.lr=0.01",
        "train.epochs=2",
        f"train.max_steps={STEPS}",
        "checkpoint.every_steps=2",
        *extra,
    ]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def _adapter_b_norm(directory: Path) -> float:
    weights = load_file(str(directory / "adapter_model.safetensors"))
    return float(sum(t.float().pow(2).sum() for k, t in weights.items() if "lora_B" in k) ** 0.5)


@pytest.fixture(scope="module")
def lora_runs(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for launcher in ("cpu_2proc", "cpu_zero2", "cpu_zero3"):
        runs[launcher] = tmp_path_factory.mktemp("lora") / launcher
        _ok(lrd_launch(launcher, *_train(synth_with_embeddings, runs[launcher])))
    return runs


@pytest.mark.parametrize("launcher", ["cpu_2proc", "cpu_zero2", "cpu_zero3"])
def test_lora_trains_on_every_rank_and_ranks_agree(lora_runs: dict[str, Path], launcher: str) -> None:
    from peft import PeftModel

    run = lora_runs[launcher]
    results = json.loads((run / "results.json").read_text())
    encoder = results["encoder"]
    assert results["world_size"] == 2 and results["steps"] == STEPS
    assert ("DEEPSPEED" in results["distributed_type"]) == (launcher != "cpu_2proc")
    assert encoder["lora_targets"] == ["query", "value"]
    assert encoder["trainable_parameters"] == 73_728  # r=8 on query and value of 6 BERT layers
    assert len(encoder["per_rank"]) == 2 and encoder["ranks_agree"]
    assert all(rank["lora_B_norm"] > 1e-3 for rank in encoder["per_rank"])  # zero at initialisation

    # each checkpoint has the adapter in PEFT's format, and no copy of the 22.7M frozen weights
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    adapter = checkpoint / "encoder"
    assert _adapter_b_norm(adapter) == pytest.approx(encoder["per_rank"][0]["lora_B_norm"], rel=1e-5)
    model_files = [p for p in (checkpoint / "accelerate").rglob("*") if "model" in p.name and p.is_file()]
    assert model_files and sum(p.stat().st_size for p in model_files) < 20e6
    _, base = load_encoder(TextEncoderConfig())
    tuned = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())


def test_killed_lora_run_resumes_with_identical_losses(
    synth_with_embeddings: Path, lora_runs: dict[str, Path], tmp_path: Path
) -> None:
    killed = tmp_path / "killed"
    fault, fault_env = kill(step=3, rank=1)
    crash = lrd_launch("cpu_2proc", *_train(synth_with_embeddings, killed, *fault), env=fault_env)
    assert crash.returncode != 0
    assert complete_checkpoints(killed / "checkpoints")[-1].name == "step-00000002"
    _ok(lrd_launch("cpu_2proc", *_train(synth_with_embeddings, killed, "checkpoint.resume=auto")))
    assert resumes(killed) == ["step-00000002"]

    def losses(run: Path) -> list[dict]:
        entries = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: e[k] for k in ("step", "loss", "lrd")} for e in entries if "loss" in e]

    assert losses(killed) == losses(lora_runs["cpu_2proc"])
    assert len(losses(killed)) == STEPS


def test_embed_with_the_trained_adapter(
    synth_with_embeddings: Path, lora_runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "tuned.safetensors"
    adapter = lora_runs["cpu_zero3"] / "encoder"
    assert (
        main(["embed", "--data", str(synth_with_embeddings), "--adapter", str(adapter), "--out", str(out)])
        == 0
    )

    texts = Catalog.read(synth_with_embeddings / CATALOG).texts.to_pylist()
    tuned, metadata = load_table(out, texts)
    frozen, _ = load_table(synth_with_embeddings / "item_embeddings.safetensors", texts)
    # the live encoder with the adapter loaded (not merged) gives the same vectors
    config = load_config(
        None, [f"data.dir={synth_with_embeddings}", *TINY_LRD, "llm.mode=lora", "llm.max_length=64"]
    )
    live = build_item_text(config, Catalog.read(synth_with_embeddings / CATALOG)).eval()
    set_peft_model_state_dict(live.model, load_file(str(adapter / "adapter_model.safetensors")))
    ids = torch.arange(1, len(texts) + 1)
    with torch.no_grad():
        expected = live(ids)
    assert (tuned[1:] - expected).abs().max() < 1e-5
    assert (tuned - frozen).abs().max() > 1e-3  # the tuned encoder is not the pretrained one
    assert metadata["model"] == "sentence-transformers/all-MiniLM-L6-v2"
