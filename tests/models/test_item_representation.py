"""Text where the recommender scores (``model.item_representation``): each representation trains
and scores, an item's score follows its text, and the ID model is untouched by the option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lrd_dist.assembly import build_dataset_and_model
from lrd_dist.config import load_config
from lrd_dist.encoders.item_text import FrozenTextTable
from lrd_dist.errors import InputError
from lrd_dist.train.trainer import train
from tests.conftest import small_run


@pytest.mark.parametrize(
    ("model", "representation"),
    [("kda", "id+text"), ("kda", "text"), ("rcf", "id+text"), ("sasrec", "id+text"), ("sasrec", "text")],
)
def test_each_representation_trains_and_scores(
    synth_with_embeddings: Path, tmp_path: Path, model: str, representation: str
) -> None:
    overrides = small_run(
        synth_with_embeddings,
        tmp_path,
        f"model.name={model}",
        f"model.item_representation={representation}",
        "lrd.enabled=false",
        "train.max_steps=6",
        "train.epochs=1",
    )
    results = train(load_config(None, overrides))
    assert results["steps"] == 6 and 0.0 <= results["test"]["NDCG@10"] <= 1.0
    built = build_dataset_and_model(load_config(None, overrides))
    assert built.model.reads_text and isinstance(built.model.item_text, FrozenTextTable)
    assert ("text_projection.weight" in built.model.state_dict()) and built.model.id_vectors == (
        representation == "id+text"
    )


@pytest.mark.parametrize("model", ["kda", "sasrec"])
def test_an_items_score_follows_its_text(synth_with_embeddings: Path, model: str) -> None:
    """With the text alone, an item is what its text says: another text, another score; with the
    ID model the text table is not even built."""
    common = [
        f"data.dir={synth_with_embeddings}",
        f"model.name={model}",
        "lrd.enabled=false",
        "model.emb_size=16",
    ]
    built = build_dataset_and_model(load_config(None, [*common, "model.item_representation=text"]))
    recommender = built.model.eval()
    batch = next(iter(built.loader("test")))
    candidates = torch.cat([batch["target"][:, None], batch["negatives"][:, :4]], dim=1)
    with torch.no_grad():
        before = recommender.score(batch, candidates)
        item = int(candidates[0, 0])
        recommender.item_text.table[item] = recommender.item_text.table[item % 150 + 1]  # another text
        after = recommender.score(batch, candidates)
    moved = after != before
    assert moved[0, 0]  # the item whose text changed scores differently
    untouched = ~(candidates == item).any(1)  # rows that neither score nor hold that item...
    untouched &= ~(batch["history_items"] == item).any(1)
    assert torch.equal(after[untouched], before[untouched])  # ...score as before
    assert build_dataset_and_model(load_config(None, common)).model.item_text is None


def test_the_decoder_reads_text_one_way_only() -> None:
    with pytest.raises(InputError, match=r"lrd\.decoder_text with model\.item_representation=id\+text"):
        load_config(
            None,
            [
                "lrd.enabled=true",
                "model.latent_relations=2",
                "lrd.decoder_text=true",
                "model.item_representation=id+text",
            ],
        )


def test_with_a_tuned_encoder_the_recommendation_loss_trains_it(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """No LRD at all: only the recommendation loss reaches the encoder, through the item vectors."""
    overrides = small_run(
        synth_with_embeddings,
        tmp_path,
        "model.name=sasrec",
        "lrd.enabled=false",
        "model.item_representation=id+text",
        "llm.mode=lora",
        "llm.tune_layers=1",
        f"llm.cache_dir={tmp_path / 'cache'}",
        "llm.lr=0.01",
        "train.max_steps=3",
        "train.epochs=1",
    )
    results = train(load_config(None, overrides))
    assert results["encoder"]["per_rank"][0]["lora_B_norm"] > 1e-4  # zero at initialisation


def test_a_softmax_over_every_item_reads_a_refreshed_table_of_a_tuned_encoder(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """Every item's text through a tuned encoder in every step would cost the catalog per step: the
    table is refreshed every train.catalog_refresh_steps (logged), the histories read the encoder live."""
    import json

    overrides = small_run(
        synth_with_embeddings,
        tmp_path,
        "model.name=sasrec",
        "lrd.enabled=false",
        "train.loss=full_softmax",
        "model.item_representation=id+text",
        "llm.mode=lora",
        "llm.tune_layers=1",
        f"llm.cache_dir={tmp_path / 'cache'}",
        "llm.lr=0.01",
        "train.catalog_refresh_steps=2",
        "train.max_steps=5",
        "train.epochs=1",
    )
    results = train(load_config(None, overrides))
    assert results["encoder"]["per_rank"][0]["lora_B_norm"] > 1e-4
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["catalog_text_refreshed"] for e in lines if "catalog_text_refreshed" in e] == [0, 2, 4]
