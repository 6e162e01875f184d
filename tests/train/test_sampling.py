"""Training negatives: never the target or a history item; under the official rule never any item
of the user, dev and test items included."""

from pathlib import Path

import torch

from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.train.sampling import draw_pairs, draw_uniform_negatives
from tests.helpers import toy_batch


def test_negatives_avoid_the_known_past_and_under_the_official_rule_every_user_item(
    synth_dataset: Path,
) -> None:
    known = UserItems.from_dataset(synth_dataset)
    batch = next(
        iter(
            make_loader(SequenceStream(synth_dataset, "train", LoaderConfig(batch_size=256, max_history=12)))
        )
    )
    num_items = 300
    generator = torch.Generator().manual_seed(0)
    plain = draw_uniform_negatives(batch, (256, 40), num_items, generator, rounds=20)
    seen = torch.cat([batch["target"][:, None], batch["history_items"]], dim=1)
    assert not (plain[:, :, None] == seen[:, None, :]).any()
    assert known.interacted(batch["user"], plain).any()  # later items of the user can be drawn
    official = draw_uniform_negatives(batch, (256, 40), num_items, generator, rounds=20, known=known)
    assert not known.interacted(batch["user"], official).any()
    assert official.min() >= 1 and official.max() <= num_items


def test_training_negatives_avoid_the_target_and_the_history() -> None:
    batch = toy_batch(items=12)
    generator = torch.Generator().manual_seed(1)
    negatives = draw_uniform_negatives(batch, (4, 50), 12, generator)
    seen = torch.cat([batch["target"][:, None], batch["history_items"]], 1)
    assert ((negatives[:, :, None] == seen[:, None, :]).any(-1)).float().mean() < 0.01
    assert negatives.min() >= 1 and negatives.max() <= 12


def test_llm_pair_subsets_cover_real_pairs_only() -> None:
    batch = {
        "valid": torch.tensor([True, True, False]),
        "history_length": torch.tensor([4, 1, 3]),
        "history_items": torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [6, 7, 8, 0]]),
        "target": torch.tensor([9, 9, 9]),
    }
    chosen = draw_pairs(batch, 100, torch.Generator().manual_seed(0))
    # every real pair, none of padding or of an invalid row
    assert chosen.tolist() == [[True] * 4, [True, False, False, False], [False] * 4]
    few = draw_pairs(batch, 2, torch.Generator().manual_seed(0))
    assert int(few.sum()) == 2 and bool((few & ~chosen).sum() == 0)
