import numpy as np
import pytest
import torch

from lrd_dist.models import load_weights, slot_attention
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender, TemporalKernel
from lrd_dist.models.sasrec import SASRec
from lrd_dist.runtime import select_attention
from tests.helpers import toy_batch, toy_relational


@pytest.mark.parametrize("temporal", [False, True])
def test_scores_ignore_what_lies_beyond_the_history_length(temporal: bool) -> None:
    model = toy_relational(temporal)
    batch = toy_batch()
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


def test_sasrec_is_causal_over_the_real_history() -> None:
    torch.manual_seed(0)
    model = SASRec(num_items=30, max_history=6, emb_size=16, num_layers=1, num_heads=2, dropout=0.0).eval()
    batch = toy_batch()
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


def test_decoder_text_gives_the_decoder_items_a_trained_view_of_their_text() -> None:
    """With decoder_text the LRD loss depends on the text projection (and trains it); without, the
    decoder sees ID embeddings only."""
    from lrd_dist.encoders.item_text import FrozenTextTable

    batch = toy_batch()
    table = FrozenTextTable(torch.randn(31, 8))
    lrd_negatives = torch.randint(
        1, 31, batch["history_items"].shape, generator=torch.Generator().manual_seed(1)
    )
    losses = {}
    for decoder_text in (False, True):
        torch.manual_seed(0)
        lrd = LatentRelationDiscovery(8, 16, num_relations=4, decoder_text=decoder_text)
        model = Recommender(toy_relational(temporal=True), lrd, table)
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
    block = RelationInteraction(
        16, num_heads=4, num_layers=3, dropout=0.0, attention=select_attention(fused_attention)
    )
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
    assert (block.attention is slot_attention.fused_slot_attention) is fused_attention  # built here
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(
        torch.autograd.grad(out, [x, block.query.weight], upstream), expected_grads, strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temporal", [False, True])
def test_scoring_candidates_in_blocks_changes_no_score(temporal: bool, monkeypatch) -> None:
    model = toy_relational(temporal).eval()
    batch = toy_batch()
    candidates = torch.randint(1, 31, (4, 25), generator=torch.Generator().manual_seed(1))
    arguments = {
        k: batch[k] for k in ("user", "history_items", "history_times", "history_length", "target_time")
    }
    whole = model(**arguments, candidates=candidates)
    monkeypatch.setattr(RelationalRecommender, "BLOCK_ROWS", 4 * 3)  # blocks of 3 candidates, one of 1
    blocked = model(**arguments, candidates=candidates)
    assert whole.shape == blocked.shape == (4, 25)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)


def test_recommendation_losses_equal_their_definitions() -> None:
    """bpr with one negative (official), bpr averaged over N, softmax over the target and N sampled
    negatives, and SASRec's softmax over every item; loader padding rows do not count."""
    import torch.nn.functional as F

    batch = toy_batch()
    batch["valid"] = torch.tensor([True, True, True, False])
    negatives = torch.randint(1, 31, (4, 5), generator=torch.Generator().manual_seed(3))
    backbone = toy_relational(temporal=True)
    for parameter in backbone.parameters():
        torch.nn.init.normal_(parameter, 0.0, 0.3)
    kept = batch["valid"]
    scores = Recommender(backbone).score(batch, torch.cat([batch["target"][:, None], negatives], 1))[kept]
    one = Recommender(backbone, loss="bpr").recommendation_loss(batch, negatives[:, 0])
    torch.testing.assert_close(one, -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean())
    several = Recommender(backbone, loss="bpr").recommendation_loss(batch, negatives)
    torch.testing.assert_close(several, -F.logsigmoid(scores[:, :1] - scores[:, 1:]).mean())
    sampled = Recommender(backbone, loss="sampled_softmax").recommendation_loss(batch, negatives)
    torch.testing.assert_close(sampled, F.cross_entropy(scores, torch.zeros(3, dtype=torch.long)))

    torch.manual_seed(0)
    sasrec = SASRec(num_items=30, max_history=6, emb_size=16, num_layers=1, num_heads=2, dropout=0.0).eval()
    every = sasrec.score_all_items(batch["history_items"], batch["history_length"])
    torch.testing.assert_close(
        every[:, 1:], Recommender(sasrec).score(batch, torch.arange(1, 31).expand(4, -1))
    )
    full = Recommender(sasrec, loss="full_softmax").recommendation_loss(batch, negatives)
    torch.testing.assert_close(full, F.cross_entropy(every[kept, 1:], batch["target"][kept] - 1))


def test_weights_of_another_catalog_are_reported_not_raised() -> None:
    """Weights trained on another catalog or user set: the caller gets the shapes to name in its
    error (the file, the data), not torch's RuntimeError; fitting weights load."""
    model = toy_relational(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k, v in weights.items() if v.dim() == 2)
    wrong = dict(weights, **{name: torch.zeros(weights[name].shape[0] + 5, weights[name].shape[1])})
    misfit = load_weights(model, wrong)
    assert len(misfit) == 1 and misfit[0].startswith(f"{name} is [{weights[name].shape[0] + 5},")
    assert not torch.equal(model.state_dict()[name], wrong[name][: weights[name].shape[0]])
    assert load_weights(model, weights) == []
