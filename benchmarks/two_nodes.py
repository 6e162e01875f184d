"""Training throughput of 2 nodes x 1 process against 1 node x 2 processes, same config and seed.

The two "nodes" are the network namespaces of ``scripts/local_slurm_2node.sh`` on this one machine
(needs root): each process has its own host name and address and gloo talks over the veth pair
between them, so this measures the multi-node software path (rendezvous by address, gloo over a
network interface instead of loopback), not a network. Both settings run ``lrd-dist launch`` with one
thread per process for a fixed number of steps, alternating, ``--rounds`` times each; samples/s (all
ranks) is the median over each run's log windows after the first (start-up). JSON out, a table
printed.

    sudo python benchmarks/two_nodes.py --data data/office --config configs/office/kda_lrd.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from process_scaling import free_port  # noqa: E402

SCRIPT = REPO / "scripts" / "local_slurm_2node.sh"
PREFIX = f"lrdb{os.getpid() % 1000}n"
SETTINGS = ("1 node x 2 processes (loopback)", "2 nodes x 1 process (veth)")


def _overrides(data: Path, config: Path, steps: int, out: Path) -> list[str]:
    return [
        "train",
        *("--config", str(config)),
        f"data.dir={data}",
        f"train.out_dir={out}",
        f"train.max_steps={steps}",
        "train.log_every=10",
        "train.tracker=none",
        "eval.enabled=false",
    ]


def _rate(out: Path) -> float:
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([e["samples_per_s"] for e in entries if "samples_per_s" in e][1:])


def one_node(data: Path, config: Path, steps: int, out: Path) -> float:
    command = [sys.executable, "-m", "lrd_dist.cli", "launch", "--config_file"]
    command += [str(REPO / "launchers/cpu_2proc.yaml"), "--main_process_port", str(free_port()), "--"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command + _overrides(data, config, steps, out), env=env, cwd=REPO, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"one node failed:\n{result.stderr[-3000:]}")
    return _rate(out)


def two_nodes(data: Path, config: Path, steps: int, out: Path) -> float:
    """One ``lrd-dist launch`` per namespace, with its machine rank (the README's multi-node command)."""
    port, launches = free_port(), []
    for rank, host in enumerate(("n1", "n2")):
        command = ["nsenter", f"--net=/var/run/netns/{PREFIX}{rank + 1}", "unshare", "--uts", "sh", "-c"]
        command += [f'hostname {host}; exec "$@"', "launch", sys.executable, "-m", "lrd_dist.cli", "launch"]
        command += ["--config_file", str(REPO / "launchers/multi_node_cpu.yaml")]
        command += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        command += ["--main_process_ip", "10.77.77.1", "--main_process_port", str(port), "--"]
        env = os.environ | {"GLOO_SOCKET_IFNAME": "lrd0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        launches.append(
            subprocess.Popen(
                command + _overrides(data, config, steps, out),
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [launch.communicate()[0] for launch in launches]
    if any(launch.returncode for launch in launches):
        raise RuntimeError("two nodes failed:\n" + outputs[0][-3000:] + outputs[1][-3000:])
    return _rate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset with item embeddings")
    parser.add_argument("--config", type=Path, default=REPO / "configs/office/kda_lrd.yaml")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/two_nodes.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("benchmarks/two_nodes.py: needs root for the network namespaces of the two nodes")
    data, config = args.data.resolve(), args.config.resolve()
    rates: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    with tempfile.TemporaryDirectory() as scratch:
        state, env = Path(scratch) / "cluster", os.environ | {"LRD_NETNS_PREFIX": PREFIX}
        subprocess.run(["bash", str(SCRIPT), "start", str(state)], env=env, check=True, capture_output=True)
        try:
            for round_ in range(args.rounds):
                for setting, measure in zip(SETTINGS, (one_node, two_nodes), strict=True):
                    rates[setting].append(
                        measure(data, config, args.steps, Path(scratch) / f"{round_}-{setting}")
                    )
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop", str(state)], env=env, check=True)
    results = {setting: {"samples_per_s": statistics.median(r), "runs": r} for setting, r in rates.items()}
    base = results[SETTINGS[0]]["samples_per_s"]
    for entry in results.values():
        entry["ratio_to_one_node"] = entry["samples_per_s"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"config": str(config), "steps": args.steps, "results": results}, indent=2)
    )
    print(f"{'setting':<36}{'samples/s':>12}{'ratio':>8}   runs")
    for setting, entry in results.items():
        runs = ", ".join(f"{r:.0f}" for r in entry["runs"])
        print(f"{setting:<36}{entry['samples_per_s']:>12.0f}{entry['ratio_to_one_node']:>8.2f}   {runs}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
