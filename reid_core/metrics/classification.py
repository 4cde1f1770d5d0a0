"""Identity-classification metrics (precision, recall, F1) for FLIMA, with an "unknown" identity.

FLIMA boxes are labelled with one of a few enrolled identities or "unknown" (a person who is not enrolled), and a
classifier may also answer "unknown" (reject). How "unknown" counts, decided here:

* Per-class precision, recall and F1 are reported for the **known** identities. For known class c:
  ``TP`` = boxes of c predicted c; ``FP`` = boxes of any other identity **or of unknown** predicted c (naming an
  unknown person as c is a false identification); ``FN`` = boxes of c predicted anything else, **including
  unknown** (a missed identification).
* **Macro** precision / recall / F1 are the unweighted means of the known classes' values (macro F1 is the mean of
  per-class F1, as scikit-learn defines it, not the F1 of the macro precision and recall). "unknown" is excluded
  from the macro averages: it is not an identity to recognise, and a classifier that rejects everything must not
  score well through it.
* **Micro** precision = correct known predictions / all known predictions, micro recall = correct known predictions
  / all known-identity boxes (over known classes only, so unknown is again excluded).
* **Accuracy** is over all boxes, unknown ones included (predicting unknown for an unknown box is correct).
* The rejection quality is reported separately as ``unknown_precision`` / ``unknown_recall`` / ``unknown_f1`` (the
  "unknown" class's own values), never mixed into the identity averages.
* 0/0 (a class never predicted, or with no boxes) counts as 0, like scikit-learn's ``zero_division=0``. The known
  classes are ``labels`` if given, else every non-unknown label seen in ``y_true`` or ``y_pred``.

Labels may be integers or strings; ``unknown_label`` is the value the data uses for the unknown identity (``-1``,
the re-ID convention, by default; e.g. ``"unknown"`` for string labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class ClassificationResult:
    """Precision / recall / F1 of identity predictions.

    Attributes:
        labels: (C,) the known identities, in the order of the per-class arrays.
        precision, recall, f1: (C,) float64 per known identity, in [0, 1].
        support: (C,) int64 number of boxes of each known identity.
        macro_precision, macro_recall, macro_f1: unweighted means over the known identities.
        micro_precision, micro_recall, micro_f1: pooled over the known identities.
        accuracy: share of all boxes (unknown included) predicted correctly.
        unknown_precision, unknown_recall, unknown_f1: quality of the "unknown" answers (rejection).
        unknown_support: number of boxes whose identity is unknown.
        confusion: (C + 1, C + 1) int64 counts, rows = truth, columns = prediction, last index = unknown.
    """

    labels: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    macro_precision: float
    macro_recall: float
    macro_f1: float
    micro_precision: float
    micro_recall: float
    micro_f1: float
    accuracy: float
    unknown_precision: float
    unknown_recall: float
    unknown_f1: float
    unknown_support: int
    confusion: np.ndarray = field(repr=False)

    def summary(self) -> dict[str, float]:
        """Flat metrics for logging (macro, micro, accuracy, unknown)."""
        return {
            "precision_macro": self.macro_precision,
            "recall_macro": self.macro_recall,
            "f1_macro": self.macro_f1,
            "precision_micro": self.micro_precision,
            "recall_micro": self.micro_recall,
            "f1_micro": self.micro_f1,
            "accuracy": self.accuracy,
            "unknown_precision": self.unknown_precision,
            "unknown_recall": self.unknown_recall,
            "unknown_f1": self.unknown_f1,
        }


def _as_label_array(y, *, name: str) -> np.ndarray:
    a = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of labels, got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name}: float labels must be whole numbers, got e.g. {a[~(a == np.round(a))][:3]}")
        a = a.astype(np.int64)
    return a


def _ratio(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _ratio(2.0 * p * r, p + r)


def classification_metrics(y_true, y_pred, *, labels=None, unknown_label=-1) -> ClassificationResult:
    """Per-class and averaged precision / recall / F1 of identity predictions, unknown handled as documented above.

    Args:
        y_true: (N,) true identity of each box (numpy, torch or list; integers or strings).
        y_pred: (N,) predicted identity of each box; ``unknown_label`` means "rejected / not enrolled".
        labels: the known identities to report, in order (default: every non-unknown label seen).
        unknown_label: the label value of the unknown identity.

    Raises:
        ValueError: different lengths, no boxes, labels not 1-D, ``labels`` containing ``unknown_label`` or
            duplicates, or a true/predicted label that is neither in ``labels`` nor unknown.
    """
    t = _as_label_array(y_true, name="y_true")
    p = _as_label_array(y_pred, name="y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {t.shape[0]} labels but y_pred has {p.shape[0]}")
    if t.shape[0] == 0:
        raise ValueError("no boxes to evaluate: y_true and y_pred are empty")
    if labels is None:
        seen = np.concatenate([t[t != unknown_label], p[p != unknown_label]])
        known = np.unique(seen)
    else:
        known = _as_label_array(labels, name="labels")
        if np.any(known == unknown_label):
            raise ValueError(f"labels must list the known identities only; it contains unknown_label {unknown_label!r}")
        if len(np.unique(known)) != len(known):
            raise ValueError("labels contains duplicates")
    num_known = len(known)
    # Map each label to 0..C-1 (known) or C (unknown).
    order = np.argsort(known, kind="stable")
    sorted_known = known[order]

    def encode(a: np.ndarray, name: str) -> np.ndarray:
        code = np.full(a.shape[0], num_known, dtype=np.int64)
        is_known = a != unknown_label
        if num_known:
            pos = np.clip(np.searchsorted(sorted_known, a[is_known]), 0, num_known - 1)
            found = sorted_known[pos] == a[is_known]
        else:
            pos, found = np.zeros(int(is_known.sum()), dtype=np.int64), np.zeros(int(is_known.sum()), dtype=bool)
        if not np.all(found):
            missing = np.unique(a[is_known][~found])[:5]
            raise ValueError(
                f"{name} has labels {missing.tolist()} that are neither in labels nor unknown_label {unknown_label!r}"
            )
        code[is_known] = order[pos]
        return code

    ct, cp = encode(t, "y_true"), encode(p, "y_pred")
    confusion = np.bincount(ct * (num_known + 1) + cp, minlength=(num_known + 1) ** 2).reshape(
        num_known + 1, num_known + 1
    )
    tp = np.diag(confusion)[:num_known].astype(np.float64)
    predicted = confusion[:, :num_known].sum(axis=0)  # includes unknown boxes predicted as c (false positives)
    support = confusion[:num_known, :].sum(axis=1)  # includes boxes of c predicted unknown (false negatives)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _f1(precision, recall)

    micro_p = float(_ratio(tp.sum(), predicted.sum()))
    micro_r = float(_ratio(tp.sum(), support.sum()))
    unknown_tp = float(confusion[num_known, num_known])
    unknown_p = float(_ratio(unknown_tp, confusion[:, num_known].sum()))
    unknown_r = float(_ratio(unknown_tp, confusion[num_known, :].sum()))
    return ClassificationResult(
        labels=known,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support.astype(np.int64),
        macro_precision=float(precision.mean()) if num_known else 0.0,
        macro_recall=float(recall.mean()) if num_known else 0.0,
        macro_f1=float(f1.mean()) if num_known else 0.0,
        micro_precision=micro_p,
        micro_recall=micro_r,
        micro_f1=float(_f1(np.float64(micro_p), np.float64(micro_r))),
        accuracy=float(np.trace(confusion) / t.shape[0]),
        unknown_precision=unknown_p,
        unknown_recall=unknown_r,
        unknown_f1=float(_f1(np.float64(unknown_p), np.float64(unknown_r))),
        unknown_support=int(confusion[num_known, :].sum()),
        confusion=confusion.astype(np.int64),
    )
