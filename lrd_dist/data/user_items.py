"""Every item each user interacted with, read back from a prepared dataset's own samples.

Two protocols need more of a user's past than the history window a sample stores
(``data.max_history``):

- full-ranking evaluation removes from the ranking *every* item the user interacted with before
  the target (RecBole, generative-recommenders), not only the last ``max_history`` ones;
- the official LRD/ReChorus training negatives reject every item of the user, dev and test items
  included (a leak this project avoids by default; ``train.negative_rule=official`` reproduces it).

The index is rebuilt from the shards in one streaming pass (no extra file in the dataset): the
targets of all samples, plus each user's first item, which is no sample's target but is the first
history item of the user's earliest samples. Entries are sorted by (user, split, time), so "known
before a sample of split s at time t" is a prefix of the user's entries: the earlier splits, then
the same split's entries strictly before t. Memory: 17 bytes per distinct (user, item, split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lrd_dist.data.format import SPLITS, Manifest
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader

SPLIT_INDEX = {name: index for index, name in enumerate(SPLITS)}


class UserItems:
    def __init__(
        self, user: np.ndarray, item: np.ndarray, split: np.ndarray, time: np.ndarray, num_items: int
    ) -> None:
        # one entry per (user, split, item), at its earliest time, sorted by (user, split, time)
        key = (user.astype(np.int64) * len(SPLITS) + split) * (num_items + 1) + item
        order = np.lexsort((time, key))
        key, time = key[order], time[order]
        first = np.r_[True, key[1:] != key[:-1]]
        key, time = key[first], time[first]
        group = key // (num_items + 1)  # user * 3 + split
        order = np.lexsort((time, group))
        self.num_items = num_items
        self.group = group[order]
        self.time = time[order]
        self.item = (key[order] % (num_items + 1)).astype(np.int32)
        # membership of (user, item) in any split, for the official negatives
        self.any_split_keys = np.unique((self.group // len(SPLITS)) * (num_items + 1) + self.item)

    @classmethod
    def from_dataset(cls, directory: str | Path, batch_size: int = 8192) -> UserItems:
        manifest = Manifest.load(directory)
        stored = manifest.max_history
        columns: dict[str, list[np.ndarray]] = {"user": [], "item": [], "split": [], "time": []}

        def add(user, item, split, time) -> None:
            columns["user"].append(user)
            columns["item"].append(item)
            columns["split"].append(np.full(len(user), split, dtype=np.int64))
            columns["time"].append(time)

        for name in SPLITS:
            config = LoaderConfig(batch_size=batch_size, max_history=stored, shuffle=False)
            for batch in make_loader(SequenceStream(directory, name, config)):
                valid = batch["valid"].numpy()
                user = batch["user"].numpy()[valid]
                add(
                    user,
                    batch["target"].numpy()[valid],
                    SPLIT_INDEX[name],
                    batch["target_time"].numpy()[valid],
                )
                # a window that starts at the user's first item (shorter than what is stored)
                length = batch["history_length"].numpy()[valid]
                starts = (length > 0) & (length < stored)
                first_item = batch["history_items"].numpy()[valid][starts, 0].astype(np.int64)
                first_time = batch["history_times"].numpy()[valid][starts, 0]
                add(user[starts], first_item, SPLIT_INDEX["train"], first_time)
        merged = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in columns.items()}
        return cls(merged["user"], merged["item"], merged["split"], merged["time"], manifest.num_items)

    def __len__(self) -> int:
        return len(self.item)

    def known_before(
        self, user: torch.Tensor, split: str, target_time: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) pairs: for each row b, the items its user had before a ``split`` sample at
        ``target_time[b]`` (every earlier split, and this split strictly before that time)."""
        users = user.cpu().numpy().astype(np.int64)
        times = target_time.cpu().numpy().astype(np.int64)
        group_start = users * len(SPLITS)
        group_here = group_start + SPLIT_INDEX[split]
        start = np.searchsorted(self.group, group_start, side="left")
        split_start = np.searchsorted(self.group, group_here, side="left")
        split_stop = np.searchsorted(self.group, group_here, side="right")
        # within the split's segment, entries strictly before the target time (sorted by time)
        stop = split_start.copy()
        for row in np.flatnonzero(split_stop > split_start):  # eval splits hold one or few rows per user
            segment = self.time[split_start[row] : split_stop[row]]
            stop[row] += np.searchsorted(segment, times[row], side="left")
        counts = stop - start
        rows = np.repeat(np.arange(len(users)), counts)
        index = np.repeat(start - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())
        return torch.from_numpy(rows), torch.from_numpy(self.item[index].astype(np.int64))

    def everything(self, user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) pairs: every item row b's user ever had, in any split."""
        users = user.cpu().numpy().astype(np.int64)
        start = np.searchsorted(self.group, users * len(SPLITS), side="left")
        stop = np.searchsorted(self.group, (users + 1) * len(SPLITS), side="left")
        counts = stop - start
        rows = np.repeat(np.arange(len(users)), counts)
        index = np.repeat(start - np.r_[0, np.cumsum(counts)[:-1]], counts) + np.arange(counts.sum())
        return torch.from_numpy(rows), torch.from_numpy(self.item[index].astype(np.int64))

    def interacted(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool, shaped like ``items`` ([B, ...]): whether user b ever interacted with the item."""
        keys = user.view(-1, *[1] * (items.dim() - 1)).numpy().astype(np.int64) * (self.num_items + 1)
        keys = keys + items.numpy()
        table = self.any_split_keys
        found = np.searchsorted(table, keys).clip(max=max(len(table) - 1, 0))
        hit = table[found] == keys if len(table) else np.zeros(keys.shape, bool)
        return torch.from_numpy(hit)
