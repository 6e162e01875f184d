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
from tests.helpers import relist, resumes, training_log

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


def test_the_same_data_prepared_again_resumes(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    """A preparation's own timing and the file's layout are not the data: a checkpoint resumes on the
    same data prepared again (seen 2026-12-06: an Office run refused after a re-prepare whose
    manifest differed only in ``prepare_seconds``)."""
    from lrd_dist.data.format import sha256_of

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

    assert resumes(killed) == ["step-00000008"]  # it resumed; it did not start again
    a, b = log(straight), training_log(log(killed))
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


def _rewrite_trainer(checkpoint: Path, change) -> dict:
    """Edit a checkpoint's trainer.json as an earlier release would have written it, keeping the
    COMPLETE marker consistent (so only the refusal of its content is tested)."""
    from lrd_dist.train.checkpoint import TRAINER

    trainer = json.loads((checkpoint / TRAINER).read_text())
    change(trainer)
    (checkpoint / TRAINER).write_text(json.dumps(trainer))
    relist(checkpoint, TRAINER)
    return trainer


def _identity(data: Path):
    from lrd_dist.data.format import DataIdentity, Manifest

    return DataIdentity.of(data, Manifest.load(data))


def test_a_checkpoint_of_an_earlier_release_is_refused_naming_the_field_or_key(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    """No conversion layer: a checkpoint of the earlier format (no "format", the fields of then), or
    whose config has a key this release lacks or lacks one it has, is refused in one line that
    names it and says to retrain or use the release that wrote it."""
    from lrd_dist.train.checkpoint import verify_checkpoint

    config = load_config(None, _overrides(synth_with_embeddings, tmp_path / "r", "checkpoint.resume=auto"))
    args = (_identity(synth_with_embeddings), 1, False)
    source = complete_checkpoints(checkpointed_run / "checkpoints")[-1]
    assert verify_checkpoint(source, config, *args)["states"]["train_state"]["step"] == 12

    def earlier_format(trainer: dict) -> None:
        del trainer["format"]
        trainer["state"] = trainer.pop("states")["train_state"]
        trainer["data_checksum"] = trainer.pop("data_fingerprint")

    for name, change, refusal in (
        ("format1", earlier_format, r"checkpoint format 1, this lrd_dist reads format 2"),
        ("added_key", lambda t: t["config"]["lrd"].pop("pair_features"), r"config key lrd\.pair_features"),
        ("removed_key", lambda t: t["config"]["lrd"].update(pair_window=0), r"config key lrd\.pair_window"),
    ):
        older = tmp_path / name
        shutil.copytree(source, older)
        _rewrite_trainer(older, change)
        with pytest.raises(InputError, match=refusal + r".*retrain, or resume it with the lrd_dist release"):
            verify_checkpoint(older, config, *args)


class _RunsACommand:
    """What a hostile checkpoint file holds: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_file_that_would_run_code_is_refused_and_never_unpickled(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path
) -> None:
    """In each place a checkpoint is read (accelerate's optimizer and RNG files, DeepSpeed's ZeRO
    files, ``lrd-dist export``): the file is refused before it is loaded, and even a load that asks
    for ``weights_only=False`` (as DeepSpeed's does) is forced to weights-only inside lrd_dist."""
    import pickle

    import torch

    from lrd_dist.commands.export import export_checkpoint
    from lrd_dist.runtime import weights_only_loading

    marker = tmp_path / "pwned"
    source = complete_checkpoints(checkpointed_run / "checkpoints")[-1]
    places = [
        "accelerate/optimizer.bin",
        "accelerate/random_states_0.pkl",
        "accelerate/pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "accelerate/pytorch_model/mp_rank_00_model_states.pt",
    ]
    for index, place in enumerate(places):
        hostile = tmp_path / f"hostile{index}"
        shutil.copytree(source, hostile)
        target = hostile / place
        target.parent.mkdir(parents=True, exist_ok=True)
        if index % 2:  # a plain pickle, not a torch.save archive
            target.write_bytes(pickle.dumps(_RunsACommand(marker)))
        else:
            torch.save({"state": _RunsACommand(marker)}, target)
        relist(hostile, place)  # listed as if its save had written it
        with pytest.raises(InputError, match=r"refused: .*could run code"):
            _resume(synth_with_embeddings, checkpointed_run, tmp_path, hostile)
        with pytest.raises(InputError, match=r"refused: .*could run code"):
            export_checkpoint(hostile, tmp_path / f"out{index}.safetensors")
        assert not marker.exists(), place
    with weights_only_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "hostile0" / places[0], weights_only=False)
    assert not marker.exists()


def test_one_run_per_directory(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path, caplog
) -> None:
    """A second fresh run into a used directory is refused (or clears it when told to), a run
    holding the directory's lock refuses any other, a lock left by a dead run is taken over, and a
    resume that would change the data order or the objective is refused naming the key."""
    import fcntl
    import textwrap

    used = tmp_path / "used"
    shutil.copytree(checkpointed_run, used)
    fresh = _overrides(synth_with_embeddings, used, "train.max_steps=2")
    with pytest.raises(
        InputError, match=r"holds the checkpoints of another run \(the newest step-00000012\)"
    ):
        train(load_config(None, fresh))
    assert train(load_config(None, [*fresh, "checkpoint.overwrite=true"]))["steps"] == 2
    assert [p.name for p in complete_checkpoints(used / "checkpoints")] == ["step-00000002"]

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, json, os, sys, time
                fd = os.open({str(used / ".lock")!r}, os.O_RDWR | os.O_CREAT)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, json.dumps({{"host": "n7", "pid": os.getpid(), "slurm_job": "42",
                                          "started": "now"}}).encode())
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        resume = _overrides(synth_with_embeddings, used, "train.max_steps=3", "checkpoint.resume=auto")
        with pytest.raises(
            InputError, match=r"another run is training here \(process \d+ on n7, SLURM job 42"
        ):
            train(load_config(None, resume))
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its record is still in the file, the lock is free
    assert "n7" in (used / ".lock").read_text()
    assert train(load_config(None, resume))["steps"] == 3
    assert "ended without releasing the run directory; taking it over" in caplog.text
    with open(used / ".lock") as handle:  # released at the end of the run
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for key, value in (("train.seed", "7"), ("data.batch_size", "32"), ("train.grad_accum", "2")):
        changed = _overrides(synth_with_embeddings, used, "train.max_steps=4", "checkpoint.resume=auto")
        with pytest.raises(InputError, match=rf"{key.replace('.', '[.]')}: "):
            train(load_config(None, [*changed, f"{key}={value}"]))


def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_says_why(
    synth_with_embeddings: Path, checkpointed_run: Path, tmp_path: Path, caplog
) -> None:
    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    newest = run / "checkpoints" / "step-00000012"
    (newest / "COMPLETE").write_text('{"files": {"trainer.json": ')  # cut short by a full disk
    resumed = train(
        load_config(
            None, _overrides(synth_with_embeddings, run, "train.max_steps=14", "checkpoint.resume=auto")
        )
    )
    assert resumed["steps"] == 14
    assert resumes(run) == ["step-00000008"]
    assert "skipping step-00000012" in caplog.text and "COMPLETE: damaged" in caplog.text
    # named explicitly, a damaged checkpoint is refused, as damaged
    with pytest.raises(InputError, match=r"COMPLETE: damaged: not the list of files its save wrote"):
        _resume(synth_with_embeddings, checkpointed_run, tmp_path, newest)
