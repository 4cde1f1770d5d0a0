"""The face-presence scorer F of the ``critic`` guidance mode: its training on the detector's labels and its
agreement with the detector (ROC AUC).

F is trained in ``train.steps.gan_step`` on real and generated images with dlib's Δ on both, so that the generator
cannot raise F(G(z)) without drawing what the detector calls a face. ``fit_face_scorer`` is the same objective on a
fixed set of labelled images (tests, ``docs/face_detector.md``'s agreement figure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def face_scorer_loss(logits: torch.Tensor, face_absent: torch.Tensor) -> torch.Tensor:
    """BCE of F's logits (N,) against the detector's labels: target 1 − Δ (1 = a face was found)."""
    if face_absent.shape != logits.shape:
        raise ValueError(
            f"face_scorer_loss: one Δ per image expected, shape {tuple(logits.shape)}; got {tuple(face_absent.shape)}"
        )
    return F.binary_cross_entropy_with_logits(logits, 1.0 - face_absent.to(logits.device, logits.dtype))


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` (N,) for the binary labels ``positive`` (N,) (bool or 0/1): the share
    of (positive, negative) pairs ranked right, ties counting one half (the Mann-Whitney U statistic / (n₊ n₋))."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(positive).flatten().bool()
    if scores.shape != positive.shape:
        raise ValueError(f"roc_auc: {scores.numel()} scores for {positive.numel()} labels")
    pos, neg = scores[positive], scores[~positive]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"roc_auc needs both classes; got {pos.numel()} positive and {neg.numel()} negative labels")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def fit_face_scorer(
    model: nn.Module,
    images: torch.Tensor,
    face_absent: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Train F (a module giving logits (N,)) on images (N, 3, H, W) in [-1, 1] and the detector's Δ (N,) with Adam;
    returns the loss of every step. Minibatches are drawn with replacement, deterministically per ``seed``."""
    if images.shape[0] != face_absent.shape[0] or images.shape[0] == 0:
        raise ValueError(f"fit_face_scorer: {images.shape[0]} images for {face_absent.shape[0]} labels")
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=rng)
        loss = face_scorer_loss(model(images[idx]), face_absent[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
