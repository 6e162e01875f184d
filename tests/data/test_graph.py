"""The knowledge graph: relation slots in the official order, true triples, corrupted negatives."""

import numpy as np

from lrd_dist.data.graph import KnowledgeGraph


def test_knowledge_graph_triples_are_true_and_negatives_are_not(rechorus_dir, tmp_path) -> None:
    from lrd_dist.data.sources.rechorus import load_rechorus

    catalog, _, _ = load_rechorus(rechorus_dir)
    graph = KnowledgeGraph(catalog, latent=2)
    assert graph.slots.names() == [
        "virtual",
        "rel:complement",
        "rel:substitute",
        "attr:category",
        "attr:brand",
        "latent:0",
        "latent:1",
    ]
    # 5 complement + 3 substitute pairs, 5 items with a category, 4 with a brand
    assert graph.num_triples == 5 + 3 + 5 + 4
    assert graph.num_entities == 7 + 2 + 2
    sample = graph.sample(400, np.random.default_rng(0))
    for h, r, t, v, nh, nt in zip(
        *(sample[k].tolist() for k in ("head", "relation", "tail", "value", "neg_head", "neg_tail")),
        strict=True,
    ):
        if v == 0:
            assert t in catalog.relations[graph.slots.item_relations[r - 1]][h - 1].as_py()
        else:
            assert graph.value_entity[h, r] == v == graph.value_entity[t, r]
            assert not (graph.value_entity[nh, r] == v and graph.value_entity[nt, r] == v) or nh == h == nt
