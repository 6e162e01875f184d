"""Writing and reading WebDataset tar shards of sample blocks (layout in ``format.py``)."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds

from lrd_dist.data.format import ShardInfo


class HashingFile:
    """A binary file that computes its sha256 as it is written, so shards need no second read."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class SplitShardWriter:
    """Appends sample columns of one split and cuts them into blocks and shards.

    ``samples_per_shard`` is rounded up to whole blocks; every shard but the last is full, so a
    sample's shard and block follow from its index alone. Blocks are encoded and written on a
    background thread (FIFO, one at a time), overlapping with the caller's numpy work.
    """

    def __init__(self, root: Path, split: str, samples_per_shard: int, block_size: int) -> None:
        self.root = root
        self.split = split
        self.block_size = block_size
        self.blocks_per_shard = max(1, -(-samples_per_shard // block_size))
        (root / split).mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_count = 0
        self.shards: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._file: HashingFile | None = None
        self._shard_samples = 0
        self._shard_blocks = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{split}")
        self._pending_writes: list[Future] = []

    def add(self, columns: dict[str, np.ndarray]) -> None:
        for name, values in columns.items():
            self.pending.setdefault(name, []).append(values)
        self.pending_count += len(next(iter(columns.values())))
        if self.pending_count >= self.block_size:
            self._flush(final=False)

    def close(self) -> list[ShardInfo]:
        self._flush(final=True)
        self._pending_writes.append(self._executor.submit(self._finish_shard))
        self._wait(0)
        self._executor.shutdown()
        return self.shards

    def abort(self) -> None:
        """Stop writing after a failure elsewhere, before the staging directory is removed."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._file is not None:
            self._file.close()

    def _wait(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are queued (bounds memory), re-raising their errors."""
        while len(self._pending_writes) > keep:
            self._pending_writes.pop(0).result()

    def _flush(self, final: bool) -> None:
        if not self.pending_count:
            return
        merged = {k: np.concatenate(v) for k, v in self.pending.items()}
        full = self.pending_count if final else self.pending_count - self.pending_count % self.block_size
        for start in range(0, full, self.block_size):
            block = {k: v[start : start + self.block_size] for k, v in merged.items()}
            self._pending_writes.append(self._executor.submit(self._write_block, block))
            self._wait(64)
        self.pending = {k: [v[full:]] for k, v in merged.items()} if full < self.pending_count else {}
        self.pending_count -= full

    def _write_block(self, block: dict[str, np.ndarray]) -> None:
        if self._tar is None:
            index = len(self.shards)
            self._path = self.root / self.split / f"{self.split}-{index:06d}.tar"
            self._file = HashingFile(self._path)
            self._tar = wds.TarWriter(self._file, mtime=0)
        record: dict[str, object] = {"__key__": f"{self._shard_blocks:08d}"}
        record.update({f"{name}.npy": np.ascontiguousarray(values) for name, values in block.items()})
        self._tar.write(record)
        self._shard_blocks += 1
        self._shard_samples += len(block["user"])
        if self._shard_blocks == self.blocks_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        assert self._file is not None and self._path is not None  # opened with the tar
        self._tar.close()
        self._file.close()
        self.shards.append(
            ShardInfo(
                split=self.split,
                path=str(self._path.relative_to(self.root)),
                samples=self._shard_samples,
                blocks=self._shard_blocks,
                bytes=self._file.size,
                sha256=self._file.digest.hexdigest(),
            )
        )
        self._tar = None
        self._shard_samples = 0
        self._shard_blocks = 0


def decode_block(record: dict, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Decode the ``.npy`` members of one block record; pickled arrays are refused."""
    return {
        name: np.lib.format.read_array(io.BytesIO(record[f"{name}.npy"]), allow_pickle=False)
        for name in fields
    }
