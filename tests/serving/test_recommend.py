"""``lrd-dist recommend`` and ``lrd-dist export --embeddings``: recommendations equal a brute-force
ranking of the whole catalog, ties are ordered the same however the catalog is chunked, two
processes write what one writes, histories from a file, retrieve-then-rerank, and refusals."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lrd_dist.cli import main
from lrd_dist.data.histories import Histories
from lrd_dist.data.user_items import UserItems
from lrd_dist.run_dir import load_trained
from lrd_dist.serving.retrieval import build_index, recall_against_exact
from lrd_dist.serving.topk import top_k
from tests.conftest import TINY_LRD
from tests.integration.launch import lrd_launch


@pytest.fixture(scope="module")
def runs(synth_with_embeddings: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("recommend")
    runs = {"kda_lrd": base / "kda_lrd", "sasrec": base / "sasrec"}
    common = [f"data.dir={synth_with_embeddings}", "data.batch_size=64", "train.epochs=1", *TINY_LRD]
    assert main(["train", *common, f"train.out_dir={runs['kda_lrd']}"]) == 0
    sasrec = [*common, f"train.out_dir={runs['sasrec']}", "model.name=sasrec", "lrd.enabled=false"]
    assert main(["train", *sasrec]) == 0
    return runs


def _recommend(tmp_path: Path, name: str, *args: str) -> list[dict]:
    out = tmp_path / f"{name}.parquet"
    assert main(["recommend", *args, "--out", str(out)]) == 0
    return pq.read_table(out).to_pylist()


@pytest.mark.parametrize("model", ["kda_lrd", "sasrec"])
def test_recommendations_equal_a_brute_force_ranking(
    runs: dict[str, Path], tmp_path: Path, model: str
) -> None:
    rows = _recommend(tmp_path, model, "--run", str(runs[model]), "--k", "7", "--item-chunk", "13")
    trained = load_trained(runs[model])
    histories = Histories.from_dataset(trained.data_dir, trained.config.data.max_history)
    known = UserItems.from_dataset(trained.data_dir)
    sources = trained.catalog.source_ids.to_pylist()
    assert len(rows) == 7 * len(histories) and list(rows[0]) == ["user", "rank", "item", "score", "text"]
    for row in (0, 17, 300):
        batch = histories.batch(np.array([row]))
        with torch.no_grad():
            scores = trained.model.score(batch, torch.arange(1, 151)[None, :])[0]
        seen = set(known.everything(batch["user"])[1].tolist())
        ranked = sorted((-float(scores[i - 1]), i) for i in range(1, 151) if i not in seen)[:7]
        got = [r for r in rows if r["user"] == histories.names[row]]
        assert [r["item"] for r in got] == [sources[i - 1] for _, i in ranked]
        assert [r["rank"] for r in got] == list(range(1, 8))
        np.testing.assert_allclose([r["score"] for r in got], [-s for s, _ in ranked], rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 50])
def test_equal_scores_are_ordered_by_item_id_whatever_the_chunking(chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    table = torch.randint(0, 4, (3, 41), generator=generator).float()  # many ties, 3 users

    def score(items: torch.Tensor) -> torch.Tensor:
        return table.gather(1, items)

    excluded = (torch.tensor([0, 0, 2]), torch.tensor([5, 9, 40]))
    items, scores = top_k(score, 3, 40, 12, excluded, item_chunk=chunk)
    for user in range(3):
        skip = {int(i) for r, i in zip(*excluded, strict=True) if r == user}
        expected = sorted((-float(table[user, i]), i) for i in range(1, 41) if i not in skip)[:12]
        assert items[user].tolist() == [i for _, i in expected]
        assert scores[user].tolist() == [-s for s, _ in expected]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(runs: dict[str, Path], tmp_path: Path) -> None:
    one = _recommend(tmp_path, "one", "--run", str(runs["kda_lrd"]), "--k", "5")
    out = tmp_path / "two.parquet"
    result = lrd_launch(
        "cpu_2proc", "recommend", "--run", str(runs["kda_lrd"]), "--k", "5", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert pq.read_table(out).to_pylist() == one
    assert not list(tmp_path.glob("two.parquet.rank*"))  # the parts were merged and removed


def test_histories_from_a_file_score_like_the_same_dataset_history(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    trained = load_trained(runs["kda_lrd"])
    histories = Histories.from_dataset(trained.data_dir, trained.config.data.max_history)
    complete = int(np.flatnonzero(histories.length < trained.config.data.max_history)[0])  # nothing older
    sources = trained.catalog.source_ids.to_pylist()
    length = int(histories.length[complete])
    record = {
        "user": histories.names[complete],
        "items": [sources[i - 1] for i in histories.items[complete, :length].tolist()],
        "times": histories.times[complete, :length].tolist(),
    }
    file = tmp_path / "histories.jsonl"
    file.write_text(
        json.dumps(record) + "\n" + json.dumps({"user": "new", "items": record["items"][:2]}) + "\n"
    )
    given = _recommend(tmp_path, "given", "--run", str(runs["kda_lrd"]), "--histories", str(file), "--k", "5")
    users = tmp_path / "users.txt"
    users.write_text(histories.names[complete] + "\n")
    dataset = _recommend(
        tmp_path, "dataset", "--run", str(runs["kda_lrd"]), "--users", str(users), "--k", "5"
    )
    assert [r for r in given if r["user"] == record["user"]] == dataset
    assert len([r for r in given if r["user"] == "new"]) == 5  # a user the model never saw

    file.write_text(
        json.dumps(record) + "\n" + json.dumps({"user": "x", "items": ["no-such-item", sources[0]]})
    )
    assert (
        main(
            [
                "recommend",
                "--run",
                str(runs["kda_lrd"]),
                "--histories",
                str(file),
                "--out",
                str(tmp_path / "b.parquet"),
            ]
        )
        == 2
    )


def test_bad_input_is_refused_with_the_file_and_the_fix(
    runs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = ["--out", str(tmp_path / "r.parquet")]
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text("model: {name: kda}\n")
    assert main(["recommend", "--run", str(empty), *out]) == 2
    assert "best.safetensors: missing" in capsys.readouterr().err
    weights, config = runs["kda_lrd"] / "best.safetensors", runs["sasrec"] / "config.yaml"
    assert main(["recommend", "--weights", str(weights), "--config", str(config), *out]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    users = tmp_path / "users.txt"
    users.write_text("1\nnobody\n")
    assert main(["recommend", "--run", str(runs["kda_lrd"]), "--users", str(users), *out]) == 2
    assert "users.txt, line 2: unknown user 'nobody'" in capsys.readouterr().err
    assert main(["recommend", "--run", str(runs["kda_lrd"]), "--k", "151", *out]) == 2
    assert "larger than the catalog (150 items)" in capsys.readouterr().err
    assert main(["recommend", "--run", str(runs["kda_lrd"]), "--retrieve", str(runs["kda_lrd"]), *out]) == 2
    assert "retrieve with a SASRec run" in capsys.readouterr().err
    file = tmp_path / "h.jsonl"
    file.write_text('{"user": "a", "items": ["synth-1"]}\n{"user": "b", "items": ["nope", "synth-2"]}\n')
    assert main(["recommend", "--run", str(runs["kda_lrd"]), "--histories", str(file), *out]) == 2
    assert "h.jsonl, line 2: unknown item ids ['nope']" in capsys.readouterr().err
    # every field is checked: each bad time or id is refused naming the line, not a traceback
    for line, problem in (
        ('{"user": "b", "items": ["synth-2"], "times": ["x"]}', "time 'x' is not a whole number"),
        ('{"user": "b", "items": ["synth-2"], "times": [null]}', "time None is not a whole number"),
        ('{"user": "b", "items": ["synth-2"], "times": [1e30]}', "time 1e+30 is not a whole number"),
        ('{"user": "b", "items": [["synth-2"]]}', "items must be source ids"),
        ('{"user": ["b"], "items": ["synth-2"]}', "user ['b'] is not a string or an integer"),
        (
            '{"user": "b", "items": ["' + "synth-1" + '", ' + '"synth-2", ' * 200_000 + '"synth-3"]}',
            "longer than",
        ),
    ):
        file.write_text('{"user": "a", "items": ["synth-1"]}\n' + line + "\n")
        assert main(["recommend", "--run", str(runs["kda_lrd"]), "--histories", str(file), *out]) == 2
        assert f"h.jsonl, line 2: {problem}" in capsys.readouterr().err
    assert not (tmp_path / "r.parquet").exists()
    # a long history is read up to what the model reads: no row is padded to the longest line
    from lrd_dist.data.histories import Histories

    trained = load_trained(runs["kda_lrd"])
    file.write_text(
        '{"user": "a", "items": ["synth-1"]}\n{"user": "b", "items": ' + json.dumps(["synth-2"] * 500) + "}\n"
    )
    histories = Histories.from_jsonl(file, trained.catalog, trained.config.data.max_history)
    assert histories.items.shape[1] == trained.config.data.max_history and histories.length.tolist() == [
        1,
        20,
    ]


def test_retrieve_then_rerank_keeps_the_reranker_order_within_the_candidates(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    embeddings = tmp_path / "vectors"
    assert main(["export", "--embeddings", str(embeddings), "--run", str(runs["sasrec"])]) == 0
    info = json.loads((embeddings / "index.json").read_text())
    assert info["index"] == "flat" and info["recall@10"] == 1.0 and info["users"] == 301
    run = ["--run", str(runs["kda_lrd"]), "--k", "5"]
    from_run = _recommend(tmp_path, "a", *run, "--retrieve", str(runs["sasrec"]), "--candidates", "40")
    from_index = _recommend(tmp_path, "b", *run, "--retrieve", str(embeddings), "--candidates", "40")
    assert from_run == from_index
    everything = _recommend(tmp_path, "c", *run, "--retrieve", "popularity", "--candidates", "150")
    assert everything == _recommend(tmp_path, "d", *run)  # 150 candidates = the whole catalog
    assert len(_recommend(tmp_path, "e", *run, "--retrieve", "relations", "--candidates", "40")) == 5 * 301


def test_an_approximate_index_reports_its_recall_against_exact_search() -> None:
    vectors = np.random.default_rng(0).standard_normal((4000, 16)).astype(np.float32)
    queries = np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32)
    exact, kind = build_index(vectors, "flat")
    assert kind == "flat" and recall_against_exact(exact, vectors, queries, 10) == 1.0
    for approximate in ("hnsw", "ivf"):
        index, _ = build_index(vectors, approximate)
        assert 0.5 < recall_against_exact(index, vectors, queries, 10) <= 1.0
