"""HR@k and NDCG@k with an explicit tie rule.

The official LRD/ReChorus code ranks by ``argsort`` with the ground truth in column 0, so a tie is
resolved in its favour: a model that scores everything equal gets HR@k = 1, and bf16 scores (many
ties) look better than they are. Here a tie never favours the ground truth:

- ``ties="pessimistic"`` (default): rank = 1 + #{candidates scoring >= the ground truth}, so every
  tie counts against it. A constant model ranks last.
- ``ties="legacy"``: rank = 1 + #{candidates scoring > the ground truth}, the official code's
  outcome for ties at the top; only for reproducing published numbers.

A NaN score of the ground truth ranks last, and a NaN candidate is counted as beating it, so a
diverged model never looks good. ``tie_rate`` reports the share of examples whose ground truth
ties with at least one candidate, to show how much the rule matters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TIE_RULES = ("pessimistic", "legacy")


def ground_truth_rank(
    target_score: torch.Tensor, candidate_scores: torch.Tensor, ties: str = "pessimistic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (1 = best) of each ground truth among its candidates, and whether it tied.

    target_score: [B]; candidate_scores: [B, C] (negatives, or all items with the ground truth and
    masked items set to -inf). Returns (rank [B] int64, tied [B] bool).
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {TIE_RULES}, not {ties!r}")
    above, equal = count_above(target_score, candidate_scores)
    return 1 + above + (equal if ties == "pessimistic" else 0), equal > 0


def count_above(
    target_score: torch.Tensor, candidate_scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, how many candidates beat the ground truth (NaN counts as beating it, and a NaN
    ground truth is beaten by every candidate) and how many tie with it: [B] int64 each. Counts
    of several candidate chunks add up (full ranking)."""
    target = target_score.float()[:, None]
    candidates = candidate_scores.float()
    beats = (candidates > target) | torch.isnan(candidates) | torch.isnan(target)
    equal = (candidates == target) & ~beats
    return beats.sum(dim=1), equal.sum(dim=1)


@dataclass
class RankingMetrics:
    """Accumulates ranks over batches; ``compute`` gives HR@k, NDCG@k and the tie rate."""

    ks: tuple[int, ...] = (5, 10, 20)
    ranks: list[torch.Tensor] = field(default_factory=list)
    ties: list[torch.Tensor] = field(default_factory=list)

    def update(self, rank: torch.Tensor, tied: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch; rows with ``valid=False`` (loader padding) are not counted."""
        if valid is not None:
            rank, tied = rank[valid], tied[valid]
        self.ranks.append(rank.detach().cpu())
        self.ties.append(tied.detach().cpu())

    def gathered(self, gather) -> RankingMetrics:
        """Every process's examples, for identical metrics on all ranks. ``gather`` maps a local
        list to the concatenation of all processes' lists (accelerate's ``gather_object``)."""
        local = [torch.cat(self.ranks), torch.cat(self.ties)] if self.ranks else []
        parts = gather([local])
        return RankingMetrics(self.ks, [p[0] for p in parts if p], [p[1] for p in parts if p])

    def compute(self) -> dict[str, float]:
        rank = torch.cat(self.ranks).double() if self.ranks else torch.zeros(0, dtype=torch.float64)
        out: dict[str, float] = {"examples": float(len(rank))}
        if not len(rank):
            return out
        for k in self.ks:
            hit = rank <= k
            out[f"HR@{k}"] = hit.double().mean().item()
            out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(rank + 1.0), 0.0).mean().item()
        out["tie_rate"] = torch.cat(self.ties).double().mean().item()
        return out
