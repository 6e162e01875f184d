import math

import pytest
import torch

from lrd_dist.evaluation.metrics import RankingMetrics, ground_truth_rank


def _metrics(target, candidates, ties="pessimistic", ks=(1, 5, 10)):
    rank, tied = ground_truth_rank(torch.as_tensor(target), torch.as_tensor(candidates), ties)
    metrics = RankingMetrics(ks=ks)
    metrics.update(rank, tied)
    return metrics.compute()


def test_constant_scores_rank_the_ground_truth_last() -> None:
    out = _metrics(torch.zeros(8), torch.zeros(8, 99))
    assert out["HR@10"] == 0.0 and out["NDCG@10"] == 0.0
    assert out["tie_rate"] == 1.0
    rank, _ = ground_truth_rank(torch.zeros(1), torch.zeros(1, 99))
    assert rank.item() == 100


def test_legacy_rule_reproduces_the_official_optimism() -> None:
    out = _metrics(torch.zeros(8), torch.zeros(8, 99), ties="legacy")
    assert out["HR@1"] == 1.0 and out["NDCG@10"] == 1.0


def test_ranks_and_ndcg_values() -> None:
    target = torch.tensor([0.9, 0.5, 0.1])
    candidates = torch.tensor([[0.1, 0.2, 0.3], [0.6, 0.7, 0.4], [0.2, 0.3, 0.4]])
    rank, tied = ground_truth_rank(target, candidates)
    assert rank.tolist() == [1, 3, 4] and not tied.any()
    out = _metrics(target, candidates, ks=(1, 3))
    assert out["HR@1"] == pytest.approx(1 / 3)
    assert out["HR@3"] == pytest.approx(2 / 3)
    assert out["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)


def test_a_partial_tie_counts_against_the_ground_truth() -> None:
    rank, tied = ground_truth_rank(torch.tensor([0.5]), torch.tensor([[0.5, 0.1, 0.9]]))
    assert rank.item() == 3 and tied.item()
    legacy, _ = ground_truth_rank(torch.tensor([0.5]), torch.tensor([[0.5, 0.1, 0.9]]), "legacy")
    assert legacy.item() == 2


def test_nan_never_helps() -> None:
    rank, _ = ground_truth_rank(
        torch.tensor([float("nan"), 0.5]), torch.tensor([[0.1, 0.2], [float("nan"), 0.1]])
    )
    assert rank.tolist() == [3, 2]


def test_padding_rows_are_not_counted() -> None:
    metrics = RankingMetrics(ks=(1,))
    metrics.update(torch.tensor([1, 50]), torch.tensor([False, False]), valid=torch.tensor([True, False]))
    assert metrics.compute() == {"examples": 1.0, "HR@1": 1.0, "NDCG@1": 1.0, "tie_rate": 0.0}
