"""FLIMA identity classification metrics: per-class and averaged P/R/F1, and how "unknown" counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reid_core.metrics.classification import classification_metrics


def test_hand_computed_counts_with_unknown():
    #        box: 0  1  2   3  4  5   6
    y_true = [0, 0, 1, 1, -1, 2, -1]
    y_pred = [0, 1, 1, -1, 0, 2, -1]
    res = classification_metrics(y_true, y_pred)
    assert res.labels.tolist() == [0, 1, 2]
    # class 0: TP 1 (box 0); FP 1 (box 4, an unknown person named 0); FN 1 (box 1)
    # class 1: TP 1 (box 2); FP 1 (box 1); FN 1 (box 3, rejected as unknown)
    # class 2: TP 1, no FP, no FN
    np.testing.assert_allclose(res.precision, [1 / 2, 1 / 2, 1.0])
    np.testing.assert_allclose(res.recall, [1 / 2, 1 / 2, 1.0])
    np.testing.assert_allclose(res.f1, [1 / 2, 1 / 2, 1.0])
    assert res.support.tolist() == [2, 2, 1]
    assert res.macro_f1 == pytest.approx(2 / 3)
    assert res.micro_precision == pytest.approx(3 / 5)  # 3 correct of 5 known predictions
    assert res.micro_recall == pytest.approx(3 / 5)  # 3 found of 5 known boxes
    assert res.accuracy == pytest.approx(4 / 7)  # box 6 (unknown predicted unknown) counts as correct
    # unknown answers: boxes 3 and 6 predicted unknown, one of them truly unknown; 2 unknown boxes, 1 found
    assert res.unknown_precision == pytest.approx(1 / 2)
    assert res.unknown_recall == pytest.approx(1 / 2)
    assert res.unknown_support == 2
    assert res.confusion.sum() == 7


def test_unknown_is_excluded_from_macro_averages():
    # Perfect on the known identities; all the errors are between unknown and "reject".
    y_true = [0, 1, 2, -1, -1]
    y_pred = [0, 1, 2, -1, -1]
    perfect = classification_metrics(y_true, y_pred)
    assert perfect.macro_f1 == 1.0 and perfect.unknown_f1 == 1.0
    # A classifier that rejects every box gets no credit from the unknown boxes.
    reject_all = classification_metrics(y_true, [-1] * 5)
    assert reject_all.macro_f1 == 0.0 and reject_all.macro_recall == 0.0
    assert reject_all.accuracy == pytest.approx(2 / 5)


def test_string_labels_explicit_label_order_and_zero_division():
    res = classification_metrics(
        ["anna", "ben", "unknown", "anna"],
        ["anna", "anna", "anna", "unknown"],
        labels=["ben", "anna", "cleo"],
        unknown_label="unknown",
    )
    assert res.labels.tolist() == ["ben", "anna", "cleo"]
    np.testing.assert_allclose(res.precision, [0.0, 1 / 3, 0.0])  # ben, cleo never predicted: 0/0 -> 0
    np.testing.assert_allclose(res.recall, [0.0, 1 / 2, 0.0])  # cleo has no boxes: 0/0 -> 0
    assert res.support.tolist() == [1, 2, 0]


def test_summary_keys_and_torch_input():
    res = classification_metrics(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    s = res.summary()
    assert {"precision_macro", "recall_macro", "f1_macro", "accuracy", "unknown_f1"} <= set(s)
    assert s["f1_macro"] == pytest.approx(res.f1.mean())


@settings(max_examples=100, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(-1, 4), st.integers(-1, 4)), min_size=1, max_size=60),
)
def test_matches_a_direct_count(pairs):
    y_true = np.array([t for t, _ in pairs])
    y_pred = np.array([p for _, p in pairs])
    res = classification_metrics(y_true, y_pred)
    for c, label in enumerate(res.labels):
        tp = np.sum((y_true == label) & (y_pred == label))
        fp = np.sum((y_true != label) & (y_pred == label))
        fn = np.sum((y_true == label) & (y_pred != label))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        assert res.precision[c] == pytest.approx(precision)
        assert res.recall[c] == pytest.approx(recall)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert res.f1[c] == pytest.approx(f1)
    assert -1 not in res.labels.tolist()
    assert res.accuracy == pytest.approx(np.mean(y_true == y_pred))
    if len(res.labels):
        assert res.macro_f1 == pytest.approx(res.f1.mean())


@pytest.mark.parametrize(
    ("y_true", "y_pred", "kwargs", "message"),
    [
        ([0, 1], [0], {}, "y_true has 2 labels but y_pred has 1"),
        ([], [], {}, "empty"),
        ([0, 3], [0, 1], {"labels": [0, 1]}, r"labels \[3\] that are neither"),
        ([0, 1], [0, 1], {"labels": [0, -1]}, "known identities only"),
        ([0, 1], [0, 1], {"labels": [0, 0, 1]}, "duplicates"),
        ([[0, 1]], [[0, 1]], {}, "1-D"),
        ([0.5, 1.0], [0.0, 1.0], {}, "whole numbers"),
    ],
)
def test_bad_input(y_true, y_pred, kwargs, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred, **kwargs)
