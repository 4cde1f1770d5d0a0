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

``label_smoothing`` ε (Szegedy et al., 2016; off at 0): ``"distractor_class"`` smooths over all N + 1 classes (the
distractor class is a class); ``"lsro"`` mixes real images' one-hot targets with ε of the uniform distribution over
the N real classes (a generated image's target is that uniform distribution already and is unchanged).

``batch_hard_triplet`` (Hermans et al., 2017) is the metric term next to the ID loss. **Decision:** generated
(distractor) images are never anchors or positives; they enter only as negatives of every real anchor (a distractor
is no one, so it is farther than the anchor's own identity should be). With no distractor in the batch it is the
standard batch-hard loss over the P × K real images.

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
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean classification loss () over a batch of real and generated images.

    Args:
        logits: (B, N + 1) raw scores; column N is the distractor class.
        labels: (B,) int identity indices in [0, N) for real images; anything for generated images (the data
            pipeline may already give them label N).
        is_generated: (B,) bool/0-1, True for synthesised images. ``None``: an image is generated iff its label is N.
        mode: ``"distractor_class"`` (cross-entropy over N + 1 classes, generated -> class N) or ``"lsro"``
            (soft cross-entropy over the N real logits, generated -> uniform; see the module docstring).
        label_smoothing: ε in [0, 1); 0 = off (module docstring).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if mode not in REID_LOSS_MODES:
        raise ValueError(f"unknown re-ID loss mode {mode!r}; expected one of {', '.join(REID_LOSS_MODES)}")
    generated = _check(logits, labels, is_generated)
    num_classes = logits.shape[1] - 1
    if mode == "distractor_class":
        hard = distractor_labels(labels, generated, num_classes=num_classes)
        return F.cross_entropy(logits, hard, label_smoothing=label_smoothing)
    targets = lsro_targets(labels, generated, num_classes=num_classes)[:, :num_classes]
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
    return F.cross_entropy(logits[:, :num_classes], targets.to(logits.dtype))


def batch_hard_triplet(
    features: torch.Tensor, labels: torch.Tensor, is_generated: torch.Tensor, *, margin: float = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss () (Hermans et al., 2017) on Euclidean distances of ``features`` (B, D).

    Anchors: the real images that have another real image of their identity in the batch. For each, the hardest
    positive (farthest same-identity real image) and the hardest negative (closest image of another identity or any
    generated image); loss = mean over anchors of max(0, d(a, p) - d(a, n) + ``margin``). Generated images are never
    anchors or positives (module docstring). 0 (with a gradient path) when the batch has no anchor.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],) or is_generated.shape != labels.shape:
        raise ValueError(
            f"batch_hard_triplet: features (B, D), labels (B,) and is_generated (B,) expected, got "
            f"{tuple(features.shape)}, {tuple(labels.shape)}, {tuple(is_generated.shape)}"
        )
    if margin < 0:
        raise ValueError(f"batch_hard_triplet: margin must be ≥ 0, got {margin}")
    generated = is_generated.bool()
    real = ~generated
    f = features.float()
    squared = f.pow(2).sum(1)
    dist = (squared[:, None] + squared[None, :] - 2.0 * f @ f.T).clamp(min=1e-12).sqrt()  # finite gradient at 0
    same = (labels[:, None] == labels[None, :]) & real[:, None] & real[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=features.device)
    positive = same & ~eye
    negative = ~same & ~eye & real[:, None]  # real anchors: other identities and every generated image
    anchors = real & positive.any(1) & negative.any(1)
    if not bool(anchors.any()):
        return features.sum() * 0.0
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(1)
    loss = F.relu(hardest_positive - hardest_negative + margin)
    return loss[anchors].mean()
