import numpy as np
import pytest
import torch

from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender, TemporalKernel
from lrd_dist.models.sasrec import SASRec
from lrd_dist.train.sampling import draw_uniform_negatives


def _batch(rows: int = 4, history: int = 6, items: int = 30) -> dict[str, torch.Tensor]:
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


def _relational(
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
        fused_attention=fused_attention,
    )


@pytest.mark.parametrize("temporal", [False, True])
def test_scores_ignore_what_lies_beyond_the_history_length(temporal: bool) -> None:
    model = _relational(temporal)
    batch = _batch()
    candidates = torch.randint(1, 31, (4, 7))
    before = model(**{k: v for k, v in batch.items() if k not in ("target", "valid")}, candidates=candidates)
    changed = dict(batch)
    padding = torch.arange(6)[None, :] >= batch["history_length"][:, None]
    changed["history_items"] = torch.where(padding, torch.randint(1, 31, (4, 6)), batch["history_items"])
    changed["history_times"] = torch.where(padding, 12345, batch["history_times"])
    after = model(**{k: v for k, v in changed.items() if k not in ("target", "valid")}, candidates=candidates)
    assert before.shape == (4, 7)
    assert torch.allclose(before, after, atol=1e-6)


def test_kda_kernel_depends_on_the_time_gap_and_stays_in_unit_range() -> None:
    kernel = TemporalKernel(num_relations=3, n_dft=64, t_scalar=60)
    with torch.no_grad():
        kernel.freq_real.fill_(1.0)
    decay = kernel(torch.tensor([[0.0, 3600.0, 86_400.0 * 30]]))
    assert decay.shape == (1, 3, 3)
    assert (decay >= 0).all() and (decay <= 1).all()
    assert not torch.allclose(decay[0, 0], decay[0, 2])


def test_lrd_loss_prefers_true_reconstructions_and_reports_usage() -> None:
    torch.manual_seed(0)
    lrd = LatentRelationDiscovery(text_dim=8, emb_size=4, num_relations=3, alpha=0.1)
    q = torch.softmax(torch.randn(2, 5, 3), -1)
    relations = torch.randn(3, 4)
    target = torch.randn(2, 4)
    aligned = (target[:, None, :] * relations.sum(0)).expand(2, 5, 4) * 3  # history items that score high
    opposed = -aligned
    mask = torch.ones(2, 5, dtype=torch.bool)
    good, stats = lrd.loss(q, aligned, opposed, target, relations, mask)
    bad, _ = lrd.loss(q, opposed, aligned, target, relations, mask)
    assert good < bad
    assert torch.isclose(stats["usage"].sum(), torch.tensor(1.0))
    assert 0 < stats["entropy"] <= np.log(3) + 1e-6


def test_leave_one_latent_drops_the_virtual_relation_from_the_decoder() -> None:
    torch.manual_seed(0)
    keep, drop = (LatentRelationDiscovery(8, 4, 3, leave_one_latent=flag) for flag in (False, True))
    q = torch.tensor([[[1.0, 0.0, 0.0]]])  # all mass on the virtual relation
    args = (
        torch.randn(1, 1, 4),
        torch.randn(1, 1, 4),
        torch.randn(1, 4),
        torch.randn(3, 4),
        torch.ones(1, 1, dtype=torch.bool),
    )
    loss_drop, _ = drop.loss(q, *args)
    assert torch.isclose(
        loss_drop, torch.tensor(np.log(2.0), dtype=torch.float32), atol=1e-5
    )  # q_r = 0: log 2
    loss_keep, _ = keep.loss(q, *args)
    assert not torch.isclose(loss_keep, loss_drop)


def test_training_negatives_avoid_the_target_and_the_history() -> None:
    batch = _batch(items=12)
    generator = torch.Generator().manual_seed(1)
    negatives = draw_uniform_negatives(batch, (4, 50), 12, generator)
    seen = torch.cat([batch["target"][:, None], batch["history_items"]], 1)
    assert ((negatives[:, :, None] == seen[:, None, :]).any(-1)).float().mean() < 0.01
    assert negatives.min() >= 1 and negatives.max() <= 12


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


def test_sasrec_is_causal_over_the_real_history() -> None:
    torch.manual_seed(0)
    model = SASRec(num_items=30, max_history=6, emb_size=16, num_layers=1, num_heads=2, dropout=0.0).eval()
    batch = _batch()
    candidates = torch.randint(1, 31, (4, 5))
    before = Recommender(model).score(batch, candidates)
    changed = dict(batch)
    padding = torch.arange(6)[None, :] >= batch["history_length"][:, None]
    changed["history_items"] = torch.where(padding, 7, batch["history_items"])
    assert torch.allclose(before, Recommender(model).score(changed, candidates), atol=1e-5)


def test_balance_term_rewards_using_several_relations() -> None:
    torch.manual_seed(0)
    lrd = LatentRelationDiscovery(text_dim=8, emb_size=4, num_relations=3, alpha=0.0, balance=1.0)
    args = (
        torch.randn(2, 4, 4),
        torch.randn(2, 4, 4),
        torch.randn(2, 4),
        torch.randn(3, 4),
        torch.ones(2, 4, dtype=torch.bool),
    )
    collapsed = torch.zeros(2, 4, 3)
    collapsed[..., 0] = 1.0
    spread = torch.zeros(2, 4, 3)
    spread[0, :, 1] = 1.0
    spread[1, :2, 2] = 1.0
    spread[1, 2:, 0] = 1.0
    _, stats_collapsed = lrd.loss(collapsed, *args)
    _, stats_spread = lrd.loss(spread, *args)
    assert stats_collapsed["marginal_entropy"] < 1e-6 < stats_spread["marginal_entropy"]


def test_predecessor_table_draws_items_that_preceded_the_target() -> None:
    from lrd_dist.data.graph import PredecessorTable

    batch = {
        "valid": torch.tensor([True, True, True, False]),
        "history_length": torch.tensor([2, 1, 3, 1]),
        "history_items": torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6], [7, 0, 0]]),
        "target": torch.tensor([9, 9, 8, 9]),
    }
    table = PredecessorTable([batch], num_items=10)
    fallback = torch.full((3, 50), -1)
    drawn = table.sample(torch.tensor([9, 8, 1]), fallback, np.random.default_rng(0))
    assert set(drawn[0].tolist()) == {2, 3}  # the padding row's 7 is not a predecessor
    assert set(drawn[1].tolist()) == {6}
    assert set(drawn[2].tolist()) == {-1}  # no predecessor: the fallback


def test_softmax_decoder_ranks_the_true_history_item_among_candidates() -> None:
    torch.manual_seed(0)
    lrd = LatentRelationDiscovery(text_dim=8, emb_size=4, num_relations=2, alpha=0.0)
    relations = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.ones(1, 4)
    q = torch.tensor([[[1.0, 0.0]]])  # relation 0: only the first two dimensions matter
    good_history = torch.tensor([[[3.0, 3.0, -3.0, -3.0]]])
    candidates = torch.tensor([[[[-3.0, -3.0, 3.0, 3.0], [0.0, 0.0, 5.0, 5.0]]]])  # [B, H, N, V]
    mask = torch.ones(1, 1, dtype=torch.bool)
    low, _ = lrd.loss(q, good_history, candidates, target, relations, mask)
    high, _ = lrd.loss(torch.tensor([[[0.0, 1.0]]]), good_history, candidates, target, relations, mask)
    assert low < 0.01 < high  # under the right relation the true item wins; under the other it loses


def test_absdiff_pair_features_give_the_same_relation_in_both_directions() -> None:
    """absdiff sees only what differs between the two texts, so (h, i) and (i, h) share q, while the
    official concatenation tells them apart."""
    torch.manual_seed(0)
    head, tail = torch.randn(5, 8), torch.randn(5, 8)
    symmetric = LatentRelationDiscovery(8, 4, num_relations=3, pair_features="absdiff")
    for layer in (symmetric.project_text, symmetric.relation_logits):
        torch.nn.init.normal_(layer.weight)
    assert torch.allclose(
        symmetric.relation_distribution(head, tail), symmetric.relation_distribution(tail, head)
    )
    official = LatentRelationDiscovery(8, 4, num_relations=3)
    for layer in (official.project_text, official.relation_logits):
        torch.nn.init.normal_(layer.weight)
    forward, backward = official.relation_distribution(head, tail), official.relation_distribution(tail, head)
    assert (forward - backward).abs().max() > 1e-3
    # identical texts: absdiff sees no difference at all, whatever the item
    same = symmetric.relation_distribution(head, head)
    assert torch.allclose(same, same[:1].expand_as(same))


def test_pair_window_keeps_only_the_most_recent_history_items() -> None:
    from lrd_dist.train.sampling import draw_pairs, recent_pairs

    batch = {
        "valid": torch.tensor([True, True, False]),
        "history_length": torch.tensor([4, 1, 3]),
        "history_items": torch.tensor([[1, 2, 3, 4], [5, 0, 0, 0], [6, 7, 8, 0]]),
        "target": torch.tensor([9, 9, 9]),
    }
    window = recent_pairs(batch, 2)
    assert window[0].tolist() == [False, False, True, True]  # the last two of four
    assert bool(window[1, 0])  # a one-item history keeps its item
    chosen = draw_pairs(batch, 100, torch.Generator().manual_seed(0), window)
    # every real pair inside the window, none outside it, none of padding or an invalid row
    assert chosen.tolist() == [[False, False, True, True], [True, False, False, False], [False] * 4]
    few = draw_pairs(batch, 1, torch.Generator().manual_seed(0), window)
    assert int(few.sum()) == 1 and bool((few & ~chosen).sum() == 0)


def test_decoder_text_gives_the_decoder_items_a_trained_view_of_their_text() -> None:
    """With decoder_text the LRD loss depends on the text projection (and trains it); without, the
    decoder sees ID embeddings only."""
    from lrd_dist.encoders.item_text import FrozenTextTable

    batch = _batch()
    table = FrozenTextTable(torch.randn(31, 8))
    lrd_negatives = torch.randint(
        1, 31, batch["history_items"].shape, generator=torch.Generator().manual_seed(1)
    )
    losses = {}
    for decoder_text in (False, True):
        torch.manual_seed(0)
        lrd = LatentRelationDiscovery(8, 16, num_relations=4, decoder_text=decoder_text)
        model = Recommender(_relational(temporal=True), lrd, table)
        out = model(batch, negatives=batch["target"].flip(0), lrd_negatives=lrd_negatives)
        losses[decoder_text] = out["lrd"].item()
        if decoder_text:
            out["lrd"].backward()
            assert lrd.text_to_entity.weight.grad.abs().sum() > 0
        else:
            assert lrd.text_to_entity is None
    assert losses[True] != pytest.approx(losses[False])


@pytest.mark.parametrize("fused_attention", [True, False])
def test_relation_interaction_matches_reference_multi_head_attention(fused_attention: bool) -> None:
    """The interaction must compute the official block: per-head attention with separate
    bias-free q, k, v projections, ReLU MLP, residual and LayerNorm, weights shared by the layers;
    with the fused CPU kernel and with torch ops, values and gradients."""
    from lrd_dist.models.relational import RelationInteraction

    torch.manual_seed(0)
    block = RelationInteraction(16, num_heads=4, num_layers=3, dropout=0.0, fused_attention=fused_attention)
    for parameter in block.parameters():  # away from the tiny init so every term matters
        torch.nn.init.normal_(parameter, 0.0, 0.3)
    x = torch.randn(7, 5, 16, requires_grad=True)  # 7 candidate rows of 5 relation slots

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(7, 5, 4, 4).transpose(1, 2)

    expected = x
    for _ in range(3):
        q, k, v = heads(block.query(expected)), heads(block.key(expected)), heads(block.value(expected))
        weights = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # scale 1/sqrt(head size 4)
        attended = (weights @ v).transpose(1, 2).reshape(7, 5, 16)
        expected = block.norm(expected + block.output(torch.relu(block.hidden(attended))))
    upstream = torch.randn(7, 5, 16)
    expected_grads = torch.autograd.grad(expected, [x, block.query.weight], upstream)
    out = block(x)
    assert block._use_kernel is fused_attention  # the kernel is built on this machine
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        torch.autograd.grad(out, [x, block.query.weight], upstream), expected_grads, strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("temporal", "fused_attention"), [(False, True), (True, True), (True, False)])
def test_compiled_scoring_scores_like_eager_and_training_stays_eager(temporal, fused_attention) -> None:
    model = _relational(temporal, fused_attention=fused_attention).eval()
    for parameter in model.parameters():  # away from the tiny init so every term matters
        torch.nn.init.normal_(parameter, 0.0, 0.3)
    batch = _batch()
    arguments = {
        k: batch[k] for k in ("user", "history_items", "history_times", "history_length", "target_time")
    }
    candidates = torch.randint(1, 31, (4, 9), generator=torch.Generator().manual_seed(1))
    eager = model(**arguments, candidates=candidates)
    model.compile_inference()
    calls = []
    compiled = model._compiled_block
    model._compiled_block = lambda *a: calls.append(a[-1].shape) or compiled(*a)
    with torch.inference_mode():
        torch.testing.assert_close(model(**arguments, candidates=candidates), eager, rtol=1e-5, atol=1e-5)
        fewer = model(**arguments, candidates=candidates[:, :2])  # another shape
        torch.testing.assert_close(fewer, eager[:, :2], rtol=1e-5, atol=1e-5)
    assert calls == [(4, 9), (4, 2)]
    with_grad = model(**arguments, candidates=candidates)  # a training call: eager, differentiable
    assert len(calls) == 2 and with_grad.requires_grad


@pytest.mark.parametrize("temporal", [False, True])
def test_scoring_candidates_in_blocks_changes_no_score(temporal: bool, monkeypatch) -> None:
    model = _relational(temporal).eval()
    batch = _batch()
    candidates = torch.randint(1, 31, (4, 25), generator=torch.Generator().manual_seed(1))
    arguments = {
        k: batch[k] for k in ("user", "history_items", "history_times", "history_length", "target_time")
    }
    whole = model(**arguments, candidates=candidates)
    monkeypatch.setattr(RelationalRecommender, "BLOCK_ROWS", 4 * 3)  # blocks of 3 candidates, one of 1
    blocked = model(**arguments, candidates=candidates)
    assert whole.shape == blocked.shape == (4, 25)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)
