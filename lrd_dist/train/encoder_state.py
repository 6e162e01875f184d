"""The live LLM item encoder's trained state, in its libraries' own formats, and a check that it
really trained.

``save_encoder`` writes a LoRA adapter with PEFT's ``save_pretrained`` (loadable by
``PeftModel.from_pretrained``) or a fully tuned encoder with transformers' ``save_pretrained`` and
its tokenizer, plus ``lrd_encoder.json``: how items were turned into text and pooled, which
``lrd-dist embed --adapter`` reads. ``encoder_summary`` fingerprints the trainable weights on every
rank: LoRA that silently does not train (a known failure under ZeRO-3 with gradient checkpointing
elsewhere) shows as a zero adapter, and ranks that drifted apart as differing fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from lrd_dist.encoders.item_text import LiveTextEncoder
from lrd_dist.encoders.lora import lora_targets
from lrd_dist.encoders.text import ENCODER_CONFIG
from lrd_dist.runtime import full_parameters

log = logging.getLogger(__name__)


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_encoder(encoder: LiveTextEncoder, deepspeed: bool, directory: Path, main_process: bool) -> None:
    """Collective (gathers ZeRO-3 shards); the main process writes."""
    model = encoder.model
    peft = is_peft(model)
    with full_parameters(model, deepspeed, trainable_only=peft):
        if not main_process:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if peft:
            model.save_pretrained(str(directory))
        else:
            # A GGUF-loaded model carries its quantisation config; the weights in memory are plain.
            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config
            model.save_pretrained(str(directory))
            encoder.tokenizer.save_pretrained(str(directory))
        embed = asdict(encoder.embed_config)
        embed.update(adapter=peft)
        if not peft:
            embed.update(model=".", gguf_file="")  # the directory itself is the model
        (directory / ENCODER_CONFIG).write_text(json.dumps(embed, indent=2) + "\n")


def encoder_summary(encoder: LiveTextEncoder, deepspeed: bool, gather: Callable[[list], list] | None) -> dict:
    """Collective. Trainable/frozen sizes, adapter targets, and per rank a sha256 of the trainable
    weights and the norm of LoRA's B matrices (zero at initialisation, so zero means untrained)."""
    model = encoder.model
    with full_parameters(model, deepspeed, trainable_only=True):
        trainable = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256()
    for name in sorted(trainable):
        digest.update(name.encode())
        digest.update(trainable[name].contiguous().numpy().tobytes())
    lora_b = math.sqrt(sum(float(t.pow(2).sum()) for n, t in trainable.items() if "lora_B" in n))
    mine = [{"sha256": digest.hexdigest(), "lora_B_norm": lora_b}]
    per_rank = gather(mine) if gather is not None else mine
    frozen = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if not p.requires_grad)
    summary = {
        "mode": "lora" if is_peft(model) else "full",
        "trainable_parameters": sum(t.numel() for t in trainable.values()),
        "frozen_parameters": frozen,
        "lora_targets": lora_targets(model),
        "per_rank": per_rank,
        "ranks_agree": len({r["sha256"] for r in per_rank}) == 1,
    }
    if summary["mode"] == "lora" and lora_b == 0.0:
        log.warning("the LoRA adapter did not move from its initialisation: the encoder is not training")
    if not summary["ranks_agree"]:
        log.warning("the encoder's trainable weights differ across ranks")
    return summary
