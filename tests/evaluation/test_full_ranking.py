"""Full ranking: chunked counting equals a brute-force ranking of every item, and the whole known
history is removed from the ranking, also for a user whose history is longer than the window."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.prepare import write_dataset
from lrd_dist.data.sequences import Interactions
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.evaluation.evaluate import evaluate, full_ranking_rank


class FixedScores(nn.Module):
    """Scores each item by a fixed table, whoever the user: what the ranking does is then known."""

    def __init__(self, item_scores: torch.Tensor) -> None:
        super().__init__()
        self.item_scores = nn.Parameter(item_scores, requires_grad=False)

    def score(self, batch: dict[str, torch.Tensor], candidates: torch.Tensor) -> torch.Tensor:
        return self.item_scores[candidates]

    def item_scorer(self, batch: dict[str, torch.Tensor]):
        return lambda items: self.score(batch, items)


def test_sasrec_item_scorer_equals_scoring_the_chunk_as_candidates() -> None:
    """Full ranking encodes a SASRec history once for every chunk: the same scores as scoring
    each chunk as candidates (which re-encodes it)."""
    from lrd_dist.models.recommender import Recommender
    from lrd_dist.models.sasrec import SASRec

    torch.manual_seed(0)
    model = Recommender(SASRec(num_items=50, max_history=6, emb_size=16, dropout=0.0)).eval()
    batch = {
        "target": torch.randint(1, 51, (5,)),
        "history_items": torch.randint(1, 51, (5, 6)),
        "history_length": torch.tensor([1, 3, 6, 6, 2]),
    }
    items = torch.arange(11, 29)
    with torch.no_grad():
        chunked = model.item_scorer(batch)(items.expand(5, -1))
        direct = model.score({**batch, "user": None, "history_times": None, "target_time": None},
                             items.expand(5, -1))  # fmt: skip
    assert chunked.shape == (5, 18)
    torch.testing.assert_close(chunked, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 7, 512])
def test_chunked_rank_equals_a_brute_force_ranking(chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    num_items, rows, window = 40, 16, 5
    scores = torch.randint(0, 12, (num_items + 1,), generator=generator).float()  # many ties
    batch = {
        "user": torch.arange(rows),
        "target": torch.randint(1, num_items + 1, (rows,), generator=generator),
        "target_time": torch.zeros(rows, dtype=torch.long),
        "history_items": torch.randint(1, num_items + 1, (rows, window), generator=generator),
        "history_length": torch.randint(0, window + 1, (rows,), generator=generator),
    }
    model = FixedScores(scores)
    for ties in ("pessimistic", "legacy"):
        rank, tied = full_ranking_rank(model, batch, num_items, ties, item_chunk=chunk)
        for row in range(rows):
            target = int(batch["target"][row])
            seen = set(batch["history_items"][row, : batch["history_length"][row]].tolist())
            others = [i for i in range(1, num_items + 1) if i != target and i not in seen]
            above = sum(scores[i] > scores[target] for i in others)
            equal = sum(scores[i] == scores[target] for i in others)
            assert rank[row] == 1 + above + (equal if ties == "pessimistic" else 0)
            assert bool(tied[row]) == (equal > 0)


def _long_history_dataset(out: Path) -> Path:
    """15 items; user 1 has 12 interactions (window 3: its test sample stores only the last 3),
    user 2 has 4."""
    items = [3, 7, 9, 1, 4, 11, 2, 6, 8, 5, 10, 12, 2, 5, 7, 9]
    users = [1] * 12 + [2] * 4
    times = [*range(12), *range(4)]
    catalog = Catalog(
        source_ids=pa.array([f"i{i}" for i in range(1, 16)]),
        texts=pa.array([f"item {i}" for i in range(1, 16)]),
        attributes={},
        relations={},
    )
    interactions = Interactions(
        user=np.array(users), item=np.array(items, dtype=np.int32), time=np.array(times)
    )
    write_dataset(
        out, source="test", catalog=catalog, interactions=interactions, max_history=3, num_negatives=2
    )
    return out


def test_known_history_covers_items_older_than_the_window(tmp_path: Path) -> None:
    data = _long_history_dataset(tmp_path / "ds")
    known = UserItems.from_dataset(data)
    stream = SequenceStream(data, "test", LoaderConfig(batch_size=8, max_history=3, shuffle=False))
    batch = next(iter(make_loader(stream)))
    row = int(torch.nonzero(batch["user"] == 1)[0])
    assert batch["history_length"][row] == 3  # the window holds 3 of the 11 earlier items
    rows, items = known.known_before(batch["user"], "test", batch["target_time"])
    assert sorted(items[rows == row].tolist()) == sorted([3, 7, 9, 1, 4, 11, 2, 6, 8, 5, 10])
    dev = next(iter(make_loader(SequenceStream(data, "dev", stream.config))))
    dev_row = int(torch.nonzero(dev["user"] == 1)[0])
    rows, items = known.known_before(dev["user"], "dev", dev["target_time"])
    assert sorted(items[rows == dev_row].tolist()) == sorted([3, 7, 9, 1, 4, 11, 2, 6, 8, 5])  # not 10
    assert known.interacted(torch.tensor([2, 2]), torch.tensor([[7, 8], [9, 1]])).tolist() == [
        [True, False],
        [True, False],
    ]


def test_full_ranking_removes_the_whole_known_history(tmp_path: Path) -> None:
    data = _long_history_dataset(tmp_path / "ds")
    # user 1's oldest item (3) scores highest, its test target (12) second
    scores = torch.zeros(16)
    scores[3], scores[12] = 10.0, 9.0
    model = FixedScores(scores)
    config = LoaderConfig(batch_size=8, max_history=3, shuffle=False)

    def test_rank(known: UserItems | None) -> float:
        stream = SequenceStream(data, "test", config)
        batches = [{k: v[b["user"] == 1] for k, v in b.items()} for b in make_loader(stream)]  # user 1 only
        metrics = evaluate(model, batches, [1], "pessimistic", True, 15, item_chunk=5, known=known)
        return metrics["HR@1"]

    assert test_rank(None) == 0.0  # window only: the old item 3 still outranks the target
    assert test_rank(UserItems.from_dataset(data)) == 1.0
