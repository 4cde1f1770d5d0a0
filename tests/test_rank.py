"""evaluate_rank / evaluate_distmat: exact agreement with the slow reference, the protocol, and input errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reid_core.metrics import rank as rank_module
from reid_core.metrics import scan
from reid_core.metrics.rank import (
    evaluate_distmat,
    evaluate_rank,
    evaluate_rank_reference,
    pairwise_distance,
)

TOL = 1e-6


def assert_same_result(got, ref):
    assert got.num_valid_queries == ref.num_valid_queries
    assert got.num_skipped_queries == ref.num_skipped_queries
    np.testing.assert_allclose(got.cmc, ref.cmc, atol=TOL, rtol=0)
    assert abs(got.mAP - ref.mAP) <= TOL
    assert abs(got.mINP - ref.mINP) <= TOL
    np.testing.assert_array_equal(got.first_match_rank, ref.first_match_rank)
    np.testing.assert_allclose(got.average_precision, ref.average_precision, atol=TOL, rtol=0)
    np.testing.assert_allclose(got.inverse_negative_penalty, ref.inverse_negative_penalty, atol=TOL, rtol=0)


def reference_or_error(distmat, ids, max_rank):
    try:
        return evaluate_rank_reference(distmat, *ids, max_rank=max_rank)
    except ValueError:
        return None


@st.composite
def retrieval_cases(draw):
    """Small sets with heavy ties (integer features), absent identities, 1-3 cameras, 1+ items per identity."""
    num_q = draw(st.integers(1, 12))
    num_g = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 5))
    num_ids = draw(st.integers(1, 8))
    num_cams = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    spread = draw(st.sampled_from([1, 3, 50]))  # 1: nearly everything tied; 50: few ties
    q = rng.integers(-spread, spread + 1, size=(num_q, dim))
    g = rng.integers(-spread, spread + 1, size=(num_g, dim))
    ids = (
        rng.integers(0, num_ids + 2, size=num_q),  # ids >= num_ids never occur in the gallery: absent identities
        rng.integers(0, num_ids, size=num_g),
        rng.integers(0, num_cams, size=num_q),
        rng.integers(0, num_cams, size=num_g),
    )
    return q, g, ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=retrieval_cases(),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
    chunk=st.sampled_from([None, 1, 2, 5]),
    max_rank=st.integers(1, 50),
)
def test_euclidean_matches_reference_with_ties(case, dtype, chunk, max_rank):
    q, g, ids = case
    # Integer-valued features: every distance is exact, so chunked and full products agree bitwise.
    qf, gf = q.astype(dtype), g.astype(dtype)
    ref = reference_or_error(pairwise_distance(qf, gf), ids, max_rank)
    if ref is None:
        with pytest.raises(ValueError, match="none of the"):
            evaluate_rank(qf, gf, *ids, max_rank=max_rank, chunk_size=chunk)
        return
    got = evaluate_rank(qf, gf, *ids, max_rank=max_rank, chunk_size=chunk)
    assert got.cmc.shape == (max_rank,)
    assert_same_result(got, ref)


@settings(max_examples=60, deadline=None)
@given(case=retrieval_cases(), as_torch=st.booleans())
def test_cosine_matches_reference(case, as_torch):
    q, g, ids = case
    qf, gf = q.astype(np.float32), g.astype(np.float32)
    if as_torch:
        qf, gf = torch.from_numpy(qf), torch.from_numpy(gf)
        ids = tuple(torch.from_numpy(a) for a in ids)
    ref = reference_or_error(pairwise_distance(qf, gf, metric="cosine"), ids, 10)
    if ref is None:  # no query has an answer: the reference refuses, and so must evaluate_rank
        with pytest.raises(ValueError, match="none of the"):
            evaluate_rank(qf, gf, *ids, max_rank=10, metric="cosine")
        return
    assert_same_result(evaluate_rank(qf, gf, *ids, max_rank=10, metric="cosine"), ref)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_q=st.integers(1, 15),
    num_g=st.integers(1, 300),
    decimals=st.sampled_from([0, 1, 3]),
    chunk=st.sampled_from([None, 1, 4]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_distmat_matches_reference(seed, num_q, num_g, decimals, chunk, dtype):
    rng = np.random.default_rng(seed)
    distmat = np.round(rng.random((num_q, num_g)) * 4, decimals).astype(dtype)  # rounded: many exact ties
    ids = (
        rng.integers(0, 12, num_q),
        rng.integers(0, 10, num_g),
        rng.integers(0, 3, num_q),
        rng.integers(0, 3, num_g),
    )
    ref = reference_or_error(distmat, ids, 20)
    if ref is None:  # no query has an answer: the reference refuses, and so must evaluate_distmat
        with pytest.raises(ValueError, match="none of the"):
            evaluate_distmat(distmat, *ids, max_rank=20, chunk_size=chunk)
        return
    assert_same_result(evaluate_distmat(distmat, *ids, max_rank=20, chunk_size=chunk), ref)


def clustered_features(rng, centres, per_id, noise):
    pids = np.repeat(np.arange(len(centres)), per_id)
    return (centres[pids] + noise * rng.normal(size=(len(pids), centres.shape[1]))).astype(np.float32), pids


@pytest.mark.parametrize("noise", [0.05, 0.6, 3.0])
def test_trained_like_and_random_features_match_reference(noise):
    """Large rows: float32 ties from rounding, and both the few-candidates and the whole-row counting paths."""
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(150, 16))
    gf, gp = clustered_features(rng, centres, 20, noise)
    qf, qp = clustered_features(rng, centres, 1, noise)
    gc, qc = rng.integers(0, 6, len(gp)), rng.integers(0, 6, len(qp))
    ref = evaluate_rank_reference(pairwise_distance(qf, gf), qp, gp, qc, gc)
    got = evaluate_rank(qf, gf, qp, gp, qc, gc, chunk_size=64)
    assert_same_result(got, ref)
    if noise == 0.05:
        assert got.mAP > 0.99  # well separated identities: the few-candidates path ranks every positive first


@pytest.mark.parametrize(
    "costs",
    [
        {"_COST_SORT": 0.0},  # always sort whole rows
        {"_COST_SORT": 1e9, "_COST_GATHER": 0.0, "_COST_GATHER_SHARE": 0.0},  # gather up to the hardest positive
        {"_COST_SORT": 1e9, "_COST_GATHER": 0.0, "_COST_GATHER_SHARE": 1.0, "_COST_COUNT": 0.01},  # gather + count
        {"_COST_SORT": 1e9, "_COST_GATHER": 1e9},  # count every positive with comparison passes
    ],
)
@pytest.mark.parametrize("spread", [2, 1000])  # 2: heavy ties; 1000: few ties
@pytest.mark.parametrize("compiled", [True, False], ids=["numba-passes", "numpy-passes"])
def test_every_counting_path_matches_reference(monkeypatch, costs, spread, compiled):
    for name, value in costs.items():
        monkeypatch.setattr(rank_module, name, value)
    assert scan.available()  # numba is a dependency: the compiled passes are the default
    if not compiled:
        monkeypatch.setattr(scan, "available", lambda: False)
    rng = np.random.default_rng(spread)
    centres = rng.integers(-spread, spread + 1, size=(40, 6))
    g_pids = rng.integers(0, 40, 1500)
    q_pids = rng.integers(0, 44, 60)
    g = centres[g_pids] + rng.integers(-spread // 2, spread // 2 + 1, size=(1500, 6))
    q = centres[np.minimum(q_pids, 39)] + rng.integers(-spread // 2, spread // 2 + 1, size=(60, 6))
    ids = (q_pids, g_pids, rng.integers(0, 3, 60), rng.integers(0, 3, 1500))
    qf, gf = q.astype(np.float32), g.astype(np.float32)
    ref = evaluate_rank_reference(pairwise_distance(qf, gf), *ids)
    assert_same_result(evaluate_rank(qf, gf, *ids, chunk_size=16), ref)


def test_one_gallery_item_per_identity_gives_ap_equal_to_inverse_rank():
    rng = np.random.default_rng(5)
    g = rng.normal(size=(300, 8)).astype(np.float32)
    q = g[:40] + 0.8 * rng.normal(size=(40, 8)).astype(np.float32)
    ids = (np.arange(40), np.arange(300), np.zeros(40, int), np.ones(300, int))  # every identity once
    res = evaluate_rank(q, g, *ids)
    assert_same_result(res, evaluate_rank_reference(pairwise_distance(q, g), *ids))
    np.testing.assert_allclose(res.average_precision, 1.0 / res.first_match_rank)
    np.testing.assert_allclose(res.inverse_negative_penalty, 1.0 / res.first_match_rank)


def test_hand_computed_example():
    # One query (pid 1, camera 0). Gallery order by distance: idx 0 (pid 2), 1 (pid 1, cam 0: junk),
    # 2 (pid 1, cam 1), 3 (pid 3), 4 (pid 1, cam 2). After removing the junk: [neg, pos, neg, pos].
    distmat = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    g_pids, g_cams = np.array([2, 1, 1, 3, 1]), np.array([0, 0, 1, 1, 2])
    res = evaluate_distmat(distmat, [1], g_pids, [0], g_cams, max_rank=5)
    # positives at ranks 2 and 4: AP = (1/2 + 2/4) / 2, INP = 2 / 4, first match at rank 2
    assert res.mAP == pytest.approx((0.5 + 0.5) / 2)
    assert res.mINP == pytest.approx(0.5)
    np.testing.assert_array_equal(res.cmc, [0, 1, 1, 1, 1])
    assert res.first_match_rank.tolist() == [2]


def test_ties_are_broken_by_gallery_index():
    distmat = np.zeros((2, 6))  # every gallery item at the same distance
    g_pids = np.array([5, 5, 7, 8, 9, 7])
    g_cams = np.ones(6, dtype=int)
    res = evaluate_distmat(distmat, [7, 5], g_pids, [0, 0], g_cams, max_rank=6)
    # query pid 7: positives at gallery indices 2 and 5 -> ranks 3 and 6; query pid 5: indices 0, 1 -> ranks 1, 2
    np.testing.assert_allclose(res.average_precision, [(1 / 3 + 2 / 6) / 2, 1.0])
    np.testing.assert_allclose(res.inverse_negative_penalty, [2 / 6, 1.0])
    assert res.first_match_rank.tolist() == [3, 1]


def test_skipped_queries_are_counted_and_logged(caplog):
    distmat = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    # query 0: positive in another camera; query 1: only same-camera match (junk); query 2: identity absent
    with caplog.at_level(logging.WARNING, logger="reid_core.metrics.rank"):
        res = evaluate_distmat(distmat, [1, 2, 9], [1, 2], [0, 0, 0], [1, 0], max_rank=2)
    assert res.num_valid_queries == 1
    assert res.num_skipped_queries == 2
    assert np.isnan(res.average_precision[1:]).all()
    assert "2 of 3 queries skipped" in caplog.text


def test_single_camera_everywhere_means_no_valid_query():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(4, 3)), rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="none of the 4 queries"):
        evaluate_rank(q, g, [0, 1, 0, 1], rng.integers(0, 2, 10), np.zeros(4, int), np.zeros(10, int))


def test_one_gallery_camera_and_cmc_longer_than_gallery():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    ids = (np.array([0, 1, 2, 0, 1]), np.array([0, 1, 2]), np.zeros(5, int), np.ones(3, int))
    res = evaluate_rank(q, g, *ids, max_rank=50)
    assert res.cmc.shape == (50,)
    assert res.cmc[-1] == 1.0  # every valid query is matched within the 3-item list; the curve stays at 1
    assert_same_result(res, evaluate_rank_reference(pairwise_distance(q, g), *ids, max_rank=50))


def test_never_builds_more_than_a_chunk_of_distances(monkeypatch):
    shapes = []
    original = rank_module.distance_block

    def recording(q, g, start, stop, out=None):
        dist = original(q, g, start, stop, out=out)
        shapes.append(tuple(dist.shape))
        return dist

    monkeypatch.setattr(rank_module, "distance_block", recording)
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(50, 8)), rng.normal(size=(70, 8))
    evaluate_rank(
        q, g, rng.integers(0, 5, 50), rng.integers(0, 5, 70), np.zeros(50, int), np.ones(70, int), chunk_size=16
    )
    assert shapes == [(16, 70), (16, 70), (16, 70), (2, 70)]


def test_summary_and_torch_inputs_agree_with_numpy():
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(20, 6)).astype(np.float32), rng.normal(size=(60, 6)).astype(np.float32)
    ids = (rng.integers(0, 5, 20), rng.integers(0, 5, 60), rng.integers(0, 2, 20), rng.integers(0, 2, 60))
    a = evaluate_rank(q, g, *ids)
    b = evaluate_rank(torch.from_numpy(q), torch.from_numpy(g), *(torch.from_numpy(x) for x in ids))
    assert_same_result(a, b)
    s = a.summary()
    assert s["rank1"] == a.cmc[0] and s["rank10"] == a.cmc[9] and s["mAP"] == a.mAP and s["mINP"] == a.mINP
    assert 0.0 <= a.mINP <= a.mAP <= 1.0  # INP <= AP for every query


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(q_feats=np.zeros((3, 4)), g_feats=np.zeros((5, 3))), "dimensions"),
        (dict(q_pids=np.zeros(2, int)), "q_pids: has 2 entries"),
        (dict(g_camids=np.zeros(4, int)), "g_camids: has 4 entries"),
        (dict(q_feats=np.full((3, 4), np.nan)), "NaN"),
        (dict(g_feats=np.zeros((0, 4)), g_pids=np.zeros(0, int), g_camids=np.zeros(0, int)), "gallery is empty"),
        (dict(q_feats=np.zeros(4)), "expected shape"),
        (dict(q_pids=np.zeros(3)), "integer ids"),
        (dict(metric="manhattan"), "valid metrics: euclidean, cosine"),
        (dict(max_rank=0), "max_rank"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(q_feats=np.zeros((3, 4), np.float32), g_feats=np.full((5, 4), 1e38, np.float32)), "too large"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, message):
    args = dict(
        q_feats=np.zeros((3, 4)),
        g_feats=np.ones((5, 4)),
        q_pids=np.zeros(3, int),
        g_pids=np.zeros(5, int),
        q_camids=np.zeros(3, int),
        g_camids=np.ones(5, int),
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate_rank(**args)


def test_distmat_errors():
    ids = (np.zeros(2, int), np.zeros(3, int), np.zeros(2, int), np.ones(3, int))
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate_distmat(np.array([[0.0, np.nan, 1.0], [0.0, 1.0, 2.0]]), *ids)
    with pytest.raises(ValueError, match=r"expected shape \(Q, G\)"):
        evaluate_distmat(np.zeros(3), *ids)
    with pytest.raises(ValueError, match="g_pids: has 3 entries but"):
        evaluate_distmat(np.zeros((2, 4)), *ids)


def test_evaluation_device_is_cuda_only_where_present():
    """None picks CUDA when torch sees one, else the CPU; a CUDA request without CUDA is one clear error."""
    from reid_core.metrics.rank import evaluation_device

    assert evaluation_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert evaluation_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            evaluation_device("cuda:0")
    with pytest.raises(ValueError, match="expected 'cpu'"):
        evaluation_device("meta")


def test_overlapped_chunks_on_the_chosen_device_match_reference():
    """Many chunks through the two alternating buffers (chunk k + 1 computed while k is ranked): exact numbers."""
    rng = np.random.default_rng(11)
    qf, gf = rng.normal(size=(333, 12)).astype(np.float32), rng.normal(size=(900, 12)).astype(np.float32)
    ids = (rng.integers(0, 30, 333), rng.integers(0, 30, 900), rng.integers(0, 4, 333), rng.integers(0, 4, 900))
    ref = evaluate_rank_reference(pairwise_distance(qf, gf), *ids)
    for device in (None, "cpu"):
        assert_same_result(evaluate_rank(qf, gf, *ids, chunk_size=32, device=device), ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_passes_count_below_and_at_or_below_exactly(dtype):
    """``scan.count_between`` against NumPy's counts, on rows full of ties and on continuous ones; only the asked
    entries are written."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        width = int(rng.integers(1, 400))
        dist = rng.integers(0, 12, (5, width)) if trial % 2 else rng.standard_normal((5, width))
        dist = dist.astype(dtype)
        m = int(rng.integers(1, 10))
        thresholds = rng.choice(dist.ravel(), (3, m))
        lo = rng.integers(0, m, 3)
        hi = np.minimum(lo + rng.integers(0, m + 1, 3), m)
        below, at_or_below = np.full((3, m), -1), np.full((3, m), -1)
        dist_rows = np.array([4, 0, 2])
        scan.count_between(dist, dist_rows, np.arange(3), thresholds, lo, hi, below, at_or_below)
        for i, r in enumerate(dist_rows):
            j = np.arange(m)
            asked = (j >= lo[i]) & (j < hi[i])
            want_below = np.where(asked, (dist[r][None, :] < thresholds[i][:, None]).sum(axis=1), -1)
            want_at = np.where(asked, (dist[r][None, :] <= thresholds[i][:, None]).sum(axis=1), -1)
            np.testing.assert_array_equal(below[i], want_below)
            np.testing.assert_array_equal(at_or_below[i], want_at)


def test_compiled_passes_refuse_what_they_cannot_count(monkeypatch):
    """Rows too long for the int32 counters are refused before any work (a zero-stride view: no 8 GiB allocated),
    and a missing numba is one clear error, not an AttributeError from deep inside."""
    index = np.zeros(1, dtype=np.int64)
    out = np.zeros((1, 1), dtype=np.int64)
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=np.float32), shape=(1, 2**31), strides=(0, 0))
    with pytest.raises(ValueError, match=r"rows of 2147483648 items overflow the passes' int32 counters"):
        scan.count_between(huge, index, index, np.zeros((1, 1), np.float32), index, index + 1, out, out)
    monkeypatch.setattr(scan, "_kernel", lambda: None)
    assert not scan.available()
    with pytest.raises(RuntimeError, match="need numba, which is not installed"):
        scan.count_between(np.zeros((1, 4), np.float32), index, index, np.zeros((1, 1), np.float32), index,
                           index + 1, out, out)  # fmt: skip
