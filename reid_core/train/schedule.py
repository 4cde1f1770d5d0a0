"""Learning-rate schedules of the re-ID recipe, as pure functions of training progress.

``learning_rate(base_lr, progress, ...)`` is what the training loop sets every step; ``progress`` = (epoch + step /
steps) / epochs, in [0, 1]. Optional linear warm-up over the first ``warmup_epochs`` epochs (from
``warmup_factor · base_lr`` up to ``base_lr``), then:

- ``"cosine"``: cosine annealing to 0 over the epochs after the warm-up (without warm-up: exactly ``cosine_lr``, the
  recipe so far);
- ``"step"``: ``base_lr · gamma^k`` after the k-th of the ``milestones`` (epochs, as in Luo et al. 2019: 40, 70);
- ``"constant"``: ``base_lr``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

SCHEDULES = ("cosine", "step", "constant")


def cosine_lr(base_lr: float, progress: float) -> float:
    """Cosine annealing from ``base_lr`` at progress 0 to 0 at progress 1."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def learning_rate(
    base_lr: float,
    progress: float,
    *,
    schedule: str,
    epochs: int,
    warmup_epochs: float = 0.0,
    warmup_factor: float = 0.01,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """The learning rate at ``progress`` (fraction of training done) under ``schedule`` (module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress must be in [0, 1], got {progress}")
    epoch = progress * epochs
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * (warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs)
    if schedule == "cosine":
        if warmup_epochs <= 0:
            return cosine_lr(base_lr, progress)
        rest = max(epochs - warmup_epochs, 1e-12)
        return cosine_lr(base_lr, min(1.0, (epoch - warmup_epochs) / rest))
    if schedule == "step":
        return base_lr * gamma ** bisect.bisect_right(sorted(milestones), epoch)
    return base_lr
