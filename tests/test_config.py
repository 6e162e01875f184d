"""The config tree: typed choices refused with the allowed values, relations between keys,
configs of earlier releases refused naming the key, every key documented and printed by --help-config."""

from pathlib import Path

import pytest

from lrd_dist.cli import main
from lrd_dist.config import config_keys, load_config
from lrd_dist.errors import InputError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no_such_key"):
        load_config(None, ["train.no_such_key=1"])
    with pytest.raises(InputError, match="latent_relations"):
        load_config(None, ["lrd.enabled=true"])
    with pytest.raises(InputError, match="leave_one_latent"):
        load_config(None, ["lrd.slots=latent", "lrd.leave_one_latent=true"])
    with pytest.raises(InputError, match=r"pair_features.*expected one of \['concat', 'absdiff'\]"):
        load_config(None, ["lrd.pair_features=product"])
    with pytest.raises(InputError, match="decoder_text"):
        load_config(
            None, ["lrd.decoder_text=true", "llm.mode=lora", "lrd.enabled=true", "model.latent_relations=1"]
        )
    with pytest.raises(InputError, match=r"eval\.metric='NDCG@7'"):
        load_config(None, ["eval.metric=NDCG@7"])
    with pytest.raises(InputError, match=r"train\.loss=full_softmax with a relational model"):
        load_config(None, ["train.loss=full_softmax", "model.name=kda"])
    with pytest.raises(InputError, match=r"train\.num_negatives=0"):
        load_config(None, ["train.num_negatives=0"])
    with pytest.raises(InputError, match=r"kg\.gamma"):
        load_config(None, ["kg.gamma=often"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: gru}\n")
    with pytest.raises(InputError, match=r"model\.name.*expected one of \['kda', 'rcf', 'sasrec'\]"):
        load_config(bad)


def test_a_config_of_an_earlier_release_is_refused_naming_the_key(tmp_path: Path) -> None:
    """Keys that moved or were removed, and old sentinels, are not read as if they meant something:
    each is refused in one line naming it and saying what to do."""
    moved = tmp_path / "moved.yaml"
    moved.write_text("model: {name: kda, latent_relations: 8, leave_one_latent: true}\n")
    with pytest.raises(
        InputError,
        match=r"model\.leave_one_latent: not a config key of this lrd_dist.*"
        r"retrain, or use the release that wrote it",
    ):
        load_config(moved)
    removed = tmp_path / "removed.yaml"
    removed.write_text("lrd: {enabled: true, decoder: official}\nmodel: {latent_relations: 8}\n")
    with pytest.raises(InputError, match=r"lrd\.decoder: not a config key"):
        load_config(removed)
    with pytest.raises(InputError, match=r"lrd\.hard_negatives: not a config key"):
        load_config(None, ["lrd.hard_negatives=0.5"])
    with pytest.raises(InputError, match=r"kg\.gamma=-1\.0.*use auto or a weight >= 0"):
        load_config(None, ["kg.gamma=-1.0"])
    with pytest.raises(InputError, match=r"checkpoint\.resume is empty"):
        load_config(None, ["checkpoint.resume=''"])


def test_every_key_has_a_meaning_and_help_config_prints_them_all(capsys) -> None:
    keys = config_keys()
    undocumented = [key for key, _, _, meaning in keys if len(meaning) < 10]
    assert not undocumented
    assert main(["train", "--help-config"]) == 0
    printed = capsys.readouterr().out
    for key, _, _, meaning in keys:
        assert f"{key} (" in printed and meaning in printed
    assert "kg.gamma (float | Literal['auto'], default 'auto')" in printed
    assert len(keys) == len({key for key, *_ in keys}) > 60


@pytest.mark.parametrize("config", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_passes_validation_and_says_how_to_run_it(config: Path) -> None:
    """A shipped config that contradicts itself (e.g. leave_one_latent with latent-only slots) fails here."""
    loaded = load_config(config)
    assert loaded.train.out_dir and loaded.data.batch_size > 0
    head = [line.lower() for line in config.read_text().splitlines() if line.startswith("#")]
    assert any("lrd-dist train --config" in line for line in head) and any(
        "validated" in line for line in head
    )


def test_a_bare_no_is_the_choice_no_for_string_choices_and_false_for_booleans() -> None:
    """YAML reads a bare no as false; for a key whose values are named choices it means "no"."""
    config = load_config(None, ["train.mixed_precision=no", "eval.full_ranking=no"])
    assert config.train.mixed_precision == "no"
    assert config.eval.full_ranking is False
