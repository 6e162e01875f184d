"""Checkpoints: refusal of incomplete, damaged and foreign checkpoints, retention, and exact resume
of a killed single-process run (with accumulation, clipping and a warmup schedule)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrd_dist.config import load_config
from lrd_dist.errors import InputError
from lrd_dist.train.checkpoint import complete_checkpoints
from lrd_dist.train.trainer import train
from tests.conftest import TINY_LRD
from tests.faults import kill

REPO = Path(__file__).resolve().parents[2]


def _overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.dir={data}",
        f"train.out_dir={out}",
        "data.batch_size=64",
        *TINY_LRD,
        *extra,
    ]


@pytest.fixture(scope="module")
def checkpointed_run(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(
        load_config(
            None,
            _overrides(
                synth_with_embeddings,
                run,
                "train.max_steps=12",
                "checkpoint.every_steps=4",
                "checkpoint.keep=2",
            ),
        )
    )
    return run


def test_retention_keeps_the_newest_complete_checkpoints(checkpointed_run: Path) -> None:
    steps = [int(p.name.split("-")[1]) for p in complete_checkpoints(checkpointed_run / "checkpoints")]
    # every 4 steps (4, 8) and at the end (12); keep=2 leaves the two newest
    assert steps == [8, 12]
    assert not list((checkpointed_run / "checkpoints").glob(".incomplete-*"))


def _resume(data: Path, run: Path, tmp_path: Path, checkpoint: Path, *extra: str):
    copy = tmp_path / "resumed"
    return train(
        load_config(
            None, _overrides(data, copy, "train.max_steps=14", f"checkpoint.resume={checkpoint}", *extra)
        )
    )


def test_resume_refuses_damaged_and_foreign_checkpoints(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    source = complete_checkpoints(checkpointed_run / "checkpoints")[-1]

    incomplete = tmp_path / "incomplete"
    shutil.copytree(source, incomplete)
    (incomplete / "COMPLETE").unlink()
    with pytest.raises(InputError, match="incomplete checkpoint"):
        _resume(synth_with_embeddings, checkpointed_run, tmp_path, incomplete)

    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    weights = damaged / "accelerate" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(InputError, match=r"model\.safetensors.*differs from the checksum"):
        _resume(synth_with_embeddings, checkpointed_run, tmp_path, damaged)

    with pytest.raises(InputError, match=r"another model config \(model\.emb_size: 16 -> 32"):
        _resume(synth_with_embeddings, checkpointed_run, tmp_path, source, "model.emb_size=32")
    # the checkpoint holds one Adam: it cannot continue as Adam + SparseAdam
    with pytest.raises(InputError, match=r"train\.embedding_updates: 'dense' -> 'sparse'"):
        _resume(synth_with_embeddings, checkpointed_run, tmp_path, source, "train.embedding_updates=sparse")

    other_data = tmp_path / "other_data"
    shutil.copytree(synth_with_embeddings, other_data)
    manifest = other_data / "manifest.json"
    content = json.loads(manifest.read_text())
    content["num_interactions"] += 1
    manifest.write_text(json.dumps(content))
    with pytest.raises(InputError, match="another dataset"):
        _resume(other_data, checkpointed_run, tmp_path, source)
    forced = _resume(other_data, checkpointed_run, tmp_path, source, "checkpoint.force=true")
    assert forced["steps"] == 14  # continued from step 12


def test_the_same_data_prepared_again_resumes_and_an_older_checkpoint_resumes_on_its_own_manifest(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    """A preparation's own timing and the file's layout are not the data: a checkpoint resumes on the
    same data prepared again (seen 2026-12-06: a parked Office run refused after a re-prepare whose
    manifest differed only in ``prepare_seconds``). A checkpoint written before the fingerprint
    recorded the manifest file's sha256: it resumes on that very file, and is refused on another."""
    from lrd_dist.data.format import sha256_of
    from lrd_dist.train.checkpoint import verify_checkpoint

    source = complete_checkpoints(checkpointed_run / "checkpoints")[-1]
    again = tmp_path / "prepared_again"
    shutil.copytree(synth_with_embeddings, again)
    manifest = again / "manifest.json"
    content = json.loads(manifest.read_text())
    content["stats"]["prepare_seconds"] = 123.456
    manifest.write_text(json.dumps(content, indent=1))
    assert sha256_of(manifest) != sha256_of(synth_with_embeddings / "manifest.json")
    resumed = _resume(again, checkpointed_run, tmp_path, source)
    assert resumed["steps"] == 14  # continued from step 12, not refused

    config = load_config(None, _overrides(again, tmp_path / "r", "checkpoint.resume=auto"))
    older = tmp_path / "older"
    shutil.copytree(source, older)
    _rewrite_trainer(older, lambda trainer: trainer.update(data_checksum=sha256_of(manifest)))
    same_file = _identity(again)
    assert verify_checkpoint(older, config, same_file, 1, False)["state"]["step"] == 12
    original = _identity(synth_with_embeddings)
    assert original.fingerprint == same_file.fingerprint
    with pytest.raises(InputError, match="another dataset"):
        verify_checkpoint(older, config, original, 1, False)


def test_auto_resume_skips_an_interrupted_save(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    newest = complete_checkpoints(run / "checkpoints")[-1]
    interrupted = run / "checkpoints" / ".incomplete-step-00000016"
    shutil.copytree(newest, interrupted)
    (interrupted / "COMPLETE").unlink()
    results = train(
        load_config(
            None, _overrides(synth_with_embeddings, run, "train.max_steps=14", "checkpoint.resume=auto")
        )
    )
    assert results["steps"] == 14
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "loss" in e] == list(range(1, 15))  # one history, no repeats


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lrd_dist.cli", *args],
        env=os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (env or {}),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(synth_with_embeddings: Path, tmp_path: Path) -> None:
    extra = [
        "train.epochs=2",
        "train.grad_accum=2",
        "train.max_grad_norm=1.0",
        "train.schedule=linear",
        "train.warmup_steps=5",
        "checkpoint.every_steps=4",
        "train.tracker=tensorboard",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _cli("train", *_overrides(synth_with_embeddings, straight, *extra)).returncode == 0
    fault, fault_env = kill(step=10, rank=0)
    crash = _cli("train", *_overrides(synth_with_embeddings, killed, *extra, *fault), env=fault_env)
    assert crash.returncode == -9  # SIGKILL
    assert [p.name for p in complete_checkpoints(killed / "checkpoints")][-1] == "step-00000008"
    resumed = _cli("train", *_overrides(synth_with_embeddings, killed, *extra, "checkpoint.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def log(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    a, b = log(straight), log(killed)
    assert len(a) == len(b) and any(e["step"] > 10 for e in a)
    for x, y in zip(a, b, strict=True):
        for timing in ("epoch_seconds", "samples_per_s"):
            x.pop(timing, None), y.pop(timing, None)
        assert x == y  # every loss term, learning rate and dev metric, bit for bit
    assert (
        json.loads((straight / "results.json").read_text())["test"]
        == json.loads((killed / "results.json").read_text())["test"]
    )
    # logging artefacts of the run: TensorBoard events and the curves
    assert list((straight / "tensorboard").rglob("events.out.tfevents.*"))
    assert (straight / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _rewrite_trainer_config(checkpoint: Path, change) -> dict:
    """Edit a checkpoint's stored config as an earlier version would have written it, keeping the
    COMPLETE marker consistent."""
    return _rewrite_trainer(checkpoint, lambda trainer: change(trainer["config"]))


def _rewrite_trainer(checkpoint: Path, change) -> dict:
    """Edit a checkpoint's trainer.json as an earlier version would have written it, keeping the
    COMPLETE marker consistent."""
    from lrd_dist.train.checkpoint import COMPLETE, TRAINER, sha256_of

    trainer = json.loads((checkpoint / TRAINER).read_text())
    change(trainer)
    (checkpoint / TRAINER).write_text(json.dumps(trainer))
    marker = json.loads((checkpoint / COMPLETE).read_text())
    marker["files"][TRAINER] = {
        "bytes": (checkpoint / TRAINER).stat().st_size,
        "sha256": sha256_of(checkpoint / TRAINER),
    }
    (checkpoint / COMPLETE).write_text(json.dumps(marker))
    return trainer


def _identity(data: Path):
    from lrd_dist.data.format import DataIdentity, Manifest

    return DataIdentity.of(data, Manifest.load(data))


def test_a_checkpoint_older_than_a_config_key_resumes_at_that_keys_default(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    """A key added after the checkpoint was written had its default then: resuming with the default
    is allowed, with another value refused."""
    from lrd_dist.train.checkpoint import verify_checkpoint

    older = tmp_path / "older"
    shutil.copytree(complete_checkpoints(checkpointed_run / "checkpoints")[-1], older)
    trainer = _rewrite_trainer_config(older, lambda config: config["lrd"].pop("pair_features"))

    config = load_config(None, _overrides(synth_with_embeddings, tmp_path / "r", "checkpoint.resume=auto"))
    args = (_identity(synth_with_embeddings), trainer["world_size"], False)
    assert verify_checkpoint(older, config, *args)["state"] == trainer["state"]
    config.lrd.pair_features = "absdiff"
    with pytest.raises(InputError, match=r"lrd\.pair_features: 'concat' -> 'absdiff'"):
        verify_checkpoint(older, config, *args)


def test_a_checkpoint_of_the_old_layout_resumes_and_removed_options_must_be_neutral(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    """Written before the restructuring: moved keys in their old section, sentinels, and the removed
    experiment options at their defaults; with a removed option set, refused naming it."""
    from lrd_dist.train.checkpoint import verify_checkpoint

    def old_layout(config: dict, pair_window: int = 0) -> None:
        config["model"]["leave_one_latent"] = config["lrd"].pop("leave_one_latent")
        config["lrd"]["embeddings"] = config["llm"].pop("table") or ""
        config["lrd"]["shuffle_text"] = config["llm"].pop("shuffle_table")
        config["kg"]["gamma"] = -1.0
        config["llm"]["max_length"] = 64  # the old llm default (irrelevant to a frozen table)
        config["lrd"].update(
            decoder="official",
            num_negatives=8,
            standardize_text=False,
            pair_window=pair_window,
            hard_negatives=0.0,
        )

    config = load_config(None, _overrides(synth_with_embeddings, tmp_path / "r", "checkpoint.resume=auto"))
    older = tmp_path / "older"
    shutil.copytree(complete_checkpoints(checkpointed_run / "checkpoints")[-1], older)
    trainer = _rewrite_trainer_config(older, old_layout)
    args = (_identity(synth_with_embeddings), trainer["world_size"], False)
    assert verify_checkpoint(older, config, *args)["state"] == trainer["state"]

    refused = tmp_path / "refused"
    shutil.copytree(complete_checkpoints(checkpointed_run / "checkpoints")[-1], refused)
    _rewrite_trainer_config(refused, lambda c: old_layout(c, pair_window=2))
    with pytest.raises(InputError, match=r"lrd\.pair_window=2: this experiment option was removed"):
        verify_checkpoint(refused, config, *args)
