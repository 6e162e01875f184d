"""Training negatives: never the target or a history item; under the official rule never any item
of the user, dev and test items included."""

from pathlib import Path

import torch

from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.data.user_items import UserItems
from lrd_dist.train.sampling import draw_uniform_negatives


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
