"""Recommenders (RCF, KDA, SASRec) and LRD, as plain modules: no devices, processes or files."""

from __future__ import annotations

import torch

from lrd_dist.config import RunConfig
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec


def build_model(
    config: RunConfig, num_users: int, graph: KnowledgeGraph, item_text: torch.Tensor | None = None
) -> Recommender:
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
    )
    lrd = None
    if config.lrd.enabled:
        lrd = LatentRelationDiscovery(
            item_text.shape[1],
            model.emb_size,
            graph.slots.total if config.lrd.slots == "all" else graph.slots.latent,
            config.lrd.alpha,
            model.leave_one_latent,
            config.lrd.balance,
        )
    first_slot = 0 if config.lrd.slots == "all" else graph.slots.predefined
    return Recommender(backbone, lrd, item_text if config.lrd.enabled else None, first_slot)
