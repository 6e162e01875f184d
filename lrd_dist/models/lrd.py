"""LRD: latent relations discovered from language, trained by reconstructing items (a DVAE).

Relation extraction q(r | h, i): the language representations of a history item h and the target
i are projected to V, concatenated and mapped to a softmax over all R relation slots. Item
reconstruction: the triple score of (h, r, i) with ID embeddings,
``q_r * (<e_h * w_r, e_i> + <e_h, w_r> + <e_i, w_r>)``, must beat the same score with a random
negative item h' in place of h, per relation channel. An entropy term (weight alpha, added to the
minimised loss) sharpens q towards one relation per pair.

Beyond the official code: sharpening alone lets every pair collapse onto the same relation (the
used relation's embedding learns, the others get almost no gradient; seen on the synthetic data,
NMI 0). ``balance`` > 0 also maximises the entropy of the batch-averaged q, so that together the
two terms maximise the mutual information between a pair and its relation (as in DVAE relation
discovery). ``balance=0`` is the official objective.

The module owns only the two projections: the entity and relation embeddings are the recommender's,
passed in, which is how the discovered relations reach the recommender.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LatentRelationDiscovery(nn.Module):
    def __init__(
        self,
        text_dim: int,
        emb_size: int,
        num_relations: int,
        alpha: float = 0.1,
        leave_one_latent: bool = False,
        balance: float = 0.0,
        pair_features: str = "concat",
        decoder_text: bool = False,
    ) -> None:
        super().__init__()
        self.project_text = nn.Linear(text_dim, emb_size)
        # Beyond the official code: the decoder's items are ID embedding + a projection of the text,
        # so it cannot fit an arbitrary partition of the pairs by memorising free ID vectors.
        self.text_to_entity = nn.Linear(text_dim, emb_size) if decoder_text else None
        self.pair_features = pair_features
        width = 2 * emb_size if pair_features == "concat" else emb_size
        self.relation_logits = nn.Linear(width, num_relations)
        self.alpha = alpha
        self.balance = balance
        self.first_decoded = 1 if leave_one_latent else 0
        for layer in (self.project_text, self.relation_logits):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.normal_(layer.bias, 0.0, 0.01)

    def relation_distribution(self, head_text: torch.Tensor, tail_text: torch.Tensor) -> torch.Tensor:
        """q(r | h, i): [N, P] language vectors of history items and targets to [N, R] probabilities."""
        head, tail = self.project_text(head_text), self.project_text(tail_text)
        # absdiff: only what differs between the two texts, the same in both directions
        absdiff = self.pair_features == "absdiff"
        pair = (tail - head).abs() if absdiff else torch.cat([head, tail], dim=-1)
        return self.relation_logits(pair).softmax(dim=-1)

    def loss(
        self,
        q: torch.Tensor,  # [B, H, R]
        history: torch.Tensor,  # [B, H, V] ID embeddings of the history items
        negatives: torch.Tensor,  # [B, H, V] ID embeddings of one random negative per position
        target: torch.Tensor,  # [B, V]
        relations: torch.Tensor,  # [R, V] the recommender's relation embeddings
        mask: torch.Tensor,  # [B, H] real history positions of valid rows
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruction + alpha * entropy, averaged over the real (history, target) pairs."""
        decoded = slice(self.first_decoded, None)
        weights, relation = q[..., decoded], relations[decoded]
        maskf = mask.to(q.dtype)
        positive = self._triple_score(weights, history, target, relation)
        negative = self._triple_score(weights, negatives, target, relation)
        rows = maskf.sum(1) > 0
        hit_rate = (torch.sigmoid(positive - negative) * maskf[..., None]).sum(1)
        hit_rate = hit_rate / maskf.sum(1).clamp(min=1)[:, None]
        reconstruction = -torch.log(hit_rate[rows].clamp(min=1e-8)).mean()
        entropy = -(q * torch.log(q.clamp(min=1e-12))).sum(-1)  # [B, H]
        mean_entropy = (entropy * maskf).sum() / maskf.sum().clamp(min=1)
        loss = reconstruction + self.alpha * mean_entropy / q.shape[-1]  # official: mean over r of -q log q
        marginal = (q * maskf[..., None]).sum((0, 1)) / maskf.sum().clamp(min=1)
        marginal_entropy = -(marginal * torch.log(marginal.clamp(min=1e-12))).sum()
        if self.balance:
            loss = loss - self.balance * marginal_entropy
        usage = F.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
        stats = {
            "reconstruction": reconstruction.detach(),
            "entropy": mean_entropy.detach(),
            "marginal_entropy": marginal_entropy.detach(),
            "usage": (usage * maskf[..., None]).sum((0, 1)).detach() / maskf.sum().clamp(min=1),
        }
        return loss, stats

    @staticmethod
    def _triple_score(weights, items, target, relations) -> torch.Tensor:
        """q_r * (DistMult(e_h, r, e_i) + e_h . r + e_i . r) -> [B, H, R]."""
        # (e_h * e_i) @ W_r^T: one GEMM (the three-operand einsum materialises [B, H, R, V])
        distmult = (items * target[:, None, :]) @ relations.T
        selectional = items @ relations.T + (target @ relations.T)[:, None, :]
        return weights * (distmult + selectional)
