"""Recommenders (RCF, KDA, SASRec) and LRD, as plain modules: no devices, processes or files."""

from __future__ import annotations

import torch
from torch import nn

from lrd_dist.config import RunConfig
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec


def build_model(
    config: RunConfig, num_users: int, graph: KnowledgeGraph, item_text: nn.Module | None = None
) -> Recommender:
    """``item_text`` (from ``encoders.item_text.build_item_text``) maps item ids to language
    vectors; LRD needs it."""
    model = config.model
    if model.name == "sasrec":
        backbone = SASRec(
            graph.num_items,
            config.data.max_history,
            model.emb_size,
            model.num_layers,
            model.num_heads,
            model.dropout,
        )
        return Recommender(backbone)
    backbone = RelationalRecommender(
        num_users=num_users,
        num_items=graph.num_items,
        num_entities=graph.num_entities,
        value_entity=torch.from_numpy(graph.value_entity),
        emb_size=model.emb_size,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        dropout=model.dropout,
        temporal=model.name == "kda",
        t_scalar=model.t_scalar,
        n_dft=model.n_dft,
        fused_attention=model.fused_attention,
    )
    lrd = None
    if config.lrd.enabled:
        lrd = LatentRelationDiscovery(
            item_text.dim,
            model.emb_size,
            graph.slots.total if config.lrd.slots == "all" else graph.slots.latent,
            config.lrd.alpha,
            model.leave_one_latent,
            config.lrd.balance,
            config.lrd.pair_features,
            config.lrd.decoder_text,
        )
    first_slot = 0 if config.lrd.slots == "all" else graph.slots.predefined
    return Recommender(backbone, lrd, item_text if config.lrd.enabled else None, first_slot)


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Weights that never train (a LoRA-wrapped encoder's base): rebuilt from the model path, so
    saved weight files leave them out."""
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def weights_to_save(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    frozen = frozen_parameter_names(model)
    return {k: v for k, v in state.items() if k not in frozen}


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load a weight file into ``model``; only frozen weights may be absent. Returns what does not
    fit (empty when it loaded)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in frozen_parameter_names(model)]
    return [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
