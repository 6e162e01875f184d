"""The heap's free pages go back to the system every $LRD_MALLOC_TRIM_STEPS optimizer steps (why, and
what each setting costs: benchmarks/heap_trim.py): the trim releases what a free leaves held, the
trainer calls it on that schedule, and a bad value is refused before anything is built."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lrd_dist.config import DEMO_CONFIG, load_config
from lrd_dist.errors import InputError
from lrd_dist.runtime import TRIM_HEAP_ENV, trim_heap_steps
from lrd_dist.train import callbacks
from lrd_dist.train.trainer import train
from tests.conftest import small_run

# 100 MB of 1 KB blocks freed while the block allocated last pins the heap's top, so glibc's
# automatic trim of the top cannot return them: only malloc_trim can.
HELD_AFTER_FREE = textwrap.dedent(
    """
    import ctypes, json, psutil
    from lrd_dist.runtime import trim_heap
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    rss = lambda: psutil.Process().memory_info().rss / 2**20
    blocks = [libc.malloc(1000) for _ in range(100_000)]
    for block in blocks:
        libc.memset(block, 1, 1000)
    pin = libc.malloc(1000)
    for block in blocks:
        libc.free(block)
    freed = rss()
    trimmed = trim_heap()
    print(json.dumps({"freed": freed, "trimmed": trimmed, "after": rss()}))
    """
)


def test_a_trim_returns_what_freed_blocks_still_hold() -> None:
    import json

    result = json.loads(
        subprocess.run(
            [sys.executable, "-c", HELD_AFTER_FREE], capture_output=True, text=True, check=True
        ).stdout
    )
    assert result["trimmed"] is True
    assert result["freed"] - result["after"] > 50, result  # MiB


def test_the_schedule_comes_from_the_environment_and_bad_values_are_refused(monkeypatch) -> None:
    monkeypatch.delenv(TRIM_HEAP_ENV, raising=False)
    assert trim_heap_steps() == 10
    monkeypatch.setenv(TRIM_HEAP_ENV, "0")
    assert trim_heap_steps() == 0
    monkeypatch.setenv(TRIM_HEAP_ENV, "ten")
    with pytest.raises(InputError, match=r"\$LRD_MALLOC_TRIM_STEPS.*'ten'.*whole number"):
        trim_heap_steps()


def test_the_trainer_trims_every_n_steps_and_not_at_zero(
    synth_with_embeddings: Path, tmp_path: Path, monkeypatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(callbacks, "trim_heap", lambda: calls.append(1) or True)
    for every, run in (("3", "every3"), ("0", "never")):
        monkeypatch.setenv(TRIM_HEAP_ENV, every)
        overrides = small_run(
            synth_with_embeddings, tmp_path / run, "train.max_steps=7", "eval.enabled=false"
        )
        train(load_config(DEMO_CONFIG, overrides))
    assert len(calls) == 2  # steps 3 and 6 of the first run, none of the second

    monkeypatch.setenv(TRIM_HEAP_ENV, "-1")
    with pytest.raises(InputError, match="LRD_MALLOC_TRIM_STEPS"):
        train(load_config(DEMO_CONFIG, small_run(synth_with_embeddings, tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()  # refused before the run directory was made
