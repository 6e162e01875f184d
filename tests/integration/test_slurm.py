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


def _job_state(env: dict, job: str) -> dict:
    shown = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True
    ).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


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
    job = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={log}",
            "slurm/cpu.sbatch",
            "lrd_dist/configs/demo.yaml",
            *overrides,
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    run = tmp_path / "runs" / f"lrd-cpu-{job}"
    metrics = run / "metrics.jsonl"
    _wait(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > 15, 300, "training steps")

    # what SLURM does ahead of the time limit (--signal=USR1@120): USR1 to the job step's tasks
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)
    _wait(
        lambda: _job_state(env, job).get("Restarts") == "1" and _job_state(env, job)["JobState"] == "PENDING",
        300,  # the tasks checkpoint first; slow when the machine is busy (seen: > 120 s under load)
        "the requeue",
    )
    # a requeued job waits ~2 minutes before it is eligible again; the test does not
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    _wait(
        lambda: _job_state(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the end"
    )

    assert _job_state(env, job)["JobState"] == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    assert "Exited with exit code 75" in text and "requeueing" in text and "(restart 1)" in text
    entries = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [e["step"] for e in entries if "loss" in e]
    assert steps == list(range(1, len(steps) + 1))  # one history across the requeue
    epoch_ends = [e["step"] for e in entries if "dev/NDCG@10" in e]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4 * epoch_ends[0] == epoch_ends[-1]
    assert sorted(p.name for p in (run / "logs").iterdir()) == [
        f"lrd-cpu-{job}-task0.out",
        f"lrd-cpu-{job}-task1.out",
    ]
