"""``lrd-dist relations``: the report page, its figures and summary, and refusals."""

import json
from pathlib import Path

import pytest

from lrd_dist.cli import main
from lrd_dist.config import DEMO_CONFIG, load_config
from lrd_dist.data.catalog import Catalog
from lrd_dist.errors import InputError
from lrd_dist.evaluation.relation_report import relation_report
from lrd_dist.train.trainer import train
from tests.conftest import small_run

DEMO = Path(str(DEMO_CONFIG))


def test_relation_report_shows_pairs_usage_and_heatmap(synth_with_embeddings: Path, tmp_path: Path) -> None:
    train(
        load_config(
            DEMO,
            small_run(
                synth_with_embeddings, tmp_path, "train.epochs=1", "model.latent_relations=2", "lrd.slots=all"
            ),
        )
    )
    assert main(["relations", "--run", str(tmp_path), "--top", "3"]) == 0
    page = (tmp_path / "relations" / "index.html").read_text()
    for figure in ("usage.png", "heatmap.png"):
        assert (tmp_path / "relations" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{figure}"' in page
    names = ["virtual", "rel:co_view", "attr:category", "attr:brand", "latent:0", "latent:1"]
    assert [line.split(":")[0] for line in page.split("<h2>")[1:]] == [n.split(":")[0] for n in names]
    assert page.count('<td class="q">') == 3 * len(names)
    texts = Catalog.read(synth_with_embeddings / "catalog.parquet").texts.to_pylist()
    assert sum(text in page for text in texts) >= 3


def test_relation_report_refuses_a_run_without_lrd(synth_with_embeddings: Path, tmp_path: Path) -> None:
    train(load_config(None, small_run(synth_with_embeddings, tmp_path, "train.epochs=1")))
    with pytest.raises(InputError, match="no LRD module"):
        relation_report(tmp_path)


def test_relation_report_summary_counts_every_pair_once(synth_with_embeddings: Path, tmp_path: Path) -> None:
    train(
        load_config(
            DEMO, small_run(synth_with_embeddings, tmp_path, "train.epochs=1", "model.latent_relations=3")
        )
    )
    relation_report(tmp_path)
    summary = json.loads((tmp_path / "relations" / "summary.json").read_text())
    assert summary["slots"] == ["latent:0", "latent:1", "latent:2"]  # the demo config: latent slots only
    assert sum(summary["won"]) == summary["pairs"] > 0
    assert sum(map(sum, summary["won_by_predefined"])) == summary["pairs"]
    assert summary["predefined"][-1] == "none" and abs(sum(summary["mean_q"]) - 1) < 1e-4


def test_relation_report_refuses_a_directory_without_best_weights(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("lrd: {enabled: true}\n")
    with pytest.raises(InputError, match=r"best\.safetensors: missing"):
        relation_report(tmp_path)
