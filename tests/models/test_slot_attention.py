"""The fused CPU kernel for attention across relation slots against torch's own attention."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lrd_dist.models import slot_attention as sa


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    rows, slots, size = q.shape
    split = [t.view(rows, slots, heads, size // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(rows, slots, size)


def test_kernel_builds_on_this_machine() -> None:
    """The suite's machines have g++ and ninja; elsewhere the model falls back to torch ops."""
    assert sa.available()


def test_one_build_serves_every_checkout_and_a_dead_builds_lock_is_not_waited_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checkouts of the same code on one machine share one build (they rebuilt each other's
    before), and torch's lock file left by a build that was killed does not hang the next process."""
    repo = Path(sa.__file__).resolve().parents[2]
    other = tmp_path / "other_checkout"
    shutil.copytree(repo / "lrd_dist", other / "lrd_dist", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    name, build, _ = sa.build_plan()
    build.mkdir(parents=True)
    (build / "lock").touch()  # what a build killed midway leaves
    load = (
        "from lrd_dist.models import slot_attention as s; assert s.available(); "
        "print(s._extension().__file__)"
    )
    built = [
        subprocess.run(
            [sys.executable, "-c", load],
            cwd=checkout,
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=600,
        )
        for checkout in (repo, other)
    ]
    assert [b.returncode for b in built] == [0, 0], [b.stderr[-2000:] for b in built]
    assert built[0].stdout == built[1].stdout == f"{build / name}.so\n"
    log = (build / ".ninja_log").read_text().splitlines()[1:]  # "start end mtime output hash" lines
    compiles = [line for line in log if line.split("\t")[3] == "slot_attention.o"]
    assert len(compiles) == 1, compiles  # the second checkout loaded the first one's build
    assert not (build / "lock").exists()


# (rows, slots, size, heads): the Office shape; slots beyond one vector of lanes; a head narrower
# than a vector (partial loads); a single row; one head
SHAPES = [(37, 13, 64, 4), (5, 21, 32, 2), (6, 7, 24, 3), (1, 3, 16, 4), (4, 13, 16, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_torch_attention_values_and_gradients(shape, dtype) -> None:
    rows, slots, size, heads = shape
    generator = torch.Generator().manual_seed(rows * slots)
    q, k, v = (
        torch.randn(rows, slots, size, generator=generator, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    upstream = torch.randn(rows, slots, size, generator=generator, dtype=dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    scale = (size // heads) ** -0.5
    for implementation in (
        lambda *t: sa.slot_attention(*t, heads, scale),
        lambda *t: sa.torch_slot_attention(*t, heads),
    ):
        out = implementation(q, k, v)
        expected = _sdpa(q, k, v, heads)
        torch.testing.assert_close(out, expected, **tolerance)
        got = torch.autograd.grad(out, (q, k, v), upstream)
        want = torch.autograd.grad(expected, (q, k, v), upstream)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, **tolerance)


def test_kernel_passes_gradcheck() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(3, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    assert torch.autograd.gradcheck(lambda q, k, v: sa.slot_attention(q, k, v, 2, 0.5), inputs)


def test_large_scores_stay_finite() -> None:
    """The softmax subtracts the row maximum: scores of 1e4 must not overflow exp."""
    q = torch.full((2, 13, 16), 100.0)
    k = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(0)) * 10
    v = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(1))
    out = sa.slot_attention(q, k, v, 1, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.softmax(q @ k.transpose(1, 2), -1) @ v)


def test_kernel_compiles_into_one_graph() -> None:
    """torch.compile sees the op through its fake implementation: no graph break."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 13, 64, generator=generator) for _ in range(3))
    compiled = torch.compile(lambda q, k, v: sa.slot_attention(q * 2, k, v, 4, 0.25) + 1, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(q, k, v), sa.slot_attention(q * 2, k, v, 4, 0.25) + 1)


def test_bad_input_is_refused_with_the_reason() -> None:
    q = torch.randn(2, 13, 64)
    with pytest.raises(RuntimeError, match="multiple of the number of heads"):
        sa.slot_attention(q, q, q, 5, 1.0)
    with pytest.raises(RuntimeError, match="match q"):
        sa.slot_attention(q, q[:1], q, 4, 1.0)


def test_a_failed_build_falls_back_to_torch_ops_with_a_warning(monkeypatch, caplog) -> None:
    """No compiler (or ninja, or a writable cache): a warning naming the cause, then torch ops
    that compute the same."""
    from lrd_dist.models.relational import RelationInteraction
    from lrd_dist.runtime import select_attention

    def broken():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(sa, "_extension", broken)
    monkeypatch.setattr(sa, "available", functools.cache(sa.available.__wrapped__))
    x = torch.randn(3, 5, 16)
    with caplog.at_level("WARNING"):
        chosen = select_attention(True)
    assert chosen is sa.torch_slot_attention
    assert "fused slot attention unavailable (Ninja is required" in caplog.text
    torch.manual_seed(0)
    out = RelationInteraction(16, num_heads=4, num_layers=2, dropout=0.0, attention=chosen)(x)
    monkeypatch.undo()
    kernel = select_attention(True)
    assert kernel is sa.fused_slot_attention
    torch.manual_seed(0)
    fused = RelationInteraction(16, num_heads=4, num_layers=2, dropout=0.0, attention=kernel)(x)
    torch.testing.assert_close(out, fused, rtol=1e-5, atol=1e-6)
