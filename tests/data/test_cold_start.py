"""The cold-start split: a seeded fraction of the items never reaches training (no target, history
item, negative or KG triple; their ID rows keep their initial values), users whose dev or test target
is one stay, and evaluation reports warm and cold targets apart beside the chance level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lrd_dist.assembly import build_dataset_and_model
from lrd_dist.cli import main
from lrd_dist.config import load_config
from lrd_dist.data.catalog import read_cold_items
from lrd_dist.data.format import Manifest
from lrd_dist.train.sampling import TrainingSampler
from lrd_dist.train.trainer import Trainer, train
from tests.conftest import small_run


@pytest.fixture(scope="module")
def cold_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cold") / "data"
    synth = ["synth", "--out", str(out), "--users", "301", "--items", "150", "--relations", "3"]
    assert main([*synth, "--negatives", "49", "--max-history", "20", "--cold-items", "0.2"]) == 0
    assert main(["embed", "--data", str(out), "--batch-size", "64"]) == 0
    return out


def test_no_cold_item_anywhere_in_training(cold_data: Path, tmp_path: Path) -> None:
    cold = read_cold_items(cold_data)
    assert len(cold) == 30 and len(set(cold.tolist())) == 30
    stats = Manifest.load(cold_data).stats
    assert stats["cold_items"] == 30 and stats["cold_dev_targets"] > 0 and stats["cold_test_targets"] > 0
    lrd = ["lrd.enabled=true", "model.latent_relations=2"]
    config = load_config(None, small_run(cold_data, tmp_path, "train.max_steps=3", *lrd))
    built = build_dataset_and_model(config)
    sampler = TrainingSampler(config, built.graph, True, 0, cold=built.cold)
    cold_set = torch.from_numpy(cold)
    for batch in built.loader("train"):
        history = batch["history_items"][batch["valid"]]
        assert not torch.isin(batch["target"][batch["valid"]], cold_set).any()
        assert not torch.isin(history, cold_set).any()
        drawn = sampler.draw(batch)
        assert not torch.isin(drawn["negatives"], cold_set).any()
        assert not torch.isin(drawn["lrd_negatives"], cold_set).any()
        kg = drawn["kg"]
        for column in ("head", "tail", "neg_head", "neg_tail"):
            assert not torch.isin(kg[column], cold_set).any(), column
    dev_targets = torch.cat([b["target"][b["valid"]] for b in built.loader("dev")])
    assert torch.isin(dev_targets, cold_set).any()  # users whose dev target is cold stay


def test_cold_id_rows_never_move_and_metrics_split_warm_from_cold(cold_data: Path, tmp_path: Path) -> None:
    overrides = small_run(cold_data, tmp_path, "train.max_steps=8", "model.item_representation=id+text")
    trainer = Trainer(load_config(None, overrides))
    trainer.setup()
    cold = torch.from_numpy(read_cold_items(cold_data))
    table = trainer.core.backbone.entity_embeddings.weight
    before = table.detach()[cold].clone()
    warm = torch.from_numpy(np.setdiff1d(np.arange(1, 151), cold.numpy()))
    warm_before = table.detach()[warm].clone()
    results = trainer.train()
    assert torch.equal(table.detach()[cold], before)  # weight decay and Adam left them alone
    assert not torch.equal(table.detach()[1:5], warm_before) or bool(
        np.isin([1, 2, 3, 4], cold.numpy()).all()
    )
    test = results["test"]
    assert test["cold/examples"] + test["warm/examples"] == test["examples"] == 301
    chance = sum(1 / np.log2(r + 1) for r in range(1, 11)) / 50  # 49 negatives + the target
    assert test["cold/chance/NDCG@10"] == pytest.approx(chance)


def test_a_fraction_outside_zero_and_one_is_refused(tmp_path: Path, capsys) -> None:
    synth = ["synth", "--out", str(tmp_path / "d"), "--users", "50", "--items", "40", "--cold-items", "1.5"]
    assert main(synth) == 2
    assert "--cold-items: 1.5" in capsys.readouterr().err


def test_new_items_rank_like_the_cold_items_they_copy(cold_data: Path, tmp_path: Path, capsys) -> None:
    """A text-reading run ranks items it has never seen: given as new items with the texts and
    attribute codes of the held-out cold items, they score what those cold items score through the
    stored catalog (no ID row, no bias, the same text); an ID-only run refuses, and bad lines are
    named."""
    import json

    import pyarrow.parquet as pq

    from lrd_dist.data.catalog import Catalog
    from lrd_dist.data.format import CATALOG
    from lrd_dist.run_dir import load_trained
    from lrd_dist.serving.new_items import NewItem, add_new_items

    run = tmp_path / "run"
    train(
        load_config(None, small_run(cold_data, run, "train.max_steps=6", "model.item_representation=id+text"))
    )
    catalog = Catalog.read(cold_data / CATALOG)
    cold = read_cold_items(cold_data)
    built = load_trained(run)
    batch = next(iter(built.loader("test")))
    cold_ids = torch.from_numpy(cold)[None, :].expand(len(batch["user"]), -1)
    texts = catalog.texts.to_pylist()
    copies = [
        NewItem(f"copy-{c}", texts[c - 1], {n: int(v[c - 1]) for n, v in catalog.attributes.items()})
        for c in cold.tolist()
    ]
    total = add_new_items(built, copies)
    assert total == catalog.num_items + len(cold)
    new_ids = torch.arange(catalog.num_items + 1, total + 1)[None, :].expand(len(batch["user"]), -1)
    with torch.no_grad():
        through_catalog = built.model.score(batch, cold_ids)
        as_new = built.model.score(batch, new_ids)
    assert (through_catalog - as_new).abs().max() < 1e-6

    items = tmp_path / "new.jsonl"
    items.write_text("".join(json.dumps({"id": i.source_id, "text": i.text}) + "\n" for i in copies[:3]))
    out = tmp_path / "recs.parquet"
    command = ["recommend", "--run", str(run), "--new-items", str(items), "--k", "150", "--out", str(out)]
    assert main(command) == 0
    recommended = set(pq.read_table(out).column("item").to_pylist())
    assert {i.source_id for i in copies[:3]} <= recommended  # ranked with the rest of the catalog
    id_only = tmp_path / "id_only"
    train(load_config(None, small_run(cold_data, id_only, "train.max_steps=2")))
    assert main(["recommend", "--run", str(id_only), "--new-items", str(items), "--out", str(out)]) == 2
    assert "this run reads items by their ID only" in capsys.readouterr().err
    taken = catalog.source_ids[0].as_py()  # an id the catalog has
    items.write_text(
        json.dumps({"id": "x1", "text": "a pen"}) + "\n" + json.dumps({"id": taken, "text": "a"})
    )
    assert main(command) == 2
    assert f"new.jsonl, line 2: id {taken!r} is already in the catalog" in capsys.readouterr().err
