"""Streaming WebDataset loader: exactly once per epoch, equal batches on every rank, exact resume.

Splitting policy (why not WebDataset's shard-level ``split_by_node``/``split_by_worker``: with few
or uneven shards it hands ranks different sample counts, and a rank that runs out first makes DDP
hang). Instead:

1. Each epoch, the shards of a split are put in a seeded order (shuffled when training) and seen as
   one virtual sequence of N samples, using the per-shard counts of the manifest.
2. Rank r of W owns the contiguous range [r*N//W, (r+1)*N//W): every sample belongs to exactly one
   rank. Every rank gets S = ceil(N/W) *slots*; a rank with fewer real samples fills its last slots
   with copies of a real sample marked ``valid=False`` (at most one per rank), so every rank yields
   the same number of batches. Training and evaluation must weight rows by ``valid``.
3. Within a rank, DataLoader worker w of n owns slots [w*S//n, (w+1)*S//n) of the rank's range.
   A worker reads only the shards that overlap its range (at most two partial shards per worker),
   skipping whole blocks it does not own without decoding them.
4. A worker buffer-shuffles its samples with a generator seeded by (seed, epoch, rank, worker) and
   batches them; PyTorch's DataLoader takes batches from the workers round-robin.

Resume: the position is (epoch, batches consumed on this rank), the same on every rank. Each worker
replays its deterministic stream and drops the batches it had already delivered (``worker_progress``
computes how many from the round-robin order), and the worker roles are rotated so that the
DataLoader's round-robin continues with the worker that was next. Exact resume needs the same world
size, ``num_workers``, batch size and seed (the checkpoint records them); see ``docs/data.md``.

Corrupt data: shards are checked against the manifest's sha256 before they are read and the samples
read are counted against the manifest (a tar truncated inside a member otherwise ends silently).
``on_corrupt="fail"`` raises; ``"skip"`` logs the shard and the number of samples dropped and fills
their slots with ``valid=False`` rows, so batch counts stay equal on all ranks.
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lrd_dist.data.format import ARRAY_FIELDS, SCALAR_FIELDS, Manifest, ShardInfo, sha256_of
from lrd_dist.data.remote import FetchedShard, local_view, remote_of
from lrd_dist.data.shards import decode_block
from lrd_dist.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class LoaderConfig:
    batch_size: int = 256
    max_history: int = 20
    shuffle: bool = True
    shuffle_buffer: int = 8192
    seed: int = 0
    num_workers: int = 0
    on_corrupt: str = "fail"  # fail | skip
    verify_checksums: bool = True
    read_timeout_s: float = 120.0  # a remote shard fetch, per attempt (data.read_timeout_s)

    def __post_init__(self) -> None:
        if self.on_corrupt not in ("fail", "skip"):
            raise InputError("config", f"data.on_corrupt={self.on_corrupt!r}", "use 'fail' or 'skip'")
        if self.batch_size < 1:
            raise InputError("config", f"data.batch_size={self.batch_size}", "use a positive batch size")


def worker_progress(batches_per_worker: list[int], consumed: int) -> tuple[list[int], int]:
    """Batches each worker had delivered after ``consumed`` batches in round-robin order (workers
    that run out are skipped), and the worker that delivers the next batch."""
    counts = np.asarray(batches_per_worker)
    consumed = min(consumed, int(counts.sum()))
    low, high = 0, int(counts.max(initial=0))
    while low < high:  # largest t with sum(min(counts, t)) <= consumed
        mid = (low + high + 1) // 2
        if np.minimum(counts, mid).sum() <= consumed:
            low = mid
        else:
            high = mid - 1
    full_rounds = low
    taken = np.minimum(counts, full_rounds)
    remaining = consumed - int(taken.sum())
    active = np.flatnonzero(counts > full_rounds)
    taken[active[:remaining]] += 1
    following = [*active[remaining:], *np.flatnonzero(counts > full_rounds + 1)]
    next_worker = int(following[0]) if following else 0
    return [int(t) for t in taken], next_worker


_verified: dict[tuple[str, int, float], bool] = {}


class SequenceStream(IterableDataset):
    """Batches of one split of a prepared dataset for one rank (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        split: str,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.directory = local_view(directory)  # remote data: a local view of its small files
        self.remote = remote_of(self.directory)  # where its shards are fetched from (None: local)
        self.manifest = Manifest.load(self.directory)
        self.split = split
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.shards = self.manifest.shards_of(split)
        if config.max_history > self.manifest.max_history:
            raise InputError(
                self.directory / "manifest.json",
                f"data.max_history={config.max_history} but the shards store histories of at most "
                f"{self.manifest.max_history}",
                f"use data.max_history <= {self.manifest.max_history} or prepare again with a longer "
                "--max-history",
            )
        self.fields = list(SCALAR_FIELDS) + list(ARRAY_FIELDS)
        if split != "train":
            self.fields.append("negatives")
        self.fields += self.manifest.extra_fields
        self.scalar_fields = set(SCALAR_FIELDS) | set(self.manifest.extra_fields)
        self.widths = dict.fromkeys(self.scalar_fields, 1)
        self.widths.update({name: self.manifest.max_history for name in ARRAY_FIELDS})
        self.widths["negatives"] = self.manifest.num_negatives
        self.epoch = 0
        self.start_batch = 0

    # ----- sizes -------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def slots_per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)

    def _worker_slots(self, num_workers: int) -> list[tuple[int, int]]:
        slots = self.slots_per_rank
        return [(w * slots // num_workers, (w + 1) * slots // num_workers) for w in range(num_workers)]

    def batches_per_worker(self) -> list[int]:
        workers = max(1, self.config.num_workers)
        return [-(-(b - a) // self.config.batch_size) for a, b in self._worker_slots(workers)]

    def __len__(self) -> int:
        """Batches per rank in one epoch: the same on every rank."""
        return sum(self.batches_per_worker())

    def set_position(self, epoch: int, batches_consumed: int = 0) -> None:
        """Where the next iteration starts; call before creating the DataLoader iterator."""
        self.epoch = epoch
        self.start_batch = batches_consumed

    # ----- reading -----------------------------------------------------------------------------------
    def _shard_order(self) -> list[ShardInfo]:
        if not self.config.shuffle:
            return list(self.shards)
        order = np.random.default_rng([self.config.seed, self.epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in order]

    def _check_shard(self, shard: ShardInfo) -> bool:
        path = self.directory / shard.path
        if not path.is_file():
            return self._corrupt(
                shard, "the shard file is missing", "restore it or prepare the dataset again"
            )
        if not self.config.verify_checksums:
            return True
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime)
        if key not in _verified:
            _verified[key] = sha256_of(path) == shard.sha256
        if not _verified[key]:
            return self._corrupt(
                shard,
                "sha256 differs from the manifest (the file changed or is damaged)",
                "restore the shard or prepare the dataset again",
            )
        return True

    def _corrupt(self, shard: ShardInfo, problem: str, fix: str, dropped: int | None = None) -> bool:
        if self.config.on_corrupt == "fail":
            raise InputError(self.directory / shard.path, problem, fix + " (or set data.on_corrupt=skip)")
        lost = f"{dropped} sample(s)" if dropped is not None else "its samples"
        log.warning(
            "skipping corrupt shard %s: %s; dropped %s of this worker's range", shard.path, problem, lost
        )
        return False

    def _check_ids(self, columns: dict[str, np.ndarray], first: int, path: Path) -> None:
        """Ids that index the model's tables must be in range: a shard that agrees with its
        manifest can still hold what no catalog has, which would surface as an IndexError deep in
        a step."""
        limits = {"user": self.manifest.num_users, "target": self.manifest.num_items}
        limits.update(history_items=self.manifest.num_items, negatives=self.manifest.num_items)
        for name, limit in limits.items():
            if name not in columns or not columns[name].size:
                continue
            values = columns[name].reshape(len(columns[name]), -1)
            wrong = (values < 0) | (values > limit) | ((values == 0) if name in ("user", "target") else False)
            if wrong.any():
                row, column = (int(i[0]) for i in np.nonzero(wrong))
                raise InputError(
                    path,
                    f"{name} {int(values[row, column])} is outside the dataset (1..{limit})",
                    "prepare the dataset again: its shards do not belong to this manifest and catalog",
                    record=f"sample {first + row}",
                )

    def _read_range(self, shard: ShardInfo, start: int, stop: int, path: Path) -> Iterator[np.ndarray]:
        """Packed rows of samples [start, stop) of one shard (read from ``path``), checked against
        the manifest."""
        block_size = self.manifest.block_size
        first_block = start // block_size
        position = start  # the next sample of the shard this reader must deliver
        expected = first_block
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([str(path)]),
            wds.tarfile_to_samples(handler=wds.reraise_exception),
        )
        try:
            for record in pipeline:
                block = int(record["__key__"])
                if block < first_block:
                    continue  # owned by another reader: skipped without decoding
                if block != expected or block >= shard.blocks:
                    raise ValueError(f"found block {block} where block {expected} of {shard.blocks} was due")
                columns = decode_block(record, tuple(self.fields))
                self._check_ids(columns, block * block_size, path)
                size = len(columns["user"])
                if size != min(block_size, shard.samples - block * block_size):
                    raise ValueError(f"block {block} holds {size} samples")
                lo, hi = position - block * block_size, min(stop - block * block_size, size)
                yield from self._pack(columns)[lo:hi]
                position = block * block_size + hi
                expected += 1
                if position >= stop and stop < shard.samples:
                    return
        except (tarfile.TarError, ValueError, OSError, KeyError, EOFError) as exc:
            reason = str(exc.args[0]) if exc.args else type(exc).__name__
            self._corrupt(
                shard,
                f"unreadable: truncated or damaged tar ({reason.split(' @ ')[0]})",
                "restore the shard or prepare the dataset again",
                dropped=stop - position,
            )
            return
        if position < stop:
            self._corrupt(
                shard,
                f"the tar ends after {expected} of {shard.blocks} blocks (truncated file?)",
                "restore the shard or prepare the dataset again",
                dropped=stop - position,
            )

    def _pack(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Block columns to one int64 matrix, a row per sample, so that later stages handle one
        array per sample and a batch is a single ``np.stack``."""
        parts = [columns[name].reshape(len(columns["user"]), -1).astype(np.int64) for name in self.fields]
        return np.concatenate(parts, axis=1)

    def _real_samples(self, lo: int, hi: int) -> Iterator[np.ndarray]:
        """Packed rows of the epoch's virtual sample range [lo, hi)."""
        offset = 0
        for shard in self._shard_order():
            begin, end = max(lo - offset, 0), min(hi - offset, shard.samples)
            if begin < end:
                yield from self._read_checked(shard, begin, end)
            offset += shard.samples
            if offset >= hi:
                return

    def _read_checked(self, shard: ShardInfo, start: int, stop: int) -> Iterator[np.ndarray]:
        """``_read_range`` of a shard that passed its checks; a remote one is fetched first (and
        its sha256 always checked) and deleted once read."""
        if self.remote is None:
            if self._check_shard(shard):
                yield from self._read_range(shard, start, stop, self.directory / shard.path)
            return
        fetched = FetchedShard(self.remote, shard.path, shard.sha256, self.config.read_timeout_s)
        try:
            if fetched.matches:
                yield from self._read_range(shard, start, stop, fetched.path)
            else:
                self._corrupt(
                    shard,
                    f"sha256 of the copy fetched from {self.remote} differs from the manifest",
                    "restore the shard at its location or prepare the dataset again",
                )
        finally:
            fetched.close()

    def _template_row(self) -> np.ndarray:
        """A real sample to copy into padding slots when a worker has none of its own."""
        for shard in self.shards:
            for row in self._read_checked(shard, 0, 1):
                return row
        raise InputError(self.directory, f"no readable {self.split} sample", "prepare the dataset again")

    def _batch(self, rows: list[np.ndarray], valid: int) -> dict[str, np.ndarray]:
        """Numpy, not tensors: a worker sends numpy arrays through a pipe cheaply, while every
        tensor would cost a shared-memory segment (10x slower here). ``StreamLoader`` converts."""
        matrix = np.stack(rows)
        out: dict[str, np.ndarray] = {}
        column = 0
        for name in self.fields:
            width = self.widths[name]
            values = matrix[:, column] if name in self.scalar_fields else matrix[:, column : column + width]
            column += width
            out[name] = np.ascontiguousarray(values)
        keep = self.config.max_history
        if keep < self.manifest.max_history:
            length = np.minimum(out["history_length"], keep)
            start = out["history_length"] - length
            index = np.minimum(start[:, None] + np.arange(keep), self.manifest.max_history - 1)
            mask = np.arange(keep)[None, :] < length[:, None]
            for name in ARRAY_FIELDS:
                out[name] = np.where(mask, np.take_along_axis(out[name], index, axis=1), 0)
            out["history_length"] = length
        out["valid"] = np.arange(len(rows)) < valid
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        if workers != max(1, self.config.num_workers):
            raise InputError(
                "config",
                f"the DataLoader has {workers} workers but data.num_workers={self.config.num_workers}",
                "build the loader with make_loader()",
            )
        taken, next_worker = worker_progress(self.batches_per_worker(), self.start_batch)
        # Rotate roles so that the DataLoader's round-robin, which starts at worker 0, continues with
        # the worker that was next when the position was recorded.
        worker = 0 if info is None else (info.id + next_worker) % workers
        first, last = self._worker_slots(workers)[worker]
        rank_start = self.rank * self.num_samples // self.world_size
        rank_real = (self.rank + 1) * self.num_samples // self.world_size - rank_start
        lo, hi = rank_start + first, rank_start + min(last, rank_real)
        rows: Iterator[np.ndarray] = self._real_samples(lo, hi) if lo < hi else iter(())
        if self.config.shuffle:
            rng = random.Random(f"{self.config.seed}/{self.epoch}/{self.rank}/{worker}")
            buffer = self.config.shuffle_buffer
            rows = wds.shuffle(buffer, initial=buffer, rng=rng)(rows)
        yield from self._batches(rows, last - first, skip=taken[worker])

    def _batches(self, rows: Iterator[np.ndarray], slots: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches filling ``slots`` rows: the worker's samples, then copies of a real one marked
        invalid where samples are missing (rank padding, or dropped corrupt data)."""
        size = self.config.batch_size
        template: np.ndarray | None = None
        for index in range(-(-slots // size)):
            want = min(size, slots - index * size)
            batch = list(itertools.islice(rows, want))
            real = len(batch)
            if template is None:
                template = batch[0] if batch else self._template_row()
            batch.extend([template] * (want - real))
            if index >= skip:
                yield self._batch(batch, real)


def _keep_numpy(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return batch


class StreamLoader:
    """Iterates a DataLoader over the stream and turns each numpy batch into tensors (zero-copy).

    Batching happens in the workers (``batch_size=None``); the identity ``collate_fn`` keeps the
    DataLoader from converting to tensors inside the workers.
    """

    def __init__(self, dataset: SequenceStream) -> None:
        workers = dataset.config.num_workers
        self.dataset = dataset
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            collate_fn=_keep_numpy,  # type: ignore[arg-type]  # batches are numpy dicts, not lists
            persistent_workers=False,
            prefetch_factor=8 if workers else None,
        )

    def __len__(self) -> int:
        return len(self.dataset) - min(self.dataset.start_batch, len(self.dataset))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.loader:
            yield {name: torch.from_numpy(values) for name, values in batch.items()}


def make_loader(dataset: SequenceStream) -> StreamLoader:
    return StreamLoader(dataset)
