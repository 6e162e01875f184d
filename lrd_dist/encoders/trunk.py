"""Top-K tuning on a cached trunk: the frozen bottom of the item encoder runs once per catalog.

With ``llm.tune_layers: K`` the embeddings and the bottom L-K transformer layers of the item
encoder never change, so their output for each item, the token states at the cut, is computed once
(eval mode, no gradient) and stored in a memory-mapped file; each training step runs only the top K
layers (LoRA restricted to them through PEFT's ``layers_to_transform``, or fully tuned) and the
pooling, on the cached states of the micro-batch's distinct items.

Both halves run through the Hugging Face model's own ``forward`` on a *view* of it: a shallow copy
whose layer list holds the bottom or the top layers (the modules, and so the weights and the LoRA
adapters, are shared with the model). The model's own code therefore builds the attention masks
(bidirectional for BERT; causal + padding for Llama), the positions, the rotary embeddings and,
for Llama, applies the final norm after the top layers. Cached states are the input to layer L-K
(``hidden_states[L - K]`` in transformers' terms), real tokens only, right-padded in a batch so
positions run 0..n-1 as in a full pass. Supported: BERT-family encoders (``BertModel``, e.g.
all-MiniLM-L6-v2) and Llama-family decoders (``LlamaModel``, e.g. SmolLM2); another architecture is
refused naming its class. Dropout below the cut is off (the trunk runs in eval mode).

The cache is keyed, not trusted: its key hashes the model's weights, the token ids of every item
(so the tokenizer, the template, ``max_length`` and the catalog's texts), the cut and the storage
dtype; a cache whose files do not match its key is refused. It lives under ``llm.cache_dir``
(default ``$LRD_DIST_CACHE`` or ``~/.cache/lrd_dist``), shared by every run with the same key,
whatever the dataset's location. A build is split across ranks in chunks of items, each chunk marked
done once written, so a killed build resumes; the directory is renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrd_dist.errors import InputError

log = logging.getLogger(__name__)

FORMAT = 1
STORAGE = {
    "bf16": (torch.bfloat16, np.int16),  # numpy has no bfloat16: its bits, viewed by torch
    "fp16": (torch.float16, np.float16),
    "fp32": (torch.float32, np.float32),
}
CHUNK_ITEMS = 512  # items per resumable unit of a build
META, STATES, OFFSETS = "meta.json", "states.bin", "offsets.npy"


@dataclass(frozen=True)
class Architecture:
    family: str  # "bert" | "llama"
    num_layers: int
    layers_pattern: str  # the name of the layer list in module paths (PEFT's layers_pattern)


def architecture_of(model: Any) -> Architecture:
    """The family of a base model (no LM head), or an ``InputError`` naming its class."""
    name = type(model).__name__
    if name == "BertModel":
        return Architecture("bert", len(model.encoder.layer), "layer")
    if name == "LlamaModel":
        return Architecture("llama", len(model.layers), "layers")
    raise InputError(
        "llm.tune_layers",
        f"a cached trunk is implemented for BERT- and Llama-family models, not {name}",
        "leave llm.tune_layers unset to tune the whole model",
    )


class _States(nn.Module):
    """Stands in for BERT's embeddings in the top view: its input already is the token states."""

    def forward(self, inputs_embeds: torch.Tensor, **_: object) -> torch.Tensor:
        return inputs_embeds


def layer_view(model: Any, layers: slice, top: bool) -> Any:
    """``model`` with only ``layers`` of its layer list: the bottom (from the token ids to the cut,
    without Llama's final norm) or the top (from the cut's states, with it). Shares every module."""
    arch = architecture_of(model)
    view = copy.copy(model)
    view.__dict__["_modules"] = dict(model._modules)
    if arch.family == "bert":
        encoder = copy.copy(model.encoder)
        encoder.__dict__["_modules"] = dict(model.encoder._modules)
        encoder.layer = nn.ModuleList(list(model.encoder.layer)[layers])
        view.encoder = encoder
        view.pooler = None  # not part of the item vector
        if top:
            view.embeddings = _States()
    else:
        view.layers = nn.ModuleList(list(model.layers)[layers])
        if not top:
            view.norm = nn.Identity()
    return view


def default_cache_dir() -> Path:
    root = os.environ.get("LRD_DIST_CACHE") or Path.home() / ".cache" / "lrd_dist"
    return Path(root) / "trunks"


def weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_sha256(token_ids: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256()
    for row in token_ids:
        digest.update(np.asarray(row, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


class TrunkCache:
    """The token states at the cut of every item (rows 0..N), read from a memory-mapped file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.meta = json.loads((directory / META).read_text())
        self.key = self.meta["key"]
        self.offsets = np.load(directory / OFFSETS, allow_pickle=False)
        self.hidden = int(self.meta["hidden"])
        self.torch_dtype, storage = STORAGE[self.meta["fields"]["dtype"]]
        expected = int(self.offsets[-1]) * self.hidden * np.dtype(storage).itemsize
        if (directory / STATES).stat().st_size != expected:
            raise InputError(
                directory / STATES,
                f"{(directory / STATES).stat().st_size} bytes where its offsets say {expected}",
                f"delete {directory} so that it is rebuilt",
            )
        self.states = np.memmap(
            directory / STATES, dtype=storage, mode="r", shape=(int(self.offsets[-1]), self.hidden)
        )
        self.rows = len(self.offsets) - 1  # items 0..N in the file; ids beyond are ``extend``ed
        self.extension: list[np.ndarray] = []

    def gather(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] item ids -> (states [B, T, H] float32, attention mask [B, T]), right-padded to the
        longest of them."""
        ids = items.cpu().numpy()
        rows = [
            self.states[self.offsets[i] : self.offsets[i + 1]]
            if i < self.rows
            else self.extension[i - self.rows]
            for i in ids.tolist()
        ]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max()) if len(ids) else 1
        buffer = np.zeros((len(ids), width, self.hidden), dtype=self.states.dtype)
        for row, states in enumerate(rows):
            buffer[row, : len(states)] = states
        states = torch.from_numpy(buffer).view(self.torch_dtype).float()
        mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]).long()
        return states, mask

    def extend(self, states: list[torch.Tensor]) -> None:
        """Items beyond the file (``recommend --new-items``), ids rows.., in memory: their token
        states at the cut, stored as the file stores them."""
        storage = self.states.dtype
        for item in states:
            self.extension.append(
                item.to(self.torch_dtype).contiguous().view(torch.uint8).numpy().view(storage)
            )

    def state_dict(self) -> dict:
        """What a checkpoint records of the cache it trained on (``Stateful``)."""
        return {"key": self.key}

    def load_state_dict(self, state: dict) -> None:
        if state.get("key") != self.key:
            raise InputError(
                self.directory,
                f"the checkpoint was trained on trunk cache {str(state.get('key'))[:16]}, this run builds "
                f"{self.key[:16]} (another model, tokenizer, template, catalog, cut or dtype)",
                "resume with the settings the checkpoint was trained with",
            )


def build_or_open(
    model: nn.Module,
    token_ids: Sequence[Sequence[int]],
    pad_id: int,
    tune_layers: int,
    dtype: str,
    root: Path,
    describe: dict,
    chunk_size: int = 128,
) -> TrunkCache:
    """The cache of ``model``'s trunk for these items (rows of ``token_ids``, row 0 the padding
    item), built if missing. Collective when a process group is up: the ranks share the chunks."""
    arch = architecture_of(model)
    if not 1 <= tune_layers < arch.num_layers:
        raise InputError(
            "llm.tune_layers",
            f"{tune_layers} of the model's {arch.num_layers} layers",
            f"use 1 to {arch.num_layers - 1} (tune every layer: leave it unset)",
        )
    fields = {
        "format": FORMAT,
        **describe,
        "architecture": type(model).__name__,
        "weights_sha256": weights_sha256(model),
        "tokens_sha256": tokens_sha256(token_ids),
        "items": len(token_ids) - 1,
        "layers": arch.num_layers,
        "tune_layers": tune_layers,
        "cut": arch.num_layers - tune_layers,
        "dtype": dtype,
    }
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    final = root / key
    rank, world = _rank_and_world()
    lock = _build_lock(root, key) if rank == 0 else contextlib.nullcontext()
    with lock:
        _barrier()  # rank 0 holds the lock: no other job changes the directory while we look
        if not (final / META).is_file():
            _build(model, arch, token_ids, pad_id, fields, key, root, chunk_size, rank, world)
        _barrier()
    cache = TrunkCache(final)
    if cache.meta.get("fields") != fields:
        raise InputError(
            final / META,
            "does not describe the cache its directory is named after",
            f"delete {final} so that it is rebuilt",
        )
    return cache


def _build(model, arch, token_ids, pad_id, fields, key, root, chunk_size, rank, world) -> None:
    cut = fields["cut"]
    storage_torch, storage_np = STORAGE[fields["dtype"]]
    hidden = int(model.config.hidden_size)
    lengths = np.array([len(row) for row in token_ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    size = int(offsets[-1]) * hidden * np.dtype(storage_np).itemsize
    staging = root / f".building-{key}"
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "chunks").mkdir(exist_ok=True)
        states = staging / STATES
        if not states.is_file() or states.stat().st_size != size:
            free = shutil.disk_usage(staging).free
            if free < size * 1.05 + (64 << 20):
                raise InputError(
                    root,
                    f"the trunk cache needs {size / 2**30:.2f} GiB and {free / 2**30:.2f} GiB are free",
                    "free disk space or point llm.cache_dir at a larger disk",
                )
            with open(states, "wb") as handle:
                handle.truncate(size)
        np.save(staging / OFFSETS, offsets, allow_pickle=False)
    _barrier()
    bottom = layer_view(model, slice(0, cut), top=False)
    chunks = range((len(token_ids) + CHUNK_ITEMS - 1) // CHUNK_ITEMS)
    mine = [c for c in chunks if c % world == rank and not (staging / "chunks" / f"{c}.done").is_file()]
    started, last_report, done = time.perf_counter(), 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    descriptor = os.open(staging / STATES, os.O_WRONLY)
    try:
        for chunk in mine:
            items = np.arange(chunk * CHUNK_ITEMS, min((chunk + 1) * CHUNK_ITEMS, len(token_ids)))
            items = items[np.argsort(lengths[items], kind="stable")]
            for part in np.array_split(items, max(1, len(items) // chunk_size)):
                width = int(lengths[part].max())
                ids = torch.full((len(part), width), pad_id, dtype=torch.long)
                for row, item in enumerate(part.tolist()):
                    ids[row, : lengths[item]] = torch.as_tensor(token_ids[item])
                mask = (torch.arange(width)[None, :] < torch.from_numpy(lengths[part])[:, None]).long()
                with torch.no_grad():
                    out = bottom(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
                out = out.to(storage_torch).cpu()
                if not torch.isfinite(out).all():
                    raise InputError(
                        "llm.trunk_dtype",
                        f"the token states at the cut overflow {fields['dtype']}",
                        "use llm.trunk_dtype=bf16 (the range of fp32) or fp32",
                    )
                for row, item in enumerate(part.tolist()):
                    data = out[row, : lengths[item]].contiguous().view(torch.uint8).numpy().tobytes()
                    os.pwrite(descriptor, data, int(offsets[item]) * hidden * np.dtype(storage_np).itemsize)
            os.fsync(descriptor)
            (staging / "chunks" / f"{chunk}.done").write_text("")
            done += len(items)
            if time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                log.info("trunk cache: rank %d encoded %d items (%.0f s)", rank, done, last_report - started)
    finally:
        os.close(descriptor)
        model.train(was_training)
    _barrier()
    if rank == 0:
        missing = [c for c in chunks if not (staging / "chunks" / f"{c}.done").is_file()]
        if missing:
            raise RuntimeError(f"trunk cache {staging}: chunks {missing[:5]} were not written")
        seconds = time.perf_counter() - started
        meta = {"key": key, "fields": fields, "hidden": hidden, "bytes": size, "build_seconds": seconds}
        (staging / META).write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(staging / "chunks")
        os.replace(staging, root / key)
        log.info(
            "trunk cache %s: %d items, %d tokens, %.1f MiB, built in %.1f s",
            key[:16],
            len(token_ids) - 1,
            int(offsets[-1]),
            size / 2**20,
            seconds,
        )


@contextlib.contextmanager
def _build_lock(root: Path, key: str) -> Iterator[None]:
    """One builder per key on this machine (other runs wait, then open what it built)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
