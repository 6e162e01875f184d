"""Attention across relation slots as one fused CPU kernel (``kernels/slot_attention.cpp``).

The relation interaction attends over about 13 slots per candidate row with 4 heads of 16: in torch
that is a batch of tiny GEMMs, a softmax over a last dim of 13 and a transposed copy, which took
more time than the interaction's projections. The kernel does the whole attention of one row and
head in registers; the backward recomputes the weights. Same arithmetic up to float summation order.

The extension is compiled by ``torch.utils.cpp_extension`` on first use (g++ and ninja; about a
40 s, then cached under ``TORCH_EXTENSIONS_DIR``), for the CPU capability torch reports, so a
cache shared by different machines never runs instructions a CPU lacks. Where it cannot be built,
``available()`` is False and callers use plain torch ops. The choice is made by the run's backend
(``lrd_dist/runtime.py``), never inside a model's forward.

The build is named by the sha256 of the source and flags and compiles a copy of the source kept in
its build directory, so every checkout of the same code shares one build (ninja rebuilds when a
source *path* changes: two checkouts on one machine rebuilt each other's kernel 8 times in an
hour, seen 2026-12-06). torch's own build lock is a file that a killed build leaves behind, on which
every later process then waits forever (seen the same day: a test run killed mid-build hung the
table's next runs); the build is therefore serialised by an ``flock``, which the kernel releases
when its holder dies, and a lock file found while holding it is a dead build's and is removed.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import sys
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


def build_plan() -> tuple[str, Path, list[str]]:
    """The extension's name, build directory and compiler flags on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ISA_FLAGS:
        capability = "DEFAULT"
    flags = [*ISA_FLAGS.get(capability, []), f"-DCPU_CAPABILITY={capability}", "-O3", "-fopenmp"]
    if capability != "DEFAULT":
        flags.append(f"-DCPU_CAPABILITY_{capability}")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    name = f"lrd_dist_slot_attention_{capability.lower()}_{digest}"
    return name, build_root() / name, flags


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load

    name, build, flags = build_plan()
    code = SOURCE.read_bytes()
    build.mkdir(parents=True, exist_ok=True)
    with open(build / "lrd_dist.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        (build / "lock").unlink(missing_ok=True)  # torch's lock file: left by a build that died
        source = build / SOURCE.name
        if not source.is_file() or source.read_bytes() != code:
            staged = build / f".{SOURCE.name}.{os.getpid()}"
            staged.write_bytes(code)
            os.replace(staged, source)
        return load(
            name=name,
            sources=[str(source)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
        )


def build_root() -> Path:
    """Where torch keeps JIT-built extensions: ``TORCH_EXTENSIONS_DIR``, or its default for this
    Python and build of torch (the folder torch's own ``load`` would use)."""
    from torch.utils.cpp_extension import get_default_build_root

    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


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
