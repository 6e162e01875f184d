"""The trained model: a backbone, and for RCF/KDA the KG term and optionally LRD, behind two calls.

``score(batch, candidates)`` ranks candidates; ``forward(batch, ...)``, the training call (so that a
DDP wrapper sees it), returns the recommendation, KG and LRD losses of a training batch, weighted
by the loader's ``valid`` rows, and their weighted sum ``loss = rec + kg_weight * kg + lrd_weight *
lrd``, the objective the trainer minimises. Negatives and KG triples are drawn by the caller, so this module
holds no randomness of its own beyond dropout.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lrd_dist.models.losses import bpr, distmult, softmax_cross_entropy
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec


class Recommender(nn.Module):
    def __init__(
        self,
        backbone: RelationalRecommender | SASRec,
        lrd: LatentRelationDiscovery | None = None,
        item_text: nn.Module | None = None,
        lrd_first_slot: int = 0,
        loss: str = "bpr",
        kg_weight: float = 0.0,
        lrd_weight: float = 0.0,
        text_projection: nn.Linear | None = None,
        id_vectors: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.lrd = lrd
        # item ids [...] -> language vectors [..., P]: a frozen table or a live (trainable) LLM
        self.item_text = item_text
        # q(r | h, i) covers relation slots lrd_first_slot.. (0: all slots, official; or only latent)
        self.lrd_first_slot = lrd_first_slot
        # bpr: the target against each negative (official) | sampled_softmax: the target among its
        # negatives | full_softmax: among every item (SASRec: one matrix product)
        self.loss = loss
        self.kg_weight = kg_weight  # gamma of the KG term (0 without relation triples)
        self.lrd_weight = lrd_weight  # lambda of the LRD term
        # model.item_representation: an item is its ID embedding (id_vectors), plus or instead
        # (id_vectors=False) the projection of its language vector (text_projection)
        self.text_projection = text_projection
        self.id_vectors = id_vectors
        # items with an ID row; ids beyond (``recommend --new-items``) read the padding row: zeros
        self.id_items: int | None = None
        # full_softmax with a tuned encoder: every item's language vector, refreshed every
        # train.catalog_refresh_steps without gradient (the trainer sets it), instead of encoding the
        # whole catalog in every step
        self.catalog_text: torch.Tensor | None = None

    @property
    def relational(self) -> bool:
        return isinstance(self.backbone, RelationalRecommender)

    @property
    def reads_text(self) -> bool:
        """Whether the recommender's item vectors read the items' text (not only the LRD loss)."""
        return self.text_projection is not None

    def text_read_once(self):
        """A context in which a text-reading model's item text comes from one pass over the catalog
        (full ranking, recommend, export), not a pass per batch; nothing to do otherwise."""
        read_once = getattr(self.item_text, "read_catalog_once", None)  # a live encoder's
        return read_once() if self.reads_text and callable(read_once) else contextlib.nullcontext()

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """[...] item ids -> [..., V]: what the recommender reads for an item, history or candidate:
        ID embedding, ID embedding + projected language vector, or the projected language vector
        alone (an item nobody has interacted with still has one)."""
        ids = items if self.id_items is None else torch.where(items > self.id_items, 0, items)
        vectors = self.backbone.id_table(ids) if self.id_vectors else None
        if self.text_projection is not None:
            assert self.item_text is not None, "a text-reading model has an item text encoder"
            text = self.text_projection(self.item_text(items))
            vectors = text if vectors is None else vectors + text
        assert vectors is not None
        return vectors

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return self.backbone(
            user=batch["user"],
            history_items=batch["history_items"],
            history_times=batch["history_times"],
            history_length=batch["history_length"],
            target_time=batch["target_time"],
            candidates=candidates,
            item_vectors=self.item_vectors if self.reads_text else None,
        )

    def item_scorer(self, batch: dict[str, torch.Tensor]):
        """``scores(items [B, C]) -> [B, C]`` for the batch's rows (full ranking, recommend). SASRec
        encodes each history once for every call, and a chunk shared by all rows (an expanded
        [C] row) is one matrix product; RCF/KDA attend the history per candidate."""
        if isinstance(self.backbone, SASRec):
            vectors = self.item_vectors if self.reads_text else None
            state = self.backbone.user_state(batch["history_items"], batch["history_length"], vectors)
            table = self.item_vectors

            def score_sasrec(items: torch.Tensor) -> torch.Tensor:
                if items.stride(0) == 0:  # every row asks for the same chunk of the catalog
                    return state @ table(items[0]).T
                return (state[:, None, :] * table(items)).sum(-1)

            return score_sasrec
        return lambda items: self.score(batch, items)

    def recommendation_loss(self, batch: dict[str, torch.Tensor], negatives: torch.Tensor) -> torch.Tensor:
        valid, target = batch["valid"], batch["target"]
        if self.loss == "full_softmax":
            assert isinstance(self.backbone, SASRec), "config validation: full_softmax is SASRec's"
            table = None
            if self.reads_text and self.catalog_text is not None and self.text_projection is not None:
                every = torch.arange(len(self.catalog_text), device=self.catalog_text.device)
                table = self.text_projection(self.catalog_text)
                if self.id_vectors:
                    table = table + self.backbone.id_table(every)
            logits = self.backbone.score_all_items(
                batch["history_items"],
                batch["history_length"],
                self.item_vectors if self.reads_text else None,
                table,
            )
            logits = logits.masked_fill(
                torch.arange(logits.shape[1], device=logits.device) == 0, float("-inf")
            )
            return softmax_cross_entropy(logits, target, valid)
        if negatives.dim() == 1:  # one negative: the official pairwise loss
            scores = self.score(batch, torch.stack([target, negatives], dim=1))
            return bpr(scores[:, 0], scores[:, 1], valid)
        scores = self.score(batch, torch.cat([target[:, None], negatives], dim=1))  # [B, 1 + N]
        if self.loss == "sampled_softmax":
            return softmax_cross_entropy(scores, torch.zeros_like(target), valid)
        pairwise = -torch.nn.functional.logsigmoid(scores[:, :1] - scores[:, 1:]).mean(1)  # bpr, N negatives
        weight = valid.to(pairwise.dtype)
        return (pairwise * weight).sum() / weight.sum().clamp(min=1)

    def relation_distribution(self, heads: torch.Tensor, tails: torch.Tensor) -> torch.Tensor:
        """q(r | h, i) for [N] (history item, target) pairs -> [N, R]. Both sides go through the
        text encoder in one call, so an item in both is encoded once."""
        assert self.item_text is not None and self.lrd is not None, "an LRD model reads item text"
        language = self.item_text(torch.cat([heads, tails]))
        return self.lrd.relation_distribution(language[: len(heads)], language[len(heads) :])

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        negatives: torch.Tensor,  # [B] one recommendation negative per row, or [B, N]
        lrd_negatives: torch.Tensor | None = None,  # [B, H] one reconstruction negative per position
        kg: dict[str, torch.Tensor] | None = None,  # sampled triples (KnowledgeGraph.sample)
        lrd_pairs: torch.Tensor | None = None,  # [B, H] bool: the pairs the LRD loss uses (default all)
    ) -> dict[str, torch.Tensor]:
        out = self.losses(batch, negatives, lrd_negatives, kg, lrd_pairs)
        out["loss"] = out["rec"] + self.kg_weight * out.get("kg", 0.0) + self.lrd_weight * out.get("lrd", 0.0)
        return out

    def losses(
        self,
        batch: dict[str, torch.Tensor],
        negatives: torch.Tensor,
        lrd_negatives: torch.Tensor | None,
        kg: dict[str, torch.Tensor] | None,
        lrd_pairs: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """Each term apart (and the LRD statistics: relation usage, entropy of q)."""
        valid = batch["valid"]
        out = {"rec": self.recommendation_loss(batch, negatives)}
        if not isinstance(self.backbone, RelationalRecommender):
            return out
        entities: nn.Embedding = self.backbone.entity_embeddings
        relations: nn.Embedding = self.backbone.relation_embeddings
        if kg is not None and len(kg["head"]):
            relation = relations(kg["relation"]) + entities(kg["value"])
            positive = distmult(entities(kg["head"]), relation, entities(kg["tail"]))
            negative = distmult(entities(kg["neg_head"]), relation, entities(kg["neg_tail"]))
            out["kg"] = bpr(positive, negative)
        if self.lrd is not None and lrd_negatives is not None:
            history = batch["history_items"]
            positions = torch.arange(history.shape[1], device=history.device)
            mask = (positions[None, :] < batch["history_length"][:, None]) & valid[:, None]
            if lrd_pairs is not None:
                mask = mask & lrd_pairs
            # Only the pairs in the loss are encoded (what bounds the cost of a live LLM).
            rows, columns = mask.nonzero(as_tuple=True)
            q_pairs = self.relation_distribution(history[rows, columns], batch["target"][rows])
            q = q_pairs.new_zeros((*history.shape, q_pairs.shape[-1]))
            q[rows, columns] = q_pairs
            items = (history, lrd_negatives, batch["target"])
            # the decoder's items are the recommender's: ID embeddings, or ID + text when they read text
            decoded = [self.item_vectors(i) if self.reads_text else entities(i) for i in items]
            if self.lrd.text_to_entity is not None:  # a frozen table: looking up negatives is free
                assert self.item_text is not None
                decoded = [
                    e + self.lrd.text_to_entity(self.item_text(i))
                    for e, i in zip(decoded, items, strict=True)
                ]
            decoded_history, decoded_negatives, decoded_target = decoded
            loss, stats = self.lrd.loss(
                q,
                decoded_history,
                decoded_negatives,
                decoded_target,
                relations.weight[self.lrd_first_slot :],
                mask,
            )
            out["lrd"] = loss
            out.update({f"lrd_{k}": v for k, v in stats.items()})
        return out
