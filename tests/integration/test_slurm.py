"""The SLURM scripts against a real single-node SLURM started on this machine (Debian's slurmctld,
slurmd and munge, daemons started by hand: scripts/local_slurm.sh). Needs root and apt or an
installed SLURM; skipped otherwise."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_LRD
from tests.helpers import resumes
from tests.integration.launch import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if os.geteuid() != 0 or not (shutil.which("slurmctld") or shutil.which("apt-get")):
        pytest.skip("a local SLURM needs root and apt (or SLURM installed)")
    state = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(
        ["bash", str(REPO / "scripts" / "local_slurm.sh"), "start", str(state)],
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    env = os.environ | {"SLURM_CONF": str(state / "slurm.conf"), "HF_HUB_OFFLINE": "1"}
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], env=env, capture_output=True, text=True).stdout.strip()
    assert cpus.isdigit() and int(cpus) >= 2, f"the local node has {cpus!r} CPUs; the 2-task job needs 2"
    yield env
    subprocess.run(["bash", str(REPO / "scripts" / "local_slurm.sh"), "stop", str(state)])


@pytest.mark.parametrize(
    ("nodelist", "node_id", "main_addr"),
    [("gpu[01-04]", 2, "gpu01"), ("node-a[7-9,12],gpu[007-009]", 3, "node-a7"), ("single", 0, "single")],
)
def test_rendezvous_from_slurm_environment(slurm: dict, nodelist: str, node_id: int, main_addr: str) -> None:
    env = slurm | {
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_ID": "123456",
        "SLURM_NODEID": str(node_id),
        "SLURM_NNODES": "4",
    }
    out = subprocess.run(
        [
            "bash",
            "-c",
            "source slurm/common.sh && lrd_rendezvous && "
            "echo $MAIN_ADDR $MAIN_PORT $MACHINE_RANK $NUM_MACHINES",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [main_addr, str(20000 + 123456 % 20000), str(node_id), "4"]


def _sbatch(env: dict, *args: str) -> str:
    """Submit from the repository root (the scripts source slurm/common.sh); the job id."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    return submitted.stdout.strip()


def _job_state(env: dict, job: str) -> dict:
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _first_run_left(env: dict, job: str) -> bool:
    """Whether the node still runs something of the job: a step daemon or a non-idle node state."""
    stepd = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job}\."], capture_output=True)
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
    return stepd.returncode == 0 or state.strip() != "idle"


def _wait(predicate, timeout: float, what: str, diagnosis=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n\n{diagnosis()}")


def _diagnosis(env: dict, job: str, log: Path, run: Path) -> str:
    """What a failed job left: its output, the ranks' logs, the job record and the daemons' logs."""
    parts = [f"job output:\n{log.read_text()[-3000:]}", f"job record: {_job_state(env, job)}"]
    for task in sorted((run / "logs").glob("*.out")) if (run / "logs").is_dir() else []:
        parts.append(f"{task.name}:\n{task.read_text()[-1500:]}")
    for daemon in ("slurmctld", "slurmd"):
        daemon_log = Path(env["SLURM_CONF"]).parent / "log" / f"{daemon}.log"
        if daemon_log.is_file():
            parts.append(f"{daemon}.log:\n{daemon_log.read_text()[-2500:]}")
    return "\n\n".join(parts)


def test_cpu_job_is_signalled_requeues_and_resumes(
    slurm: dict, synth_with_embeddings: Path, tmp_path: Path
) -> None:
    env = slurm | {"RUNS_DIR": str(tmp_path / "runs")}
    overrides = [
        f"data.dir={synth_with_embeddings}",
        "data.batch_size=32",
        *TINY_LRD,
        "train.epochs=4",
        "train.patience=10",
    ]
    log = tmp_path / "job.out"
    job = _sbatch(env, f"--output={log}", "slurm/cpu.sbatch", "lrd_dist/configs/demo.yaml", *overrides)
    run = tmp_path / "runs" / f"lrd-cpu-{job}"
    metrics = run / "metrics.jsonl"
    diagnosis = lambda: _diagnosis(env, job, log, run)  # noqa: E731
    _wait(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 15,
        300,
        "training steps",
        diagnosis,
    )

    # what SLURM does ahead of the time limit (--signal=USR1@120): USR1 to the job step's tasks
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    _wait(
        lambda: (
            int(_job_state(env, job).get("Restarts", "0")) >= 1 or _job_state(env, job)["JobState"] in ended
        ),
        300,  # the tasks checkpoint first; slow when the machine is busy (seen: > 120 s under load)
        "the requeue",
        diagnosis,
    )
    assert _job_state(env, job).get("Restarts") == "1", f"the job ended without a requeue\n\n{diagnosis()}"
    # A requeued job waits ~2 minutes before it is eligible again, which gives the node time to tear
    # down the first run's steps; the test shortens the wait to that teardown (relaunching job 1 while a
    # slurmstepd of its first run is still alive can fail the launch) plus the second in which slurmd
    # revoked the first run's credential (one-second resolution: a credential issued in that second is
    # refused as revoked and the job fails).
    if _job_state(env, job).get("JobState") == "PENDING":
        _wait(lambda: not _first_run_left(env, job), 180, "the first run's steps to end", diagnosis)
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env)
    _wait(
        lambda: _job_state(env, job).get("JobState") in ended,
        600,
        "the end",
        diagnosis,
    )

    assert _job_state(env, job)["JobState"] == "COMPLETED", _diagnosis(env, job, log, run)
    text = log.read_text()
    assert "Exited with exit code 75" in text and "requeueing" in text and "(restart 1)" in text
    entries = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e]
    assert steps == list(range(1, len(steps) + 1))  # one history across the requeue
    (resumed_from,) = resumes(run)  # the requeued attempt resumed from the preemption's checkpoint
    assert 0 < int(resumed_from.split("-")[1]) < steps[-1]
    epoch_ends = [e["step"] for e in entries if "dev/NDCG@10" in e]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4 * epoch_ends[0] == epoch_ends[-1]
    assert sorted(p.name for p in (run / "logs").iterdir()) == [
        f"lrd-cpu-{job}-task0.out",
        f"lrd-cpu-{job}-task1.out",
    ]


# Two tasks as the trainer's ranks leave after a checkpoint for a signal: rank 1 exits 75 while the
# main rank is still on its way out, and `srun --kill-on-bad-exit` ends the main rank (srun: 143).
RACE = """#!/bin/bash
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
source slurm/common.sh
lrd_setup_run
srun --kill-on-bad-exit=1 bash -c '
    if [[ $SLURM_PROCID == 1 ]]; then sleep 2; exit 75; fi
    {announce}
    sleep 120'
lrd_finish $? "$RUN_DIR"
"""


@pytest.mark.parametrize("announced", [True, False], ids=["checkpointed", "crashed"])
def test_a_rank_killed_after_the_checkpoint_still_requeues_the_job(
    slurm: dict, tmp_path: Path, announced: bool
) -> None:
    script = tmp_path / "race.sbatch"
    script.write_text(RACE.format(announce='touch "$LRD_DIST_PREEMPTED_FILE"' if announced else ":"))
    log = tmp_path / "job.out"
    env = slurm | {"RUNS_DIR": str(tmp_path / "runs")}
    job = _sbatch(env, "--job-name=race", f"--output={log}", str(script))
    try:
        _wait(
            lambda: (
                log.is_file()
                and ("finished with exit code" in log.read_text() or "requeue" in log.read_text())
            ),
            120,
            "the job's first attempt to end",
            lambda: log.read_text() if log.is_file() else "(no job output)",
        )
        text = log.read_text()
        if announced:
            assert "after the main rank checkpointed for a signal" in text and "requeueing" in text, text
            _wait(lambda: _job_state(env, job).get("Restarts") == "1", 60, "the requeue")
        else:
            assert "requeueing" not in text and "finished with exit code" in text, text
            _wait(lambda: _job_state(env, job).get("JobState") == "FAILED", 60, "the failed state")
            assert _job_state(env, job).get("Restarts") == "0"
    finally:
        subprocess.run(["scancel", job], env=env)
        _wait(lambda: not _first_run_left(env, job), 180, "the job's steps to end")


def test_requeues_without_a_new_checkpoint_are_capped(tmp_path: Path) -> None:
    """The sbatch scripts' exit path: a job that keeps stopping for a requeue without writing a new
    checkpoint stops after LRD_MAX_IDLE_REQUEUES attempts instead of looping forever."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (stub / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "checkpoints" / "step-00000010" / "COMPLETE").write_text("{}")
    env = {
        "PATH": f"{stub}:/usr/bin:/bin",
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "7",
        "LRD_MAX_IDLE_REQUEUES": "2",
    }

    def finish(code: int) -> subprocess.CompletedProcess:
        script = f'source "{REPO / "slurm" / "common.sh"}"; lrd_finish {code} "{run}"'
        return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=REPO)

    assert finish(75).returncode == 0  # a first requeue
    (run / "checkpoints" / "step-00000020").mkdir()
    (run / "checkpoints" / "step-00000020" / "COMPLETE").write_text("{}")
    assert finish(75).returncode == 0  # progress: requeued again
    assert finish(75).returncode == 0  # no new checkpoint once
    capped = finish(75)  # twice in a row
    assert capped.returncode == 1 and "not requeued again" in capped.stdout
    assert (tmp_path / "scontrol.log").read_text().count("requeue 7") == 3
