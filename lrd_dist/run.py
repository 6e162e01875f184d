"""One place that turns a config into what it describes: dataset, catalog, knowledge graph, item
text and model. Training, ``lrd-dist eval`` / ``export``, the relation report and the benchmarks
all build through ``build_run``, so they cannot disagree on how a model is made.

Backend choices (the fused attention kernel, ZeRO-3 lockstep of a live encoder) come in as
arguments from ``train/backend.py``; this module knows nothing of processes or devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lrd_dist.config import RunConfig
from lrd_dist.data.catalog import Catalog
from lrd_dist.data.format import CATALOG, DataIdentity, Manifest
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.data.remote import local_view
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.encoders.item_text import build_item_text
from lrd_dist.errors import InputError
from lrd_dist.models import load_weights
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec
from lrd_dist.models.slot_attention import SlotAttention, torch_slot_attention


@dataclass
class Run:
    """A config's dataset and model, built. ``stream`` gives a split's loader for one rank."""

    config: RunConfig
    data_dir: Path
    manifest: Manifest
    data_identity: DataIdentity  # what a checkpoint records of the data it was trained on
    catalog: Catalog
    graph: KnowledgeGraph
    model: Recommender

    @property
    def relational(self) -> bool:
        return self.config.model.name != "sasrec"

    @property
    def kg_weight(self) -> float:
        """gamma: the KG loss weight, 0 without relation triples (``kg.gamma: auto`` = triples per
        interaction, the official choice)."""
        if not self.relational or self.graph.num_triples == 0:
            return 0.0
        gamma = self.config.kg.gamma
        return self.graph.num_triples / self.manifest.num_interactions if gamma == "auto" else float(gamma)

    def stream(
        self, split: str, shuffle: bool | None = None, rank: int = 0, world_size: int = 1
    ) -> SequenceStream:
        """Training batches are shuffled and of ``data.batch_size``; dev/test in order, of
        ``data.eval_batch_size``."""
        train = split == "train" if shuffle is None else shuffle
        data = self.config.data
        loader = LoaderConfig(
            batch_size=data.batch_size if train else data.eval_batch_size,
            max_history=data.max_history,
            shuffle=train,
            shuffle_buffer=data.shuffle_buffer,
            seed=self.config.train.seed,
            num_workers=data.num_workers,
            on_corrupt=data.on_corrupt,
        )
        return SequenceStream(self.data_dir, split, loader, rank, world_size)

    def loader(self, split: str, **options):
        return make_loader(self.stream(split, **options))


def build_run(
    config: RunConfig, attention: SlotAttention = torch_slot_attention, lockstep: bool = False
) -> Run:
    data = local_view(config.data.dir)  # a remote dataset: its small files, fetched once
    manifest = Manifest.load(data)
    catalog = Catalog.read(data / CATALOG)
    relational = config.model.name != "sasrec"
    graph = KnowledgeGraph(catalog, latent=config.model.latent_relations if relational else 0)
    item_text = build_item_text(config, catalog, lockstep=lockstep)
    model = build_model(config, manifest.num_users, graph, item_text, attention)
    return Run(config, data, manifest, DataIdentity.of(data, manifest), catalog, graph, model)


CONFIG_KEY = "lrd_dist.config"  # the run config (YAML) in a weight file's safetensors metadata
BEST_WEIGHTS = "best.safetensors"  # a run's best dev weights (train/checkpoint.py writes it)


def stored_config(weights: Path) -> dict | None:
    """The run config a weight file carries (``lrd-dist export`` writes it), as plain data."""
    with safe_open(str(weights), framework="pt") as handle:
        text = (handle.metadata() or {}).get(CONFIG_KEY)
    return yaml.safe_load(text) if text else None


def load_trained_weights(run: Run, weights: Path, config_source: str | Path) -> None:
    """Load a weight file into the run's model, refused with the reason if it does not fit."""
    if not Path(weights).is_file():
        raise InputError(
            weights, "no such weights file", "pass best.safetensors of a run, or lrd-dist export's output"
        )
    misfit = load_weights(run.model, load_file(str(weights)))
    if misfit:
        raise InputError(
            weights,
            f"does not fit the model of {config_source} ({', '.join(misfit)})",
            "use the config the weights were trained with",
        )


def load_trained(
    run_dir: Path | None = None,
    weights: Path | None = None,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    attention: SlotAttention = torch_slot_attention,
) -> Run:
    """A trained model ready to score: a run directory (its config.yaml and best.safetensors), or
    a weight file with ``--config`` or the config it carries (``lrd-dist export``)."""
    from lrd_dist.config import load_config

    if run_dir is not None:
        run_dir = Path(run_dir)
        for name in ("config.yaml", BEST_WEIGHTS):
            if not (run_dir / name).is_file():
                raise InputError(
                    run_dir / name, "missing", "pass the run directory of a finished `lrd-dist train`"
                )
        weights, config_path = run_dir / BEST_WEIGHTS, run_dir / "config.yaml"
    if weights is None:
        raise InputError(
            "command line", "no model given", "pass --run DIR, or --weights FILE [--config FILE]"
        )
    if not Path(weights).is_file():
        raise InputError(
            weights, "no such weights file", "pass best.safetensors of a run, or lrd-dist export's output"
        )
    if config_path is None:
        stored = stored_config(weights)
        if stored is None:
            raise InputError(weights, "carries no run config", "pass --config with the run's config.yaml")
        config = load_config(weights, overrides, tree=stored)
    else:
        config = load_config(config_path, overrides)
    run = build_run(config, attention)
    load_trained_weights(run, weights, config_path or weights)
    run.model.eval()
    return run


def build_model(
    config: RunConfig,
    num_users: int,
    graph: KnowledgeGraph,
    item_text: torch.nn.Module | None = None,
    attention: SlotAttention = torch_slot_attention,
) -> Recommender:
    """``item_text`` (from ``encoders.item_text.build_item_text``) maps item ids to language
    vectors; LRD needs it."""
    model = config.model
    if model.name == "sasrec":
        backbone = SASRec(
            graph.num_items,
            config.data.max_history,
            model.emb_size,
            model.num_layers,
            model.num_heads,
            model.dropout,
        )
        return Recommender(backbone, loss=config.train.loss)
    backbone = RelationalRecommender(
        num_users=num_users,
        num_items=graph.num_items,
        num_entities=graph.num_entities,
        value_entity=torch.from_numpy(graph.value_entity),
        emb_size=model.emb_size,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        dropout=model.dropout,
        temporal=model.name == "kda",
        t_scalar=model.t_scalar,
        n_dft=model.n_dft,
        attention=attention,
    )
    lrd = None
    if config.lrd.enabled:
        lrd = LatentRelationDiscovery(
            item_text.dim,
            model.emb_size,
            graph.slots.total if config.lrd.slots == "all" else graph.slots.latent,
            config.lrd.alpha,
            config.lrd.leave_one_latent,
            config.lrd.balance,
            config.lrd.pair_features,
            config.lrd.decoder_text,
        )
    first_slot = 0 if config.lrd.slots == "all" else graph.slots.predefined
    return Recommender(
        backbone, lrd, item_text if config.lrd.enabled else None, first_slot, config.train.loss
    )
