"""From per-frame logits to stable decisions.

Defaults follow the official online demo where it has one: the demo averages the last 12 frames.
* ``history`` (12): how many frames of softmax probabilities are averaged;
* ``threshold`` (0.0): the averaged probability the top class needs to count at all;
* ``agree`` (2): how many consecutive frames a new top class must hold before the decision
  switches to it (one frame of noise does not flip the decision).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError


@dataclass
class SmoothingConfig:
    history: int = 12
    threshold: float = 0.0
    agree: int = 2

    def __post_init__(self):
        if self.history < 1:
            raise UserError(f"--smooth-history must be at least 1, got {self.history}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"--smooth-threshold must be in [0, 1], got {self.threshold}")
        if self.agree < 1:
            raise UserError(f"--smooth-agree must be at least 1, got {self.agree}")


@dataclass
class Smoother:
    config: SmoothingConfig = field(default_factory=SmoothingConfig)

    def __post_init__(self):
        self._probs: deque = deque(maxlen=self.config.history)
        self.decision: int | None = None
        self._candidate: int | None = None
        self._streak = 0

    def reset(self) -> None:
        self.__post_init__()

    def update(self, logits: np.ndarray) -> tuple[int | None, float]:
        """Add one frame; returns (decision or None, its averaged probability)."""
        z = logits.astype(np.float64) - logits.max()
        p = np.exp(z)
        self._probs.append(p / p.sum())
        mean = np.mean(self._probs, axis=0)
        top = int(mean.argmax())
        score = float(mean[top])
        candidate = top if score >= self.config.threshold else None
        if candidate == self._candidate:
            self._streak += 1
        else:
            self._candidate, self._streak = candidate, 1
        if self._streak >= self.config.agree and candidate != self.decision:
            self.decision = candidate
        prob = float(mean[self.decision]) if self.decision is not None else 0.0
        return self.decision, prob
