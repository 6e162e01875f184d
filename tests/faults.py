"""Fault injection for the kill-and-resume tests, registered as a trainer callback:

    lrd-dist train ... train.callbacks=[tests.faults:kill_at_step]   with LRD_TEST_KILL_AT=STEP:RANK

SIGKILLs the process of rank RANK right after optimizer step STEP (before that step's checkpoint),
the way a node failure ends a job: no handler runs, nothing is flushed."""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "LRD_TEST_KILL_AT"
CALLBACK = "train.callbacks=[tests.faults:kill_at_step]"


class KillAtStep:
    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.step and trainer.accelerator.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step() -> KillAtStep:
    step, rank = (int(x) for x in os.environ[KILL_AT_ENV].split(":"))
    return KillAtStep(step, rank)


def kill(step: int, rank: int) -> tuple[list[str], dict[str, str]]:
    """The override and the environment that kill rank ``rank`` after step ``step``."""
    return [CALLBACK], {KILL_AT_ENV: f"{step}:{rank}"}


HANG_AT_ENV = "LRD_TEST_HANG_AT"
HANG = "train.callbacks=[tests.faults:hang_at_step]"


class HangAtStep:
    """Rank RANK stops answering after step STEP (a stuck data read, a wedged device): it sleeps."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, trainer) -> None:
        if trainer.state.step == self.step and trainer.accelerator.process_index == self.rank:
            import time

            time.sleep(3600)


def hang_at_step() -> HangAtStep:
    step, rank = (int(x) for x in os.environ[HANG_AT_ENV].split(":"))
    return HangAtStep(step, rank)


def hang(step: int, rank: int) -> tuple[list[str], dict[str, str]]:
    """The override and the environment that make rank ``rank`` stop answering after ``step``."""
    return [HANG], {HANG_AT_ENV: f"{step}:{rank}"}
