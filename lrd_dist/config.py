"""One typed, documented config tree for a run, read from YAML with dotted command-line overrides.

    lrd-dist train --config configs/office/kda_lrd.yaml train.seed=2 lrd.weight=5
    lrd-dist train --help-config          # every key with its type, default and meaning

OmegaConf checks every key and type against the dataclasses: a typo in a YAML file or an override
is an error naming the key, and a choice key (``Literal``) refuses a value with the allowed ones.
Every field carries its one-line meaning (``help`` metadata), which ``--help-config`` prints.

A config read back from a run directory, a weight file or a checkpoint (``stored=True``) is data: the
keys that act (``ACTING``: a ``pipe:`` data location runs a command, ``train.callbacks`` imports code,
``llm.trust_remote_code`` runs a model's own code) are dropped from it with a one-line notice; they act
only from the training config given to ``lrd-dist train --config`` or from the command line.

A config written by an earlier release with a key this one does not have is refused naming the key:
retrain with today's keys, or use the release that wrote it (``docs/experiments.md`` records the
options that were removed and why).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lrd_dist.errors import InputError

log = logging.getLogger(__name__)
DEMO_CONFIG = resources.files("lrd_dist") / "configs" / "demo.yaml"  # what `lrd-dist demo` trains


def option(default: Any, help: str) -> Any:
    """A config field with its one-line meaning (RecBole's documentation per key)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dir: str = option("runs/demo/data", "prepared dataset directory (lrd-dist prepare / synth / demo)")
    max_history: int = option(20, "history items per sample the model reads (at most what the data stores)")
    batch_size: int = option(256, "training samples per micro-batch and rank")
    eval_batch_size: int = option(256, "users per evaluation batch and rank")
    num_workers: int = option(0, "DataLoader worker processes per rank (0: read in the training process)")
    shuffle_buffer: int = option(8192, "samples in each loader's shuffle buffer")
    read_timeout_s: float = option(
        120.0, "a remote dataset: seconds one fetch of a shard may take (stalled or trickling) before a retry"
    )
    on_corrupt: Literal["fail", "skip"] = option(
        "fail",
        "a shard whose sha256 or sample count is wrong: stop, or skip it (logged, rows marked invalid)",
    )


@dataclass
class ModelConfig:
    name: Literal["kda", "rcf", "sasrec"] = option(
        "kda", "recommender: KDA (relations + temporal kernel), RCF (relations), SASRec (baseline)"
    )
    emb_size: int = option(64, "embedding size of items, entities, relations and users")
    num_layers: int = option(
        5, "RCF/KDA: applications of the weight-tied relation interaction; SASRec: layers"
    )
    num_heads: int = option(4, "attention heads (divides emb_size)")
    dropout: float = option(0.0, "dropout probability")
    latent_relations: int = option(0, "K latent relation slots added by LRD (0: the plain model)")
    item_representation: Literal["id", "id+text", "text"] = option(
        "id",
        "what the recommender reads for an item: its ID embedding (official), ID + a learned projection "
        "of its language vector, or the projected text alone (items without interactions get vectors)",
    )
    t_scalar: float = option(60.0, "KDA: time unit of the gap normalisation, in seconds")
    n_dft: int = option(64, "KDA: Fourier resolution of the temporal kernel")
    fused_attention: bool = option(
        True, "CPU: the attention across relation slots as one fused C++ kernel (false: torch ops)"
    )


@dataclass
class LRDConfig:
    enabled: bool = option(False, "train the latent relations with the LRD objective (RCF/KDA only)")
    weight: float = option(10.0, "lambda: weight of the LRD loss in the total loss")
    alpha: float = option(0.1, "weight of the per-pair entropy of q(r | h, i) (minimised: sharpens q)")
    balance: float = option(
        0.0, "weight of the entropy of the batch-averaged q (maximised; 0: official, which collapses)"
    )
    slots: Literal["all", "latent"] = option(
        "all", "slots q covers: every relation slot (official) or the K latent ones only"
    )
    pair_features: Literal["concat", "absdiff"] = option(
        "concat", "what q reads of a pair: [h; i] (official) or |i - h| (what the two texts differ in)"
    )
    decoder_text: bool = option(
        False, "decoder items are ID embedding + projected text (frozen table only; beyond the paper)"
    )
    leave_one_latent: bool = option(
        False, "leave the virtual slot out of the LRD decoder (official KDA+LRD; needs slots=all)"
    )


@dataclass
class TextEncoderConfig:
    """How item texts become vectors; shared by ``lrd-dist embed`` and the live encoder of ``llm``."""

    model: str = option("sentence-transformers/all-MiniLM-L6-v2", "Hugging Face model: local path or hub id")
    gguf_file: str | None = option(None, "a GGUF file inside the model directory (dequantised on load)")
    pooling: Literal["mean", "cls", "last"] = option(
        "mean", "token states to one vector: mean, first token (cls), last token (decoder LLMs)"
    )
    normalize: bool = option(True, "L2-normalise the item vectors")
    template: str = option("{text}", "prompt around each item text; must contain {text}")
    max_length: int = option(128, "tokens per item text (longer texts are truncated)")
    trust_remote_code: bool = option(False, "run a model's own code from the hub (only for models you trust)")


@dataclass
class LLMConfig(TextEncoderConfig):
    """The language side of LRD: where the item text vectors come from."""

    mode: Literal["frozen", "lora", "full"] = option(
        "frozen", "frozen: the table of lrd-dist embed | lora | full: the encoder runs in the step, trained"
    )
    table: str | None = option(
        None, "frozen: the embedding table (null: <data.dir>/item_embeddings.safetensors)"
    )
    shuffle_table: bool = option(False, "ablation: give each item another item's text vector (frozen only)")
    lr: float | None = option(None, "learning rate of the encoder's trainable weights (null: train.lr)")
    lora_rank: int = option(8, "rank of the LoRA update matrices")
    lora_alpha: int = option(16, "LoRA scaling alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    target_modules: list[str] = option([], "modules LoRA wraps (empty: PEFT's choice for the architecture)")
    gradient_checkpointing: bool = option(False, "recompute the encoder's activations in the backward pass")
    autocast: Literal["no", "bf16", "fp16"] = option("no", "the encoder's forward under torch.autocast")
    max_pairs_per_step: int | None = option(
        None, "(history, target) pairs of the LRD loss per micro-batch and rank (null: all of them)"
    )
    dedup: bool = option(True, "encode each distinct item once per micro-batch (false: every occurrence)")
    dropout: bool = option(
        True, "the encoder's own dropout while it trains (false: off; a tenth of a tuned step on a CPU)"
    )
    tune_layers: int | None = option(
        None,
        "tune only the top K layers, on token states of the frozen bottom cached once per catalog "
        "(null: the whole model runs in every step)",
    )
    trunk_dtype: Literal["bf16", "fp16", "fp32"] = option(
        "fp16", "storage of the cached token states (fp16 refuses states it cannot hold: use bf16 then)"
    )
    cache_dir: str | None = option(
        None, "where trunk caches live, shared by runs (null: $LRD_DIST_CACHE or ~/.cache/lrd_dist)/trunks"
    )
    chunk_size: int = option(128, "items per encoder call, grouped by text length (less padding)")


@dataclass
class KGConfig:
    gamma: float | Literal["auto"] = option(
        "auto", "weight of the KG loss; auto: relation triples / interactions (official)"
    )
    neg_head_p: float = option(0.5, "probability that a KG negative corrupts the head (else the tail)")


@dataclass
class TrainConfig:
    epochs: int = option(200, "epochs at most")
    lr: float = option(1e-3, "Adam learning rate")
    weight_decay: float = option(1e-6, "Adam weight decay on non-bias weights")
    early_stop: Literal["patience", "official"] = option(
        "patience",
        "patience: stop after train.patience evaluations without improvement; official: LRD/ReChorus "
        "(ties improve; stop after 20+ epochs when the last 5 are non-increasing or the best is 20 old)",
    )
    patience: int = option(5, "early_stop=patience: evaluations without improvement before stopping")
    loss: Literal["bpr", "sampled_softmax", "full_softmax"] = option(
        "bpr",
        "recommendation loss: BPR of the target against each negative (official) | softmax over the "
        "target and its num_negatives negatives | softmax over every item (SASRec only)",
    )
    num_negatives: int = option(1, "sampled negatives per training row (bpr averages over them)")
    catalog_refresh_steps: int = option(
        50,
        "loss=full_softmax over items that read a tuned encoder: optimizer steps between refreshes of "
        "the catalog's text vectors, read without gradient in between (staleness at most this)",
    )
    negative_rule: Literal["history", "official"] = option(
        "history",
        "training negatives avoid the target and history window; official: every item of the user, "
        "dev and test included (the authors' setting; leaks them)",
    )
    embedding_updates: Literal["dense", "sparse"] = option(
        "dense",
        "dense: Adam over every row of the id tables each step (official) | sparse: row-wise gradients "
        "and SparseAdam for the tables, a step costs what its batch costs (large catalogs; no ZeRO)",
    )
    seed: int = option(0, "seed of initialisation, data order and sampling")
    out_dir: str = option("runs/train", "run directory (config, metrics, checkpoints, best weights)")
    log_every: int = option(50, "optimizer steps per metrics.jsonl line")
    progress_seconds: float = option(60.0, "seconds between progress log lines when stderr is not a terminal")
    max_steps: int | None = option(None, "stop after this many optimizer steps and size the schedule by it")
    grad_accum: int = option(1, "micro-batches per optimizer step (windows never cross an epoch end)")
    max_grad_norm: float | None = option(None, "clip the gradient norm to this (null: no clipping)")
    collective_timeout_s: float = option(
        1800.0, "seconds a collective waits for a rank that stopped answering before the others stop"
    )
    skip_nonfinite_steps: int = option(
        0,
        "optimizer steps whose loss is NaN/inf on some rank that are skipped (gradients dropped, counted "
        "in metrics.jsonl) before the run stops; 0: stop at the first (DeepSpeed: always stops)",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = option(
        "no", "autocast of the training step (DeepSpeed's auto precision follows it; on a CPU fp32 is faster)"
    )
    schedule: Literal["constant", "linear", "cosine"] = option(
        "constant", "learning-rate schedule after warmup_steps of linear warmup"
    )
    warmup_steps: int = option(0, "optimizer steps of linear warmup")
    tracker: Literal["tensorboard", "wandb", "none"] = option("tensorboard", "where scalars are logged")
    callbacks: list[str] = option(
        [], "'module:name' callables returning a Callback (train/callbacks.py), e.g. fault injection in tests"
    )


@dataclass
class CheckpointConfig:
    every_steps: int | None = option(
        None, "also checkpoint every N optimizer steps (null: at epoch ends only)"
    )
    keep: int = option(3, "complete checkpoints kept, newest first (best weights live in best.safetensors)")
    resume: str = option(
        "never", "never | auto (the latest complete checkpoint under out_dir, else fresh) | a checkpoint dir"
    )
    force: bool = option(
        False, "resume even if the model config, the data order or the dataset differs from the checkpoint's"
    )
    overwrite: bool = option(
        False, "a fresh run into a directory that holds another run's checkpoints: delete them first"
    )


@dataclass
class EvalConfig:
    ks: list[int] = option([5, 10, 20, 50], "cut-offs of HR@k and NDCG@k")
    metric: str = option("NDCG@10", "dev metric that selects the best weights (HR@k or NDCG@k, k in ks)")
    ties: Literal["pessimistic", "legacy"] = option(
        "pessimistic", "a tie counts against the ground truth; legacy: the official argsort rule"
    )
    full_ranking: bool = option(
        False, "rank against every item (known history masked), not the stored negatives"
    )
    enabled: bool = option(True, "evaluate dev every epoch and test at the end (false: throughput runs)")
    compile: bool = option(False, "score through torch.compile (RCF/KDA; not under ZeRO-3)")


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


# ---- loading ------------------------------------------------------------------------------------
# Keys whose value would act rather than describe, and the test of a value that acts.
ACTING: dict[str, Callable[[Any], bool]] = {
    "data.dir": lambda value: str(value).startswith("pipe:"),
    "train.callbacks": lambda value: bool(value),
    "llm.trust_remote_code": lambda value: value is True or str(value).lower() == "true",
}


def drop_acting(tree: dict, where: str | Path) -> dict:
    """A stored config tree without the values of ``ACTING`` keys that would act."""
    tree = {section: dict(values) if isinstance(values, dict) else values for section, values in tree.items()}
    for dotted, acts in ACTING.items():
        section, key = dotted.split(".")
        values = tree.get(section)
        if isinstance(values, dict) and key in values and acts(values[key]):
            log.warning(
                "%s: stored %s=%r ignored: a config read back from a run, a weight file or a checkpoint "
                "never runs a program, imports code or runs a model's own code (pass it on the command "
                "line if you mean it)",
                where,
                dotted,
                values.pop(key),
            )
    return tree


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    tree: dict | None = None,
    stored: bool = False,
) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (or a config ``tree`` stored elsewhere: a weight
    file's metadata, named by ``path`` in messages), then ``key.sub=value`` overrides; validated
    against the schema. ``stored``: the file or tree was read back from a run, a weight file or a
    checkpoint, so its acting values are dropped (``drop_acting``); overrides are the caller's own."""
    schema = OmegaConf.structured(RunConfig)
    where = path or "command line"
    try:
        layers = [schema]
        if tree is None and path is not None:
            if not Path(path).is_file():
                raise InputError(path, "no such config file", "pass an existing YAML file to --config")
            tree = cast(dict, OmegaConf.to_container(OmegaConf.load(path)))
        if tree is not None:
            layers.append(OmegaConf.create(drop_acting(tree, where) if stored else tree))
        layers.append(OmegaConf.from_dotlist(_quote_literal_words(overrides or [])))
        merged = OmegaConf.merge(*layers)
    except ConfigKeyError as exc:
        raise InputError(
            where,
            f"{exc.full_key or _describe(exc)}: not a config key of this lrd_dist",
            "fix the key (lrd-dist train --help-config lists them); a config of an earlier release: "
            "retrain, or use the release that wrote it",
        ) from exc
    except OmegaConfBaseException as exc:
        raise InputError(where, _describe(exc), "fix the key or value") from exc
    config = cast(RunConfig, OmegaConf.to_object(merged))
    validate(config, path or "config")
    return config


def _quote_literal_words(overrides: list[str]) -> list[str]:
    """``train.mixed_precision=no`` means the choice "no": YAML would read a bare no/yes/on/off as
    a boolean, so such a value of a string-choice key is quoted before parsing."""
    quoted = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and value.lower() in ("no", "yes", "on", "off", "n", "y") and _is_string_choice(key):
            override = f"{key}='{value}'"
        quoted.append(override)
    return quoted


def _is_string_choice(dotted_key: str) -> bool:
    hints: object = RunConfig
    for part in dotted_key.split("."):
        types = get_type_hints(hints) if is_dataclass(hints) else {}
        if part not in types:
            return False
        hints = types[part]
    return get_origin(hints) is Literal and all(isinstance(a, str) for a in get_args(hints))


def _describe(error: OmegaConfBaseException) -> str:
    """OmegaConf's message with the key it is about (its first line does not always name it)."""
    message = str(error).splitlines()[0]
    key = getattr(error, "full_key", None)
    return message if not key or key in message else f"{key}: {message}"


def validate(config: RunConfig, where: str | Path) -> None:
    """What the schema cannot say: relations between keys."""
    problems = []
    if config.lrd.enabled and config.model.name == "sasrec":
        problems.append(("lrd.enabled with model.name=sasrec", "LRD needs a relation-aware model (kda, rcf)"))
    if config.lrd.enabled and config.model.latent_relations < 1:
        problems.append(("lrd.enabled with model.latent_relations=0", "set model.latent_relations >= 1"))
    if config.lrd.slots == "latent" and config.lrd.leave_one_latent:
        problems.append(
            (
                "lrd.leave_one_latent with lrd.slots=latent",
                "leave_one_latent drops the virtual slot, which latent-only q does not have",
            )
        )
    for key, value in (
        ("lrd.decoder_text", config.lrd.decoder_text),
        ("llm.shuffle_table", config.llm.shuffle_table),
    ):
        if value and config.llm.mode != "frozen":
            problems.append((f"{key} with llm.mode={config.llm.mode}", "use it with llm.mode=frozen"))
    if config.llm.tune_layers is not None and config.llm.mode == "frozen":
        problems.append(("llm.tune_layers with llm.mode=frozen", "set llm.mode=lora or full"))
    reads_text = config.model.item_representation != "id"
    if config.llm.mode != "frozen" and not (config.lrd.enabled or reads_text):
        problems.append(
            (
                f"llm.mode={config.llm.mode} with nothing that reads text",
                "set lrd.enabled=true or model.item_representation=id+text|text",
            )
        )
    if reads_text and config.lrd.decoder_text:
        problems.append(
            (
                f"lrd.decoder_text with model.item_representation={config.model.item_representation}",
                "set lrd.decoder_text=false: the LRD decoder reads the recommender's items, text included",
            )
        )
    if "{text}" not in config.llm.template:
        problems.append((f"llm.template={config.llm.template!r} has no {{text}}", "put {text} in it"))
    positive = {
        "llm.lora_rank": config.llm.lora_rank,
        "llm.chunk_size": config.llm.chunk_size,
        "llm.max_pairs_per_step": config.llm.max_pairs_per_step or 1,
        "llm.tune_layers": 1 if config.llm.tune_layers is None else config.llm.tune_layers,
        "train.grad_accum": config.train.grad_accum,
        "checkpoint.keep": config.checkpoint.keep,
        "checkpoint.every_steps": config.checkpoint.every_steps or 1,
        "train.max_steps": config.train.max_steps or 1,
        "train.num_negatives": config.train.num_negatives,
        "train.catalog_refresh_steps": config.train.catalog_refresh_steps,
    }
    problems += [(f"{key}={value}", "use 1 or more") for key, value in positive.items() if value < 1]
    if config.train.loss == "full_softmax" and config.model.name != "sasrec":
        problems.append(
            (
                "train.loss=full_softmax with a relational model",
                "use sampled_softmax: RCF/KDA score each item apart",
            )
        )
    if config.train.embedding_updates == "sparse":
        if config.train.loss == "full_softmax":
            problems.append(
                (
                    "train.embedding_updates=sparse with train.loss=full_softmax",
                    "use sampled_softmax or bpr: a softmax over every item updates every row anyway",
                )
            )
        if config.train.max_grad_norm:
            problems.append(
                (
                    "train.embedding_updates=sparse with train.max_grad_norm",
                    "set train.max_grad_norm=null: torch cannot clip row-wise (sparse) gradients",
                )
            )
    if config.model.emb_size % config.model.num_heads:
        problems.append(("model.emb_size is not a multiple of model.num_heads", "change one of them"))
    name, _, k = config.eval.metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit() or int(k) not in config.eval.ks:
        problems.append(
            (f"eval.metric={config.eval.metric!r}", f"use HR@k or NDCG@k with k in eval.ks={config.eval.ks}")
        )
    if config.kg.gamma != "auto" and float(config.kg.gamma) < 0:
        problems.append((f"kg.gamma={config.kg.gamma}", "use auto or a weight >= 0"))
    if not config.checkpoint.resume.strip():
        problems.append(("checkpoint.resume is empty", "use never, auto or a checkpoint directory"))
    if problems:
        raise InputError(where, problems[0][0], problems[0][1])


def to_yaml(config: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_keys(node: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of every leaf key, in declaration order."""
    out = []
    for item in fields(node):
        if is_dataclass(item.type) or (isinstance(item.type, str) and item.type.endswith("Config")):
            section = item.default_factory if item.default_factory is not MISSING else None
            out += config_keys(type(section()) if section else cast(type, item.type), f"{prefix}{item.name}.")
            continue
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        out.append((prefix + item.name, str(item.type), default, item.metadata.get("help", "")))
    return out


def describe_config() -> str:
    """Every key with its type, default and meaning: what ``lrd-dist train --help-config`` prints."""
    lines = []
    for key, kind, default, meaning in config_keys():
        lines.append(f"{key} ({kind.replace('typing.', '')}, default {default!r})\n    {meaning}")
    return "\n".join(lines)
