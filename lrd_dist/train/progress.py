"""Progress of an epoch that fits in a log file.

On a terminal: a tqdm bar. Anywhere else (a SLURM job log, nohup, CI) a bar writes a
carriage-return frame per update and a long run's log becomes megabytes of bars; there one log line
is written every ``seconds`` instead, with the position, the share and the rate.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")


def progress(
    items: Iterable[T],
    total: int,
    initial: int = 0,
    desc: str = "",
    enabled: bool = True,
    seconds: float = 60.0,
    stream=None,
) -> Iterator[T]:
    stream = stream or sys.stderr
    if not enabled:
        yield from items
    elif stream.isatty():
        yield from tqdm(items, total=total, initial=initial, desc=desc, leave=False, file=stream)
    else:
        yield from _log_lines(items, total, initial, desc, seconds)


def _log_lines(items: Iterable[T], total: int, initial: int, desc: str, seconds: float) -> Iterator[T]:
    started = last = time.perf_counter()
    done = initial
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= seconds and done < total:
            rate = (done - initial) / max(now - started, 1e-9)
            log.info("%s: %d/%d (%.0f%%), %.1f it/s", desc, done, total, 100 * done / max(total, 1), rate)
            last = now
