"""Steps shared by sources that come as raw interaction logs (MovieLens, Amazon)."""

from __future__ import annotations

import numpy as np


def k_core(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Mask of the rows that survive iterative k-core filtering (every user and item >= k rows)."""
    keep = np.ones(len(user), dtype=bool)
    while True:
        _, user_index, user_counts = np.unique(user[keep], return_inverse=True, return_counts=True)
        _, item_index, item_counts = np.unique(item[keep], return_inverse=True, return_counts=True)
        ok = (user_counts[user_index] >= k) & (item_counts[item_index] >= k)
        if ok.all():
            return keep
        keep[np.flatnonzero(keep)[~ok]] = False


def dedupe(user: np.ndarray, item: np.ndarray, time: np.ndarray) -> np.ndarray:
    """Mask keeping the first of exact duplicate (user, item, time) rows."""
    keys = np.stack([user, item, time], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    keep = np.zeros(len(user), dtype=bool)
    keep[first] = True
    return keep


def ids_by_first_appearance(values: np.ndarray, time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids from 1 in order of first appearance in time (stable); returns (ids, originals)."""
    order = np.lexsort((np.arange(len(values)), time))
    uniques, first_seen, inverse = np.unique(values[order], return_index=True, return_inverse=True)
    rank = np.empty(len(uniques), dtype=np.int64)
    rank[np.argsort(first_seen, kind="stable")] = np.arange(1, len(uniques) + 1)
    ids = np.empty(len(values), dtype=np.int64)
    ids[order] = rank[inverse]
    originals = np.empty(len(uniques), dtype=uniques.dtype)
    originals[rank - 1] = uniques
    return ids, originals
