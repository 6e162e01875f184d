"""Model selection and early stopping on the dev metric: which epoch's weights are the run's best,
and when to stop. A ``Stateful`` part of the checkpoint, so a resumed run selects and stops exactly
as an uninterrupted one."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field


@dataclass
class ModelSelection:
    rule: str = "patience"  # train.early_stop: patience | official
    patience: int = 5  # rule=patience: evaluations without improvement before stopping
    best: float = float("-inf")
    best_epoch: int = -1
    waited: int = 0  # evaluations without improvement
    dev_history: list[float] = field(default_factory=list)  # the selection metric per evaluation

    def update(self, value: float, epoch: int) -> bool:
        """Record one evaluation; True when these weights are the new best (official: a tie too,
        as LRD/ReChorus overwrite on equality)."""
        self.dev_history.append(value)
        if value > self.best or (self.rule == "official" and value == self.best):
            self.best, self.best_epoch, self.waited = value, epoch, 0
            return True
        self.waited += 1
        return False

    def should_stop(self) -> bool:
        if self.rule == "official":
            return official_stop(self.dev_history)
        return self.waited >= self.patience

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("rule", "patience")}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.waited, self.dev_history = state["waited"], list(state["dev_history"])


def official_stop(history: list[float], patience: int = 5, horizon: int = 20) -> bool:
    """LRD/ReChorus ``eval_termination``: more than ``horizon`` evaluations and the last
    ``patience`` non-increasing, or the (first) best more than ``horizon`` evaluations old."""
    if not history:
        return False
    recent = history[-patience:]
    if len(history) > horizon and all(a >= b for a, b in itertools.pairwise(recent)):
        return True
    return len(history) - history.index(max(history)) > horizon
