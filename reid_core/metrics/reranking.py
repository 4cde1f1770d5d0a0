"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), computed in bounded memory.

The method, over all N = Q + G images (queries and gallery together):

1. ``d(i, j)``: the original distance (our ``"euclidean"`` metric is already the *squared* Euclidean distance,
   which is what Zhong et al.'s code uses), normalised per row by its maximum over all N images: ``od(i, j)``.
2. ``N(i, k)``: the k nearest images of i (i itself included, at distance 0). The k-reciprocal set
   ``R(i) = {j in N(i, k1+1) : i in N(j, k1+1)}``; the expanded set adds ``R_half(c)`` (computed with
   ``round(k1 / 2)``) of every ``c in R(i)`` for which more than 2/3 of ``R_half(c)`` lies in ``R(i)``.
3. ``V[i, j] = exp(-od(i, j)) / sum_e exp(-od(i, e))`` over the expanded set, 0 elsewhere; with ``k2 > 1`` each
   row is replaced by the mean of the rows of its ``k2`` nearest images (local query expansion).
4. Jaccard distance ``dJ(i, j) = 1 - m / (2 - m)`` with ``m = sum_k min(V[i, k], V[j, k])``, and the final distance
   ``(1 - lambda) * dJ(i, j) + lambda * od(i, j)`` for queries i and gallery images j.

The authors' code and its common ports build dense N x N matrices (distances, argsort, V): 35 GB each at MSMT17
scale. Here every step is chunked or sparse: the N x N distances are computed a block of rows at a time and reduced
to the ``k1 + 1`` nearest neighbours and the row maximum; V and its expansion are sparse (CSR) rows of a few hundred
entries; the Jaccard overlaps come from an inverted index over the gallery's non-zeros, accumulated one block of
queries at a time, bounded by a budget of (query, gallery, overlap) pairs. Peak memory stays within a few hundred MB
plus ``O(N * (k1 + k2 * |expansion|))`` for the sparse rows.

Differences from the authors' code, all deliberate: neighbours at exactly equal distances are ordered by index
(theirs: an unstable argsort); a row whose maximum distance is 0 is left unnormalised (theirs divides by zero).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from reid_core.metrics.rank import (
    PreparedFeatures,
    RankResult,
    as_feature_tensor,
    check_distance_range,
    check_max_rank,
    check_metric,
    common_dtype,
    default_chunk_rows,
    distance_block,
    evaluate_distance_chunks,
    prepare_features,
    validate_ids,
)

logger = logging.getLogger(__name__)

# Budget of sparse entries / (query, gallery, overlap) pairs expanded at once (~40 bytes each with temporaries).
_PAIR_BUDGET = 2**23
# Budget of elements of the temporary arrays of the set expansion and of the gathered feature pairs.
_ELEMENT_BUDGET = 2**24


@dataclass(frozen=True)
class _SparseRows:
    """CSR rows: row i holds columns ``indices[indptr[i]:indptr[i + 1]]`` (increasing) with ``values`` there."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int64
    values: np.ndarray  # (nnz,) float32

    def row_lengths(self) -> np.ndarray:
        return np.diff(self.indptr)


def _check_params(k1: int, k2: int, lambda_value: float, num_items: int) -> None:
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"re-ranking {name} must be a positive integer, got {v!r}")
    if k2 > k1 + 1:
        raise ValueError(
            f"re-ranking k2 ({k2}) must not exceed k1 + 1 ({k1 + 1}): it averages over the k1+1 neighbours"
        )
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"re-ranking lambda_value must be in [0, 1], got {lambda_value!r}")
    if num_items <= k1:
        raise ValueError(f"re-ranking needs more than k1 = {k1} images in query + gallery, got {num_items}")


def _nearest_neighbours(all_q, all_g, *, num_items: int, k: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest images of every image ((N, k) int64, nearest first, ties by index) and each row's maximum.

    One pass over the N x N distances, a block of rows at a time (the block is the only dense buffer).
    """
    neighbours = np.empty((num_items, k), dtype=np.int64)
    row_max = np.empty(num_items, dtype=np.float64)
    buffer = torch.empty((min(chunk_rows, num_items), num_items), dtype=all_q.augmented.dtype)
    for start in range(0, num_items, chunk_rows):
        stop = min(start + chunk_rows, num_items)
        dist = distance_block(all_q, all_g, start, stop, out=buffer)
        row_max[start:stop] = dist.amax(dim=1).double().numpy()
        vals, idx = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        # topk leaves the order of equal values unspecified: order by (distance, index)
        idx, order = torch.sort(idx, dim=1)
        vals = vals.gather(1, order)
        vals, order = torch.sort(vals, dim=1, stable=True)
        neighbours[start:stop] = idx.gather(1, order).numpy()
        logger.debug("re-ranking neighbours: rows %d:%d of %d", start, stop, num_items)
    return neighbours, row_max


def _reciprocal_mask(neighbours: np.ndarray, *, chunk_rows: int) -> np.ndarray:
    """(N, k) bool: ``neighbours[i, s]`` has i among its own k nearest."""
    num_items, k = neighbours.shape
    mask = np.empty((num_items, k), dtype=bool)
    for start in range(0, num_items, chunk_rows):
        stop = min(start + chunk_rows, num_items)
        back = neighbours[neighbours[start:stop]]  # (b, k, k)
        mask[start:stop] = (back == np.arange(start, stop)[:, None, None]).any(axis=2)
    return mask


def _expanded_sets(neighbours: np.ndarray, k1: int) -> _SparseRows:
    """Zhong et al.'s expanded k-reciprocal set of every image, as CSR rows (values unused, set to 0)."""
    num_items = neighbours.shape[0]
    k_half = int(np.around(k1 / 2.0))  # the authors' rounding (half to even)
    full = neighbours[:, : k1 + 1]
    chunk_rows = max(1, _ELEMENT_BUDGET // (k1 + 1) ** 2)
    recip = _reciprocal_mask(full, chunk_rows=chunk_rows)
    half = neighbours[:, : k_half + 1]
    recip_half = _reciprocal_mask(half, chunk_rows=chunk_rows)
    half_size = recip_half.sum(axis=1)

    indptr = np.zeros(num_items + 1, dtype=np.int64)
    pieces: list[np.ndarray] = []
    rows_per_block = max(1, _ELEMENT_BUDGET // ((k1 + 1) ** 2 * (k_half + 1)))
    for start in range(0, num_items, rows_per_block):
        stop = min(start + rows_per_block, num_items)
        r_set = np.where(recip[start:stop], full[start:stop], -1)  # (b, k1+1), -1 = not reciprocal
        cand = full[start:stop]  # candidates c (only reciprocal ones count)
        cand_half = np.where(recip_half[cand], half[cand], -2)  # (b, k1+1, k_half+1) = R_half(c), -2 padding
        in_r = (cand_half[..., None] == r_set[:, None, None, :]).any(axis=3)  # member of R_half(c) also in R(i)
        overlap = in_r.sum(axis=2)
        accept = recip[start:stop] & (overlap > 2.0 / 3.0 * half_size[cand])
        added = np.where(accept[..., None], cand_half, -1).reshape(stop - start, -1)
        merged = np.sort(np.concatenate([r_set, added], axis=1), axis=1)
        keep = merged >= 0
        keep[:, 1:] &= merged[:, 1:] != merged[:, :-1]  # unique per row
        counts = keep.sum(axis=1)
        indptr[start + 1 : stop + 1] = counts
        pieces.append(merged[keep])
    np.cumsum(indptr, out=indptr)
    indices = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return _SparseRows(indptr, indices, np.zeros(len(indices), dtype=np.float32))


def _row_pair_distances(all_q, all_g, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """Distances d(rows[t], cols[t]) for index pairs, with the same augmented-feature dot product."""
    q = torch.index_select(all_q.augmented, 0, torch.from_numpy(rows))
    g = torch.index_select(all_g.augmented, 0, torch.from_numpy(cols))
    return (q * g).sum(dim=1)


def _encode(sets: _SparseRows, all_q, all_g, row_max: np.ndarray) -> _SparseRows:
    """V: Gaussian-kernel weights ``exp(-od)`` over each expanded set, normalised to sum 1 per row."""
    num_items = len(sets.indptr) - 1
    rows = np.repeat(np.arange(num_items), sets.row_lengths())
    values = np.empty(len(sets.indices), dtype=np.float32)
    pair_budget = max(1, _ELEMENT_BUDGET // all_q.augmented.shape[1])
    for start in range(0, len(rows), pair_budget):
        stop = min(start + pair_budget, len(rows))
        d = _row_pair_distances(all_q, all_g, rows[start:stop], sets.indices[start:stop]).double().numpy()
        values[start:stop] = np.exp(-d / row_max[rows[start:stop]])
    sums = np.bincount(rows, weights=values.astype(np.float64), minlength=num_items)
    values = (values / sums[rows]).astype(np.float32)
    return _SparseRows(sets.indptr, sets.indices, values)


def _query_expansion(v: _SparseRows, neighbours: np.ndarray, k2: int, *, pair_budget: int) -> _SparseRows:
    """Row i becomes the mean of the rows of its k2 nearest images (itself included), still sparse."""
    if k2 == 1:
        return v
    num_items = len(v.indptr) - 1
    lengths = v.row_lengths()
    per_row = lengths[neighbours[:, :k2]].sum(axis=1)
    indptr = np.zeros(num_items + 1, dtype=np.int64)
    idx_pieces, val_pieces = [], []
    start = 0
    while start < num_items:
        stop = start + max(1, int(np.searchsorted(np.cumsum(per_row[start:]), pair_budget)))
        stop = min(stop, num_items)
        src = neighbours[start:stop, :k2].reshape(-1)  # rows of V to gather
        owner = np.repeat(np.arange(start, stop), k2)
        take = np.repeat(v.indptr[src], lengths[src]) + _ragged_arange(lengths[src])
        owner = np.repeat(owner, lengths[src])
        key = owner * num_items + v.indices[take]
        uniq, inverse = np.unique(key, return_inverse=True)
        summed = np.bincount(inverse, weights=v.values[take].astype(np.float64), minlength=len(uniq)) / k2
        row_of = uniq // num_items
        indptr[start + 1 : stop + 1] = np.bincount(row_of - start, minlength=stop - start)
        idx_pieces.append(uniq % num_items)
        val_pieces.append(summed.astype(np.float32))
        start = stop
    np.cumsum(indptr, out=indptr)
    return _SparseRows(indptr, np.concatenate(idx_pieces), np.concatenate(val_pieces))


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(n) for each n in lengths."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


def _gallery_columns(v: _SparseRows, num_queries: int, num_items: int) -> _SparseRows:
    """Inverted index over the gallery rows of V: for each column k, the gallery rows j with V[j, k] != 0."""
    lo = v.indptr[num_queries]
    cols = v.indices[lo:]
    rows = np.repeat(np.arange(num_items - num_queries), v.row_lengths()[num_queries:])
    order = np.argsort(cols, kind="stable")
    indptr = np.zeros(num_items + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(cols, minlength=num_items))
    return _SparseRows(indptr, rows[order], v.values[lo:][order])


def _jaccard_overlap(v: _SparseRows, by_column: _SparseRows, start: int, stop: int, num_gallery: int) -> torch.Tensor:
    """(stop - start, G) float32: ``m[i, j] = sum_k min(V[i, k], V[j, k])`` for queries i and gallery j.

    Every non-zero (i, k) of the query rows meets every gallery non-zero (j, k) of column k (inverted index); the
    pair's ``min`` is accumulated at (i, j). Vectorised: one expansion per block of queries, no Python loop.
    """
    lo, hi = int(v.indptr[start]), int(v.indptr[stop])
    q_cols = v.indices[lo:hi]
    base = np.repeat(np.arange(stop - start, dtype=np.int64) * num_gallery, v.row_lengths()[start:stop])
    col_start = by_column.indptr[q_cols]
    col_len = by_column.indptr[q_cols + 1] - col_start
    # pair p of query non-zero t sits at col_start[t] + (p - first pair of t) in the inverted index
    take = np.arange(int(col_len.sum()), dtype=np.int64)
    take += np.repeat(col_start - (np.cumsum(col_len) - col_len), col_len)
    flat = np.repeat(base, col_len)
    flat += by_column.indices.take(take)
    mins = np.minimum(np.repeat(v.values[lo:hi], col_len), by_column.values.take(take))
    overlap = torch.zeros((stop - start) * num_gallery, dtype=torch.float32)
    overlap.index_add_(0, torch.from_numpy(flat), torch.from_numpy(mins))
    return overlap.view(stop - start, num_gallery)


def k_reciprocal_distance_chunks(
    q_feats,
    g_feats,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    chunk_size: int | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Re-ranked query x gallery distances, one block of query rows at a time.

    Args:
        q_feats: (Q, D) query features, numpy or torch.
        g_feats: (G, D) gallery features.
        k1, k2, lambda_value: Zhong et al.'s parameters (their defaults 20, 6, 0.3); ``k2 <= k1 + 1``.
        metric: ``"euclidean"`` (squared) or ``"cosine"``, as in ``pairwise_distance``.
        chunk_size: rows per dense block (``None``: about 128 MiB per block).

    Yields:
        ``(start, stop, dist)`` with ``dist`` a (stop - start, G) float32 array of final distances, covering the
        queries in order. The sparse encodings are built before the first block is yielded.
    """
    check_metric(metric)
    q_t, g_t = as_feature_tensor(q_feats, name="q_feats"), as_feature_tensor(g_feats, name="g_feats")
    if q_t.shape[1] != g_t.shape[1]:
        raise ValueError(f"q_feats has {q_t.shape[1]} dimensions but g_feats has {g_t.shape[1]}")
    if q_t.shape[0] == 0 or g_t.shape[0] == 0:
        raise ValueError(f"re-ranking needs queries and gallery images, got {q_t.shape[0]} and {g_t.shape[0]}")
    q_t, g_t = common_dtype(q_t, g_t)
    num_q, num_g = q_t.shape[0], g_t.shape[0]
    num_items = num_q + num_g
    _check_params(k1, k2, lambda_value, num_items)
    feats = torch.cat([q_t, g_t], dim=0)
    all_q, all_g = (
        prepare_features(feats, metric=metric, side="query"),
        prepare_features(feats, metric=metric, side="gallery"),
    )
    check_distance_range(all_q, all_g, metric=metric)
    rows = default_chunk_rows(num_items, num_items) if chunk_size is None else max(1, int(chunk_size))

    neighbours, row_max = _nearest_neighbours(all_q, all_g, num_items=num_items, k=k1 + 1, chunk_rows=rows)
    row_max = np.where(row_max > 0, row_max, 1.0)
    sets = _expanded_sets(neighbours, k1)
    v = _encode(sets, all_q, all_g, row_max)
    v = _query_expansion(v, neighbours, k2, pair_budget=_PAIR_BUDGET)
    by_column = _gallery_columns(v, num_q, num_items)
    # Query blocks: at most `rows` rows and about _PAIR_BUDGET overlap pairs each.
    owner = np.repeat(np.arange(num_q), v.row_lengths()[:num_q])
    overlap_terms = by_column.row_lengths()[v.indices[: v.indptr[num_q]]]
    pairs_per_query = np.bincount(owner, weights=overlap_terms, minlength=num_q).astype(np.int64)
    logger.info(
        "re-ranking: %d images, %.1f expanded neighbours per image, %.1f non-zeros per encoding, "
        "%.3g query-gallery overlap terms",
        num_items,
        len(sets.indices) / num_items,
        len(v.indices) / num_items,
        float(pairs_per_query.sum()),
    )
    gallery_all = slice(num_q, num_items)
    g_aug = PreparedFeatures(all_g.augmented[gallery_all], all_g.sq_norms[gallery_all])
    buffer = torch.empty((min(rows, num_q), num_g), dtype=all_q.augmented.dtype)
    start = 0
    while start < num_q:
        budget_rows = int(np.searchsorted(np.cumsum(pairs_per_query[start:]), _PAIR_BUDGET, side="right"))
        stop = min(num_q, start + min(rows, max(1, budget_rows)))
        overlap = _jaccard_overlap(v, by_column, start, stop, num_g)
        jaccard = 1.0 - overlap / (2.0 - overlap)
        original = distance_block(all_q, g_aug, start, stop, out=buffer).float()
        original /= torch.from_numpy(row_max[start:stop]).float().unsqueeze(1)
        final = jaccard.mul_(1.0 - lambda_value).add_(original, alpha=lambda_value)
        yield start, stop, final.numpy()
        start = stop


def k_reciprocal_distmat(
    q_feats, g_feats, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, metric: str = "euclidean"
) -> np.ndarray:
    """The whole (Q, G) float32 re-ranked distance matrix, for small sets (see ``k_reciprocal_distance_chunks``)."""
    blocks = k_reciprocal_distance_chunks(q_feats, g_feats, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric)
    return np.concatenate([d for _, _, d in blocks], axis=0)


def evaluate_rank_reranked(
    q_feats,
    g_feats,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_rank: int = 50,
    metric: str = "euclidean",
    chunk_size: int | None = None,
) -> RankResult:
    """``evaluate_rank`` on k-reciprocal re-ranked distances (same protocol, ties and errors), in bounded memory."""
    check_max_rank(max_rank)
    num_q = len(q_feats)
    num_g = len(g_feats)
    ids = validate_ids(q_pids, g_pids, q_camids, g_camids, num_queries=num_q, num_gallery=num_g)
    chunks = k_reciprocal_distance_chunks(
        q_feats, g_feats, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric, chunk_size=chunk_size
    )
    return evaluate_distance_chunks(chunks, *ids, max_rank=max_rank, check_finite=False)
