"""The catalog's predefined relations as a knowledge graph: relation slots, value entities, triples.

Relation slots follow the official code: 0 is the *virtual* relation (the plain history-target
link), then one slot per item-item relation (``rel_*``), one per attribute (``attr_*``), then the K
latent slots of LRD. Attribute values are entities of their own, after the items, so the entity
table holds items 0..n (0 = padding) and then every attribute's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch

from lrd_dist.data.catalog import Catalog


@dataclass(frozen=True)
class RelationSlots:
    item_relations: tuple[str, ...]
    attributes: tuple[str, ...]
    latent: int

    @property
    def predefined(self) -> int:
        """Virtual + item-item + attribute slots (what RCF/KDA have without LRD)."""
        return 1 + len(self.item_relations) + len(self.attributes)

    @property
    def total(self) -> int:
        return self.predefined + self.latent

    def names(self) -> list[str]:
        return (
            ["virtual"]
            + [f"rel:{r}" for r in self.item_relations]
            + [f"attr:{a}" for a in self.attributes]
            + [f"latent:{k}" for k in range(self.latent)]
        )


class KnowledgeGraph:
    """Predefined triples and their on-the-fly, vectorised sampling for the KG loss (DistMult).

    Item-item triple (h, r, t): value 0. Attribute triple (item, a, value): the tail is a random
    item with the same value and the value entity enters the relation (``r_a + e_value``), as the
    official code does. Negatives corrupt the head or the tail with a uniform item, redrawn while
    the corrupted triple is true.
    """

    def __init__(self, catalog: Catalog, latent: int = 0, cold: np.ndarray | None = None) -> None:
        """``cold``: items of a cold-start split, in no triple and never a corrupted one."""
        self.num_items = catalog.num_items
        cold = np.zeros(0, np.int64) if cold is None else cold
        self.slots = RelationSlots(tuple(catalog.relations), tuple(catalog.attributes), latent)
        n = self.num_items
        heads, tails, relations = [], [], []
        for index, lists in enumerate(catalog.relations.values()):
            lengths = pc.list_value_length(lists).to_numpy()
            heads.append(np.repeat(np.arange(1, n + 1), lengths))
            tails.append(pc.list_flatten(lists).to_numpy().astype(np.int64))
            relations.append(np.full(lengths.sum(), 1 + index))
        self.item_heads = np.concatenate(heads) if heads else np.zeros(0, np.int64)
        self.item_tails = np.concatenate(tails) if tails else np.zeros(0, np.int64)
        self.item_relations = np.concatenate(relations) if relations else np.zeros(0, np.int64)
        warm = ~np.isin(self.item_heads, cold) & ~np.isin(self.item_tails, cold)
        self.item_heads, self.item_tails = self.item_heads[warm], self.item_tails[warm]
        self.item_relations = self.item_relations[warm]
        # corrupted triples draw from these (every item, or the warm ones of a cold-start split)
        self.replacements = np.setdiff1d(np.arange(1, n + 1), cold) if len(cold) else None
        self._true_keys = np.unique(
            (self.item_relations * (n + 1) + self.item_heads) * (n + 1) + self.item_tails
        )

        # value_entity[item, slot]: the entity of the item's value for attribute slots, else 0
        self.value_entity = np.zeros((n + 1, self.slots.total), dtype=np.int64)
        next_entity = n + 1
        attr_items, attr_slots = [], []
        # per attribute: its slot, the entity of its value code 1, and how many codes it has
        self.attribute_values: dict[str, tuple[int, int, int]] = {}
        for index, (name, values) in enumerate(catalog.attributes.items()):
            slot = 1 + len(catalog.relations) + index
            present = values > 0
            self.value_entity[1:, slot] = np.where(present, next_entity + values - 1, 0)
            self.attribute_values[name] = (slot, next_entity, int(values.max(initial=0)))
            next_entity += int(values.max(initial=0))
            attr_items.append(np.flatnonzero(present) + 1)
            attr_slots.append(np.full(present.sum(), slot))
        self.num_entities = next_entity
        self.attr_items = np.concatenate(attr_items) if attr_items else np.zeros(0, np.int64)
        self.attr_slots = np.concatenate(attr_slots) if attr_slots else np.zeros(0, np.int64)
        warm_attrs = ~np.isin(self.attr_items, cold)
        self.attr_items, self.attr_slots = self.attr_items[warm_attrs], self.attr_slots[warm_attrs]
        # items grouped by value entity, to draw "another item with the same value"
        values = self.value_entity[self.attr_items, self.attr_slots]
        order = np.argsort(values, kind="stable")
        self._items_by_value = self.attr_items[order]
        self._value_sorted = values[order]

    def value_entities(self, attributes: dict[str, int]) -> np.ndarray:
        """[slots] the value entity of each attribute slot for an item with these value codes (the
        catalog's codes; a code the catalog does not have, or no code, gives 0: no value)."""
        row = np.zeros(self.slots.total, dtype=np.int64)
        for name, code in attributes.items():
            slot, first, count = self.attribute_values[name]
            if 1 <= code <= count:
                row[slot] = first + code - 1
        return row

    @property
    def num_triples(self) -> int:
        return len(self.item_heads) + len(self.attr_items)

    def sample(
        self, count: int, rng: np.random.Generator, neg_head_p: float = 0.5
    ) -> dict[str, torch.Tensor]:
        """``count`` triples with one corrupted copy each; empty tensors when there are no triples."""
        total = self.num_triples
        if total == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return dict.fromkeys(("head", "relation", "tail", "value", "neg_head", "neg_tail"), empty)
        pick = rng.integers(0, total, size=count)
        is_item = pick < len(self.item_heads)
        head = np.empty(count, np.int64)
        tail = np.empty(count, np.int64)
        relation = np.empty(count, np.int64)
        value = np.zeros(count, np.int64)
        item_pick = pick[is_item]
        head[is_item] = self.item_heads[item_pick]
        tail[is_item] = self.item_tails[item_pick]
        relation[is_item] = self.item_relations[item_pick]
        attr_pick = pick[~is_item] - len(self.item_heads)
        head[~is_item] = self.attr_items[attr_pick]
        relation[~is_item] = self.attr_slots[attr_pick]
        value[~is_item] = self.value_entity[head[~is_item], relation[~is_item]]
        tail[~is_item] = self._same_value_item(value[~is_item], rng)

        corrupt_head = rng.random(count) < neg_head_p
        neg_head, neg_tail = head.copy(), tail.copy()
        todo = np.arange(count)
        for _ in range(10):  # rejection; the few still true after 10 draws are kept
            if self.replacements is None:
                replacement = rng.integers(1, self.num_items + 1, size=len(todo))
            else:
                replacement = self.replacements[rng.integers(0, len(self.replacements), size=len(todo))]
            neg_head[todo] = np.where(corrupt_head[todo], replacement, head[todo])
            neg_tail[todo] = np.where(corrupt_head[todo], tail[todo], replacement)
            todo = todo[self._is_true(neg_head[todo], relation[todo], neg_tail[todo], value[todo])]
            if not len(todo):
                break
        return {
            name: torch.from_numpy(array)
            for name, array in (
                ("head", head),
                ("relation", relation),
                ("tail", tail),
                ("value", value),
                ("neg_head", neg_head),
                ("neg_tail", neg_tail),
            )
        }

    def _same_value_item(self, values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo = np.searchsorted(self._value_sorted, values, side="left")
        hi = np.searchsorted(self._value_sorted, values, side="right")
        return self._items_by_value[lo + (rng.random(len(values)) * (hi - lo)).astype(np.int64)]

    def _is_true(self, head, relation, tail, value) -> np.ndarray:
        n = self.num_items
        keys = (relation * (n + 1) + head) * (n + 1) + tail
        found = np.searchsorted(self._true_keys, keys).clip(max=max(len(self._true_keys) - 1, 0))
        item_true = (self._true_keys[found] == keys) if len(self._true_keys) else np.zeros(len(keys), bool)
        attribute = value > 0
        same_value = (self.value_entity[head, relation] == value) & (
            self.value_entity[tail, relation] == value
        )
        return np.where(attribute, same_value, item_true)
