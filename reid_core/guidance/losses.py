"""Face-guided DC-GAN losses: the modes `paper`, `weighted` and `critic` of docs/method.md §1, and
`smoothing`, the label-smoothing control of `weighted`.

Notation (per batch of m real images x and m' generated images G(z)): the discriminator returns logits ℓ, D = σ(ℓ);
Δ ∈ [0, 1] per image is "no face" (the detector's 0/1, or 1 − F(x) with the face-presence score F in `critic` mode).

The plain DC-GAN, which every mode reduces to at λ1 = λ2 = 0 (minimised; the two means added, as in the usual
DC-GAN step):
    L_D = −(1/m) Σ log D(x) − (1/m') Σ log(1 − D(G(z)))
    L_G = −(1/m') Σ log D(G(z))                                    (non-saturating generator loss)

The paper's penalised discriminator terms (eqs. 5-6, in the paper's maximisation sign):
    L'_Dx = (1/m) Σ [log D(x) + λ1 Δ(x)]
    L'_Dz = (1/m') Σ [log(1 − D(G(z))) − λ2 Δ(G(z))]
They are logged in every mode (`paper_l_dx`, `paper_l_dz`, and `loss_d_penalised` = −(L'_Dx + L'_Dz), the penalised
value in the minimised sign). Δ comes from a detector, so λ·Δ is a constant: it moves the value, never a gradient.

All functions are pure: no optimizer, no device or rank logic. Logits may be on any device; Δ is moved to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GUIDANCE_MODES = ("paper", "weighted", "critic", "smoothing")


def validate_guidance(*, mode: str, lambda1: float, lambda2: float) -> None:
    """Raise ValueError unless ``mode`` is a guidance mode and both λ are numbers in [0, 1].

    Jobs call this when they read their config, so that a bad value fails before any cluster time is spent.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown face-guidance mode {mode!r}; valid modes: {', '.join(GUIDANCE_MODES)}")
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
            raise ValueError(
                f"face guidance {name} must be a number in [0, 1] (the paper uses 0, 0.025 or 0.05); got {value!r}"
            )


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"{name} must be discriminator logits of shape (N,) with N ≥ 1; got {tuple(logits.shape)}")


def _face_absent_on(name: str, face_absent: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Δ as a constant (detached) of the logits' dtype and device, after checking its shape and range."""
    face_absent = torch.as_tensor(face_absent)
    if face_absent.shape != logits.shape:
        raise ValueError(
            f"{name} must have one value per image, shape {tuple(logits.shape)} like the logits; "
            f"got {tuple(face_absent.shape)}"
        )
    face_absent = face_absent.detach().to(device=logits.device, dtype=logits.dtype)
    if bool(((face_absent < 0) | (face_absent > 1) | face_absent.isnan()).any()):
        raise ValueError(f"{name} must lie in [0, 1] (Δ = 1 for no face, or 1 − F(x) in critic mode)")
    return face_absent


def discriminator_loss(
    real_logits: torch.Tensor,
    fake_logits: torch.Tensor,
    face_absent_real: torch.Tensor,
    face_absent_fake: torch.Tensor,
    *,
    mode: str = "weighted",
    lambda1: float,
    lambda2: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The discriminator's loss (to minimise) under face guidance, and values to log.

    real_logits: (m,) D's logits on real images x.
    fake_logits: (m',) D's logits on generated images G(z) (G detached for the D step).
    face_absent_real: (m,) Δ(x) in [0, 1]; face_absent_fake: (m',) Δ(G(z)) in [0, 1]. Detached here: in `critic` mode
        pass 1 − F(x) and the face-presence head gets no gradient from D's loss.
    mode, lambda1, lambda2: see below; λ in [0, 1].

    Modes (BCE(ℓ, t) = −t log σ(ℓ) − (1 − t) log(1 − σ(ℓ)), computed from logits):
      - ``paper``: the literal penalised loss −(L'_Dx + L'_Dz)
            = L_D − λ1 (1/m) Σ Δ(x) + λ2 (1/m') Σ Δ(G(z)).
        The penalty does not depend on any weight: **every gradient equals the plain DC-GAN's.** Use it to reproduce
        the paper's logged values.
      - ``weighted`` (default): Δ enters per sample,
            (1/m) Σ BCE(ℓ(x), 1 − λ1 Δ(x)) + (1/m') Σ (1 + λ2 Δ(G(z))) · BCE(ℓ(G(z)), 0).
        A real image without a face is a softer "real" target; a generated image without a face weighs more in the
        fake term. Samples with Δ = 0 contribute exactly as in the plain DC-GAN (the means divide by m and m', not
        by the sum of weights).
      - ``critic``: the `weighted` formula with Δ = 1 − F(·), F the differentiable face-presence score; the generator
        side of the critic is in ``generator_loss``.
      - ``smoothing``: the control for `weighted`: its formula with Δ fixed at 1 for every image, i.e. one-sided label
        smoothing (real target 1 − λ1) and a uniform (1 + λ2) weight on the fake term. The Δ given are only logged.
        An effect of `weighted` λ1 that `smoothing` with the same λ1 also shows is smoothing, not face guidance.

    Returns (loss, logs). logs (floats): ``loss_d`` (this loss), ``loss_d_plain`` (L_D), ``loss_d_penalised``,
    ``paper_l_dx``, ``paper_l_dz``, ``d_real`` / ``d_fake`` (mean D(x), mean D(G(z))), ``face_absent_real`` /
    ``face_absent_fake`` (mean Δ: the Δ rates).
    """
    validate_guidance(mode=mode, lambda1=lambda1, lambda2=lambda2)
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    delta_real = _face_absent_on("face_absent_real", face_absent_real, real_logits)
    delta_fake = _face_absent_on("face_absent_fake", face_absent_fake, fake_logits)

    # Plain DC-GAN terms, computed exactly as a plain DC-GAN step does (so `paper` and λ = 0 match it bit for bit).
    loss_real_plain = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    loss_fake_plain = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    loss_plain = loss_real_plain + loss_fake_plain

    # Paper eqs. 5-6 (maximisation sign). log D = logsigmoid(ℓ), log(1 − D) = logsigmoid(−ℓ).
    with torch.no_grad():
        paper_l_dx = F.logsigmoid(real_logits).mean() + lambda1 * delta_real.mean()
        paper_l_dz = F.logsigmoid(-fake_logits).mean() - lambda2 * delta_fake.mean()
        penalised = -(paper_l_dx + paper_l_dz)

    if mode == "paper":
        # The plain loss plus a constant: the same graph, so the same gradients.
        loss = loss_plain - lambda1 * delta_real.mean() + lambda2 * delta_fake.mean()
    else:  # weighted, critic, smoothing
        if mode == "smoothing":
            delta_real_loss, delta_fake_loss = torch.ones_like(delta_real), torch.ones_like(delta_fake)
        else:
            delta_real_loss, delta_fake_loss = delta_real, delta_fake
        loss_real = F.binary_cross_entropy_with_logits(real_logits, 1.0 - lambda1 * delta_real_loss)
        loss_fake = F.binary_cross_entropy_with_logits(
            fake_logits, torch.zeros_like(fake_logits), weight=1.0 + lambda2 * delta_fake_loss
        )
        loss = loss_real + loss_fake

    values = torch.stack(
        [
            loss.detach(),
            loss_plain.detach(),
            penalised,
            paper_l_dx,
            paper_l_dz,
            torch.sigmoid(real_logits.detach()).mean(),
            torch.sigmoid(fake_logits.detach()).mean(),
            delta_real.mean(),
            delta_fake.mean(),
        ]
    ).tolist()
    names = (
        "loss_d",
        "loss_d_plain",
        "loss_d_penalised",
        "paper_l_dx",
        "paper_l_dz",
        "d_real",
        "d_fake",
        "face_absent_real",
        "face_absent_fake",
    )
    return loss, dict(zip(names, values, strict=True))


def generator_loss(
    fake_logits: torch.Tensor,
    *,
    mode: str = "weighted",
    lambda2: float,
    face_score_fake: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The generator's loss (to minimise) under face guidance, and values to log.

    fake_logits: (m',) D's logits on G(z), with the graph back to G.
    face_score_fake: (m',) F(G(z)) in [0, 1], the face-presence score of the generated images, differentiable back to
        G. Required in ``critic`` mode; in the other modes it is only logged.

    Modes:
      - ``paper``, ``weighted``: the plain non-saturating loss L_G = −(1/m') Σ log D(G(z)) = mean BCE(ℓ(G(z)), 1)
        (the face signal reaches G only through D in `weighted` mode).
      - ``critic``: L_G + λ2 · (1/m') Σ (1 − F(G(z))): the generator is pushed directly towards images F scores
        as faces.

    Returns (loss, logs). logs: ``loss_g`` (this loss), ``loss_g_plain`` (L_G), ``loss_g_face`` (the critic term,
    0 in the other modes) and, when given, ``face_score_fake`` (mean F(G(z))).
    """
    validate_guidance(mode=mode, lambda1=0.0, lambda2=lambda2)
    _check_logits("fake_logits", fake_logits)
    if mode == "critic" and face_score_fake is None:
        raise ValueError(
            "generator_loss in critic mode needs face_score_fake = F(G(z)), the face-presence head's score on the "
            "generated batch (shape (N,), values in [0, 1], differentiable back to G)"
        )

    if face_score_fake is not None:
        if face_score_fake.shape != fake_logits.shape:
            raise ValueError(
                f"face_score_fake must have one score per generated image, shape {tuple(fake_logits.shape)}; "
                f"got {tuple(face_score_fake.shape)}"
            )
        if bool(((face_score_fake < 0) | (face_score_fake > 1) | face_score_fake.isnan()).any()):
            raise ValueError("face_score_fake must lie in [0, 1] (a probability that the image shows a face)")
        face_score_fake = face_score_fake.to(device=fake_logits.device, dtype=fake_logits.dtype)

    loss_plain = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if mode == "critic":
        face_term = lambda2 * (1.0 - face_score_fake).mean()
        loss = loss_plain + face_term
    else:
        face_term = torch.zeros_like(loss_plain)
        loss = loss_plain

    names = ["loss_g", "loss_g_plain", "loss_g_face"]
    values = [loss.detach(), loss_plain.detach(), face_term.detach()]
    if face_score_fake is not None:
        names.append("face_score_fake")
        values.append(face_score_fake.detach().mean())
    return loss, dict(zip(names, torch.stack(values).tolist(), strict=True))
