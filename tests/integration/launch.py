"""Start a script under `accelerate launch` with real CPU processes (gloo), the way ENV_NOTES found works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_cpu(
    script: Path, *args: str, processes: int = 2, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


REPO = Path(__file__).resolve().parents[2]


def lrd_launch(
    launcher: str, *command: str, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """``lrd-dist launch`` with one of the shipped accelerate configs (``launchers/NAME.yaml``)."""
    return subprocess.run(
        lrd_launch_command(launcher, *command),
        env=launch_env(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lrd_launch_command(launcher: str, *command: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lrd_dist.cli",
        "launch",
        "--config_file",
        str(REPO / "launchers" / f"{launcher}.yaml"),
        "--main_process_port",
        str(free_port()),
        "--",
        *command,
    ]


def launch_env(extra: dict | None = None) -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"} | (extra or {})
