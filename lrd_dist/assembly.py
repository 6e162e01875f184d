"""One place that turns a config into what it describes: dataset, catalog, knowledge graph, item
text and model. Training, ``lrd-dist eval`` / ``export``, the relation report and the benchmarks
all build through ``build_dataset_and_model``, so they cannot disagree on how a model is made.

Runtime choices (the fused attention kernel, ZeRO-3 lockstep of a live encoder) come in as
arguments from ``lrd_dist/runtime.py``; this module knows nothing of processes, devices or run
directories (``lrd_dist/run_dir.py`` loads a trained model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrd_dist.config import RunConfig
from lrd_dist.data.catalog import Catalog, read_cold_items
from lrd_dist.data.format import CATALOG, DataIdentity, Manifest
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.data.remote import local_view
from lrd_dist.data.stream import LoaderConfig, SequenceStream, make_loader
from lrd_dist.encoders.item_text import FrozenTextTable, LiveTextEncoder, build_item_text
from lrd_dist.models.lrd import LatentRelationDiscovery
from lrd_dist.models.recommender import Recommender
from lrd_dist.models.relational import RelationalRecommender
from lrd_dist.models.sasrec import SASRec
from lrd_dist.models.slot_attention import SlotAttention, torch_slot_attention


@dataclass
class DatasetAndModel:
    """A config's dataset (manifest, catalog, knowledge graph) and its model, built. ``stream``
    gives a split's loader for one rank."""

    config: RunConfig
    data_dir: Path
    manifest: Manifest
    data_identity: DataIdentity  # what a checkpoint records of the data it was trained on
    catalog: Catalog
    graph: KnowledgeGraph
    model: Recommender
    cold: np.ndarray  # items a cold-start split held out of training (empty for a plain split)

    @property
    def relational(self) -> bool:
        return self.config.model.name != "sasrec"

    @property
    def kg_weight(self) -> float:
        return self.model.kg_weight

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
            read_timeout_s=data.read_timeout_s,
        )
        return SequenceStream(self.data_dir, split, loader, rank, world_size)

    def loader(self, split: str, **options):
        return make_loader(self.stream(split, **options))


def build_dataset_and_model(
    config: RunConfig, attention: SlotAttention = torch_slot_attention, lockstep: bool = False
) -> DatasetAndModel:
    data = local_view(config.data.dir)  # a remote dataset: its small files, fetched once
    manifest = Manifest.load(data)
    catalog = Catalog.read(data / CATALOG)
    relational = config.model.name != "sasrec"
    cold = read_cold_items(data)
    graph = KnowledgeGraph(catalog, latent=config.model.latent_relations if relational else 0, cold=cold)
    item_text = build_item_text(config, catalog, lockstep=lockstep)
    model = build_model(
        config, manifest.num_users, graph, item_text, attention, kg_weight(config, graph, manifest)
    )
    return DatasetAndModel(
        config, data, manifest, DataIdentity.of(data, manifest), catalog, graph, model, cold
    )


def kg_weight(config: RunConfig, graph: KnowledgeGraph, manifest: Manifest) -> float:
    """gamma: the KG loss weight, 0 without relation triples (``kg.gamma: auto`` = triples per
    interaction, the official choice)."""
    if config.model.name == "sasrec" or graph.num_triples == 0:
        return 0.0
    gamma = config.kg.gamma
    return graph.num_triples / manifest.num_interactions if gamma == "auto" else float(gamma)


def build_model(
    config: RunConfig,
    num_users: int,
    graph: KnowledgeGraph,
    item_text: FrozenTextTable | LiveTextEncoder | None = None,
    attention: SlotAttention = torch_slot_attention,
    kg_weight: float = 0.0,
) -> Recommender:
    """``item_text`` (from ``encoders.item_text.build_item_text``) maps item ids to language
    vectors; LRD needs it."""
    model = config.model
    if model.name == "sasrec":
        sasrec = SASRec(
            graph.num_items,
            config.data.max_history,
            model.emb_size,
            model.num_layers,
            model.num_heads,
            model.dropout,
        )
        return Recommender(
            sasrec,
            item_text=item_text if model.item_representation != "id" else None,
            loss=config.train.loss,
            **_representation(config, item_text),
        )
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
        assert item_text is not None, "build_item_text gives LRD its item text"
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
        backbone,
        lrd,
        item_text if config.lrd.enabled or model.item_representation != "id" else None,
        first_slot,
        config.train.loss,
        kg_weight=kg_weight,
        lrd_weight=config.lrd.weight if lrd is not None else 0.0,
        **_representation(config, item_text),
    )


def _representation(config: RunConfig, item_text: FrozenTextTable | LiveTextEncoder | None) -> dict:
    """``model.item_representation`` as the Recommender takes it: whether items keep their ID
    embedding, and the projection of their language vector into the model's space. With ID + text
    the projection starts near zero (N(0, 0.01)), so the model starts as the ID model it extends."""
    mode = config.model.item_representation
    if mode == "id":
        return {}
    assert item_text is not None, "build_item_text builds the encoder of a text-reading model"
    projection = torch.nn.Linear(item_text.dim, config.model.emb_size)
    if mode == "id+text":
        torch.nn.init.normal_(projection.weight, 0.0, 0.01)
        torch.nn.init.zeros_(projection.bias)
    return {"text_projection": projection, "id_vectors": mode == "id+text"}
