"""Pure training steps: no Ray, no MLflow, no ranks. The loop around them lives in ``loops.py``.

A step drives *updaters*: anything with ``module``, ``backward(loss)`` and ``step()``. A DeepSpeed engine is one
(its ``step()`` also zeroes the gradients); ``TorchUpdater`` wraps a plain module and optimizer the same way, so the
same step runs in tests, in benchmarks' plain-PyTorch baseline and inside Ray Train.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


@dataclass(frozen=True)
class Guidance:
    """Face guidance of the GAN losses (docs/method.md §1; ``reid_core.guidance.losses``). λ1 = λ2 = 0: plain DC-GAN."""

    mode: str = "weighted"
    lambda1: float = 0.0
    lambda2: float = 0.0

    @property
    def needs_fake_detection(self) -> bool:
        """Δ(G(z)) from the detector is needed every step: it moves the loss (λ2 > 0) or the logged paper value."""
        return self.mode != "critic" and (self.lambda2 > 0 or self.mode == "paper")


def _frozen_call(updater: Updater, x: torch.Tensor) -> torch.Tensor:
    """``updater.module(x)`` with its parameters frozen: gradients flow through it to ``x`` only.

    Calling a DeepSpeed engine here instead would register a second backward on its gradient hooks
    (ZeRO 2: "gradient computed twice"), so the raw module is used.
    """
    updater.module.requires_grad_(False)
    try:
        return updater.module(x)
    finally:
        updater.module.requires_grad_(True)


@dataclass
class PreparedFakes:
    """The discriminator's generated batch of the next step, made ahead (``prepare_fakes``): ``fake`` = G(z) with G's
    weights as they are when the step starts, and ``pending`` its Δ being detected (a Future, or None)."""

    fake: torch.Tensor
    pending: object | None


def prepare_fakes(
    gen: Updater,
    n: int,
    *,
    z_dim: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    guidance: Guidance = Guidance(),
    detect_faces: Callable[[torch.Tensor], object] | None = None,
) -> PreparedFakes:
    """G(z) for the next ``gan_step`` and the start of its Δ, right after the previous step's updates: the detector's
    threads then work while the loop fetches and copies the next real batch, instead of while the GPU waits at the
    discriminator's loss. G does not change between the two, so the step's result is what it would compute itself."""
    dtype = next(gen.module.parameters()).dtype
    with torch.no_grad():
        fake = gen.module(torch.randn(n, z_dim, generator=generator, device=device).to(dtype))
    pending = detect_faces(fake) if (detect_faces is not None and guidance.needs_fake_detection) else None
    return PreparedFakes(fake, pending)


def gan_step(
    gen: Updater,
    disc: Updater,
    real: torch.Tensor,
    *,
    z_dim: int,
    g_steps: int = 2,
    generator: torch.Generator | None = None,
    guidance: Guidance = Guidance(),
    face_absent_real: torch.Tensor | None = None,
    detect_faces: Callable[[torch.Tensor], torch.Tensor] | None = None,
    critic: Updater | None = None,
    prepared: PreparedFakes | None = None,
) -> dict[str, float]:
    """One discriminator update and ``g_steps`` generator updates of the (face-guided) DC-GAN.

    real: (N, 3, H, W) in [-1, 1].
    face_absent_real: (N,) Δ(x) of the real images (1 = no face), from the detector; zeros when None.
    detect_faces: generated images (N, 3, H, W) in [-1, 1] -> Δ (N,) or ``FaceDetections``, or a Future of either
        (e.g. ``FaceDetector.submit``: awaited after D's forward passes, so detection overlaps them); called when
        ``guidance.needs_fake_detection``.
    critic: the face-presence scorer F (logits; ``critic`` mode only). It is trained in this step on the real batch
        with the detector's labels (BCE(F(x), 1 − Δ(x))); D's losses use Δ = 1 − σ(F(·)) and the generator's loss
        adds λ2 · mean(1 − σ(F(G(z)))).
    prepared: the discriminator's generated batch and its pending Δ, made by ``prepare_fakes`` after the previous
        step (then ``detect_faces`` is not called here); None: generated and submitted here.

    Returns floats: ``loss_d``, ``loss_g`` (mean over the generator updates), the paper's penalised value
    ``loss_d_penalised``, ``d_real`` / ``d_fake`` (mean D(x), D(G(z))), the Δ rates ``face_absent_real`` /
    ``face_absent_fake``, ``loss_critic`` (critic mode) and ``step_seconds``.
    """
    from reid_core.guidance.losses import discriminator_loss, generator_loss

    if guidance.mode == "critic" and critic is None:
        raise ValueError("gan_step: guidance mode 'critic' needs the face-presence scorer (critic=...)")
    t0 = time.perf_counter()
    n = real.shape[0]
    dtype = next(gen.module.parameters()).dtype
    real = real.to(dtype)
    if face_absent_real is None:
        face_absent_real = torch.zeros(n)
    face_absent_real = face_absent_real.to(device=real.device, dtype=dtype)

    def noise() -> torch.Tensor:
        return torch.randn(n, z_dim, generator=generator, device=real.device).to(dtype)

    logs: dict[str, float] = {}
    # --- discriminator: maximise log D(x) + log(1 − D(G(z))), with Δ entering as the guidance mode says
    if prepared is None:
        prepared = prepare_fakes(gen, n, z_dim=z_dim, device=real.device, generator=generator, guidance=guidance,
                                 detect_faces=detect_faces)  # fmt: skip
    if prepared.fake.shape[0] != n:
        raise ValueError(f"gan_step: prepared fakes hold {prepared.fake.shape[0]} images for a batch of {n}")
    fake, pending = prepared.fake, prepared.pending  # G is not updated here: no graph through it
    if critic is not None:
        # F learns "has a face" from the detector's labels on real images; its own update, before D uses it.
        loss_c = F.binary_cross_entropy_with_logits(critic(real), 1.0 - face_absent_real)
        critic.backward(loss_c)
        critic.step()
        logs["loss_critic"] = float(loss_c.detach())
        with torch.no_grad():
            delta_real = 1.0 - torch.sigmoid(critic.module(real))
            delta_fake = 1.0 - torch.sigmoid(critic.module(fake))
    logits_real = disc(real)
    logits_fake = disc(fake)
    if critic is None:
        # A Future from FaceDetector.submit resolves here: detection overlapped with D's forward passes.
        delta_real = face_absent_real
        delta_fake = pending.result() if hasattr(pending, "result") else pending
        delta_fake = getattr(delta_fake, "face_absent", delta_fake)  # FaceDetections -> its Δ tensor
        delta_fake = torch.zeros(n) if delta_fake is None else delta_fake
    loss_d, d_logs = discriminator_loss(
        logits_real, logits_fake, delta_real, delta_fake.to(real.device, dtype),
        mode=guidance.mode, lambda1=guidance.lambda1, lambda2=guidance.lambda2,
    )  # fmt: skip
    disc.backward(loss_d)
    disc.step()
    logs.update({k: d_logs[k] for k in ("loss_d", "loss_d_penalised", "d_real", "d_fake")})
    logs["face_absent_real"] = float(face_absent_real.float().mean())
    if guidance.needs_fake_detection or critic is not None:
        logs["face_absent_fake"] = d_logs["face_absent_fake"]

    # --- generator: the non-saturating loss −log D(G(z)) (+ λ2 · mean(1 − F(G(z))) in critic mode); D and F frozen
    losses_g = []
    for _ in range(g_steps):
        fake = gen(noise())
        logits = _frozen_call(disc, fake)
        score = torch.sigmoid(_frozen_call(critic, fake)) if critic is not None else None
        loss_g, _ = generator_loss(logits, mode=guidance.mode, lambda2=guidance.lambda2, face_score_fake=score)
        gen.backward(loss_g)
        gen.step()
        losses_g.append(loss_g.detach())
    logs["loss_g"] = float(torch.stack(losses_g).mean())
    logs["step_seconds"] = time.perf_counter() - t0
    return logs
