import json
from pathlib import Path

import pytest

from lrd_dist.config import DEMO_CONFIG, load_config
from lrd_dist.errors import InputError
from lrd_dist.train.selection import official_stop
from lrd_dist.train.trainer import train
from tests.conftest import small_run
from tests.helpers import resumes, training_log

DEMO = Path(str(DEMO_CONFIG))


@pytest.mark.parametrize("name", ["kda", "rcf", "sasrec"])
def test_training_learns_and_writes_its_run_directory(
    synth_with_embeddings: Path, tmp_path: Path, name: str
) -> None:
    config = load_config(
        DEMO,
        small_run(
            synth_with_embeddings,
            tmp_path,
            f"model.name={name}",
            "train.epochs=4",
            f"lrd.enabled={name != 'sasrec'}",
            "model.latent_relations=3",
        ),
    )
    results = train(config)
    # 49 negatives: a random ranking gives NDCG@10 about 0.1
    assert results["test"]["NDCG@10"] > 0.2 and results["test"]["examples"] == 301
    assert results["test"]["tie_rate"] == 0.0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in lines if "loss" in entry]
    assert steps[-1]["rec"] < steps[0]["rec"]
    assert sum("dev/NDCG@10" in entry for entry in lines) == results["epochs_run"]
    assert json.loads((tmp_path / "results.json").read_text())["best_epoch"] == results["best_epoch"]
    assert "latent_relations: 3" in (tmp_path / "config.yaml").read_text()
    if name != "sasrec":
        # the synthetic config's q covers the 3 latent slots only (lrd.slots=latent)
        assert "lrd_usage" in steps[-1] and len(steps[-1]["lrd_usage"]) == 3
        discovery = results["relation_discovery"]
        assert len(discovery["usage"]) == 3 and sum(discovery["usage"]) == discovery["pairs"]
        assert 0 <= discovery["nmi"] <= 1 and discovery["pairs"] > 0


def test_early_stopping_keeps_the_best_epoch(synth_with_embeddings: Path, tmp_path: Path) -> None:
    config = load_config(
        None,
        small_run(synth_with_embeddings, tmp_path, "train.lr=0.5", "train.epochs=30", "train.patience=2"),
    )
    results = train(config)
    assert results["epochs_run"] <= results["best_epoch"] + 3
    assert results["epochs_run"] < 30


def test_compiled_scoring_gives_the_metrics_of_eager_scoring(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    results = {}
    for compiled in (False, True):
        config = load_config(
            DEMO,
            small_run(
                synth_with_embeddings,
                tmp_path / str(compiled),
                "train.epochs=1",
                "model.latent_relations=2",
                f"eval.compile={str(compiled).lower()}",
            ),
        )
        results[compiled] = train(config)
    for split in ("dev", "test"):
        assert results[True][split]["NDCG@10"] == pytest.approx(results[False][split]["NDCG@10"], abs=1e-6)
        assert results[True][split]["HR@5"] == pytest.approx(results[False][split]["HR@5"], abs=1e-6)
    assert results[True]["test"]["NDCG@10"] > 0  # scored something


def test_embeddings_of_another_catalog_are_refused(
    synth_with_embeddings: Path, tmp_path: Path, rechorus_dir: Path
) -> None:
    from lrd_dist.cli import main

    toy = tmp_path / "toyds"
    assert main(["prepare", "--source", "rechorus", "--input", str(rechorus_dir), "--out", str(toy)]) == 0
    config = load_config(
        DEMO,
        small_run(
            tmp_path / "toyds",
            tmp_path / "run",
            f"llm.table={synth_with_embeddings / 'item_embeddings.safetensors'}",
        ),
    )
    with pytest.raises(InputError, match="another catalog"):
        train(config)


def test_latent_only_relations_cover_the_latent_slots(synth_with_embeddings: Path, tmp_path: Path) -> None:
    config = load_config(
        DEMO,
        small_run(
            synth_with_embeddings, tmp_path, "train.epochs=1", "model.latent_relations=3", "lrd.slots=latent"
        ),
    )
    results = train(config)
    assert len(results["relation_discovery"]["usage"]) == 3
    first_log = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    usage = json.loads(first_log)["lrd_usage"]
    assert len(usage) == 3 and abs(sum(usage) - 1) < 1e-4


def test_official_stop_rule() -> None:
    rising = [0.1 + 0.01 * i for i in range(30)]
    assert not official_stop([]) and not official_stop(rising)  # nothing yet; still improving at 30
    flat_tail = [*rising[:20], 0.3, 0.3, 0.29, 0.28, 0.28]
    assert official_stop(flat_tail)  # > 20 evaluations, last 5 non-increasing
    assert not official_stop(rising[:15] + [0.2] * 5)  # non-increasing but only 20 evaluations
    old_best = [0.5] + [0.1, 0.2] * 10  # best 21 evaluations ago, although the tail zig-zags
    assert official_stop(old_best)
    assert not official_stop(old_best[:-1])


def test_a_run_stopped_by_the_official_rule_stays_stopped_on_resume(
    synth_with_embeddings: Path, tmp_path: Path
) -> None:
    overrides = small_run(
        synth_with_embeddings,
        tmp_path,
        "model.name=sasrec",
        "lrd.enabled=false",
        "data.batch_size=512",
        "train.lr=1e-9",  # dev NDCG@5 stays flat: the rule stops after its 21st evaluation
        "train.epochs=60",
        "train.early_stop=official",
        "eval.metric=NDCG@5",
        "checkpoint.resume=auto",
    )
    first = train(load_config(None, overrides))
    assert first["epochs_run"] == 21  # the rule needs more than 20 evaluations
    metrics = (tmp_path / "metrics.jsonl").read_text()
    best = (tmp_path / "best.safetensors").read_bytes()
    again = train(load_config(None, overrides))
    # resumed from the last checkpoint: no further epoch, the same best weights and test figures
    assert again["epochs_run"] == first["epochs_run"] and again["steps"] == first["steps"]
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert training_log(kept) == [json.loads(line) for line in metrics.splitlines()]
    assert resumes(tmp_path) == [f"step-{first['steps']:08d}"]
    assert (tmp_path / "best.safetensors").read_bytes() == best
    assert again["test"] == first["test"]


def test_a_non_finite_loss_stops_the_run_clearly_or_is_skipped_when_allowed(
    synth_with_embeddings: Path, tmp_path: Path, monkeypatch
) -> None:
    """NaN at the fourth training call: the run stops there naming the step, the rank and the term,
    with exit code 3 (not 75: nothing to requeue) and its last good checkpoint kept; with
    ``train.skip_nonfinite_steps`` the step is skipped and counted instead."""
    from lrd_dist.models.recommender import Recommender

    forward, calls = Recommender.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out["rec"] = out["rec"] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Recommender, "forward", poisoned)
    overrides = small_run(
        synth_with_embeddings, tmp_path / "stopped", "train.max_steps=6", "checkpoint.every_steps=2"
    )
    with pytest.raises(
        Exception, match=r"non-finite loss at step 4 \(rank 0: rec\).*last good checkpoint is step-00000002"
    ):
        train(load_config(None, overrides))
    calls.clear()
    from lrd_dist.cli import main

    assert main(["train", *small_run(synth_with_embeddings, tmp_path / "cli", "train.max_steps=6")]) == 3
    calls.clear()
    skipped = small_run(
        synth_with_embeddings, tmp_path / "skipped", "train.max_steps=6", "train.skip_nonfinite_steps=1"
    )
    results = train(load_config(None, skipped))
    assert results["steps"] == 6
    entries = [json.loads(line) for line in (tmp_path / "skipped" / "metrics.jsonl").read_text().splitlines()]
    assert [e["skipped_nonfinite"] for e in entries if "skipped_nonfinite" in e] == [1]
    assert all(e["loss"] == e["loss"] for e in entries if "loss" in e)  # no NaN reached the log
