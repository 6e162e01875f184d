"""Preemption: SIGTERM or SIGUSR1 asks the job to stop at the next step boundary with a checkpoint.

The handler only sets a flag; the loop checks it after every optimizer step with one all-reduce, so
all ranks stop at the same step even when only some of them got the signal. The trainer raises
``Preempted``, the command line exits with ``REQUEUE_EXIT_CODE`` and, when started by ``lrd-dist
launch``, the launcher exits with it too (``accelerate launch`` itself exits 1 whatever its workers
return), so a scheduler can requeue on it.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (torch is imported where it is used: `lrd-dist launch` needs only the constants)
    from accelerate import Accelerator

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by `lrd-dist launch`: the file the main rank writes when it stopped for a signal.
PREEMPTED_FILE_ENV = "LRD_DIST_PREEMPTED_FILE"


class Preempted(Exception):
    """Training stopped for a signal after writing its checkpoint; ``lrd-dist`` exits with
    ``REQUEUE_EXIT_CODE`` on it, so a scheduler requeues the job."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped for a signal at step {step}; resume with checkpoint.resume=auto")
        self.step = step


class NonFiniteLoss(Exception):
    """A loss term went NaN or inf: every rank stops at that step, without a checkpoint of it (the
    last one written is the last good one), with an exit code a scheduler does not requeue on."""

    EXIT_CODE = 3

    def __init__(self, step: int, found: list[tuple[int, list[str]]], last_checkpoint: str | None) -> None:
        where = "; ".join(f"rank {rank}: {', '.join(terms)}" for rank, terms in found)
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
        super().__init__(
            f"non-finite loss at step {step} ({where}); stopped without a checkpoint of it, {kept}. Lower "
            "train.lr, set train.max_grad_norm, or let train.skip_nonfinite_steps skip a few such steps"
        )


class PreemptionFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)

    def _handle(self, number: int, _frame) -> None:
        if self.signal is None:
            log.warning(
                "received %s: stopping after this step with a checkpoint", signal.Signals(number).name
            )
        self.signal = number

    def any_rank(self, accelerator: Accelerator) -> bool:
        """Collective: True on every rank when any rank was signalled."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        import torch

        flag = torch.tensor([0.0 if self.signal is None else 1.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @staticmethod
    def announce() -> None:
        target = os.environ.get(PREEMPTED_FILE_ENV)
        if target:
            Path(target).write_text("preempted\n")
