"""Backend choices applied from outside the models: compiled scoring equals eager scoring and
leaves training eager; a failed compilation falls back to eager scoring with a warning; the kernel
choice; denormal flushing."""

import logging

import pytest
import torch

from lrd_dist.models import slot_attention
from lrd_dist.models.recommender import Recommender
from lrd_dist.runtime import CompiledScoring, select_attention
from tests.helpers import score_arguments, toy_batch, toy_relational


@pytest.mark.parametrize(("temporal", "fused_attention"), [(False, True), (True, True), (True, False)])
def test_compiled_scoring_scores_like_eager_and_training_stays_eager(temporal, fused_attention) -> None:
    model = toy_relational(temporal, fused_attention=fused_attention).eval()
    for parameter in model.parameters():  # away from the tiny init so every term matters
        torch.nn.init.normal_(parameter, 0.0, 0.3)
    batch = toy_batch()
    arguments = score_arguments(batch)
    candidates = torch.randint(1, 31, (4, 9), generator=torch.Generator().manual_seed(1))
    eager = model(**arguments, candidates=candidates)
    scorer = CompiledScoring(Recommender(model))
    calls = []
    compiled = scorer.compiled
    scorer.compiled = lambda *a: calls.append(a[-2].shape) or compiled(*a)  # (candidates, items)
    with torch.inference_mode(), scorer.active():
        torch.testing.assert_close(model(**arguments, candidates=candidates), eager, rtol=1e-5, atol=1e-5)
        fewer = model(**arguments, candidates=candidates[:, :2])  # another shape
        torch.testing.assert_close(fewer, eager[:, :2], rtol=1e-5, atol=1e-5)
    if scorer.compiled is None:  # torch.compile fell back to eager: nothing compiled was compared
        pytest.skip("torch.compile fell back to eager here (no working compiler)")
    assert calls == [(4, 9), (4, 2)]
    with_grad = model(**arguments, candidates=candidates)  # a training call: eager, differentiable
    assert len(calls) == 2 and with_grad.requires_grad


def test_a_failed_compilation_scores_eagerly_with_a_warning(caplog) -> None:
    model = toy_relational(temporal=True).eval()
    batch = toy_batch()
    arguments = score_arguments(batch)
    candidates = torch.randint(1, 31, (4, 5), generator=torch.Generator().manual_seed(2))
    eager = model(**arguments, candidates=candidates)
    scorer = CompiledScoring(Recommender(model))

    def broken(*args):
        raise RuntimeError("no C++ compiler for inductor")

    scorer.compiled = broken
    with caplog.at_level(logging.WARNING), torch.inference_mode(), scorer.active():
        torch.testing.assert_close(model(**arguments, candidates=candidates), eager)
    assert "torch.compile failed (no C++ compiler for inductor)" in caplog.text
    assert scorer.compiled is None  # not retried
    assert "score_block" not in vars(model)  # the model is itself again outside the context


def test_the_kernel_is_chosen_for_the_cpu_only_when_asked() -> None:
    assert select_attention(False) is slot_attention.torch_slot_attention
    assert select_attention(True, "meta") is slot_attention.torch_slot_attention
    expected = (
        slot_attention.fused_slot_attention
        if slot_attention.available()
        else slot_attention.torch_slot_attention
    )
    assert select_attention(True, "cpu") is expected
