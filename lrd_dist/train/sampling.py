"""Per-step random inputs of training: recommendation negatives, LRD reconstruction negatives, the
subset of LRD pairs a live LLM encodes, and KG triples, drawn vectorised from seeded generators
(one stream per rank)."""

from __future__ import annotations

import numpy as np
import torch

from lrd_dist.config import RunConfig
from lrd_dist.data.graph import KnowledgeGraph
from lrd_dist.data.user_items import UserItems


class TrainingSampler:
    def __init__(
        self,
        config: RunConfig,
        graph: KnowledgeGraph,
        use_kg: bool,
        rank: int,
        known: UserItems | None = None,
        cold: np.ndarray | None = None,
    ) -> None:
        self.config = config
        # a cold-start split: negatives are drawn from the warm items only
        self.pool = torch.from_numpy(graph.replacements) if cold is not None and len(cold) else None
        self.graph = graph
        self.use_kg = use_kg
        self.known = known  # train.negative_rule=official: reject every item of the user
        self.rng = np.random.default_rng([config.train.seed, rank])
        self.generator = torch.Generator().manual_seed(config.train.seed * 1009 + rank)

    def state_dict(self) -> dict:
        """JSON-able, so a checkpoint holds it without pickling."""
        return {"numpy": self.rng.bit_generator.state, "torch": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        self.generator.set_state(torch.tensor(state["torch"], dtype=torch.uint8))

    def draw(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | dict | None]:
        """Inputs for ``Recommender.forward`` besides the batch, on the CPU."""
        num_items = self.graph.num_items
        rows = len(batch["user"])
        count = self.config.train.num_negatives
        shape: tuple[int, ...] = (rows,) if count == 1 and self.config.train.loss == "bpr" else (rows, count)
        negatives = draw_uniform_negatives(
            batch, shape, num_items, self.generator, known=self.known, pool=self.pool
        )
        lrd_negatives = lrd_pairs = None
        if self.config.lrd.enabled:
            shape = tuple(batch["history_items"].shape)
            lrd_negatives = draw_uniform_negatives(
                batch, shape, num_items, self.generator, known=self.known, pool=self.pool
            )
            if self.config.llm.max_pairs_per_step is not None:
                lrd_pairs = draw_pairs(batch, self.config.llm.max_pairs_per_step, self.generator)
        kg = self.graph.sample(rows, self.rng, self.config.kg.neg_head_p) if self.use_kg else None
        return {"negatives": negatives, "lrd_negatives": lrd_negatives, "kg": kg, "lrd_pairs": lrd_pairs}


def draw_uniform_negatives(
    batch: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    num_items: int,
    generator: torch.Generator,
    rounds: int = 5,
    known: UserItems | None = None,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform items 1..num_items, redrawn while equal to the row's target or in its history window.

    Only the user's known past is excluded (not later items, unlike the official code, which
    rejects the user's dev and test items too and so leaks them into training). With ``known``
    (the official rule) every item the user ever interacted with is rejected as well.
    """
    rows = batch["target"].shape[0]

    def draw(*size: int) -> torch.Tensor:  # uniform over 1..num_items, or over ``pool``
        if pool is None:
            return torch.randint(1, num_items + 1, size, generator=generator)
        return pool[torch.randint(0, len(pool), size, generator=generator)]

    draws = draw(rows, *shape[1:])
    seen = torch.cat([batch["target"][:, None], batch["history_items"]], dim=1)  # [B, 1 + H]
    for _ in range(rounds):
        flat = draws.view(rows, -1)
        clash = (flat[:, :, None] == seen[:, None, :]).any(-1).view(draws.shape)
        if known is not None:
            clash |= known.interacted(batch["user"], draws)
        if not clash.any():
            break
        draws[clash] = draw(int(clash.sum()))
    return draws


def draw_pairs(batch: dict[str, torch.Tensor], limit: int, generator: torch.Generator) -> torch.Tensor:
    """[B, H] bool: ``limit`` (history, target) pairs chosen uniformly among the real ones, all of
    them when there are fewer. Bounds what the LLM encodes per step; the recommender still sees
    every position."""
    history = batch["history_items"]
    positions = torch.arange(history.shape[1])
    real = (positions[None, :] < batch["history_length"][:, None]) & batch["valid"][:, None]
    keys = torch.rand(history.shape, generator=generator).masked_fill(~real, -1.0)
    chosen = torch.zeros(history.numel(), dtype=torch.bool)
    count = min(limit, int(real.sum()))
    chosen[keys.view(-1).topk(count).indices] = True
    return chosen.view(history.shape)
