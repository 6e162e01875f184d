"""Interactions to next-item samples, vectorised: leave-one-out split, histories, eval negatives.

Everything works on whole numpy columns (or chunks of them), never on a Python object per row, so
tens of millions of interactions fit in a few hundred MB and convert in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

TRAIN, DEV, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", DEV: "dev", TEST: "test"}


@dataclass
class Interactions:
    """Columnar interactions with dense ids (users and items from 1).

    ``split`` is given by sources that ship their own split (ReChorus); None asks for the
    leave-one-out split by time. ``negatives[split]`` are given candidate lists, one row per
    interaction of that split in input order, referenced by ``negative_row``.
    """

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    split: np.ndarray | None = None
    negatives: dict[int, np.ndarray] = field(default_factory=dict)
    negative_row: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    # the source's id of each dense user id 1..U (index 0 is user 1); None: the dense id itself
    user_source_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class OrderedInteractions:
    """Interactions sorted by user, then in sequence order, with each row's split and position."""

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    split: np.ndarray
    position: np.ndarray  # index of the row within its user's sequence
    negative_row: np.ndarray | None
    extras: dict[str, np.ndarray]


def order_and_split(inter: Interactions) -> OrderedInteractions:
    """Sort into per-user sequences and assign splits.

    Given splits keep the source's semantics (ReChorus): train rows in file order, then dev, then
    test. Otherwise rows are ordered by time (ties by input order) and split leave-one-out: the
    first interaction always stays in train, the last goes to test and the second-last to dev.
    """
    rows = np.arange(len(inter), dtype=np.int64)
    if inter.split is not None:
        order = np.lexsort((rows, inter.split, inter.user))
    else:
        order = np.lexsort((rows, inter.time, inter.user))
    user = inter.user[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    counts = np.diff(np.r_[starts, len(user)])
    position = rows - np.repeat(starts, counts)
    if inter.split is not None:
        split = inter.split[order]
    else:
        count = np.repeat(counts, counts)
        split = np.full(len(user), TRAIN, dtype=np.int8)
        split[(position == count - 1) & (count >= 2)] = TEST
        split[(position == count - 2) & (count >= 3)] = DEV
    return OrderedInteractions(
        user=user,
        item=inter.item[order],
        time=inter.time[order],
        split=split,
        position=position,
        negative_row=None if inter.negative_row is None else inter.negative_row[order],
        extras={k: v[order] for k, v in inter.extras.items()},
    )


def sample_rows(ordered: OrderedInteractions) -> np.ndarray:
    """Rows that become samples: every dev/test row, and train rows with at least one earlier item."""
    return np.flatnonzero((ordered.split != TRAIN) | (ordered.position > 0))


def user_item_keys(user: np.ndarray, item: np.ndarray, num_items: int) -> np.ndarray:
    """Sorted unique (user, item) keys, for vectorised 'did this user interact with it' lookups."""
    return np.unique(user.astype(np.int64) * (num_items + 1) + item)


def sample_negatives(
    users: np.ndarray,
    num_negatives: int,
    num_items: int,
    clicked_keys: np.ndarray,
    rng: np.random.Generator,
    rows_per_step: int = 16_384,
) -> np.ndarray:
    """For each user, ``num_negatives`` distinct items from 1..num_items the user never interacted with.

    Rejection sampling on whole matrices: oversample, drop clicked items and repeats within a row,
    keep the first ``num_negatives`` survivors in random order; rows that fall short are redrawn
    with a wider sample. Rows are processed ``rows_per_step`` at a time to bound memory.
    """
    out = np.empty((len(users), num_negatives), dtype=np.int32)
    for start in range(0, len(users), rows_per_step):
        stop = min(start + rows_per_step, len(users))
        out[start:stop] = _sample_negatives(users[start:stop], num_negatives, num_items, clicked_keys, rng)
    return out


def _sample_negatives(users, num_negatives, num_items, clicked_keys, rng) -> np.ndarray:
    out = np.empty((len(users), num_negatives), dtype=np.int32)
    todo = np.arange(len(users))
    # Oversample by the expected loss to clicked items and repeats, so that large catalogs (almost
    # every draw usable) do not pay for a fixed 2x; short rows are redrawn wider.
    users_total = int(clicked_keys[-1] // (num_items + 1)) if len(clicked_keys) else 1  # ids are dense
    seen = len(clicked_keys) / max(users_total, 1)  # items per user, on average
    usable_share = max(1e-3, (1 - seen / num_items) * (1 - num_negatives / (2 * num_items)))
    width = int(num_negatives / usable_share * 1.1) + 8
    while len(todo):
        cand = rng.integers(1, num_items + 1, size=(len(todo), width), dtype=np.int64)
        keys = users[todo, None].astype(np.int64) * (num_items + 1) + cand
        found = np.searchsorted(clicked_keys, keys).clip(max=len(clicked_keys) - 1)
        clicked = clicked_keys[found] == keys
        # repeats within a row (rare in a large catalog): found on sorted rows, and only rows that
        # have one pay for locating them (a stable sort puts later occurrences after the first)
        ordered = np.sort(cand, axis=1)
        repeat = np.zeros(cand.shape, dtype=bool)
        with_repeat = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
        if len(with_repeat):
            order = np.argsort(cand[with_repeat], axis=1, kind="stable")
            sorted_rows = np.take_along_axis(cand[with_repeat], order, axis=1)
            repeat_sorted = np.zeros(sorted_rows.shape, dtype=bool)
            repeat_sorted[:, 1:] = sorted_rows[:, 1:] == sorted_rows[:, :-1]
            found_repeat = np.empty_like(repeat_sorted)
            np.put_along_axis(found_repeat, order, repeat_sorted, axis=1)
            repeat[with_repeat] = found_repeat
        usable = ~repeat & ~clicked
        done = usable.sum(axis=1) >= num_negatives
        take = usable & (np.cumsum(usable, axis=1) <= num_negatives)
        out[todo[done]] = cand[done][take[done]].reshape(-1, num_negatives)
        todo = todo[~done]
        width *= 2
    return out


def build_samples(
    ordered: OrderedInteractions,
    rows: np.ndarray,
    max_history: int,
    padded: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Sample columns for the given rows: the target and the last ``max_history`` earlier items.

    Histories are chronological and right-padded with 0 (the ReChorus convention), so
    ``history_items[b, :history_length[b]]`` are the real items, oldest first. ``padded``: item
    and time columns with one 0 appended (``padded_columns``), made once for many calls.
    """
    items, times = padded or padded_columns(ordered)
    length = np.minimum(ordered.position[rows], max_history)
    offsets = np.arange(max_history)
    index = rows[:, None] - length[:, None] + offsets[None, :]
    # padding positions read one appended 0: a single gather per column, no masking pass
    index[offsets[None, :] >= length[:, None]] = len(ordered.item)
    columns = {
        "user": ordered.user[rows].astype(np.int64),
        "target": ordered.item[rows].astype(np.int64),
        "target_time": ordered.time[rows].astype(np.int64),
        "history_length": length.astype(np.int64),
        "history_items": items[index],
        "history_times": times[index],
    }
    for name, values in ordered.extras.items():
        columns[name] = values[rows].astype(np.int64)
    return columns


def padded_columns(ordered: OrderedInteractions) -> tuple[np.ndarray, np.ndarray]:
    """Item (int32) and time (int64) columns with a 0 appended, which history padding reads."""
    return np.append(ordered.item, 0).astype(np.int32), np.append(ordered.time, 0).astype(np.int64)


def iter_sample_chunks(
    ordered: OrderedInteractions,
    max_history: int,
    chunk_rows: int = 1 << 20,
    shuffle_train: np.random.Generator | None = None,
) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """Yield (split, rows, columns) in chunks of at most ``chunk_rows`` sample rows, so that the
    padded history matrices of a large dataset never exist all at once. ``shuffle_train``: put
    each chunk's training rows in random order first (rows are built once, already shuffled)."""
    rows = sample_rows(ordered)
    padded = padded_columns(ordered)
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start : start + chunk_rows]
        split_of_chunk = ordered.split[chunk]
        for split in (TRAIN, DEV, TEST):
            selected = chunk[split_of_chunk == split]
            if split == TRAIN and shuffle_train is not None:
                selected = selected[shuffle_train.permutation(len(selected))]
            if len(selected):
                yield split, selected, build_samples(ordered, selected, max_history, padded)
