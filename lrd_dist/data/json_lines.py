"""JSON lines someone hands a command (histories to recommend from, new items): one object per line,
read one bounded line at a time, so a file without newlines cannot be read into memory whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lrd_dist.errors import InputError

MAX_LINE_BYTES = 1 << 20  # one record per line; a longer line is refused, not read


def json_records(path: Path, fix: str, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line of ``path``; a line over ``max_bytes``
    characters or that is not JSON is refused naming the line (``fix``: what to write instead)."""
    with open(path, encoding="utf-8") as handle:
        number = 0
        while line := handle.readline(max_bytes + 1):
            number += 1
            if len(line) > max_bytes:
                raise InputError(path, f"longer than {max_bytes} characters", fix, line=number)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"not JSON ({exc.msg})", fix, line=number) from exc
