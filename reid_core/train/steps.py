"""Pure training steps (``gan_step``, ``reid_step``): no Ray, no MLflow, no ranks. The loops around them live in
``loops.py``.

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
        """Δ(G(z)) from the detector is needed every step: it moves the loss (λ2 > 0), the logged paper value, or (in
        ``critic`` mode) it labels the fakes that the face-presence scorer is trained on."""
        if self.mode == "critic":
            return True
        return self.mode != "smoothing" and (self.lambda2 > 0 or self.mode == "paper")


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
        and the generated one, with the detector's labels on both (BCE(F(·), 1 − Δ(·)), ``detect_faces`` required):
        the generator cannot raise F without drawing what the detector calls a face. D's losses then use
        Δ = 1 − σ(F(·)) and the generator's loss adds λ2 · mean(1 − σ(F(G(z)))).
    prepared: the discriminator's generated batch and its pending Δ, made by ``prepare_fakes`` after the previous
        step (then ``detect_faces`` is not called here); None: generated and submitted here.

    Returns floats: ``loss_d``, ``loss_g`` (mean over the generator updates), the paper's penalised value
    ``loss_d_penalised``, ``d_real`` / ``d_fake`` (mean D(x), D(G(z))), the Δ rates ``face_absent_real`` /
    ``face_absent_fake`` (the detector's; in critic mode ``critic_face_absent_fake``, mean 1 − F(G(z)), is the Δ that
    D's loss used), ``loss_critic`` (critic mode) and ``step_seconds``.
    """
    from reid_core.guidance.critic import face_scorer_loss
    from reid_core.guidance.losses import discriminator_loss, generator_loss

    if guidance.mode == "critic" and critic is None:
        raise ValueError("gan_step: guidance mode 'critic' needs the face-presence scorer (critic=...)")
    if critic is not None and detect_faces is None and (prepared is None or prepared.pending is None):
        raise ValueError(
            "gan_step: the face-presence scorer (critic=...) is trained on the detector's labels of the generated "
            "images too; pass detect_faces (e.g. FaceDetector.submit), or prepared fakes whose Δ is pending"
        )
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
    needs_fake_delta = pending is not None
    logits_real = disc(real)
    logits_fake = disc(fake)
    # A Future from FaceDetector.submit resolves here: detection overlapped with D's forward passes.
    detected_fake = pending.result() if hasattr(pending, "result") else pending
    detected_fake = getattr(detected_fake, "face_absent", detected_fake)  # FaceDetections -> its Δ tensor
    if critic is not None and detected_fake is None:
        raise ValueError("gan_step: detect_faces gave no Δ for the generated images; the critic needs their labels")
    detected_fake = torch.zeros(n) if detected_fake is None else detected_fake.to(real.device, dtype)
    if critic is not None:
        # F learns "has a face" from the detector's labels on real AND generated images (its own update, before D
        # uses it): a fake scores high only if the detector finds a face in it.
        loss_c = face_scorer_loss(critic(torch.cat([real, fake])), torch.cat([face_absent_real, detected_fake]))
        critic.backward(loss_c)
        critic.step()
        logs["loss_critic"] = float(loss_c.detach())
        with torch.no_grad():
            delta_real = 1.0 - torch.sigmoid(critic.module(real))
            delta_fake = 1.0 - torch.sigmoid(critic.module(fake))
    else:
        delta_real, delta_fake = face_absent_real, detected_fake
    loss_d, d_logs = discriminator_loss(
        logits_real, logits_fake, delta_real, delta_fake.to(real.device, dtype),
        mode=guidance.mode, lambda1=guidance.lambda1, lambda2=guidance.lambda2,
    )  # fmt: skip
    disc.backward(loss_d)
    disc.step()
    logs.update({k: d_logs[k] for k in ("loss_d", "loss_d_penalised", "d_real", "d_fake")})
    logs["face_absent_real"] = float(face_absent_real.float().mean())
    if needs_fake_delta:
        logs["face_absent_fake"] = float(detected_fake.float().mean())
    if critic is not None:
        logs["critic_face_absent_fake"] = d_logs["face_absent_fake"]

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


@dataclass(frozen=True)
class ReidLoss:
    """The loss of ``reid_step``: ``reid_loss`` (distractor class or LSRO, ``label_smoothing``) plus the weighted
    terms that apply to the model (0 = off): the batch-hard ``triplet`` (one-stream models), the CondenseNet
    ``group_lasso`` (models with learned group convolutions) and the Dual-Stream ``face_presence`` BCE."""

    mode: str = "distractor_class"
    label_smoothing: float = 0.0
    triplet: float = 0.0
    triplet_margin: float = 0.3
    group_lasso: float = 0.0
    face_presence: float = 0.0


def reid_step(
    model: Updater,
    images: torch.Tensor,
    labels: torch.Tensor,
    generated: torch.Tensor,
    *,
    num_classes: int,
    loss: ReidLoss = ReidLoss(),
    face_crop: torch.Tensor | None = None,
    has_face: torch.Tensor | None = None,
    check: Callable[[dict[str, float]], str | None] | None = None,
) -> tuple[dict[str, float], str | None]:
    """One update of a re-ID network on real identities 0..N-1 plus the distractor class N (``num_classes`` = N).

    images: (B, C, H, W) on the model's device and dtype; labels: (B,) training labels; generated: (B,) bool, the
    distractors of the batch. face_crop, has_face: the Dual-Stream model's face stream (then it is called as
    ``model(images, face_crop, has_face)``); None for a one-stream model.
    check: sees {"loss", "total_loss"} before the update and returns None to go on, or a reason to stop (a
        non-finite loss: a NaN gradient step would only spread it into the weights); then nothing is updated.

    Returns (floats, the reason ``check`` gave or None). The floats: ``loss`` (``reid_loss``), ``total_loss`` (with the
    weighted terms), ``triplet`` / ``group_lasso`` / ``face_presence_loss`` when they apply, and for the epoch's
    accuracies ``correct`` and ``real`` (real images classified as their identity, among the N real classes; real
    images) and, when the batch holds distractors, ``distractor_correct`` and ``generated``.
    """
    from reid_core.losses import batch_hard_triplet, reid_loss
    from reid_core.models.condense import group_lasso_loss

    dual = face_crop is not None
    logs: dict[str, float] = {}
    if dual:
        logits = model(images, face_crop, has_face)
    elif loss.triplet:
        metric_features, logits = model.module.forward_train(images)
    else:
        logits = model(images)
    logits = logits.float()
    id_loss = reid_loss(logits, labels, generated, mode=loss.mode, label_smoothing=loss.label_smoothing)
    total = id_loss
    if loss.triplet and not dual:
        triplet = batch_hard_triplet(metric_features, labels, generated, margin=loss.triplet_margin)
        total = total + loss.triplet * triplet
        logs["triplet"] = triplet.item()
    if loss.group_lasso:
        lasso = group_lasso_loss(model.module)
        total = total + loss.group_lasso * lasso
        logs["group_lasso"] = lasso.item()
    if dual and loss.face_presence:
        face_loss = nn.functional.binary_cross_entropy_with_logits(
            model.module.face_logit(images).float(), has_face.float()
        )
        total = total + loss.face_presence * face_loss
        logs["face_presence_loss"] = face_loss.item()
    logs.update(loss=id_loss.item(), total_loss=total.item())
    stop = check({"loss": logs["loss"], "total_loss": logs["total_loss"]}) if check is not None else None
    if stop is not None:
        return logs, stop
    model.backward(total)
    model.step()

    with torch.no_grad():
        real = ~generated
        predicted = logits[:, :num_classes].argmax(1)
        logs["correct"] = float((predicted[real] == labels[real]).sum())
        logs["real"] = float(real.sum())
        if generated.any():
            logs["distractor_correct"] = float((logits.argmax(1)[generated] == num_classes).sum())
            logs["generated"] = float(generated.sum())
    return logs, None
