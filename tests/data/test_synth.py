from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import PLANTED_PAIRS, Manifest
from lrd_dist.data.stream import LoaderConfig, SequenceStream
from lrd_dist.data.synth import RELATIONS, SynthConfig, generate
from lrd_dist.errors import InputError


def test_planted_relation_of_every_generated_pair_is_an_edge_of_the_graph(synth_dataset: Path) -> None:
    planted = pq.read_table(synth_dataset / PLANTED_PAIRS).to_pydict()
    edges = {}
    for head, tail, relation in zip(planted["head"], planted["tail"], planted["relation"], strict=True):
        edges[(head, tail)] = edges[(tail, head)] = relation
    stream = SequenceStream(
        synth_dataset, "train", LoaderConfig(batch_size=100_000, shuffle=False, max_history=12)
    )
    batch = next(iter(stream))  # numpy
    relation, offset = batch["planted_relation"], batch["planted_offset"]
    length, history, target = batch["history_length"], batch["history_items"], batch["target"]
    related = np.flatnonzero(relation > 0)
    assert 0.6 < len(related) / len(relation) < 0.95  # mostly relational steps, some jumps
    for row in related:
        source = history[row, length[row] - offset[row]]
        assert edges[(int(source), int(target[row]))] == relation[row]
    assert set(np.unique(relation[related])) == {1, 2, 3, 4}


def test_relation_can_be_read_from_the_texts(synth_dataset: Path) -> None:
    catalog = Catalog.read(synth_dataset / "catalog.parquet")
    planted = pq.read_table(synth_dataset / PLANTED_PAIRS).to_pydict()
    texts = catalog.texts.to_pylist()
    for head, tail, relation in list(zip(planted["head"], planted["tail"], planted["relation"], strict=True))[
        :40
    ]:
        base, partner = texts[head - 1], texts[tail - 1]
        assert base in partner  # the partner's text is written from its base product's text
        assert partner.replace(base, "{b}") in RELATIONS[relation - 1][1]


def test_generation_is_seeded_and_sized() -> None:
    a = generate(SynthConfig(users=50, items=60, relations=3, seed=5))
    b = generate(SynthConfig(users=50, items=60, relations=3, seed=5))
    c = generate(SynthConfig(users=50, items=60, relations=3, seed=6))
    assert np.array_equal(a[1].item, b[1].item) and a[0].texts.equals(b[0].texts)
    assert not np.array_equal(a[1].item[:100], c[1].item[:100])
    assert a[0].num_items == 60 and a[1].user.max() == 50
    assert a[1].item.min() >= 1 and a[1].item.max() <= 60
    assert np.bincount(a[1].user)[1:].min() >= 5


def test_manifest_names_the_extra_fields(synth_dataset: Path) -> None:
    manifest = Manifest.load(synth_dataset)
    assert manifest.extra_fields == ["planted_relation", "planted_offset"]
    assert manifest.source == "synth"


@pytest.mark.parametrize("relations,items", [(0, 100), (9, 100), (4, 6)])
def test_bad_synth_options_are_refused(relations: int, items: int) -> None:
    with pytest.raises(InputError):
        generate(SynthConfig(users=10, items=items, relations=relations))


def test_preparation_is_byte_for_byte_reproducible(tmp_path: Path) -> None:
    from lrd_dist.data.prepare import write_dataset

    digests = []
    for name in ("a", "b"):
        catalog, interactions, _ = generate(SynthConfig(users=120, items=100, relations=2, seed=9))
        manifest = write_dataset(
            tmp_path / name,
            source="synth",
            catalog=catalog,
            interactions=interactions,
            num_negatives=20,
            samples_per_shard=300,
            block_size=64,
            seed=4,
        )
        digests.append([shard.sha256 for shard in manifest.shards])
    assert digests[0] == digests[1] and len(digests[0]) > 3
