"""Pure training steps: no Ray, no MLflow, no ranks. The loop around them lives in ``loops.py``.

A step drives *updaters*: anything with ``module``, ``backward(loss)`` and ``step()``. A DeepSpeed engine is one
(its ``step()`` also zeroes the gradients); ``TorchUpdater`` wraps a plain module and optimizer the same way, so the
same step runs in tests, in benchmarks' plain-PyTorch baseline and inside Ray Train.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class Updater(Protocol):
    module: nn.Module

    def __call__(self, *args, **kwargs): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


@dataclass
class TorchUpdater:
    """A module and its optimizer behind the DeepSpeed engine's interface."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def gan_step(
    gen: Updater,
    disc: Updater,
    real: torch.Tensor,
    *,
    z_dim: int,
    g_steps: int = 2,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One discriminator update and ``g_steps`` generator updates of the DC-GAN (Goodfellow et al. / Radford et al.).

    real: (N, 3, H, W) in [-1, 1]. Returns floats: ``loss_d``, ``loss_g`` (mean over the generator updates),
    ``d_real`` / ``d_fake`` (mean D(x), D(G(z)) as probabilities) and ``step_seconds``.
    """
    t0 = time.perf_counter()
    n = real.shape[0]
    dtype = next(gen.module.parameters()).dtype

    def noise() -> torch.Tensor:
        return torch.randn(n, z_dim, generator=generator, device=real.device).to(dtype)

    # --- discriminator: maximise log D(x) + log(1 − D(G(z)))  <=>  minimise BCE(D(x), 1) + BCE(D(G(z)), 0)
    with torch.no_grad():
        fake = gen.module(noise())  # G is not updated here: no graph through it
    logits_real = disc(real.to(dtype))
    logits_fake = disc(fake)
    loss_d = F.binary_cross_entropy_with_logits(
        logits_real, torch.ones_like(logits_real)
    ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
    disc.backward(loss_d)
    disc.step()

    # --- generator: the non-saturating loss, minimise BCE(D(G(z)), 1) = −log D(G(z)).
    # D is frozen and called through its raw module: calling D's DeepSpeed engine here would register a second
    # backward on its gradient hooks (ZeRO 2: "gradient computed twice").
    losses_g = []
    disc.module.requires_grad_(False)
    try:
        for _ in range(g_steps):
            logits = disc.module(gen(noise()))
            loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            gen.backward(loss_g)
            gen.step()
            losses_g.append(loss_g.detach())
    finally:
        disc.module.requires_grad_(True)

    return {
        "loss_d": float(loss_d.detach()),
        "loss_g": float(torch.stack(losses_g).mean()),
        "d_real": float(torch.sigmoid(logits_real.detach().float()).mean()),
        "d_fake": float(torch.sigmoid(logits_fake.detach().float()).mean()),
        "step_seconds": time.perf_counter() - t0,
    }
