"""k-reciprocal re-ranking: equal to a naive dense transcription of Zhong et al.'s algorithm, chunk-independent,
and it improves retrieval where the method should."""

from __future__ import annotations

import numpy as np
import pytest

from reid_core.metrics import rank as rank_module
from reid_core.metrics import reranking
from reid_core.metrics.rank import evaluate_distmat, evaluate_rank
from reid_core.metrics.reranking import evaluate_rank_reranked, k_reciprocal_distmat


def naive_re_ranking(q, g, *, k1, k2, lambda_value, metric="euclidean"):
    """Dense, loop-by-loop k-reciprocal re-ranking over all N = Q + G images (Zhong et al., CVPR 2017)."""
    feats = np.concatenate([q, g]).astype(np.float64)
    if metric == "euclidean":
        dist = ((feats[:, None, :] - feats[None, :, :]) ** 2).sum(-1)
    else:
        unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        dist = 1.0 - unit @ unit.T
    dist = dist / dist.max(axis=1, keepdims=True)
    n, nq = len(feats), len(q)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=int)

    v = np.zeros((n, n))
    k_half = int(np.around(k1 / 2.0))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(c, k_half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion.extend(rc)
        expansion = np.unique(expansion)
        weight = np.exp(-dist[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):
        for j in range(n - nq):
            overlap = np.minimum(v[i], v[nq + j]).sum()
            out[i, j] = (1 - lambda_value) * (1 - overlap / (2 - overlap)) + lambda_value * dist[i, nq + j]
    return out


def clustered(rng, num_ids, per_id, dim, noise):
    centres = rng.normal(size=(num_ids, dim))
    pids = np.repeat(np.arange(num_ids), per_id)
    return centres, pids, centres[pids] + noise * rng.normal(size=(len(pids), dim))


@pytest.mark.parametrize(
    ("k1", "k2", "lambda_value", "metric"),
    [(5, 3, 0.3, "euclidean"), (8, 1, 0.0, "euclidean"), (4, 5, 1.0, "euclidean"), (6, 2, 0.5, "cosine")],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_reference(seed, k1, k2, lambda_value, metric):
    rng = np.random.default_rng(seed)
    centres, g_pids, g = clustered(rng, 6, 6, 8, 0.6)
    q = centres[[0, 2, 3, 5]] + 0.6 * rng.normal(size=(4, 8))
    expected = naive_re_ranking(q, g, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric)
    got = k_reciprocal_distmat(q, g, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric)
    assert got.shape == (4, 36)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_chunking_and_budgets_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(3)
    _, _, g = clustered(rng, 8, 5, 6, 0.5)
    q = g[::4] + 0.1 * rng.normal(size=(10, 6))
    whole = k_reciprocal_distmat(q, g, k1=6, k2=3, lambda_value=0.3)

    shapes = []
    original_block = rank_module.distance_block

    def recording(qp, gp, start, stop, out=None):
        dist = original_block(qp, gp, start, stop, out=out)
        shapes.append(tuple(dist.shape))
        return dist

    monkeypatch.setattr(reranking, "distance_block", recording)
    monkeypatch.setattr(reranking, "_PAIR_BUDGET", 7)
    monkeypatch.setattr(reranking, "_ELEMENT_BUDGET", 50)
    blocks = list(reranking.k_reciprocal_distance_chunks(q, g, k1=6, k2=3, lambda_value=0.3, chunk_size=3))
    assert [b[0] for b in blocks] == sorted(b[0] for b in blocks) and blocks[-1][1] == len(q)
    np.testing.assert_allclose(np.concatenate([b[2] for b in blocks]), whole, atol=1e-6, rtol=0)
    assert max(rows for rows, _ in shapes) <= 3  # no dense block larger than the chunk, never N x N


def test_lambda_one_keeps_the_original_ranking():
    rng = np.random.default_rng(4)
    _, g_pids, g = clustered(rng, 10, 6, 8, 0.8)
    q_pids = np.arange(10)
    q = g[::6] + 0.5 * rng.normal(size=(10, 8))
    ids = (q_pids, g_pids, np.zeros(10, int), np.ones(60, int))
    plain = evaluate_rank(q.astype(np.float32), g.astype(np.float32), *ids)
    same = evaluate_rank_reranked(q.astype(np.float32), g.astype(np.float32), *ids, k1=5, k2=3, lambda_value=1.0)
    np.testing.assert_array_equal(same.first_match_rank, plain.first_match_rank)
    assert same.mAP == pytest.approx(plain.mAP, abs=1e-9)


def test_re_ranking_improves_map_when_identities_form_neighbourhoods():
    """Each identity has several gallery images around it: k-reciprocal neighbours recover the far ones."""
    gains = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        centres, g_pids, g = clustered(rng, 30, 8, 16, 0.9)
        q = centres + 0.9 * rng.normal(size=centres.shape)
        ids = (np.arange(30), g_pids, np.zeros(30, int), np.ones(len(g_pids), int))
        before = evaluate_rank(q, g, *ids).mAP
        after = evaluate_rank_reranked(q, g, *ids, k1=8, k2=3, lambda_value=0.3)
        assert after.num_valid_queries == 30
        np.testing.assert_allclose(
            after.average_precision,
            evaluate_distmat(k_reciprocal_distmat(q, g, k1=8, k2=3, lambda_value=0.3), *ids).average_precision,
        )
        gains.append(after.mAP - before)
    assert min(gains) > 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k1=3, k2=5), "k2"),
        (dict(k1=0), "k1 must be a positive integer"),
        (dict(lambda_value=1.5), "lambda_value"),
        (dict(k1=50), "more than k1"),
    ],
)
def test_bad_parameters_raise(kwargs, message):
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 4)), rng.normal(size=(10, 4))
    with pytest.raises(ValueError, match=message):
        k_reciprocal_distmat(q, g, **kwargs)
