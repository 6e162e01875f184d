"""``lrd-dist embed``: encode a dataset's catalog, one contiguous slice per process.

With ``adapter`` it encodes with a trained encoder: a LoRA adapter (merged into the base model)
or a fully tuned model directory, as written by training under ``<run>/encoder``.

Under ``accelerate launch`` each rank encodes items [r*n//W, (r+1)*n//W) and saves its slice next to
the output; after a barrier rank 0 joins the slices into one table. Without a launcher it is one
process encoding everything.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lrd_dist.config import TextEncoderConfig
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG
from lrd_dist.encoders.text import (
    ENCODER_CONFIG,
    catalog_checksum,
    encode_texts,
    load_encoder,
    save_table,
)
from lrd_dist.errors import InputError

log = logging.getLogger(__name__)
TABLE_NAME = "item_embeddings.safetensors"


def trained_encoder_config(directory: Path) -> dict:
    """What a trained encoder directory says about itself (``lrd_encoder.json``); a tuned model's
    ``model: "."`` is resolved to the directory."""
    path = Path(directory) / ENCODER_CONFIG
    if not path.is_file():
        raise InputError(
            directory,
            f"no {ENCODER_CONFIG}",
            "pass <run>/encoder or <checkpoint>/encoder from lrd-dist train",
        )
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not JSON ({exc})", "re-save the encoder by re-running training") from exc
    if saved.get("model") == ".":
        saved["model"] = str(Path(directory).resolve())
    return saved


def embed_catalog(
    data: Path,
    config: TextEncoderConfig,
    out: Path | None = None,
    adapter: Path | None = None,
    batch_size: int = 64,
    dtype: Literal["float32", "float16"] = "float32",
) -> Path:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    out = out or data / TABLE_NAME
    texts = Catalog.read(data / CATALOG).texts.to_pylist()
    lo = state.process_index * len(texts) // state.num_processes
    hi = (state.process_index + 1) * len(texts) // state.num_processes
    tokenizer, model = load_encoder(config)
    if adapter is not None and trained_encoder_config(adapter).get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    model.to(state.device)
    started = time.perf_counter()
    part = encode_texts(texts[lo:hi], tokenizer, model, config, batch_size)
    seconds = time.perf_counter() - started
    log.info(
        "rank %d encoded %d items in %.1f s (%.0f items/s)",
        state.process_index,
        hi - lo,
        seconds,
        (hi - lo) / max(seconds, 1e-9),
    )
    if state.num_processes == 1:
        save_table(out, part, config, catalog_checksum(texts), dtype)
        return out
    slice_path = out.with_name(f"{out.name}.rank{state.process_index}.npy")
    np.save(slice_path, part, allow_pickle=False)
    state.wait_for_everyone()
    if state.is_main_process:
        slices = [out.with_name(f"{out.name}.rank{r}.npy") for r in range(state.num_processes)]
        table = np.concatenate([np.load(p, allow_pickle=False) for p in slices])
        save_table(out, table, config, catalog_checksum(texts), dtype)
        for p in slices:
            p.unlink()
    state.wait_for_everyone()
    return out
