"""The trained model: a backbone, and for RCF/KDA the KG term and optionally LRD, behind two calls.

``score(batch, candidates)`` ranks candidates; ``forward(batch, ...)``, the training call (so that a
DDP wrapper sees it), returns the recommendation, KG and LRD losses of a training batch, weighted
by the loader's ``valid`` rows. Negatives and KG triples are drawn by the caller, so this module
holds no randomness of its own beyond dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from lrd_dist.models.losses import bpr, distmult
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec


class Recommender(nn.Module):
    def __init__(
        self,
        backbone: RelationalRecommender | SASRec,
        lrd: LatentRelationDiscovery | None = None,
        item_text: torch.Tensor | None = None,
        lrd_first_slot: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.lrd = lrd
        # Frozen language representations [num_items + 1, P]; loaded from the embedding table, so
        # not part of the state dict.
        self.register_buffer("item_text", item_text, persistent=False)
        # q(r | h, i) covers relation slots lrd_first_slot.. (0: all slots, official; or only latent)
        self.lrd_first_slot = lrd_first_slot

    @property
    def relational(self) -> bool:
        return isinstance(self.backbone, RelationalRecommender)

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return self.backbone(
            user=batch["user"],
            history_items=batch["history_items"],
            history_times=batch["history_times"],
            history_length=batch["history_length"],
            target_time=batch["target_time"],
            candidates=candidates,
        )

    def relation_distribution(self, history_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """q(r | h, i) for [B, H] history items and [B] targets."""
        return self.lrd.relation_distribution(self.item_text[history_items], self.item_text[targets])

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        negatives: torch.Tensor,  # [B] one recommendation negative per row
        lrd_negatives: torch.Tensor | None = None,  # [B, H] one reconstruction negative per position
        kg: dict[str, torch.Tensor] | None = None,  # sampled triples (KnowledgeGraph.sample)
    ) -> dict[str, torch.Tensor]:
        valid = batch["valid"]
        scores = self.score(batch, torch.stack([batch["target"], negatives], dim=1))
        out = {"rec": bpr(scores[:, 0], scores[:, 1], valid)}
        if not self.relational:
            return out
        entities = self.backbone.entity_embeddings
        relations = self.backbone.relation_embeddings
        if kg is not None and len(kg["head"]):
            relation = relations(kg["relation"]) + entities(kg["value"])
            positive = distmult(entities(kg["head"]), relation, entities(kg["tail"]))
            negative = distmult(entities(kg["neg_head"]), relation, entities(kg["neg_tail"]))
            out["kg"] = bpr(positive, negative)
        if self.lrd is not None and lrd_negatives is not None:
            history = batch["history_items"]
            positions = torch.arange(history.shape[1], device=history.device)
            mask = (positions[None, :] < batch["history_length"][:, None]) & valid[:, None]
            q = self.relation_distribution(history, batch["target"])
            loss, stats = self.lrd.loss(
                q,
                entities(history),
                entities(lrd_negatives),
                entities(batch["target"]),
                relations.weight[self.lrd_first_slot :],
                mask,
            )
            out["lrd"] = loss
            out.update({f"lrd_{k}": v for k, v in stats.items()})
        return out
