"""``lrd-dist launch``: ``accelerate launch`` for schedulers.

``accelerate launch`` (torchrun underneath) exits 1 whatever its workers return, and by default does
not pass SIGUSR1 on to them. This wrapper asks torchrun to forward SIGTERM and SIGUSR1, forwards them
itself from its own parent (a SLURM batch shell, a terminal), and exits with ``REQUEUE_EXIT_CODE``
when the run stopped for a signal after writing its checkpoint, so a scheduler can requeue on it.
Where the caller names the main rank's preemption file (``LRD_DIST_PREEMPTED_FILE`` in a shared run
directory, as the SLURM scripts do), the launchers of all nodes see it, not only the main rank's.

    lrd-dist launch --config_file launchers/cpu_2proc.yaml -- train --config configs/office/kda_lrd.yaml
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from lrd_dist.train.preemption import PREEMPTED_FILE_ENV, REQUEUE_EXIT_CODE

HELP = (
    "accelerate launch with signal forwarding and a requeue exit code: "
    "lrd-dist launch [accelerate launch options] -- train --config ..."
)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
USAGE = "usage: lrd-dist launch [accelerate launch options] -- COMMAND [ARGS] (e.g. -- train --config FILE)"


def launch(argv: list[str]) -> int:
    if "--" not in argv:
        print(USAGE, file=sys.stderr)
        return 2
    split = argv.index("--")
    accelerate_args, command = argv[:split], argv[split + 1 :]
    if not command:
        print(USAGE, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="lrd-dist-launch-") as scratch:
        # A file named by the caller (the SLURM scripts name one per attempt in the shared run
        # directory) is seen by the launchers of every node, not only by the main rank's.
        outer = os.environ.get(PREEMPTED_FILE_ENV)
        marker = Path(outer) if outer else Path(scratch) / "preempted"
        marker.unlink(missing_ok=True)
        env = os.environ | {
            "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            PREEMPTED_FILE_ENV: str(marker),
        }
        env.setdefault("OMP_NUM_THREADS", "1")
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                *accelerate_args,
                "-m",
                "lrd_dist.cli",
                *command,
            ],
            env=env,
        )

        def forward(number: int, _frame) -> None:
            child.send_signal(number)

        for number in FORWARDED:
            signal.signal(number, forward)
        code = child.wait()
        return REQUEUE_EXIT_CODE if marker.exists() else code
