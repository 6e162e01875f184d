"""Two nodes for real: a two-node SLURM cluster the test builds from network namespaces on this
machine (``scripts/local_slurm_2node.sh``: two hosts joined by a veth pair, nothing reachable beyond
them), the shipped ``slurm/multi_node.sbatch`` training DDP across them with gloo over the veth, and
``lrd-dist launch`` across the two hosts without SLURM; both log the losses of a one-node,
two-process run of the same config and seed. Needs root (namespaces, SLURM); elsewhere the tests
skip with the reason, and under CI=true that skip fails them (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lrd_dist.train.checkpoint import complete_checkpoints
from tests.conftest import TINY_LRD
from tests.helpers import resumes
from tests.integration.launch import REPO, free_port, lrd_launch

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts" / "local_slurm_2node.sh"
CONFIG = "lrd_dist/configs/demo.yaml"  # every run here: this config, the overrides of _train


def _train(data: Path, *extra: str) -> list[str]:
    return [
        f"data.dir={data}",
        "data.batch_size=64",
        *TINY_LRD,
        "train.max_steps=8",
        "eval.enabled=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        pytest.skip("a two-node cluster of network namespaces needs root, iproute2 and nsenter")
    state = tmp_path_factory.mktemp("two") / "cluster"
    prefix = f"lrd{os.getpid() % 10000}n"
    env = os.environ | {"LRD_NETNS_PREFIX": prefix}
    started = subprocess.run(
        ["bash", str(SCRIPT), "start", str(state)], env=env, capture_output=True, text=True
    )
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, capture_output=True)
        pytest.skip(f"the two-node cluster did not start here: {started.stderr[-500:]}")
    yield {"state": state, "env": env, "prefix": prefix}
    subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, check=True)
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces and not state.exists()  # nothing outlives the cluster
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in links


def _in_cluster(cluster: dict, *command: str, **options) -> subprocess.CompletedProcess:
    """A command inside the first node's network (where slurmctld listens)."""
    return subprocess.run(
        ["bash", str(SCRIPT), "run", str(cluster["state"]), "--", *command],
        env=cluster["env"],
        cwd=REPO,
        capture_output=True,
        text=True,
        **options,
    )


def _losses(run: Path) -> list[tuple]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"], e.get("lrd")) for e in entries if "loss" in e]


@pytest.fixture(scope="module")
def one_node(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: two processes on one node, DDP over gloo."""
    run = tmp_path_factory.mktemp("one") / "run"
    overrides = _train(synth_with_embeddings, f"train.out_dir={run}")
    result = lrd_launch("cpu_2proc", "train", "--config", CONFIG, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def test_the_cluster_has_two_idle_nodes_with_their_own_addresses(two_nodes: dict) -> None:
    nodes = _in_cluster(two_nodes, "sinfo", "-h", "-N", "-o", "%N %T").stdout.split()
    assert nodes == ["n1", "idle", "n2", "idle"]
    hosts = _in_cluster(two_nodes, "srun", "-N2", "-n2", "sh", "-c", "echo $(hostname)=$SLURM_NODEID")
    assert sorted(hosts.stdout.split()) == ["n1=0", "n2=1"], hosts.stderr


def test_multi_node_sbatch_trains_ddp_across_two_nodes_like_one_node(
    two_nodes: dict, synth_with_embeddings: Path, one_node: Path, tmp_path: Path
) -> None:
    run, output = _sbatch_and_wait(
        two_nodes, tmp_path, "launchers/multi_node_cpu.yaml", _train(synth_with_embeddings)
    )
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 8
    logs = {p.name: p.read_text() for p in (run / "logs").iterdir()}
    assert len(logs) == 2 and any("rank 0 of 2" in t for t in logs.values())
    assert any("rank 1 of 2" in t for t in logs.values())
    assert "2 nodes x 1 processes" in output and "main 10.77.77.1:" in output
    assert _losses(run) == _losses(one_node)  # gloo over the veth: the same numbers


def test_lrd_dist_launch_across_two_hosts_without_slurm(
    two_nodes: dict, synth_with_embeddings: Path, one_node: Path, tmp_path: Path
) -> None:
    """The README's multi-node command, one launch per host with its machine rank."""
    port, run = free_port(), tmp_path / "run"
    prefix = two_nodes["prefix"]
    launches = []
    for rank, host in enumerate(("n1", "n2")):
        command = [
            "nsenter",
            f"--net=/var/run/netns/{prefix}{rank + 1}",
            "unshare",
            "--uts",
            "sh",
            "-c",
            f'hostname {host}; exec "$@"',
            "launch",
            str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else "python3",
            "-m",
            "lrd_dist.cli",
            "launch",
            "--config_file",
            "launchers/multi_node_cpu.yaml",
            *("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)),
            *("--main_process_ip", "10.77.77.1", "--main_process_port", str(port)),
            "--",
            "train",
            *("--config", CONFIG),
            *_train(synth_with_embeddings, f"train.out_dir={run}"),
        ]
        env = os.environ | {"GLOO_SOCKET_IFNAME": "lrd0", "OMP_NUM_THREADS": "1"}
        launches.append(
            subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [launch.communicate(timeout=300)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert json.loads((run / "results.json").read_text())["world_size"] == 2
    assert _losses(run) == _losses(one_node)


def _sbatch_and_wait(
    cluster: dict,
    tmp_path: Path,
    launcher: str,
    overrides: list[str],
    nodes: str = "--nodes=2",
    expect: str = "COMPLETED",
    run_dir: Path | None = None,
) -> tuple[Path, str]:
    """Submit slurm/multi_node.sbatch to the nodes (continuing ``run_dir`` if given) and wait for
    the job to end as ``expect``; (the run directory it made, or None; the job's output)."""
    runs = tmp_path / "runs"
    place = f"RUN_DIR={run_dir}" if run_dir else f"RUNS_DIR={runs}"
    submit = (
        f"cd {REPO} && LAUNCHER={launcher} PROCS_PER_NODE=1 LRD_NETWORK_INTERFACE=lrd0 {place} "
        f"sbatch --parsable {nodes} --output={tmp_path}/job-%j.out slurm/multi_node.sbatch {CONFIG} "
        + " ".join(overrides)
    )
    job = _in_cluster(cluster, "bash", "-c", submit).stdout.strip()
    assert job.isdigit(), job
    deadline, state = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        shown = _in_cluster(cluster, "scontrol", "-o", "show", "job", job).stdout
        state = next((f.split("=", 1)[1] for f in shown.split() if f.startswith("JobState=")), "")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(1)
    output = (tmp_path / f"job-{job}.out").read_text()
    assert state == expect, output
    made = list(runs.iterdir()) if runs.exists() else []
    return (made[0] if len(made) == 1 else None), output  # type: ignore[return-value]


def test_zero2_across_two_nodes_like_one_node_and_its_export_is_the_best_weights(
    two_nodes: dict, synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """ZeRO-2 shards written on two hosts: the losses of one node with two processes, the
    checkpoint exported to one file equals the run's best weights of that step, bit for bit, and
    resubmitted to one node (what a lost node leaves) the run refuses the world-size change."""
    from safetensors.torch import load_file

    from lrd_dist.cli import main

    one_epoch = [f"data.dir={synth_with_embeddings}", "data.batch_size=64", *TINY_LRD, "train.epochs=1"]
    reference = tmp_path / "one"
    result = lrd_launch("cpu_zero2", "train", "--config", CONFIG, *one_epoch, f"train.out_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    run, _ = _sbatch_and_wait(two_nodes, tmp_path, "launchers/multi_node_cpu_zero2.yaml", one_epoch)
    assert "DEEPSPEED" in json.loads((run / "results.json").read_text())["distributed_type"]
    assert _losses(run) == _losses(reference)
    checkpoint = complete_checkpoints(run / "checkpoints")[-1]
    assert (
        main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model.safetensors")]) == 0
    )
    exported, best = load_file(str(tmp_path / "model.safetensors")), load_file(str(run / "best.safetensors"))
    assert exported.keys() == best.keys() and all(exported[k].equal(best[k]) for k in best)
    # the ZeRO shards of two ranks cannot continue on the one node a lost node leaves: refused, with why
    _, output = _sbatch_and_wait(
        two_nodes,
        tmp_path,
        "launchers/multi_node_cpu_zero2.yaml",
        [*one_epoch[:-1], "train.epochs=2"],
        nodes="--nodes=1 --nodelist=n1",
        expect="FAILED",
        run_dir=run,
    )
    logs = "".join(log.read_text() for log in sorted((run / "logs").iterdir()))
    assert "DeepSpeed ZeRO checkpoint of 2 ranks, resumed with 1" in logs, output
    assert "`lrd-dist export` it and start from the weights" in logs
    assert complete_checkpoints(run / "checkpoints")[-1] == checkpoint  # nothing written over


def test_a_signal_reaches_both_nodes_and_the_requeued_job_resumes_on_two_nodes(
    two_nodes: dict, synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """SIGUSR1 (what SLURM sends ahead of the time limit) to the job: the ranks on both hosts stop at
    one step with a checkpoint, the job exits 75 and requeues, and the requeued job resumes on two
    nodes from that step and logs the losses of a run that was never stopped."""
    four_epochs = [f"data.dir={synth_with_embeddings}", "data.batch_size=32", *TINY_LRD, "train.epochs=4"]
    reference = tmp_path / "one"
    result = lrd_launch("cpu_2proc", "train", "--config", CONFIG, *four_epochs, f"train.out_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = tmp_path / "runs"
    submit = (
        f"cd {REPO} && LAUNCHER=launchers/multi_node_cpu.yaml PROCS_PER_NODE=1 LRD_NETWORK_INTERFACE=lrd0 "
        f"RUNS_DIR={runs} sbatch --parsable --nodes=2 --output={tmp_path}/job.out "
        f"slurm/multi_node.sbatch {CONFIG} " + " ".join(four_epochs)
    )
    job = _in_cluster(two_nodes, "bash", "-c", submit).stdout.strip()
    assert job.isdigit(), job

    def state() -> dict:
        shown = _in_cluster(two_nodes, "scontrol", "-o", "show", "job", job).stdout
        return dict(field.split("=", 1) for field in shown.split() if "=" in field)

    def wait(predicate, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what}: {state()}\n{(tmp_path / 'job.out').read_text()}"
            time.sleep(1)

    metrics = lambda: next(runs.glob("*/metrics.jsonl"), None)  # noqa: E731
    wait(lambda: metrics() is not None and len(metrics().read_text().splitlines()) > 20, "training steps")
    _in_cluster(two_nodes, "scancel", "--signal=USR1", job, check=True)
    wait(lambda: int(state().get("Restarts", "0")) >= 1, "the requeue")
    run = metrics().parent
    stopped = complete_checkpoints(run / "checkpoints")[-1].name

    # A requeued job waits ~2 minutes before it is eligible again; the test shortens that to the
    # teardown of the first attempt on both nodes, plus the second in which slurmd revoked its
    # credential (revocations have one-second resolution: a credential issued in the same second is
    # refused, "Job credential revoked", and the job fails instead of starting).
    def first_attempt_left() -> bool:
        steps = _in_cluster(two_nodes, "squeue", "-h", "-s", "-j", job).stdout.strip()
        nodes = _in_cluster(two_nodes, "sinfo", "-h", "-N", "-o", "%T").stdout.split()
        return not steps and nodes == ["idle", "idle"]

    wait(first_attempt_left, "the first attempt's steps to end", 180)
    time.sleep(2)
    _in_cluster(two_nodes, "scontrol", "update", f"JobId={job}", "StartTime=now")
    wait(lambda: state().get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the second attempt")
    output = (tmp_path / "job.out").read_text()
    daemons = "".join(log.read_text()[-3000:] for log in sorted((two_nodes["state"] / "log").iterdir()))
    assert state()["JobState"] == "COMPLETED" and "requeueing" in output, f"{state()}\n{output}\n{daemons}"
    assert resumes(run) == [stopped]  # it resumed from the signal's checkpoint, not from step 0
    assert _losses(run) == _losses(reference)
    logs = "".join(p.read_text() for p in (run / "logs").iterdir())
    assert logs.count("received SIGUSR1") >= 2  # on both hosts


def test_losing_a_node_ends_the_job_within_the_timeout_and_the_run_resumes_on_the_node_left(
    two_nodes: dict, synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """Every process of the second host is killed mid-epoch (its slurmd, the job's launcher and
    rank): the rank left stops at its next collective within ``train.collective_timeout_s`` instead of
    hanging, and the run, resubmitted to the one node left, resumes from its last complete checkpoint
    (the two-process checkpoint continued by one process)."""
    overrides = [
        f"data.dir={synth_with_embeddings}",
        "data.batch_size=32",
        *TINY_LRD,
        "train.epochs=3",
        "checkpoint.every_steps=5",
        "train.collective_timeout_s=15",
    ]
    runs = tmp_path / "runs"
    base = f"cd {REPO} && LAUNCHER=launchers/multi_node_cpu.yaml PROCS_PER_NODE=1 LRD_NETWORK_INTERFACE=lrd0 "
    submit = (
        base + f"RUNS_DIR={runs} sbatch --parsable --nodes=2 --output={tmp_path}/job.out "
        f"slurm/multi_node.sbatch {CONFIG} " + " ".join(overrides)
    )
    job = _in_cluster(two_nodes, "bash", "-c", submit).stdout.strip()

    def state(which: str) -> str:
        shown = _in_cluster(two_nodes, "scontrol", "-o", "show", "job", which).stdout
        return next((f.split("=", 1)[1] for f in shown.split() if f.startswith("JobState=")), "")

    deadline = time.monotonic() + 300
    while not any(
        len(m.read_text().splitlines()) > 12 for m in runs.glob("*/metrics.jsonl")
    ):  # some steps and a checkpoint or two
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()
        time.sleep(0.5)
    (run,) = runs.iterdir()
    lost = time.monotonic()
    second = f"/var/run/netns/{two_nodes['prefix']}2"
    pids = subprocess.run(["ip", "netns", "pids", Path(second).name], capture_output=True, text=True).stdout
    subprocess.run(["kill", "-9", *pids.split()], check=False)
    ended = ("FAILED", "NODE_FAIL", "CANCELLED", "COMPLETED", "TIMEOUT")
    while state(job) == "RUNNING":  # then requeued (PENDING: its --requeue) or failed
        assert time.monotonic() - lost < 150, "the job hung after losing a node"
        time.sleep(1)
    assert state(job) != "COMPLETED"
    _in_cluster(two_nodes, "scancel", job)  # its requeue would wait for the lost node
    last = complete_checkpoints(run / "checkpoints")[-1]
    resubmit = (
        base + f"RUN_DIR={run} sbatch --parsable --nodes=1 --nodelist=n1 "
        f"--output={tmp_path}/again.out slurm/multi_node.sbatch {CONFIG} " + " ".join(overrides)
    )
    again = _in_cluster(two_nodes, "bash", "-c", resubmit).stdout.strip()
    deadline = time.monotonic() + 300
    while state(again) not in ended:
        assert time.monotonic() < deadline, (tmp_path / "again.out").read_text()
        time.sleep(1)
    assert state(again) == "COMPLETED", (tmp_path / "again.out").read_text()
    assert resumes(run)[-1] == last.name
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 1 and results["epochs_run"] == 3
