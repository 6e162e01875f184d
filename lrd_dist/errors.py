"""One error type for bad user input, so every boundary reports file, place and fix the same way."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input found at a boundary (file, config, CLI).

    The message always names the file, the line or record when there is one, what is wrong and
    how to fix it, because the person reading it usually has only the message.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        fix: str,
        *,
        line: int | None = None,
        record: str | None = None,
    ) -> None:
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.line = line
        self.record = record
        where = self.path
        if line is not None:
            where += f", line {line}"
        if record is not None:
            where += f", {record}"
        super().__init__(f"{where}: {problem}. Fix: {fix}")
