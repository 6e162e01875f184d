"""Columnar reading of delimited text files with errors that name the offending line.

pyarrow parses the whole file in C++; only when it refuses a file do we scan it line by line, to
tell the user which line is wrong and why. The fast path never builds a Python object per row.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from lrd_dist.errors import InputError

INT_RE = re.compile(r"^\s*-?\d+\s*$")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(path, f"missing {what}", f"put the {what} at this path or point --input elsewhere")
    return path


def read_delimited(
    path: Path,
    columns: dict[str, pa.DataType],
    *,
    header: bool = True,
    delimiter: str = "\t",
    encoding: str = "utf8",
    column_names: list[str] | None = None,
) -> pa.Table:
    """Read the named ``columns`` (name -> type) of a delimited file.

    With ``header`` the names come from the first line and every name in ``columns`` must be
    there; without it ``column_names`` names the fields in order.
    """
    require_file(path, "file")
    first_data_line = 2 if header else 1
    read_options = pacsv.ReadOptions(
        column_names=None if header else column_names, encoding=encoding, block_size=1 << 24
    )
    parse_options = pacsv.ParseOptions(delimiter=delimiter, quote_char=False, newlines_in_values=False)
    convert_options = pacsv.ConvertOptions(
        column_types=columns, include_columns=list(columns), strings_can_be_null=False
    )
    try:
        table = pacsv.read_csv(path, read_options, parse_options, convert_options)
    except pa.ArrowInvalid as exc:
        names = (column_names or []) if not header else _header(path, delimiter, encoding)
        if header:
            missing = [c for c in columns if c not in names]
            if missing:
                raise InputError(
                    path, f"missing column(s) {missing}; the header has {names}", "add the columns", line=1
                ) from exc
        _raise_first_bad_line(path, names, columns, delimiter, encoding, first_data_line, exc)
    return table


def _header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with open(path, "rb") as handle:
        line = handle.readline()
    try:
        return line.decode(encoding).rstrip("\r\n").split(delimiter)
    except UnicodeDecodeError as exc:
        raise InputError(
            path, f"the header is not valid {encoding}", "save the file as UTF-8", line=1
        ) from exc


def _raise_first_bad_line(
    path: Path,
    names: list[str],
    columns: dict[str, pa.DataType],
    delimiter: str,
    encoding: str,
    first_data_line: int,
    cause: Exception,
) -> None:
    """Only called after pyarrow refused the file: find and report the first bad line."""
    positions = {name: names.index(name) for name in columns if name in names}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number < first_data_line:
                continue
            try:
                line = raw.decode(encoding).rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise InputError(
                    path,
                    f"not valid {encoding} text ({exc.reason} at byte {exc.start})",
                    "re-encode the file as UTF-8",
                    line=number,
                ) from cause
            if not line.strip():
                raise InputError(path, "empty line", "remove the empty line", line=number) from cause
            fields = line.split(delimiter)
            if len(fields) != len(names):
                raise InputError(
                    path,
                    f"expected {len(names)} {delimiter!r}-separated fields ({', '.join(names)}), "
                    f"found {len(fields)}",
                    "repair or remove this line",
                    line=number,
                ) from cause
            for name, pos in positions.items():
                if pa.types.is_integer(columns[name]) and not INT_RE.match(fields[pos]):
                    raise InputError(
                        path,
                        f"column {name!r} holds {fields[pos]!r}, not an integer",
                        "repair this line",
                        line=number,
                    ) from cause
    raise InputError(
        path, f"cannot parse the file ({cause})", "check its format against the README"
    ) from cause


def parse_id_lists(
    column: pa.ChunkedArray | pa.Array, path: Path, name: str, first_line: int
) -> pa.ListArray:
    """Parse Python-style id lists such as ``[3, 17, 42]`` or ``[]`` without evaluating them."""
    text = pc.replace_substring_regex(column, r"[\[\]\s]", "")
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    lengths_raw = pc.list_value_length(pc.split_pattern(text, ",")).to_numpy()
    is_empty = pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False)
    lengths = np.where(is_empty, 0, lengths_raw)
    flat = pc.list_flatten(pc.split_pattern(text, ","))
    flat = pc.filter(flat, pc.not_equal(pc.utf8_length(flat), 0))
    numeric = pc.match_substring_regex(flat, r"^-?\d+$").to_numpy(zero_copy_only=False)
    if not numeric.all() or len(flat) != lengths.sum():
        bad_value = np.flatnonzero(~numeric)
        owner = (
            int(np.searchsorted(np.cumsum(lengths), bad_value[0], side="right"))
            if len(bad_value)
            else int(np.flatnonzero(lengths_raw != lengths + is_empty)[0])
        )
        raise InputError(
            path,
            f"column {name!r} is not a list of integer ids: {column[owner]}",
            "write it as [id, id, ...]",
            line=owner + first_line,
        )
    values = pc.cast(flat, pa.int32())
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def check_id_range(
    values: np.ndarray,
    low: int,
    high: int,
    path: Path,
    what: str,
    fix: str,
    first_line: int,
    row_of: np.ndarray | None = None,
) -> None:
    """Refuse ids outside [low, high], naming the line of the first one."""
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        row = int(bad[0] if row_of is None else row_of[bad[0]])
        raise InputError(
            path, f"{what} {int(values[bad[0]])} is not in {low}..{high}", fix, line=row + first_line
        )
