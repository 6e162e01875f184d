"""The language representations LRD reads, per item id: a frozen table, or an encoder run live.

``FrozenTextTable`` looks up vectors precomputed by ``lrd-dist embed`` (the paper's setting).
``LiveTextEncoder`` runs the Hugging Face model (LoRA-wrapped or fully trainable) inside the
training step, so the item encoder learns from the recommendation signal; with ``llm.tune_layers``
only its top layers run, on token states of the frozen bottom cached once per catalog
(``encoders/trunk.py``). Catalog texts are
tokenized once, at construction; each call encodes each distinct item of its input once, padded
only to the longest of them, and scatters the vectors back to every occurrence.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrd_dist.config import LLMConfig, RunConfig, TextEncoderConfig
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.remote import local_view
from lrd_dist.encoders.embed_catalog import TABLE_NAME
from lrd_dist.encoders.lora import apply_lora, lora_targets
from lrd_dist.encoders.text import encode_texts, load_encoder, load_table, pool, tokenize
from lrd_dist.encoders.trunk import TrunkCache, architecture_of, build_or_open, default_cache_dir, layer_view
from lrd_dist.errors import InputError

log = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FrozenTextTable(nn.Module):
    table: torch.Tensor  # a buffer: [num_items + 1, dim]

    def __init__(self, table: torch.Tensor, encoder: TextEncoderConfig | None = None) -> None:
        super().__init__()
        # Rebuilt from the embedding file, so not part of the state dict.
        self.register_buffer("table", table, persistent=False)
        self.encoder = encoder  # how the table was encoded (its metadata): to encode more items

    def extend(self, texts: list[str]) -> None:
        """Rows for items beyond the catalog, encoded as the table was (``recommend --new-items``)."""
        if self.encoder is None:
            raise InputError("item text table", "it does not say how it was encoded", "re-run lrd-dist embed")
        tokenizer, model = load_encoder(self.encoder)
        vectors = torch.from_numpy(encode_texts(texts, tokenizer, model, self.encoder))
        self.table = torch.cat([self.table, vectors.to(self.table)])

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.table[items]


class LiveTextEncoder(nn.Module):
    token_ids: torch.Tensor  # buffers
    lengths: torch.Tensor
    model: Any  # a Hugging Face model, or its PEFT wrapper
    tokenizer: Any  # set by from_texts, for saving the tuned encoder
    embed_config: TextEncoderConfig

    def __init__(
        self,
        model: nn.Module,
        token_ids: torch.Tensor,  # [num_items + 1, L] right-padded, row 0 unused (the padding id)
        lengths: torch.Tensor,  # [num_items + 1]
        pooling: str = "mean",
        normalize: bool = True,
        autocast: str = "no",
        dedup: bool = True,
        chunk_size: int = 128,
        lockstep: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("lengths", lengths, persistent=False)
        self.pooling, self.normalize, self.autocast, self.dedup = pooling, normalize, autocast, dedup
        self.chunk_size = chunk_size  # sequences per encoder call, grouped by length
        # Under ZeRO-3 every call of the model gathers its weights collectively, so every rank must
        # make the same number of calls: exactly one per encode (no chunks; a dummy when empty).
        self.lockstep = lockstep
        self.last_encoded = 0  # sequences the last call sent through the model (benchmarks, tests)
        # llm.tune_layers: the cached trunk and the top layers' view (not submodules: the view
        # shares the model's own modules, which are registered once, under ``model``)
        self.trunk: TrunkCache | None = None
        self.__dict__["top"] = None
        self.table: torch.Tensor | None = None  # set while read_catalog_once() is active

    def attach_trunk(self, trunk: TrunkCache, top: nn.Module, bottom: nn.Module) -> None:
        self.trunk = trunk
        self.__dict__["top"] = top
        self.__dict__["bottom"] = bottom  # for items added later

    @torch.no_grad()
    def extend(self, texts: list[str]) -> None:
        """Items beyond the catalog (``recommend --new-items``): tokenized as the catalog was, and
        with a cached trunk their token states at the cut computed now (in memory)."""
        ids = tokenize(texts, self.tokenizer, self.embed_config)
        width = max(self.token_ids.shape[1], max(len(x) for x in ids))
        rows = torch.full((len(ids), width), int(self.tokenizer.pad_token_id), dtype=self.token_ids.dtype)
        for row, sequence in enumerate(ids):
            rows[row, : len(sequence)] = torch.tensor(sequence, dtype=rows.dtype)
        padded = torch.nn.functional.pad(
            self.token_ids, (0, width - self.token_ids.shape[1]), value=int(self.tokenizer.pad_token_id)
        )
        self.token_ids = torch.cat([padded, rows.to(padded)])
        self.lengths = torch.cat([self.lengths, torch.tensor([len(x) for x in ids]).to(self.lengths)])
        if self.trunk is not None:
            bottom, states = self.__dict__["bottom"], []
            for sequence in ids:
                hidden = bottom(
                    input_ids=torch.tensor([sequence]),
                    attention_mask=torch.ones(1, len(sequence), dtype=torch.long),
                )
                states.append(hidden.last_hidden_state[0])
            self.trunk.extend(states)

    @classmethod
    def from_texts(
        cls, model: nn.Module, tokenizer, texts: Sequence[str], embed: TextEncoderConfig, **options
    ) -> LiveTextEncoder:
        ids = tokenize(texts, tokenizer, embed)
        width = max((len(x) for x in ids), default=1)
        token_ids = np.full((len(ids) + 1, width), tokenizer.pad_token_id, dtype=np.int32)
        lengths = np.ones(len(ids) + 1, dtype=np.int32)
        for row, sequence in enumerate(ids, start=1):
            token_ids[row, : len(sequence)] = sequence
            lengths[row] = len(sequence)
        encoder = cls(
            model,
            torch.from_numpy(token_ids),
            torch.from_numpy(lengths),
            pooling=embed.pooling,
            normalize=embed.normalize,
            **options,
        )
        encoder.tokenizer, encoder.embed_config = tokenizer, embed  # for saving the tuned encoder
        return encoder

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """[...] item ids to [..., dim] vectors."""
        if self.table is not None:
            return self.table[items]
        flat = items.reshape(-1)
        if self.dedup:
            distinct, inverse = torch.unique(flat, return_inverse=True)
            vectors = self.encode(distinct)[inverse]
        else:
            vectors = self.encode(flat)
        return vectors.view(*items.shape, vectors.shape[-1])

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """[N] ids to [N, dim], in length-sorted chunks: one long title would otherwise pad the
        whole step to its length (measured on Office: most of the encoder's work)."""
        self.last_encoded = len(items)
        if self.lockstep:
            if len(items) == 0:  # still take part in the collective gathers of the weights
                return self._encode_chunk(items.new_ones(1))[:0]
            return self._encode_chunk(items)
        if len(items) == 0:
            return self.token_ids.new_zeros((0, self.dim), dtype=torch.float32)
        order = torch.argsort(self.lengths[items], stable=True)
        chunks = [self._encode_chunk(items[chosen]) for chosen in order.split(self.chunk_size)]
        vectors = torch.empty((len(items), chunks[0].shape[1]), device=chunks[0].device)
        return vectors.index_copy(0, order, torch.cat(chunks))

    def _encode_chunk(self, items: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(
            items.device.type, dtype=AUTOCAST.get(self.autocast), enabled=self.autocast != "no"
        )
        if self.trunk is not None:  # the top layers on the cached states at the cut
            states, mask = self.trunk.gather(items)
            states, mask = states.to(items.device), mask.to(items.device)
            with autocast, _attention_backend(items.device, self.autocast):
                hidden = self.__dict__["top"](inputs_embeds=states, attention_mask=mask).last_hidden_state
        else:
            lengths = self.lengths[items].long()
            width = int(lengths.max())
            input_ids = self.token_ids[items, :width].long()
            mask = (torch.arange(width, device=items.device)[None, :] < lengths[:, None]).long()
            with autocast:
                hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        vectors = pool(hidden.float(), mask, self.pooling)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    @torch.no_grad()
    def catalog_vectors(self) -> torch.Tensor:
        """[num_items + 1, dim] the whole catalog through the current encoder (eval mode; row 0, the
        padding id, zeros as in a frozen table)."""
        was_training = self.training
        self.eval()
        try:
            items = torch.arange(1, len(self.lengths), device=self.lengths.device)
            vectors = self.encode(items)
        finally:
            self.train(was_training)
        return torch.cat([vectors.new_zeros((1, vectors.shape[1])), vectors])

    @contextlib.contextmanager
    def read_catalog_once(self) -> Iterator[None]:
        """While active, item vectors come from one pass over the catalog, not a pass per call:
        for what reads every item (the relation agreement, ``lrd-dist relations``)."""
        self.table = self.catalog_vectors()
        try:
            yield
        finally:
            self.table = None


def _attention_backend(device: torch.device, autocast: str):
    """On a CPU under bf16/fp16 autocast, attention through SDPA's math backend: the fused CPU
    flash-attention backward in bf16 measured 10x slower than the math path here (MiniLM's top
    layer on an Office micro-batch: 0.95 s of a 1.0 s step)."""
    if device.type != "cpu" or autocast == "no":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def read_catalog_once(item_text: nn.Module | None):
    """``item_text.read_catalog_once()`` for a live encoder; nothing to do for a frozen table."""
    if isinstance(item_text, LiveTextEncoder):
        return item_text.read_catalog_once()
    return contextlib.nullcontext()


def text_encoder_of(llm: LLMConfig) -> TextEncoderConfig:
    """The text-encoder part of the ``llm`` section (what ``lrd-dist embed`` also takes)."""
    return TextEncoderConfig(**{f.name: getattr(llm, f.name) for f in fields(TextEncoderConfig)})


def build_item_text(
    config: RunConfig, catalog: Catalog, lockstep: bool = False
) -> FrozenTextTable | LiveTextEncoder | None:
    """What ``Recommender`` reads item language from; None when nothing reads text (neither LRD
    nor a text-reading item representation). ``lockstep``: the live encoder runs under ZeRO-3 (see
    ``LiveTextEncoder``)."""
    if not config.lrd.enabled and config.model.item_representation == "id":
        return None
    texts = catalog.texts.to_pylist()
    if config.llm.mode == "frozen":
        path = config.llm.table or local_view(config.data.dir) / TABLE_NAME
        table, metadata = load_table(path, texts)
        if config.llm.shuffle_table:  # ablation: each item gets another item's text vector
            order = torch.randperm(len(table) - 1, generator=torch.Generator().manual_seed(config.train.seed))
            table[1:] = table[1:][order]
        return FrozenTextTable(table, _encoder_of(metadata))
    embed = text_encoder_of(config.llm)
    tokenizer, model = load_encoder(embed)
    trunk, top_layers, pattern = None, None, None
    if config.llm.tune_layers is not None:
        if lockstep:
            raise InputError(
                "llm.tune_layers",
                "a cached trunk under DeepSpeed ZeRO-3: the top layers run outside the model's own "
                "forward, which ZeRO-3's parameter gathering follows",
                "launch with DDP or ZeRO-2 (only the top layers train), or leave llm.tune_layers unset",
            )
        trunk = _build_trunk(config, model, tokenizer, texts)
        arch = architecture_of(model)
        top_layers = list(range(arch.num_layers - config.llm.tune_layers, arch.num_layers))
        pattern = arch.layers_pattern
    if not config.llm.dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):  # BERT's attention reads its p as well
                module.p = 0.0
    if config.llm.gradient_checkpointing:
        # Non-reentrant: the reentrant variant drops gradients of adapters whose inputs need none.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.llm.mode == "lora":
        model = apply_lora(model, config.llm, top_layers, pattern)
        log.info("LoRA on %s: %s", config.llm.model, ", ".join(lora_targets(model)))
    encoder = LiveTextEncoder.from_texts(
        model,
        tokenizer,
        texts,
        embed,
        autocast=config.llm.autocast,
        dedup=config.llm.dedup,
        chunk_size=config.llm.chunk_size,
        lockstep=lockstep,
    )
    if trunk is not None and top_layers is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cut = top_layers[0]
        encoder.attach_trunk(
            trunk, layer_view(base, slice(cut, None), top=True), layer_view(base, slice(0, cut), top=False)
        )
    if config.llm.mode == "full":  # with a trunk: everything below the cut is unreached, so frozen
        _freeze_unreached(encoder)
    return encoder


def _encoder_of(metadata: dict[str, str]) -> TextEncoderConfig | None:
    """The encoder settings a table's metadata records (``save_table``), or None if it lacks them."""
    try:
        return TextEncoderConfig(
            model=metadata["model"],
            gguf_file=metadata.get("gguf_file")
            if metadata.get("gguf_file") not in (None, "None", "")
            else None,
            pooling=metadata["pooling"],  # type: ignore[arg-type]
            normalize=metadata["normalize"] == "True",
            template=metadata["template"],
            max_length=int(metadata["max_length"]),
        )
    except (KeyError, ValueError):
        return None


def _build_trunk(config: RunConfig, model: nn.Module, tokenizer, texts: list[str]) -> TrunkCache:
    """The trunk cache of the catalog's texts: rows 0 (the padding item) .. N, as ``from_texts``
    tokenizes them."""
    llm = config.llm
    assert llm.tune_layers is not None
    rows = [[tokenizer.pad_token_id], *tokenize(texts, tokenizer, text_encoder_of(llm))]
    describe = {
        "model": llm.model,
        "gguf_file": llm.gguf_file,
        "tokenizer": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "template": llm.template,
        "max_length": llm.max_length,
    }
    root = Path(llm.cache_dir) if llm.cache_dir else default_cache_dir()
    return build_or_open(
        model, rows, tokenizer.pad_token_id, llm.tune_layers, llm.trunk_dtype, root, describe, llm.chunk_size
    )


def _freeze_unreached(encoder: LiveTextEncoder) -> None:
    """Freeze weights that never reach the pooled vector (BERT's pooler head, an LM head): they
    would get no gradient, which DDP reports as an error and optimisers carry as dead weight."""
    encoder.model.zero_grad(set_to_none=True)
    encoder(torch.tensor([1])).sum().backward()
    unreached = [n for n, p in encoder.model.named_parameters() if p.requires_grad and p.grad is None]
    for name, parameter in encoder.model.named_parameters():
        parameter.grad = None
        if name in unreached:
            parameter.requires_grad_(False)
    if unreached:
        log.info(
            "full fine-tuning: %d tensors do not reach the item vector, frozen: %s",
            len(unreached),
            unreached[:4],
        )
