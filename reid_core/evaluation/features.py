"""Evaluation of a trained re-ID network: features of query and gallery, ranking metrics, FLIMA ID classification.

- ``extract_features`` runs the model's ``forward_features`` over records in eval mode and returns L2-normalised
  features. **Flip averaging, the one definition everywhere** (training-time validation, ``pipeline.finalize``,
  ``jobs/evaluate.py`` on registered models): the L2-normalised sum of the image's and its mirror image's
  *L2-normalised* features, normalize(normalize(f(x)) + normalize(f(flip(x)))). Registered models already output
  normalised features, so normalising each view first makes a training-form model and its registered export give the
  same flip metric; it also keeps one view from dominating by its norm.
- ``evaluate_splits`` ranks the gallery for every query with ``reid_core.metrics.evaluate_rank`` (same-camera
  same-person gallery images are junk; CMC, mAP, mINP). Query and gallery are real records only: a generated
  (distractor) record there is refused, so the distractor class never enters evaluation.
- ``classify_identities`` predicts each test box's identity with the classifier over the N real classes (the
  distractor logit is never an answer) and scores it with ``reid_core.metrics.classification_metrics`` (FLIMA's P/R/F1).
- ``FeatureModel`` and ``DualStreamFeatureModel`` are what gets registered and exported: image batch -> normalised
  feature, one tensor in and one out; ``RegisteredFeatureModel`` wraps such a deployed model (from the registry) back
  into the ``forward_features`` interface, so that ``extract_features`` serves both.

The Dual-Stream CNN reads (person image, face crop, has_face): pass ``face_boxes`` ({record: box or None}), which
``evaluation_face_boxes`` finds, the one test-time definition (the detector only, at the one person-crop setting).
No Ray or MLflow here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from reid_core import storage
from reid_core.data import Record, ReIDDataset, build_transforms
from reid_core.data.training_set import DISTRACTOR_PID, Box, FaceStreamDataset
from reid_core.metrics import ClassificationResult, RankResult, classification_metrics, evaluate_rank

log = logging.getLogger(__name__)


def evaluation_face_boxes(
    records: Sequence[Record], *, detector=None, workers: int | None = None, settings: storage.S3Settings | None = None
) -> dict[Record, Box | None]:
    """The Dual-Stream model's face boxes at test time, {record: box or None} for every distinct record of ``records``
    (query + gallery, or a chunk of them): the detector's only (``face_boxes``; never the dataset's face tags), as
    validation, ``pipeline.finalize`` and ``jobs/evaluate.py`` all use them.

    detector: a ``FaceDetector`` to use (a Ray actor keeps one across its chunks); None: one at the person-crop
    setting (``FaceDetector.for_person_crops(workers=workers)``), closed afterwards.
    """
    from reid_core.data.training_set import face_boxes as detected_boxes
    from reid_core.guidance.faces import FaceDetector

    distinct = list(dict.fromkeys(records))
    if detector is None:
        with FaceDetector.for_person_crops(workers=workers) as own:
            return evaluation_face_boxes(distinct, detector=own, settings=settings)
    found = detected_boxes(distinct, detector, settings=settings)
    return {r: found[i] for i, r in enumerate(distinct)}


class FeatureModel(nn.Module):
    """Deployable re-ID model: images (N, 3, H, W), normalised like training -> features (N, D) float, L2-normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.forward_features(x), dim=1)


class DualStreamFeatureModel(nn.Module):
    """Deployable Dual-Stream model with one input: (N, 6, S, S) = person image (channels 0-2) and face crop (3-5),
    both normalised, the crop all zeros when there is no face -> features (N, D), L2-normalised.

    Needs ``face_size == image_size`` (both 64 in the paper) so that the two stack into one tensor.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        person, face = x[:, :3], x[:, 3:]
        has_face = face.flatten(1).abs().amax(1) > 0
        return F.normalize(self.model.forward_features(person, face, has_face), dim=1)


class RegisteredFeatureModel(nn.Module):
    """The inverse of ``FeatureModel`` / ``DualStreamFeatureModel``: a deployed one-input model (e.g. loaded from the
    MLflow registry) with the ``forward_features`` interface ``extract_features`` uses.

    ``model``: images (N, 3, H, W) -> features (N, D), or (N, 6, S, S) person + face crop -> features (``dual``). The
    features are returned as the model gives them (already L2-normalised by the registered models).

    MLflow 3 loads PyTorch models as ``torch.export`` programs fixed in eval mode, whose ``train()``/``eval()`` raise:
    ``train`` here leaves the wrapped model alone, so it must already be in eval mode.
    """

    def __init__(self, model: nn.Module, *, dual: bool = False):
        super().__init__()
        self.model = model
        self.dual = dual

    def train(self, mode: bool = True) -> RegisteredFeatureModel:
        if mode:
            raise ValueError("RegisteredFeatureModel wraps a deployed model for inference only; it cannot train")
        self.training = False
        return self

    def forward_features(self, x: torch.Tensor, face: torch.Tensor | None = None, has_face=None) -> torch.Tensor:
        if self.dual != (face is not None):
            raise ValueError("a Dual-Stream model needs face crops (pass face_boxes), a one-stream model none")
        return self.model(torch.cat([x, face], dim=1) if self.dual else x)


def _check_real(records: Sequence[Record], what: str) -> None:
    generated = [r.path for r in records if r.orig_pid == DISTRACTOR_PID]
    if generated:
        raise ValueError(
            f"{what}: {len(generated)} generated (distractor) images, e.g. {generated[0]}; the distractor class is for "
            "training only and never appears in query, gallery or test sets"
        )


def _loader(
    records: Sequence[Record],
    *,
    image_size: tuple[int, int],
    batch_size: int,
    face_boxes: Mapping[Record, Box | None] | None,
    face_size: int,
    settings: storage.S3Settings | None,
) -> DataLoader:
    h, w = image_size
    if face_boxes is None:
        dataset = ReIDDataset(records, build_transforms(h, w, train=False), settings=settings)
    else:
        missing = [r.path for r in records if r not in face_boxes]
        if missing:
            raise ValueError(f"face_boxes has no entry for {len(missing)} records, e.g. {missing[0]}")
        boxes = {i: face_boxes[r] for i, r in enumerate(records)}
        dataset = FaceStreamDataset(records, boxes, image_size=h, face_size=face_size, train=False, settings=settings)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def _forward(model: nn.Module, batch: dict, device: torch.device, *, flip: bool, dual: bool, logits: bool):
    x = batch["image"].to(device)
    if flip:
        x = x.flip(-1)
    if dual:
        face = batch["face_crop"].to(device)
        face = face.flip(-1) if flip else face
        feats = model.forward_features(x, face, batch["has_face"].to(device))
    else:
        feats = model.forward_features(x)
    return model.forward_head(feats) if logits else feats


@torch.no_grad()
def extract_features(
    model: nn.Module,
    records: Sequence[Record],
    *,
    image_size: tuple[int, int],
    batch_size: int,
    flip: bool = False,
    face_boxes: Mapping[Record, Box | None] | None = None,
    face_size: int = 64,
    device: torch.device | str = "cpu",
    settings: storage.S3Settings | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Features of ``records`` in order.

    Args:
        model: has ``forward_features`` (CondenseNet, converted or not; Dual-Stream with ``face_boxes``); put in eval
            mode here (and left so).
        image_size: (H, W) the images are resized to (the training size).
        flip: the normalised sum of the image's and its horizontal mirror's normalised features (module docstring).
        face_boxes: Dual-Stream only: {record: face box (left, top, right, bottom) px or None}.
    Returns:
        feats (N, D) float32 on the CPU, L2-normalised; pids (N,) int64; camids (N,) int64.
    """
    if not records:
        raise ValueError("extract_features: no records")
    model.eval()
    device = torch.device(device)
    dual = face_boxes is not None
    loader = _loader(records, image_size=image_size, batch_size=batch_size, face_boxes=face_boxes,
                     face_size=face_size, settings=settings)  # fmt: skip
    parts = []
    for batch in loader:
        f = _forward(model, batch, device, flip=False, dual=dual, logits=False).float()
        if flip:
            f = F.normalize(f, dim=1) + F.normalize(
                _forward(model, batch, device, flip=True, dual=dual, logits=False).float(), dim=1
            )
        parts.append(F.normalize(f, dim=1).cpu())
    pids = np.asarray([r.pid for r in records], dtype=np.int64)
    camids = np.asarray([r.camid for r in records], dtype=np.int64)
    return torch.cat(parts), pids, camids


def evaluate_splits(
    model: nn.Module,
    query: Sequence[Record],
    gallery: Sequence[Record],
    *,
    image_size: tuple[int, int],
    batch_size: int = 128,
    flip: bool = False,
    metric: str = "euclidean",
    max_rank: int = 50,
    face_boxes: Mapping[Record, Box | None] | None = None,
    face_size: int = 64,
    device: torch.device | str = "cpu",
    settings: storage.S3Settings | None = None,
) -> tuple[dict[str, float], RankResult]:
    """Rank-k, mAP and mINP of ``query`` against ``gallery`` (the MSMT17 / Market-1501 protocol).

    Returns ({"rank1", "rank5", "rank10", "mAP", "mINP", "num_valid_queries", "num_skipped_queries"} as fractions /
    counts, the full ``RankResult``).

    Raises:
        ValueError: a generated (distractor) record in query or gallery, or no query with a match.
    """
    _check_real(query, "query")
    _check_real(gallery, "gallery")
    common = dict(image_size=image_size, batch_size=batch_size, flip=flip, face_boxes=face_boxes,
                  face_size=face_size, device=device, settings=settings)  # fmt: skip
    qf, qp, qc = extract_features(model, query, **common)
    gf, gp, gc = extract_features(model, gallery, **common)
    result = evaluate_rank(qf, gf, qp, gp, qc, gc, max_rank=max_rank, metric=metric)
    return result.summary(ranks=(1, 5, 10)), result


@torch.no_grad()
def classify_identities(
    model: nn.Module,
    records: Sequence[Record],
    *,
    pid_map: Mapping[int | str, int],
    image_size: tuple[int, int],
    batch_size: int = 128,
    face_boxes: Mapping[Record, Box | None] | None = None,
    face_size: int = 64,
    unknown_label: int = -1,
    device: torch.device | str = "cpu",
    settings: storage.S3Settings | None = None,
) -> ClassificationResult:
    """Identity classification of test boxes (FLIMA): precision / recall / F1 per known identity and averaged.

    The prediction is the argmax over the N real classes (the distractor logit, column N, is never an answer). A class
    whose original id is FLIMA's "unknown" (``unknown="class"``) predicts ``unknown_label``. Truth: ``record.pid``
    (the original id; FLIMA gives ``unknown_label`` to unknown people); a person who was never a training class
    counts as unknown too (logged).
    """
    _check_real(records, "test set")
    if not records:
        raise ValueError("classify_identities: no records")
    model.eval()
    device = torch.device(device)
    num_classes = len(pid_map)
    to_orig = {label: orig for orig, label in pid_map.items()}
    if sorted(to_orig) != list(range(num_classes)):
        raise ValueError(f"pid_map must map original ids to the labels 0..{num_classes - 1}, got {sorted(to_orig)}")

    def as_id(orig) -> int:
        return unknown_label if isinstance(orig, str) else int(orig)

    known = sorted({as_id(o) for o in pid_map} - {unknown_label})
    loader = _loader(records, image_size=image_size, batch_size=batch_size, face_boxes=face_boxes,
                     face_size=face_size, settings=settings)  # fmt: skip
    predicted = []
    for batch in loader:
        logits = _forward(model, batch, device, flip=False, dual=face_boxes is not None, logits=True)
        predicted.append(logits[:, :num_classes].argmax(1).cpu())
    y_pred = [as_id(to_orig[int(label)]) for label in torch.cat(predicted)]
    y_true = [r.pid if r.pid in known else unknown_label for r in records]
    unenrolled = sum(1 for r in records if r.pid != unknown_label and r.pid not in known)
    if unenrolled:
        log.warning("classify_identities: %d test boxes of people who were no training class count as unknown",
                    unenrolled)  # fmt: skip
    return classification_metrics(y_true, y_pred, labels=known, unknown_label=unknown_label)
