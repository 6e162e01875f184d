"""Attention across relation slots as one fused CPU kernel (``kernels/slot_attention.cpp``).

The relation interaction attends over about 13 slots per candidate row with 4 heads of 16: in torch
that is a batch of tiny GEMMs, a softmax over a last dim of 13 and a transposed copy, which took
more time than the interaction's projections. The kernel does the whole attention of one row and
head in registers; the backward recomputes the weights. Same arithmetic up to float summation order.

The extension is compiled by ``torch.utils.cpp_extension`` on first use (g++ and ninja; about a
40 s, then cached under ``TORCH_EXTENSIONS_DIR``), for the CPU capability torch reports, so a
cache shared by different machines never runs instructions a CPU lacks. Where it cannot be built,
``available()`` is False and callers use plain torch ops. The choice is made by the run's backend
(``train/backend.py``), never inside a model's forward.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
# (q, k, v [N, R, V], heads) -> [N, R, V]: what the relation interaction calls
SlotAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
SOURCE = Path(__file__).parent / "kernels" / "slot_attention.cpp"
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ISA_FLAGS:
        capability = "DEFAULT"
    flags = [*ISA_FLAGS.get(capability, []), f"-DCPU_CAPABILITY={capability}", "-O3", "-fopenmp"]
    if capability != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    return load(
        name=f"lrd_dist_slot_attention_{capability.lower()}",
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
    )


@functools.cache
def available() -> bool:
    """Build (or load the cached) kernel once per process; False, with a warning, where it fails."""
    try:
        _extension()
    except Exception as error:  # no compiler, no ninja, a read-only cache, ...
        log.warning("fused slot attention unavailable (%s); using torch ops", str(error).splitlines()[0])
        return False
    return True


@torch.library.custom_op("lrd_dist::slot_attention", mutates_args=())
def slot_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """softmax(scale * q_h k_h^T) v_h for every row and head; q, k, v token-major [N, R, V] on the
    CPU (contiguous), output the same."""
    return _extension().forward(q.contiguous(), k.contiguous(), v.contiguous(), heads, scale)


@slot_attention.register_fake
def _(q, k, v, heads, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("lrd_dist::slot_attention_backward", mutates_args=())
def slot_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _extension().backward(grad.contiguous(), q, k, v, heads, scale)
    return dq, dk, dv


@slot_attention_backward.register_fake
def _(grad, q, k, v, heads, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, heads, scale = inputs
    ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous())
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, grad):
    dq, dk, dv = slot_attention_backward(grad, *ctx.saved_tensors, ctx.heads, ctx.scale)
    return dq, dk, dv, None, None


slot_attention.register_autograd(_backward, setup_context=_setup_context)


def fused_slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The kernel for fp32/fp64 CPU tensors, torch ops otherwise (bf16 autocast, other devices).
    Only pass it where ``available()`` is True."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        return slot_attention(q, k, v, heads, (q.shape[-1] // heads) ** -0.5)
    return torch_slot_attention(q, k, v, heads)


def torch_slot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same in torch ops (other devices, or where the kernel cannot be built)."""
    rows, slots, size = q.shape
    q, k, v = (t.view(rows, slots, heads, size // heads).transpose(1, 2) for t in (q, k, v))
    scale = (size // heads) ** -0.5
    if torch.compiler.is_compiling():  # inductor writes its own vectorised softmax
        weights = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    else:
        # Eager torch's CPU softmax over a last dim of 13 runs a scalar loop, about 15x slower
        # than over a middle dim: the scores are formed transposed, [key slot, query slot], and
        # normalised over dim -2 (inductor does much worse with that form, hence two).
        weights = (k @ q.transpose(-1, -2) * scale).softmax(-2).transpose(-1, -2)
    return (weights @ v).transpose(1, 2).reshape(rows, slots, size)
