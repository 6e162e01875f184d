"""What to recommend from: each user's most recent history, as the model reads it.

For the users of a prepared dataset it is their whole known history: the latest sample of each user
(test, else dev, else train) holds the ``max_history`` items before its target, and the target
itself is the latest item, so the window the model reads ends there. Histories may also come from
a JSON-lines file (a user the model never saw, an anonymous browsing session)::

    {"user": "u42", "items": ["B0001", "B0002"], "times": [1690000000, 1690003600]}

``times`` (seconds, like the dataset's) may be left out: every item then counts as just seen.
Items are named by their source ids (``catalog.parquet``'s ``source_id``); an unknown one is refused
with the line and the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import SPLITS, USERS, Manifest
from lrd_dist.data.json_lines import json_records
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.errors import InputError


@dataclass
class Histories:
    """Row b: user ``user[b]`` (a dense id, 0 for a user the model never saw) named ``names[b]``,
    its last ``length[b]`` items ``items[b, :length[b]]`` (oldest first) at ``times``, and the
    time recommendations are made for, ``now[b]`` (its latest item's time)."""

    user: np.ndarray  # [U] int64
    names: list[str]
    items: np.ndarray  # [U, W] int64, right-padded with 0
    times: np.ndarray  # [U, W] int64
    length: np.ndarray  # [U] int64
    now: np.ndarray  # [U] int64
    given: list[np.ndarray] | None = None  # histories from a file: every item given, beyond the window

    def __len__(self) -> int:
        return len(self.user)

    def batch(self, rows: slice | np.ndarray) -> dict[str, torch.Tensor]:
        """The model's inputs for these rows (``Recommender.score`` takes them)."""
        return {
            "user": torch.from_numpy(self.user[rows]),
            "history_items": torch.from_numpy(self.items[rows]),
            "history_times": torch.from_numpy(self.times[rows]),
            "history_length": torch.from_numpy(self.length[rows]),
            "target_time": torch.from_numpy(self.now[rows]),
        }

    def select(self, rows: np.ndarray) -> Histories:
        return Histories(
            self.user[rows],
            [self.names[r] for r in rows.tolist()],
            self.items[rows],
            self.times[rows],
            self.length[rows],
            self.now[rows],
            None if self.given is None else [self.given[r] for r in rows.tolist()],
        )

    @classmethod
    def from_dataset(cls, directory: str | Path, max_history: int, batch_size: int = 8192) -> Histories:
        directory = Path(directory)
        manifest = Manifest.load(directory)
        stored = manifest.max_history
        users = manifest.num_users
        # the latest sample per user: by split, then target time, then order in the split
        best = np.full((users + 1, 3), -1, dtype=np.int64)
        sequence = np.zeros((users + 1, stored + 1), dtype=np.int64)
        sequence_times = np.zeros((users + 1, stored + 1), dtype=np.int64)
        sequence_length = np.zeros(users + 1, dtype=np.int64)
        counter = 0
        for split_index, split in enumerate(SPLITS):
            config = LoaderConfig(batch_size=batch_size, max_history=stored, shuffle=False)
            for batch in make_loader(SequenceStream(directory, split, config)):
                valid = batch["valid"].numpy()
                user = batch["user"].numpy()[valid]
                length = batch["history_length"].numpy()[valid]
                key = np.stack(
                    [
                        np.full(len(user), split_index),
                        batch["target_time"].numpy()[valid],
                        counter + np.arange(len(user)),
                    ],
                    axis=1,
                )
                counter += len(user)
                latest = _later(key, best[user])
                # several rows of one user in this batch: the last in key order wins
                order = np.lexsort((key[:, 2], key[:, 1], key[:, 0], user))
                last_of_user = np.r_[user[order][1:] != user[order][:-1], True]
                chosen = order[last_of_user]
                chosen = chosen[latest[chosen]]
                rows = user[chosen]
                best[rows] = key[chosen]
                items = batch["history_items"].numpy()[valid][chosen]
                times = batch["history_times"].numpy()[valid][chosen]
                sequence[rows, :stored] = items
                sequence_times[rows, :stored] = times
                sequence[rows, length[chosen]] = batch["target"].numpy()[valid][chosen]
                sequence_times[rows, length[chosen]] = batch["target_time"].numpy()[valid][chosen]
                sequence_length[rows] = length[chosen] + 1
        ids = np.arange(1, users + 1)
        return cls.from_sequences(
            ids,
            user_names(directory, users),
            sequence[1:],
            sequence_times[1:],
            sequence_length[1:],
            max_history,
        )

    @classmethod
    def from_sequences(
        cls,
        user: np.ndarray,
        names: list[str],
        items: np.ndarray,
        times: np.ndarray,
        length: np.ndarray,
        max_history: int,
    ) -> Histories:
        """The last ``max_history`` of each row's ``length`` items (right-padded arrays)."""
        kept = np.minimum(length, max_history)
        start = length - kept
        index = np.minimum(start[:, None] + np.arange(max_history), max(items.shape[1] - 1, 0))
        mask = np.arange(max_history)[None, :] < kept[:, None]
        window = np.where(mask, np.take_along_axis(items, index, 1), 0) if items.shape[1] else index * 0
        window_times = np.where(mask, np.take_along_axis(times, index, 1), 0) if items.shape[1] else index * 0
        last = np.take_along_axis(times, np.maximum(length - 1, 0)[:, None], 1)[:, 0] if times.shape[1] else 0
        now = np.where(length > 0, last, 0)
        return cls(user.astype(np.int64), list(names), window, window_times, kept.astype(np.int64), now)

    @classmethod
    def from_jsonl(
        cls, path: Path, catalog: Catalog, max_history: int, known_users: dict[str, int] | None = None
    ) -> Histories:
        """Histories given as JSON lines; a ``user`` that names a dataset user keeps its embedding
        (``known_users``: source id -> dense id), any other user is scored as a new one."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "no such histories file", "pass a JSON-lines file of {user, items, times}")
        item_id = {s: i + 1 for i, s in enumerate(catalog.source_ids.to_pylist())}
        names, users, sequences, sequence_times = [], [], [], []
        fix = 'write one {"user": ..., "items": [...], "times": [...]} per line, most recent items only'
        for line_number, record in json_records(path, fix):
            given, times, name = _history_record(record, path, line_number, item_id)
            names.append(name)
            users.append((known_users or {}).get(name, 0))
            sequences.append([item_id[i] for i in given])
            sequence_times.append(times)
        if not names:
            raise InputError(path, "no histories", "write one JSON object per line")
        # the model reads the most recent max_history items: no row is padded to a longer line
        width = max(1, min(max_history, max(len(s) for s in sequences)))
        item_matrix = np.zeros((len(names), width), dtype=np.int64)
        time_matrix = np.zeros((len(names), width), dtype=np.int64)
        for row, (sequence, stamps) in enumerate(zip(sequences, sequence_times, strict=True)):
            recent = len(sequence) - min(len(sequence), width)
            item_matrix[row, : len(sequence) - recent] = sequence[recent:]
            time_matrix[row, : len(stamps) - recent] = stamps[recent:]
        length = np.array([min(len(s), width) for s in sequences], dtype=np.int64)
        histories = cls.from_sequences(np.array(users), names, item_matrix, time_matrix, length, max_history)
        histories.given = [np.array(s, dtype=np.int64) for s in sequences]
        return histories


MAX_TIME = 2**53  # seconds (or any integer clock) a float64 still counts exactly


def _history_record(record, path: Path, line: int, item_id: dict) -> tuple[list[str], list[int], str]:
    """(item source ids, times, user name) of one line, every field checked."""
    if not isinstance(record, dict) or not isinstance(record.get("items"), list):
        raise InputError(path, "no list of items", 'write {"user": ..., "items": [...]}', line=line)
    user = record.get("user", f"line{line}")
    if not isinstance(user, str | int) or isinstance(user, bool):
        raise InputError(path, f"user {user!r} is not a string or an integer", "name the user", line=line)
    if any(not isinstance(i, str | int) or isinstance(i, bool) for i in record["items"]):
        raise InputError(path, "items must be source ids (strings or integers)", "list item ids", line=line)
    given = [str(i) for i in record["items"]]
    unknown = [i for i in given if i not in item_id]
    if unknown:
        raise InputError(
            path,
            f"unknown item ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}",
            "use the catalog's source ids (catalog.parquet, column source_id)",
            line=line,
        )
    times = record.get("times")
    if times is None:
        times = [0] * len(given)
    if not isinstance(times, list) or len(times) != len(given):
        raise InputError(path, "times and items differ in length", "give one time per item", line=line)
    bad = [
        t
        for t in times
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < MAX_TIME or t != int(t)
    ]
    if bad:
        raise InputError(
            path,
            f"time {bad[0]!r} is not a whole number of seconds between 0 and 2**53",
            "give Unix times in seconds, one per item",
            line=line,
        )
    return given, [int(t) for t in times], str(user)


def _later(key: np.ndarray, than: np.ndarray) -> np.ndarray:
    """Row-wise lexicographic key > than ([N, 3] each)."""
    later = np.zeros(len(key), dtype=bool)
    equal = np.ones(len(key), dtype=bool)
    for column in range(key.shape[1]):
        later |= equal & (key[:, column] > than[:, column])
        equal &= key[:, column] == than[:, column]
    return later


def user_names(directory: Path, count: int) -> list[str]:
    """Source ids of dense users 1..count (``users.parquet``; the dense id where it is absent)."""
    path = Path(directory) / USERS
    if not path.is_file():
        return [str(i) for i in range(1, count + 1)]
    table = pq.read_table(path)
    names = table.column("source_id").to_pylist()
    if len(names) < count:
        raise InputError(path, f"{len(names)} users, the manifest has {count}", "prepare the dataset again")
    return names[:count]
