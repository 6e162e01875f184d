"""Two real processes (gloo on CPU) under DDP and DeepSpeed ZeRO-2/3: a rank SIGKILLed mid-run and
resumed logs exactly the losses of an uninterrupted run; 2 -> 1 process resume; preemption by
signal; export of a sharded ZeRO checkpoint to one file that ``lrd-dist eval`` scores."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrd_dist.train.checkpoint import complete_checkpoints
from lrd_dist.train.preemption import PREEMPTED_FILE_ENV, REQUEUE_EXIT_CODE
from tests.conftest import TINY_LRD
from tests.faults import hang, kill
from tests.helpers import resumes
from tests.integration.launch import REPO, launch_env, lrd_launch, lrd_launch_command

pytestmark = pytest.mark.slow


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        f"data.dir={data}",
        f"train.out_dir={out}",
        "data.batch_size=32",
        *TINY_LRD,
        "train.epochs=2",
        "train.max_steps=30",
        "checkpoint.every_steps=4",
        *extra,
    ]


def _log(run: Path) -> list[dict]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for entry in entries:
        entry.pop("epoch_seconds", None), entry.pop("samples_per_s", None)
    return entries


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def ddp_reference(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "straight"
    _ok(lrd_launch("cpu_2proc", *_train(synth_with_embeddings, run)))
    return run


@pytest.mark.parametrize("launcher", ["cpu_2proc", "cpu_zero2"])
def test_sigkilled_rank_resumes_with_identical_losses(
    synth_with_embeddings: Path, ddp_reference: Path, tmp_path: Path, launcher: str
) -> None:
    straight = ddp_reference
    if launcher != "cpu_2proc":
        straight = tmp_path / "straight"
        _ok(lrd_launch(launcher, *_train(synth_with_embeddings, straight)))
        # ZeRO-2 and DDP compute the same updates (fp32): same losses up to summation order
        for x, y in zip(_log(ddp_reference), _log(straight), strict=True):
            if "loss" in x:
                assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    killed = tmp_path / "killed"
    fault, fault_env = kill(step=14, rank=1)
    crash = lrd_launch(launcher, *_train(synth_with_embeddings, killed, *fault), env=fault_env)
    assert crash.returncode != 0
    assert complete_checkpoints(killed / "checkpoints")[-1].name == "step-00000012"
    assert max(e["step"] for e in _log(killed)) >= 13  # it ran past the checkpoint before dying

    _ok(lrd_launch(launcher, *_train(synth_with_embeddings, killed, "checkpoint.resume=auto")))
    assert resumes(killed) == ["step-00000012"]
    after = [e for e in _log(killed) if e["step"] > 12]
    assert after == [e for e in _log(straight) if e["step"] > 12]  # bit for bit, every step
    assert len([e for e in after if "loss" in e]) == 30 - 12
    assert (
        json.loads((killed / "results.json").read_text())["test"]
        == json.loads((straight / "results.json").read_text())["test"]
    )


def test_a_rank_that_stops_answering_ends_the_job_within_the_collective_timeout(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """Rank 1 hangs after step 3; rank 0 waits at the next collective for at most
    ``train.collective_timeout_s``, then the job ends (no hang, not the requeue code)."""
    fault, env = hang(step=3, rank=1)
    started = time.monotonic()
    result = lrd_launch(
        "cpu_2proc",
        *_train(synth_with_embeddings, tmp_path / "hung", *fault, "train.collective_timeout_s=10"),
        env=env,
        timeout=300,
    )
    assert result.returncode not in (0, REQUEUE_EXIT_CODE)
    assert time.monotonic() - started < 150
    assert "timed out" in result.stderr.lower() or "timeout" in result.stderr.lower(), result.stderr[-3000:]


def test_sparse_id_table_updates_under_ddp_resume_exactly_and_zero_refuses_them(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """Row-wise gradients all-reduced as sparse tensors (gloo) by DDP: a
    SIGKILLed rank resumes bit for bit (SparseAdam's state is in the checkpoint); ZeRO refuses."""
    sparse = "train.embedding_updates=sparse"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _ok(lrd_launch("cpu_2proc", *_train(synth_with_embeddings, straight, sparse)))
    fault, fault_env = kill(step=14, rank=1)
    crash = lrd_launch("cpu_2proc", *_train(synth_with_embeddings, killed, sparse, *fault), env=fault_env)
    assert crash.returncode != 0
    _ok(lrd_launch("cpu_2proc", *_train(synth_with_embeddings, killed, sparse, "checkpoint.resume=auto")))
    assert resumes(killed) == ["step-00000012"]
    after = [e for e in _log(killed) if e["step"] > 12]
    assert len([e for e in after if "loss" in e]) == 30 - 12
    assert after == [e for e in _log(straight) if e["step"] > 12]  # bit for bit, every step
    refused = lrd_launch("cpu_zero2", *_train(synth_with_embeddings, tmp_path / "zero", sparse))
    assert refused.returncode != 0
    assert "ZeRO partitions dense gradients" in refused.stderr and "cpu_2proc" in refused.stderr


def test_two_process_checkpoint_resumes_in_one_process(
    synth_with_embeddings: Path, ddp_reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    source = ddp_reference / "checkpoints"
    mid_epoch = [p for p in complete_checkpoints(source) if p.name == "step-00000024"]
    assert mid_epoch, [p.name for p in complete_checkpoints(source)]
    shutil.copytree(mid_epoch[0], run / "checkpoints" / mid_epoch[0].name)
    result = subprocess.run(
        [sys.executable, "-m", "lrd_dist.cli", *_train(synth_with_embeddings, run, "checkpoint.resume=auto")],
        env=launch_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _ok(result)
    assert "resuming a 2-process checkpoint with 1 processes" in result.stderr
    assert resumes(run) == ["step-00000024"]
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 30 and results["world_size"] == 1
    assert results["test"]["examples"] == 301


def test_zero3_checkpoint_exports_to_one_file_that_eval_scores(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    run = tmp_path / "zero3"
    # one epoch: the last checkpoint holds the best (and only) weights
    _ok(lrd_launch("cpu_zero3", *_train(synth_with_embeddings, run, "train.epochs=1", "train.max_steps=0")))
    results = json.loads((run / "results.json").read_text())
    assert results["distributed_type"] == "DistributedType.DEEPSPEED" and results["world_size"] == 2
    last = complete_checkpoints(run / "checkpoints")[-1]
    assert (last / "accelerate" / "pytorch_model").is_dir()  # sharded by DeepSpeed
    exported = tmp_path / "model.safetensors"
    base = [sys.executable, "-m", "lrd_dist.cli"]
    run_cli = dict(env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    _ok(subprocess.run([*base, "export", "--checkpoint", str(last), "--out", str(exported)], **run_cli))
    scored = subprocess.run([*base, "eval", "--weights", str(exported), "--split", "test"], **run_cli)
    _ok(scored)
    test = json.loads(scored.stdout[scored.stdout.index("{") :])["test"]
    # scored by 2 ranks during training, by 1 process here: the same examples, the same metrics
    assert test == pytest.approx(results["test"], abs=1e-12)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_the_launcher_checkpoints_and_exits_for_requeue(
    synth_with_embeddings: Path, tmp_path: Path, stop_signal: signal.Signals
) -> None:
    run = tmp_path / "run"
    command = lrd_launch_command(
        "cpu_2proc", *_train(synth_with_embeddings, run, "train.max_steps=0", "train.epochs=40")
    )
    env = launch_env()
    if stop_signal == signal.SIGUSR1:  # as the SLURM scripts run it: a file named per attempt
        named = tmp_path / "preempted"
        named.write_text("an earlier attempt's\n")  # not taken for this attempt's
        env[PREEMPTED_FILE_ENV] = str(named)
    launcher = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) > 20
    ):
        time.sleep(0.2)
    launcher.send_signal(stop_signal)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == REQUEUE_EXIT_CODE, stderr[-4000:]
    stopped_at = max(e["step"] for e in _log(run))
    assert complete_checkpoints(run / "checkpoints")[-1].name == f"step-{stopped_at:08d}"
    assert not (run / "results.json").exists()
    if stop_signal == signal.SIGUSR1:
        assert named.read_text() == "preempted\n"

    # the requeued job: same command, resume=auto, finishes the planned run
    resumed = lrd_launch(
        "cpu_2proc",
        *_train(synth_with_embeddings, run, "train.max_steps=0", "train.epochs=3", "checkpoint.resume=auto"),
    )
    _ok(resumed)
    assert resumes(run) == [f"step-{stopped_at:08d}"]
    results = json.loads((run / "results.json").read_text())
    steps_per_epoch = next(e["step"] for e in _log(run) if "dev/NDCG@10" in e)
    assert results["steps"] == 3 * steps_per_epoch
