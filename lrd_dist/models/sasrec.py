"""SASRec (Kang and McAuley, 2018): a causal transformer over the history, the plain baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SASRec(nn.Module):
    # looked up by id while training (train.loss=full_softmax reads it whole: dense updates only)
    id_tables = ("item_embeddings",)

    def __init__(
        self,
        num_items: int,
        max_history: int,
        emb_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.item_embeddings = nn.Embedding(num_items + 1, emb_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(max_history, emb_size)
        layer = nn.TransformerEncoderLayer(
            emb_size, num_heads, emb_size * 4, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(emb_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.item_embeddings.weight, 0.0, 0.02)
        nn.init.normal_(self.position_embeddings.weight, 0.0, 0.02)
        with torch.no_grad():
            self.item_embeddings.weight[0].zero_()

    def forward(
        self,
        history_items: torch.Tensor,
        history_length: torch.Tensor,
        candidates: torch.Tensor,
        item_vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,  # ids -> [..., V]
        **_: torch.Tensor,
    ) -> torch.Tensor:  # [B, C]
        vectors = item_vectors or self.item_embeddings
        state = self.user_state(history_items, history_length, item_vectors)
        return (state[:, None, :] * vectors(candidates)).sum(-1)

    def id_table(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embeddings(items)

    def score_all_items(
        self,
        history_items: torch.Tensor,
        history_length: torch.Tensor,
        item_vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,
        table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, num_items + 1] scores of every item id (column 0 is the padding id): one GEMM.
        ``table``: the items' vectors when the caller has them (a refreshed text table)."""
        if table is None:
            table = self.item_embeddings.weight
            if item_vectors is not None:
                table = item_vectors(torch.arange(len(table), device=table.device))
        return self.user_state(history_items, history_length, item_vectors) @ table.T

    def user_state(
        self,
        history_items: torch.Tensor,
        history_length: torch.Tensor,
        item_vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[B, V]. Histories are right-padded: the state at position length-1 summarises the sequence."""
        steps = history_items.shape[1]
        positions = torch.arange(steps, device=history_items.device)
        x = (item_vectors or self.item_embeddings)(history_items) + self.position_embeddings(positions)[None]
        causal = torch.triu(torch.ones(steps, steps, dtype=torch.bool, device=x.device), diagonal=1)
        padding = positions[None, :] >= history_length[:, None].clamp(min=1)
        hidden = self.norm(self.encoder(self.dropout(x), mask=causal, src_key_padding_mask=padding))
        return hidden[torch.arange(len(history_items)), (history_length - 1).clamp(min=0)]
