"""Re-ID classification losses with synthesised distractor images (docs/method.md §2).

Models have N + 1 outputs: the N real identities and, last, the distractor class (index N). Two ways to train with
generated images:

- ``"distractor_class"`` (the paper): generated images are one more class; cross-entropy over all N + 1 logits with
  label N for every generated image.
- ``"lsro"`` (Zheng et al., ICCV 2017, label smoothing regularisation for outliers): generated images get the uniform
  distribution over the N real classes. **Decision:** in this mode the distractor logit is left out of the softmax
  for every image (real and generated), so the loss is exactly LSRO on an N-way classifier; the distractor logit gets
  no gradient and must be ignored at prediction time (take the argmax over the first N logits). Keeping it inside
  the softmax with target 0 would instead train it as an "always wrong" class and change the real images' loss too.

``lsro_targets`` gives the target distributions as (B, N + 1) rows with a zero in the distractor column, so every
row sums to one in both views.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ReidLossMode = Literal["distractor_class", "lsro"]
REID_LOSS_MODES: tuple[str, ...] = ("distractor_class", "lsro")


def _check(logits: torch.Tensor, labels: torch.Tensor, is_generated: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and label ranges; return ``is_generated`` as a (B,) bool tensor."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"re-ID logits must have shape (B, num_classes + 1) with at least one real class, got {tuple(logits.shape)}"
        )
    batch, num_classes = logits.shape[0], logits.shape[1] - 1
    if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"re-ID labels must be an integer tensor of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if is_generated is None:
        generated = labels == num_classes
    else:
        if is_generated.shape != (batch,):
            raise ValueError(f"is_generated must have shape ({batch},), got {tuple(is_generated.shape)}")
        generated = is_generated.bool()
    real_labels = labels[~generated]
    if real_labels.numel() and bool(((real_labels < 0) | (real_labels >= num_classes)).any()):
        bad = real_labels[(real_labels < 0) | (real_labels >= num_classes)][:5].tolist()
        raise ValueError(
            f"labels of real images must be identity indices in [0, {num_classes}) (the distractor class is "
            f"{num_classes}); got e.g. {bad}. Mark generated images with is_generated or label {num_classes}"
        )
    return generated


def distractor_labels(labels: torch.Tensor, is_generated: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """Hard labels (B,) int64: ``labels`` for real images, the distractor class ``num_classes`` for generated ones."""
    return torch.where(is_generated.bool(), torch.full_like(labels, num_classes), labels).long()


def lsro_targets(labels: torch.Tensor, is_generated: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """LSRO target distributions (B, num_classes + 1) float32; every row sums to one.

    Real image with identity y: one-hot at y. Generated image: 1 / num_classes on each real class, 0 on the
    distractor column (index ``num_classes``). ``labels`` of generated images are ignored.
    """
    if num_classes < 1:
        raise ValueError(f"lsro_targets: num_classes must be >= 1, got {num_classes}")
    generated = is_generated.bool()
    safe = torch.where(generated, torch.zeros_like(labels), labels).long()
    onehot = F.one_hot(safe, num_classes + 1).float()
    uniform = torch.full_like(onehot, 1.0 / num_classes)
    uniform[:, num_classes] = 0.0
    return torch.where(generated[:, None], uniform, onehot)


def reid_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_generated: torch.Tensor | None = None,
    *,
    mode: ReidLossMode = "distractor_class",
) -> torch.Tensor:
    """Mean classification loss () over a batch of real and generated images.

    Args:
        logits: (B, N + 1) raw scores; column N is the distractor class.
        labels: (B,) int identity indices in [0, N) for real images; anything for generated images (the data
            pipeline may already give them label N).
        is_generated: (B,) bool/0-1, True for synthesised images. ``None``: an image is generated iff its label is N.
        mode: ``"distractor_class"`` (cross-entropy over N + 1 classes, generated -> class N) or ``"lsro"``
            (soft cross-entropy over the N real logits, generated -> uniform; see the module docstring).
    """
    if mode not in REID_LOSS_MODES:
        raise ValueError(f"unknown re-ID loss mode {mode!r}; expected one of {', '.join(REID_LOSS_MODES)}")
    generated = _check(logits, labels, is_generated)
    num_classes = logits.shape[1] - 1
    if mode == "distractor_class":
        return F.cross_entropy(logits, distractor_labels(labels, generated, num_classes=num_classes))
    targets = lsro_targets(labels, generated, num_classes=num_classes)[:, :num_classes]
    return F.cross_entropy(logits[:, :num_classes], targets.to(logits.dtype))
