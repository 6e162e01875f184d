"""RCF and KDA: attention over the history, once per relation slot, then across relation slots.

For each candidate c and relation slot r the history is attended with the key
``(r_r + e_value(c, r)) * e_c``; KDA multiplies the attention by a learned frequency-domain kernel
of the time gaps, one per relation (the ReChorus "RCF" is KDA without it). The per-relation
contexts interact through a weight-tied self-attention block across relation slots, are averaged,
and score the candidate with the user embedding plus an item bias. Latent relations of LRD are
just more slots: their embeddings are the ones the LRD decoder trains.

Shapes: B batch, C candidates, H history, R relation slots, V embedding size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrd_dist.models import slot_attention
from lrd_dist.models.slot_attention import SlotAttention


class RelationInteraction(nn.Module):
    """x <- LayerNorm(x + Dropout(W2 ReLU(W1 MHA(x)))), applied ``num_layers`` times with one set of
    weights; MHA has bias-free q/k/v and no output projection (official). Tokens are [N, R, V]:
    N candidate rows of R relation slots.

    ``attention(q, k, v, heads)`` computes the attention across slots: torch ops by default, the
    fused CPU kernel where the run's backend chose it (``lrd_dist/runtime.py``); both compute the same
    up to float summation order.
    """

    def __init__(
        self,
        emb_size: int,
        num_heads: int,
        num_layers: int,
        dropout: float,
        attention: SlotAttention = slot_attention.torch_slot_attention,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_layers = num_heads, num_layers
        self.query = nn.Linear(emb_size, emb_size, bias=False)
        self.key = nn.Linear(emb_size, emb_size, bias=False)
        self.value = nn.Linear(emb_size, emb_size, bias=False)
        self.hidden = nn.Linear(emb_size, emb_size)
        self.output = nn.Linear(emb_size, emb_size)
        self.norm = nn.LayerNorm(emb_size)
        self.dropout = nn.Dropout(dropout)
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, R, V] -> [N, R, V]
        # q, k, v stay three module calls (not one GEMM on concatenated weights): under ZeRO-3 a
        # module's weights are gathered only when that module runs.
        for _ in range(self.num_layers):
            attended = self.attention(self.query(x), self.key(x), self.value(x), self.num_heads)
            x = self.norm(x + self.dropout(self.output(F.relu(self.hidden(attended)))))
        return x


class TemporalKernel(nn.Module):
    """KDA's relational time decay: per relation, a real kernel of the normalised time gap given by
    learned Fourier coefficients, clamped to [0, 1]."""

    frequencies: torch.Tensor  # a buffer

    def __init__(self, num_relations: int, n_dft: int, t_scalar: float) -> None:
        super().__init__()
        frequencies = n_dft // 2 + 1
        self.t_scalar = t_scalar
        self.freq_real = nn.Parameter(torch.randn(num_relations, frequencies) * 0.01)
        self.freq_imag = nn.Parameter(torch.randn(num_relations, frequencies) * 0.01)
        self.register_buffer("frequencies", torch.linspace(0, 0.5, frequencies), persistent=False)

    def forward(self, gap_seconds: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B, H, R]
        gap = torch.log2(gap_seconds.clamp(min=0).float() / self.t_scalar + 1e-6).clamp(min=0)
        phase = 2 * math.pi * gap[..., None] * self.frequencies  # [B, H, F]
        # Mirrored spectrum (real part even, imaginary part odd): both halves contribute the same.
        decay = (
            (torch.cos(phase) @ self.freq_real.T - torch.sin(phase) @ self.freq_imag.T) / phase.shape[-1] / 2
        )
        return decay.clamp(0, 1)


class RelationalRecommender(nn.Module):
    """RCF (``temporal=False``) or KDA (``temporal=True``) over ``num_relations`` slots."""

    BLOCK_ROWS = 512  # (user, candidate) rows scored together; see forward
    # Tables that grow with the catalog and are only looked up by id (never read whole while
    # training), so they may take row-wise gradients (train/optimizer.py).
    id_tables = ("user_embeddings", "entity_embeddings", "item_bias")

    value_entity: torch.Tensor  # a buffer: [num_entities] the value entity of each (item, relation)

    def __init__(
        self,
        num_users: int,
        num_items: int,
        num_entities: int,
        value_entity: torch.Tensor,  # [num_items + 1, R]: attribute value entity per item and slot
        emb_size: int = 64,
        num_layers: int = 5,
        num_heads: int = 4,
        dropout: float = 0.0,
        temporal: bool = True,
        t_scalar: float = 60.0,
        n_dft: int = 64,
        attention: SlotAttention = slot_attention.torch_slot_attention,
    ) -> None:
        super().__init__()
        num_relations = value_entity.shape[1]
        self.user_embeddings = nn.Embedding(num_users + 1, emb_size)
        self.entity_embeddings = nn.Embedding(num_entities, emb_size, padding_idx=0)
        self.relation_embeddings = nn.Embedding(num_relations, emb_size)
        self.item_bias = nn.Embedding(num_items + 1, 1)
        self.interaction = RelationInteraction(emb_size, num_heads, num_layers, dropout, attention)
        self.register_buffer("value_entity", value_entity.long(), persistent=False)
        self.apply(_init_weights)
        self.kernel = TemporalKernel(num_relations, n_dft, t_scalar) if temporal else None

    def forward(
        self,
        user: torch.Tensor,  # [B]
        history_items: torch.Tensor,  # [B, H]
        history_times: torch.Tensor,  # [B, H]
        history_length: torch.Tensor,  # [B]
        target_time: torch.Tensor,  # [B]
        candidates: torch.Tensor,  # [B, C]
        item_vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,  # ids -> [..., V]
    ) -> torch.Tensor:  # [B, C]
        """``item_vectors``: what an item id is to the model (default its ID embedding; a model whose
        items read their text passes ID + projected text, see ``Recommender.item_vectors``)."""
        vectors = item_vectors or self.entity_embeddings
        history = vectors(history_items)  # [B, H, V]
        valid = torch.arange(history_items.shape[1], device=user.device)[None, :] < history_length[:, None]
        decay = None
        if self.kernel is not None:
            decay = self.kernel(target_time[:, None] - history_times) * valid[..., None]  # [B, H, R]
        user_vector = self.user_embeddings(user)[:, None, :]
        # Candidates in blocks of about BLOCK_ROWS (user, candidate) rows: the per-candidate tensors
        # [rows, R, V] then stay in cache through the interaction's layers. Scoring 100 candidates
        # per user at once is memory-bound and about twice as slow on a CPU (512 measured 1.1-1.3x
        # faster than 1024 or 2048 with the fused attention kernel); results are identical.
        block = self.candidates_per_block(len(user))
        items = vectors(candidates)  # [B, C, V]
        blocks = zip(candidates.split(block, dim=1), items.split(block, dim=1), strict=True)
        return torch.cat(
            [self.score_block(history, valid, decay, user_vector, c, v) for c, v in blocks], dim=1
        )

    def id_table(self, items: torch.Tensor) -> torch.Tensor:
        """The ID embeddings of items (items are the first entities)."""
        return self.entity_embeddings(items)

    def add_items(self, value_entities: torch.Tensor) -> None:
        """Items beyond the trained catalog (``recommend --new-items``), ids num_items+1..: their
        attribute value entities ([M, R]) and a zero bias, like a cold item's. Their ID vector is
        the caller's (``Recommender.item_vectors`` gives them none)."""
        self.value_entity = torch.cat([self.value_entity, value_entities.to(self.value_entity)])
        old = self.item_bias
        bias = nn.Embedding(old.num_embeddings + len(value_entities), 1)
        with torch.no_grad():
            bias.weight.zero_()
            bias.weight[: old.num_embeddings] = old.weight
        self.item_bias = bias

    @classmethod
    def candidates_per_block(cls, batch_size: int) -> int:
        return max(1, cls.BLOCK_ROWS // batch_size)

    def score_block(
        self,
        history: torch.Tensor,  # [B, H, V]
        valid: torch.Tensor,  # [B, H]
        decay: torch.Tensor | None,  # [B, H, R]
        user_vector: torch.Tensor,  # [B, 1, V]
        candidates: torch.Tensor,  # [B, C]
        items: torch.Tensor,  # [B, C, V] the candidates' item vectors
    ) -> torch.Tensor:  # [B, C]
        """One block of candidates; evaluation may run it through ``torch.compile`` (one graph per
        block: the history attention and the elementwise work between the interaction's GEMMs)."""
        values = self.entity_embeddings(self.value_entity[candidates])  # [B, C, R, V]
        keys = (self.relation_embeddings.weight + values) * items[:, :, None, :]  # [B, C, R, V]
        logits = torch.einsum("bhv,bcrv->bchr", history, keys)
        logits = logits.masked_fill(~valid[:, None, :, None], torch.finfo(logits.dtype).min)
        attention = logits.softmax(dim=2) * valid[:, None, :, None]
        if decay is not None:
            attention = attention * decay[:, None]
        context = torch.einsum("bchr,bhv->bcrv", attention, history)
        batch, count, relations, size = context.shape
        pooled = (
            self.interaction(context.view(batch * count, relations, size)).mean(1).view(batch, count, size)
        )
        return ((user_vector + pooled) * items).sum(-1) + self.item_bias(candidates).squeeze(-1)


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.01) for every Linear and Embedding weight and bias (official); LayerNorm keeps its defaults."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, 0.0, 0.01)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            nn.init.normal_(bias, 0.0, 0.01)
