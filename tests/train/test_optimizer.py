"""Row-wise (sparse) id-table updates against dense Adam, on the real Trainer and data."""

import json
from pathlib import Path

import pytest
import torch

from lrd_dist.config import DEMO_CONFIG, load_config
from lrd_dist.data.stream import make_loader
from lrd_dist.errors import InputError
from lrd_dist.train.optimizer import Schedules, id_tables
from lrd_dist.train.trainer import Trainer, train
from tests.conftest import small_run

DEMO = Path(str(DEMO_CONFIG))
TABLES = {
    "kda": ["backbone.user_embeddings", "backbone.entity_embeddings", "backbone.item_bias"],
    "sasrec": ["backbone.item_embeddings"],
}


def _trainer(data: Path, out: Path, *extra: str) -> Trainer:
    overrides = small_run(data, out, "eval.enabled=false", "train.tracker=none", "lrd.enabled=false", *extra)
    trainer = Trainer(load_config(DEMO, overrides))
    trainer.setup()
    return trainer


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.core.state_dict().items()}


def _one_step(trainer: Trainer) -> dict[str, torch.Tensor]:
    batch = next(iter(make_loader(trainer.train_stream)))
    trainer.model.train()
    trainer.train_step(batch)
    return batch


@pytest.mark.parametrize("name", ["kda", "sasrec"])
def test_each_model_declares_its_catalog_tables(
    synth_with_embeddings: Path, tmp_path: Path, name: str
) -> None:
    trainer = _trainer(
        synth_with_embeddings, tmp_path, f"model.name={name}", "train.embedding_updates=sparse"
    )
    names = {id(m): n for n, m in trainer.core.named_modules()}
    assert [names[id(t)] for t in id_tables(trainer.core)] == TABLES[name]
    assert [type(o.optimizer).__name__ for o in trainer.optimizers] == ["Adam", "SparseAdam"]
    sparse_params = {id(p) for p in trainer.optimizers[1].param_groups[0]["params"]}
    assert sparse_params == {id(t.weight) for t in id_tables(trainer.core)}
    _one_step(trainer)
    for table in id_tables(trainer.core):
        assert table.weight.grad.is_sparse  # row-wise: only the looked-up rows are in it


def test_sparse_step_touches_only_the_rows_a_batch_looked_up(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    sparse = _trainer(
        synth_with_embeddings, tmp_path / "sparse", "model.name=sasrec", "train.embedding_updates=sparse"
    )
    dense = _trainer(
        synth_with_embeddings, tmp_path / "dense", "model.name=sasrec", "train.weight_decay=0.01"
    )
    for trainer in (sparse, dense):
        before, sampler = _weights(trainer), trainer.sampler.state_dict()
        batch = _one_step(trainer)
        trainer.sampler.load_state_dict(sampler)
        batch["negatives"] = trainer.sampler.draw(batch)["negatives"]  # the same draw again
        trainer.optimizer_step()
        after = _weights(trainer)["backbone.item_embeddings.weight"]
        changed = (after != before["backbone.item_embeddings.weight"]).any(1)
        trainer.changed, trainer.batch = changed, batch
    seen = torch.zeros_like(sparse.changed)
    seen[sparse.batch["history_items"].flatten()] = True
    seen[sparse.batch["target"]] = True
    seen[sparse.batch["negatives"]] = True
    seen[0] = False  # the padding row has no gradient
    assert sparse.changed.sum() > 0
    assert not sparse.changed[~seen].any()  # untouched rows keep their values, bit for bit
    # dense Adam with weight decay moves every row every step (the cost this option removes)
    assert dense.changed[1:].all()


def test_first_sparse_step_equals_dense_adam_and_later_ones_are_lazy(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    """Step 1 of lazy Adam is Adam's (no moments yet); later, rows a batch skips keep their
    moments, so the two diverge."""
    overrides = ("model.name=sasrec", "train.weight_decay=0", "model.dropout=0")
    runs = {
        mode: _trainer(synth_with_embeddings, tmp_path / mode, *overrides, f"train.embedding_updates={mode}")
        for mode in ("dense", "sparse")
    }
    loader = {mode: iter(make_loader(t.train_stream)) for mode, t in runs.items()}
    drift = []
    for _ in range(3):
        for mode, trainer in runs.items():
            trainer.train_step(next(loader[mode]))
            if mode == "dense":
                # step 1 is lr * g / (|g| + eps), but SparseAdam adds eps before the bias
                # correction (eps / sqrt(1 - beta2) = 3e-7 at step 1): compare where |g| >> that
                clear = trainer.core.backbone.item_embeddings.weight.grad.abs() > 1e-4
            trainer.optimizer_step()
        a, b = (_weights(runs[m])["backbone.item_embeddings.weight"] for m in ("dense", "sparse"))
        drift.append((a - b).abs()[clear].max().item())
    assert drift[0] < 1e-5  # lr 1e-3 times 3e-7 / 1e-4 at most
    assert drift[2] > 1e-4  # about lr (1e-3): a lazy row's step differs in sign or size


def test_kda_lrd_learns_with_sparse_updates(synth_with_embeddings: Path, tmp_path: Path) -> None:
    overrides = ("model.name=kda", "lrd.enabled=true", "model.latent_relations=3", "train.epochs=3")
    results = train(
        load_config(
            DEMO, small_run(synth_with_embeddings, tmp_path, *overrides, "train.embedding_updates=sparse")
        )
    )
    assert results["test"]["NDCG@10"] > 0.2  # 49 negatives: a random ranking gives about 0.1
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in lines if "loss" in entry]
    assert steps[-1]["rec"] < steps[0]["rec"]


def test_sparse_updates_refuse_what_cannot_be_row_wise(tmp_path: Path) -> None:
    for extra, fix in (
        (["model.name=sasrec", "lrd.enabled=false", "train.loss=full_softmax"], "sampled_softmax"),
        (["train.max_grad_norm=1.0"], "max_grad_norm=null"),
    ):
        with pytest.raises(InputError, match=fix):
            load_config(DEMO, ["train.embedding_updates=sparse", *extra])


@pytest.mark.filterwarnings("ignore:Detected call of")  # lr_scheduler.step() with no optimizer step
@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 50), (7, 50), (5, 5)])
def test_schedules_give_the_learning_rates_of_transformers(name: str, warmup: int, total: int) -> None:
    from transformers import get_scheduler

    config = load_config(DEMO, [f"train.schedule={name}", f"train.warmup_steps={warmup}", "train.lr=0.01"])
    ours = [torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01) for _ in range(2)]
    reference = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    schedules = Schedules(ours, config, total)
    theirs = get_scheduler(
        "constant_with_warmup" if name == "constant" else name,
        reference,
        num_warmup_steps=warmup,
        num_training_steps=total,
    )
    seen = []
    for _ in range(total + 3):  # past the end: decays stay at 0
        assert schedules.lr == pytest.approx(theirs.get_last_lr()[0], abs=1e-15)
        assert ours[1].param_groups[0]["lr"] == ours[0].param_groups[0]["lr"]  # both optimizers
        seen.append(schedules.lr)
        schedules.step()
        theirs.step()
    assert seen[0] == (0.0 if warmup else 0.01)
    assert seen[-1] == {"constant": 0.01, "linear": 0.0}.get(name, seen[-1])  # (cosine climbs again)
    # the state (JSON in the trainer state) restores the position of both schedules
    restored = Schedules(
        [torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01) for _ in range(2)], config, total
    )
    restored.load_state_dict(json.loads(json.dumps(schedules.state_dict())))
    assert restored.lr == schedules.lr and restored.schedulers[0].last_epoch == total + 3
