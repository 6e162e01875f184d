"""Tiny tensors and models shared by the model, sampling and backend tests."""

import torch

from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.runtime import select_attention


def toy_batch(rows: int = 4, history: int = 6, items: int = 30) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    length = torch.tensor([6, 3, 1, 5])[:rows]
    items_ = torch.randint(1, items + 1, (rows, history), generator=generator)
    positions = torch.arange(history)[None, :]
    items_ = torch.where(positions < length[:, None], items_, 0)
    times = torch.where(positions < length[:, None], 1000 + positions * 86_400, 0)
    return {
        "user": torch.arange(1, rows + 1),
        "history_items": items_,
        "history_times": times,
        "history_length": length,
        "target_time": torch.full((rows,), 10 * 86_400),
        "target": torch.randint(1, items + 1, (rows,), generator=generator),
        "valid": torch.ones(rows, dtype=torch.bool),
    }


def toy_relational(
    temporal: bool, relations: int = 4, items: int = 30, fused_attention: bool = True
) -> RelationalRecommender:
    torch.manual_seed(0)
    value_entity = torch.zeros(items + 1, relations, dtype=torch.long)
    value_entity[1:, 2] = torch.randint(items + 1, items + 4, (items,))  # one attribute slot
    return RelationalRecommender(
        num_users=10,
        num_items=items,
        num_entities=items + 4,
        value_entity=value_entity,
        emb_size=16,
        num_layers=2,
        num_heads=2,
        temporal=temporal,
        attention=select_attention(fused_attention),
    )


def score_arguments(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``RelationalRecommender.forward`` takes of a batch, besides the candidates."""
    return {k: batch[k] for k in ("user", "history_items", "history_times", "history_length", "target_time")}


def resumes(run) -> list[str]:
    """The checkpoints a run's ``metrics.jsonl`` says it resumed from, in order: what proves a resume
    (a run that silently started again from step 0 with the same seed logs the same losses)."""
    import json
    from pathlib import Path

    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [e["resumed_from"] for e in map(json.loads, lines) if "resumed_from" in e]


def training_log(entries: list[dict]) -> list[dict]:
    """A log's entries without the records of where a process took over."""
    return [e for e in entries if "resumed_from" not in e]


def relist(checkpoint, *names: str) -> None:
    """After a test edits (or adds) files of a checkpoint, record them in its COMPLETE marker as its
    save would have, so only what they hold is tested, not the checksum."""
    import json
    from pathlib import Path

    from lrd_dist.data.format import sha256_of
    from lrd_dist.train.checkpoint import COMPLETE

    checkpoint = Path(checkpoint)
    marker = json.loads((checkpoint / COMPLETE).read_text())
    for name in names:
        marker["files"][name] = {
            "bytes": (checkpoint / name).stat().st_size,
            "sha256": sha256_of(checkpoint / name),
        }
    (checkpoint / COMPLETE).write_text(json.dumps(marker))
