"""LoRA on a Hugging Face encoder through PEFT.

Target modules default to PEFT's own table for the architecture (BERT: query/value; GPT-2: c_attn;
Llama, Qwen2, Mistral: q_proj/v_proj); an architecture PEFT does not know gets every linear layer.
``llm.target_modules`` overrides both.
"""

from __future__ import annotations

from torch import nn

from lrd_dist.config import LLMConfig
from lrd_dist.errors import InputError


def default_targets(model: nn.Module) -> list[str] | str:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = str(getattr(getattr(model, "config", None), "model_type", None))
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return list(targets) if targets is not None else "all-linear"


def apply_lora(
    model: nn.Module, config: LLMConfig, layers: list[int] | None = None, layers_pattern: str | None = None
) -> nn.Module:
    """The model wrapped in a ``PeftModel``: base weights frozen, adapters trainable; with
    ``layers``, adapters only in those layers of the list named ``layers_pattern`` (PEFT's own
    ``layers_to_transform``: the top layers of a cached trunk)."""
    from peft import LoraConfig, get_peft_model

    targets = list(config.target_modules) or default_targets(model)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern=layers_pattern if layers is not None else None,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise InputError(
            "config",
            f"llm.target_modules={targets}: {str(exc).splitlines()[0]}",
            "name modules of this model (or leave llm.target_modules empty for the default)",
        ) from exc


def lora_targets(model: nn.Module) -> list[str]:
    """Names (last component) of the modules that carry an adapter."""
    return sorted(
        {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    )
