"""Everything that depends on how a run executes, kept out of the models and the trainer's logic:
the Accelerator (one process, DDP or DeepSpeed ZeRO), DeepSpeed's "auto" values, the gradient-sync
context, whole parameters under ZeRO-3, the fused CPU kernel, ``torch.compile`` of scoring, denormal
flushing, and how checkpoint files are read (never unpickled). Models receive these choices as
constructor arguments or are wrapped from here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    is_tensorboard_available,
    is_wandb_available,
)

from lrd_dist.config import RunConfig
from lrd_dist.errors import InputError
from lrd_dist.models import slot_attention
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.slot_attention import SlotAttention

log = logging.getLogger(__name__)


class Backend:
    """The accelerator of a run and the decisions that follow from it."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.accelerator = make_accelerator(config)
        plugin = self.accelerator.state.deepspeed_plugin
        self.deepspeed = plugin is not None
        self.zero3 = self.deepspeed and plugin.zero_stage == 3
        if self.deepspeed and config.train.embedding_updates == "sparse":
            raise InputError(
                "train.embedding_updates",
                f"sparse under DeepSpeed ZeRO-{plugin.zero_stage}: ZeRO partitions dense gradients and "
                "refuses row-wise ones",
                "launch with DDP (launchers/cpu_2proc.yaml) or use train.embedding_updates=dense",
            )
        if self.accelerator.device.type == "cpu":
            flush_denormals()

    @property
    def attention(self) -> SlotAttention:
        """The relation interaction's attention across slots: the fused kernel on a CPU where it
        builds (decided here, eagerly: building it inside a compiled region would fail)."""
        return select_attention(self.config.model.fused_attention, self.accelerator.device)

    @property
    def lockstep(self) -> bool:
        """A live LLM encoder must make the same calls on every rank (ZeRO-3 gathers per call)."""
        return self.zero3

    def fill_deepspeed_auto(self) -> None:
        """ds_configs/ leave batch size, accumulation and clipping "auto": they come from the run
        config, so they live in one place. (Precision is filled by accelerate.)"""
        if not self.deepspeed:
            return
        config = self.config
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        values = {
            "train_micro_batch_size_per_gpu": config.data.batch_size,
            "gradient_accumulation_steps": config.train.grad_accum,
            "gradient_clipping": config.train.max_grad_norm or 0.0,
            "train_batch_size": config.data.batch_size
            * config.train.grad_accum
            * self.accelerator.num_processes,
        }
        for key, value in values.items():
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
        for key in ("optimizer", "scheduler"):
            if key in ds_config:
                raise InputError(
                    "DeepSpeed config", f"it sets '{key}'", "remove it: the trainer builds it from train.*"
                )

    def sync_context(self, model, boundary: bool):
        """Gradients synchronise only at the last micro-batch of an accumulation window."""
        if self.deepspeed:  # the engine steps its optimizer only at a boundary; say where it is
            model.set_gradient_accumulation_boundary(boundary)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if boundary else self.accelerator.no_sync(model)

    def full_parameters(
        self,
        module: torch.nn.Module,
        modify: bool = False,
        trainable_only: bool = False,
        skip: torch.nn.Module | None = None,
    ):
        return full_parameters(module, self.deepspeed, modify, trainable_only, skip)

    def full_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        with self.full_parameters(module):
            return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}

    def scoring(self, model: Recommender) -> CompiledScoring | None:
        """``eval.compile``: the compiled scorer of ``model`` (None when off or under ZeRO-3)."""
        if not self.config.eval.compile:
            return None
        if self.zero3:  # parameters are re-gathered on every call there, which compiled graphs do not follow
            log.warning("eval.compile is ignored under ZeRO-3; scoring runs eagerly")
            return None
        return CompiledScoring(model)


def make_accelerator(config: RunConfig) -> Accelerator:
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if config.train.tracker in available and not available[config.train.tracker]():
        # accelerate would drop the tracker with a warning and the run would log nowhere
        raise InputError(
            "config",
            f"train.tracker={config.train.tracker} is not installed",
            "pip install it or set train.tracker=none",
        )
    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    timeout = timedelta(seconds=config.train.collective_timeout_s)  # a hung rank: the others stop
    handlers: list = []
    if distributed:
        handlers.append(InitProcessGroupKwargs(backend="nccl" if cuda else "gloo", timeout=timeout))
    # Our buffers are constants (text table, token ids, value entities): no per-step broadcast.
    handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
    return Accelerator(
        # On CPU, accelerate only sees the gloo process group when told it is CPU work (DDP) or
        # given the backend (DeepSpeed); otherwise each process silently trains alone.
        cpu=not cuda and not deepspeed,
        kwargs_handlers=handlers,
        mixed_precision=config.train.mixed_precision,
        log_with=None if config.train.tracker == "none" else config.train.tracker,
        project_config=ProjectConfiguration(
            project_dir=config.train.out_dir, logging_dir=str(Path(config.train.out_dir) / "tensorboard")
        ),
    )


TRIM_HEAP_ENV = "LRD_MALLOC_TRIM_STEPS"
TRIM_HEAP_STEPS = 10


def trim_heap_steps() -> int:
    """Optimizer steps between returns of the heap's free pages to the system (``$LRD_MALLOC_TRIM_STEPS``,
    default 10; 0: never). A tuned encoder allocates buffers of a new size each step (a gather of
    cached states is ~20-40 MB, set by the step's longest item), so freed blocks rarely fit the next
    request and the heap grows: a top-1 LoRA run on Office reached 5.6 GiB in 150 steps and kept
    growing. Every 10 steps holds it at 4.5 GiB for 2% of the speed (2% on the frozen table too);
    every step, 3.2 GiB for 33%. glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` (each large block its
    own mapping, what lrd_dist did before) holds 2.6 GiB at half the speed: each step faults its
    buffers in afresh (``benchmarks/heap_trim.py``, docs/performance.md). A process-level
    setting, like the allocator it tunes, so it is an environment variable, not a config key."""
    value = os.environ.get(TRIM_HEAP_ENV, str(TRIM_HEAP_STEPS))
    if not value.isdigit():
        raise InputError(
            f"${TRIM_HEAP_ENV}", f"{value!r} is not a number of steps", "set a whole number (0: never trim)"
        )
    return int(value)


def trim_heap() -> bool:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``); False where the C
    library is not glibc."""
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once: ``find_library`` runs ``ldconfig`` each call."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def flush_denormals() -> None:
    """A trained model's weights and activations reach denormal floats, which a CPU computes with
    microcode assists: a KDA+LRD step measured 5.5x slower after a few epochs (330 -> 1,549 ms).
    Flushing them to zero changes nothing a float32 rounding would not."""
    torch.set_flush_denormal(True)


def select_attention(fused: bool, device: torch.device | str = "cpu") -> SlotAttention:
    if fused and torch.device(device).type == "cpu" and slot_attention.available():
        return slot_attention.fused_slot_attention
    return slot_attention.torch_slot_attention


def full_parameters(
    module: torch.nn.Module,
    deepspeed: bool,
    modify: bool = False,
    trainable_only: bool = False,
    skip: torch.nn.Module | None = None,
):
    """Whole parameters on every rank for code outside the training forward (evaluation, saving):
    under ZeRO-3 each rank holds only a shard of each parameter. Collective. ``skip``: a submodule
    that is only ever called through its forward (the live LLM encoder), whose ZeRO-3 hooks fetch
    its weights themselves; gathering it as well would hold a whole LLM on every rank and collide
    with those hooks' prefetching."""
    if deepspeed:
        import deepspeed as ds

        skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
        parameters = [
            p for p in module.parameters() if (p.requires_grad or not trainable_only) and id(p) not in skipped
        ]
        if any(hasattr(p, "ds_id") for p in parameters):
            return ds.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


class CompiledScoring:
    """Scoring without gradients through ``torch.compile``, one graph per candidate block of
    RCF/KDA (the history attention and the elementwise work between the interaction's small GEMMs;
    1.1x faster evaluation than compiling the interaction alone). Applied from outside: while
    ``active()``, the backbone's ``score_block`` is the compiled one. Training stays eager
    (compiled forward and backward measured slower on a CPU). Where compilation fails (no C++
    compiler for inductor's CPU code) it warns once and scores eagerly from then on."""

    def __init__(self, model: Recommender) -> None:
        self.backbone = model.backbone if isinstance(model.backbone, RelationalRecommender) else None
        self.compiled = torch.compile(self.backbone.score_block) if self.backbone is not None else None

    def _score_block(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as error:  # a real error in the model reappears in the eager call
                log.warning("torch.compile failed (%s); scoring eagerly from now on", error)
                self.compiled = None
        assert self.backbone is not None  # only installed on a relational backbone
        return RelationalRecommender.score_block(self.backbone, *args)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if self.backbone is None:
            yield
            return
        self.backbone.score_block = self._score_block  # type: ignore[method-assign]  # an instance override
        try:
            yield
        finally:
            del self.backbone.score_block  # back to the class's eager method


def scoring_context(scorer: CompiledScoring | None):
    return scorer.active() if scorer is not None else contextlib.nullcontext()


# What accelerate and DeepSpeed write into a checkpoint besides tensors and plain containers: the
# only classes a checkpoint file may name (found with torch.serialization.get_unsafe_globals_in_checkpoint
# on DDP, ZeRO-2 and ZeRO-3 checkpoints). Anything else is refused before a file is read.
CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy._core.multiarray._reconstruct",  # accelerate's RNG states: numpy arrays
    "numpy.ndarray",
    "numpy.dtype",
)
PICKLED_SUFFIXES = (".pt", ".bin", ".pkl", ".pth")


def unsafe_checkpoint_files(directory: Path) -> list[tuple[Path, str]]:
    """(file, why) for each torch file under ``directory`` that names a class outside
    ``CHECKPOINT_GLOBALS`` or is not a ``torch.save`` archive at all. Reads the archives' pickle
    opcodes, never runs them."""
    found = []
    for path in sorted(p for p in Path(directory).rglob("*") if p.suffix in PICKLED_SUFFIXES and p.is_file()):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as error:  # a plain pickle, or not a torch file: nothing to trust in it
            found.append((path, f"not a torch.save archive ({str(error).splitlines()[0][:80]})"))
            continue
        foreign = sorted(set(names) - set(CHECKPOINT_GLOBALS))
        if foreign:
            found.append((path, f"names {foreign[0]}, which a checkpoint of lrd_dist never holds"))
    return found


def refuse_unsafe_checkpoint(directory: Path) -> None:
    """An ``InputError`` naming the first file that would need unpickling of a foreign class."""
    unsafe = unsafe_checkpoint_files(directory)
    if unsafe:
        path, why = unsafe[0]
        raise InputError(
            path,
            f"refused: {why} (a file that would be unpickled could run code)",
            "use a checkpoint written by lrd-dist train, not one from elsewhere",
        )


@contextlib.contextmanager
def weights_only_loading() -> Iterator[None]:
    """Every ``torch.load`` inside (accelerate's optimizer and RNG files, DeepSpeed's ZeRO files and
    its ``zero_to_fp32``, which ask for ``weights_only=False``) runs with ``weights_only=True`` and
    ``CHECKPOINT_GLOBALS`` allowed: ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides the call sites."""
    allowed = [_resolve(name) for name in CHECKPOINT_GLOBALS]
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([a for a in allowed if a is not None]):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _resolve(dotted: str):
    """The object a dotted name names, or None when its package is not installed."""
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def release_process_group(completed: bool) -> None:
    """Tear down the process group a command opened, before the interpreter starts to finalize.

    A gloo process left to the interpreter's exit can abort (SIGABRT, "terminate called without an
    active exception"): gloo's worker threads still hold work objects whose tensors need the GIL
    while Python is being torn down (pytorch/pytorch#190489). torchrun then kills the other rank
    and a job that did all its work fails. After a command that completed, every rank first meets
    at a barrier so none closes its pairs while a peer still uses them; after a failure there is no
    barrier, since the peers may never arrive. A no-op where no group exists (one process, or the
    trainer, which ends its own).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()
