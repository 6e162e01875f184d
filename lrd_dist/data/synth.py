"""Synthetic data with planted latent relations, readable from item texts.

Items come in *families*: a base product and up to K partners, one per relation type (its refill,
its case, the next model of its series, ...). Partner texts are written from the base's text with a
relation-specific template, so the relation of a pair can be read from the two texts, as LRD
assumes of real catalogs. Users walk the hidden graph: from a base they move to one of its partners
(by their own preference over relations), from a partner back to its base, and now and then jump to
an unrelated product. Each generated (previous item, next item) step records its planted relation,
which the samples carry as ``planted_relation`` (0 = a jump, no relation) and ``planted_offset``
(how many positions back in the history the source item is; 1 = the last item), so relation
discovery can be scored with NMI and purity. ``planted_pairs.parquet`` lists the whole graph.

The observable metadata is deliberately weaker: attributes ``category`` (the product noun) and
``brand``, and a noisy ``co_view`` item relation within a category. The planted relations
themselves are never given to the model.

Generation is vectorised over users (one numpy step per sequence position), so tens of millions of
interactions take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from lrd_dist.data.catalog import Catalog
from lrd_dist.data.sequences import Interactions
from lrd_dist.errors import InputError

NOUNS = (
    "fountain pen",
    "stapler",
    "label printer",
    "desk lamp",
    "paper shredder",
    "calculator",
    "notebook",
    "laminator",
    "hole punch",
    "tape dispenser",
    "whiteboard",
    "pencil sharpener",
    "ink printer",
    "document scanner",
    "desk organizer",
    "filing cabinet",
    "binder",
    "marker set",
    "letter tray",
    "cutting mat",
    "glue gun",
    "wall clock",
    "desk fan",
    "headset",
    "webcam",
    "keyboard",
    "mouse",
    "monitor arm",
    "phone stand",
    "planner",
    "sticky notes",
    "rubber stamp",
    "envelope sealer",
    "badge holder",
    "clipboard",
    "paper trimmer",
    "label maker",
    "postal scale",
    "cash box",
    "easel",
)
SYLLABLES = (
    "ar",
    "bel",
    "cor",
    "dun",
    "ex",
    "fal",
    "gor",
    "hel",
    "ix",
    "jun",
    "kal",
    "lum",
    "mor",
    "nev",
    "or",
    "pax",
    "quin",
    "ros",
    "sol",
    "tav",
    "ul",
    "ven",
    "wex",
    "xan",
    "yor",
    "zel",
    "bri",
    "cas",
    "dro",
    "fen",
)
# Relation templates; {b} is the base product's text. Several wordings per relation so that the
# model must read meaning, not one fixed string.
RELATIONS = (
    ("refill", ("Refill pack for the {b}", "Replacement refills compatible with {b}", "{b} refill set")),
    ("case", ("Protective carrying case for the {b}", "Hard shell travel case fits {b}", "{b} storage case")),
    (
        "next_model",
        ("{b} Mark II, the next model of the series", "{b} second generation", "New {b} 2nd edition"),
    ),
    ("battery", ("Rechargeable battery for the {b}", "Spare power pack for {b}", "{b} replacement battery")),
    ("manual", ("User guide and manual for the {b}", "Printed handbook for {b}", "{b} instruction booklet")),
    ("stand", ("Adjustable desk stand for the {b}", "Mounting bracket for {b}", "{b} wall mount stand")),
    ("cover", ("Dust cover sized for the {b}", "Fabric cover to protect {b}", "{b} dust cover")),
    ("cable", ("Power cable for the {b}", "USB charging cord for {b}", "{b} replacement cable")),
)


@dataclass
class SynthConfig:
    users: int = 2000
    items: int = 1000
    relations: int = 4
    seed: int = 0
    mean_length: float = 12.0
    min_length: int = 5
    max_length: int = 50
    jump_probability: float = 0.15

    def validate(self) -> None:
        if not 1 <= self.relations <= len(RELATIONS):
            raise InputError("synth", f"--relations {self.relations}", f"use 1..{len(RELATIONS)} relations")
        if self.items < 2 * (self.relations + 1):
            raise InputError(
                "synth",
                f"--items {self.items} is too few for {self.relations} relations",
                f"use at least {2 * (self.relations + 1)} items",
            )
        if self.users < 1 or self.min_length < 3 or self.max_length < self.min_length:
            raise InputError(
                "synth", "users must be >= 1 and 3 <= min_length <= max_length", "fix the options"
            )
        if self.mean_length <= self.min_length:
            raise InputError("synth", "mean_length must exceed min_length", "fix the options")


def _brand(family: int) -> str:
    a, b, c = family % 30, (family // 30) % 30, (family // 900) % 30
    name = (SYLLABLES[a] + SYLLABLES[b] + SYLLABLES[c]).capitalize()
    return name if family < 27_000 else f"{name}{family // 27_000}"


def generate(config: SynthConfig) -> tuple[Catalog, Interactions, pa.Table]:
    config.validate()
    rng = np.random.default_rng(config.seed)
    group = config.relations + 1
    items = np.arange(config.items)
    family, role = items // group, items % group  # role 0: base product, r: partner of relation r
    families = int(family[-1]) + 1
    noun_of_family = rng.integers(0, len(NOUNS), size=families)

    texts = []
    for item in range(config.items):
        f = int(family[item])
        base = f"{_brand(f)} {NOUNS[noun_of_family[f]]} {100 + f % 900}"
        if role[item] == 0:
            texts.append(base)
        else:
            wordings = RELATIONS[role[item] - 1][1]
            texts.append(wordings[rng.integers(len(wordings))].format(b=base))

    # Observable metadata: category = noun, brand = family; co_view links a few items of one category.
    category = noun_of_family[family] + 1
    brand = family + 1
    by_category = np.argsort(category, kind="stable")
    co_view_lists = []
    starts = np.searchsorted(category[by_category], np.arange(1, len(NOUNS) + 2))
    picks = rng.integers(0, 1 << 30, size=(config.items, 3))
    for item in range(config.items):
        lo, hi = starts[category[item] - 1], starts[category[item]]
        members = by_category[lo + picks[item] % max(hi - lo, 1)] + 1
        co_view_lists.append(sorted(set(members.tolist()) - {item + 1}))
    catalog = Catalog(
        source_ids=pa.array([f"synth-{i}" for i in range(1, config.items + 1)]),
        texts=pa.array(texts),
        attributes={"category": category.astype(np.int64), "brand": brand.astype(np.int64)},
        relations={"co_view": pa.array(co_view_lists, type=pa.list_(pa.int32()))},
    )

    # The planted graph: base <-> partner r, relation r (ids from 1).
    partners = np.flatnonzero(role > 0)
    base_of = family * group
    planted = pa.table(
        {
            "head": pa.array(base_of[partners] + 1, pa.int32()),
            "tail": pa.array(partners + 1, pa.int32()),
            "relation": pa.array(role[partners], pa.int8()),
            "relation_name": pa.array([RELATIONS[r - 1][0] for r in role[partners]]),
        }
    )

    interactions = _walk(config, rng, family, role, group)
    return catalog, interactions, planted


def _walk(
    config: SynthConfig, rng: np.random.Generator, family: np.ndarray, role: np.ndarray, group: int
) -> Interactions:
    n = config.users
    extra = rng.geometric(1.0 / (config.mean_length - config.min_length + 1), size=n) - 1
    length = np.minimum(config.min_length + extra, config.max_length)
    bases = np.flatnonzero(role == 0)
    preference = rng.dirichlet(np.full(config.relations, 0.5), size=n)
    cumulative = preference.cumsum(axis=1)

    item = np.zeros((n, config.max_length), dtype=np.int32)
    relation = np.zeros((n, config.max_length), dtype=np.int8)
    item[:, 0] = rng.choice(bases, size=n)
    for step in range(1, config.max_length):
        current = item[:, step - 1]
        wanted = 1 + (rng.random((n, 1)) > cumulative).sum(axis=1).clip(max=config.relations - 1)
        partner = family[current] * group + wanted
        from_base = role[current] == 0
        target = np.where(from_base, partner, family[current] * group)
        rel = np.where(from_base, wanted, role[current])
        jump = (rng.random(n) < config.jump_probability) | (target >= config.items)
        item[:, step] = np.where(jump, rng.choice(bases, size=n), target)
        relation[:, step] = np.where(jump, 0, rel)

    mask = np.arange(config.max_length)[None, :] < length[:, None]
    days = rng.integers(0, 3650, size=(n, 1), dtype=np.int32) + np.cumsum(
        rng.integers(1, 30, size=(n, config.max_length), dtype=np.int32), axis=1, dtype=np.int32
    )
    times = 1_400_000_000 + days[mask].astype(np.int64) * 86_400
    planted_relation = relation[mask].astype(np.int64)
    return Interactions(
        user=np.repeat(np.arange(1, n + 1), length),
        item=(item[mask] + 1).astype(np.int32),
        time=times,
        extras={
            "planted_relation": planted_relation,
            "planted_offset": (planted_relation > 0).astype(np.int64),
        },
    )
