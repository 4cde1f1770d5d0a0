"""Re-ID retrieval metrics: CMC, mAP and mINP under the Market-1501 / MSMT17 protocol, exact and memory-bounded.

Protocol (the one torchreid's ``eval_market1501`` implements, plus mINP):

* For each query, gallery items with the **same person id and the same camera** as the query are *junk*: they are
  removed from that query's ranked list (they would make re-identification trivial).
* A query with no remaining gallery item of its identity is **skipped** (its identity is absent from the gallery, or
  only seen by its own camera); how many were skipped is logged and returned.
* Ranks are 1-based positions in the query's ranked list after junk removal. Gallery items are ordered by increasing
  distance; **equal distances are ordered by gallery index** (a stable sort), so results are deterministic.
* ``cmc[k]`` is the share of valid queries whose first correct match is at rank ``<= k + 1``. When the gallery has
  fewer than ``max_rank`` kept items, the curve simply stays at its final value 1.0 (torchreid shortens it instead).
* ``AP`` is the mean, over the query's positives, of the precision at each positive's rank: with positives at ranks
  ``r_1 < ... < r_P``, ``AP = (1/P) * sum_j j / r_j``. ``mAP`` averages AP over valid queries.
* ``INP`` (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI 2021) is
  ``P / r_P``: the share of the list up to the hardest positive that is correct. ``mINP`` averages it.

How it stays fast and bounded: queries are processed in chunks of rows; each chunk's (rows, G) distances come from
one torch matrix product (multi-threaded BLAS) into a reused buffer. The rank of every positive is then found by
**counting** the kept gallery items before it (a block of rows per thread-pool task), never with an argsort: depending
on where a sample of the row says the positives lie, and on what each way costs on this machine (measured once per
process and gallery size), the row's values (no indices) are sorted with NumPy's sort and binary-searched, or only
the items up to some positive are gathered and sorted while the positives beyond it are counted with comparison
passes, or every positive is counted that way (one fused comparison loop per positive, compiled by numba:
``reid_core.metrics.scan``, ~0.1 ns per item; NumPy's two passes when numba is missing). Junk below a positive
is counted and subtracted; exact ties with a positive (frequent in float32 rows of tens of thousands of values) are
resolved by gallery index. Peak memory is one (rows, G) buffer plus 1 MiB of rows to sort per thread, never the
(Q, G) matrix: at MSMT17 scale (11,659 x 82,161) about 130 MB instead of 3.8 GB of distances plus 7.7 GB of argsort
indices.
Cost: the product plus, for random features (the worst case: positives anywhere in the list), the cheaper of a sort
of the row (2–3 ns per item and core with NumPy's AVX-512 sort on Intel, ~20 ns with its generic sort, e.g. on AMD
EPYC) and ~0.1 ns per item and positive (MSMT17: ~25 positives per query); much less when positives rank high.

Distances (``pairwise_distance``): ``"euclidean"`` is the **squared** Euclidean distance
``|q|^2 + |g|^2 - 2 q.g`` (same ranking as the Euclidean distance, no square root), ``"cosine"`` is
``1 - q.g / (|q| |g|)``; both come out of a single product of augmented features (no pass over the result).
Features of dtype float16/bfloat16/integer are computed in float32, float64 in float64. Chunk row counts default to
multiples of 64, which keeps each chunk's distances bitwise equal to the rows of the full product on MKL/OpenBLAS,
so the chunked evaluation reproduces ``evaluate_rank_reference`` on the full matrix exactly.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from reid_core.metrics import scan

logger = logging.getLogger(__name__)

DISTANCE_METRICS = ("euclidean", "cosine")

# One (rows, G) distance buffer holds at most this many elements (128 MiB in float32).
_CHUNK_ELEMENTS = 2**25
# Chunk row counts are multiples of this, so BLAS computes every chunk row exactly as in the full product.
_CHUNK_ROW_ALIGNMENT = 64


@dataclass(frozen=True)
class RankResult:
    """Retrieval metrics of one query set against one gallery.

    Attributes:
        cmc: (max_rank,) float64, ``cmc[k]`` = share of valid queries matched within the top ``k + 1``.
        mAP: mean average precision over valid queries, in [0, 1].
        mINP: mean inverse negative penalty over valid queries, in [0, 1].
        num_valid_queries: queries with at least one positive after junk removal.
        num_skipped_queries: queries without one (identity absent from the gallery or only under the same camera).
        average_precision: (Q,) float64, AP of each query, NaN for skipped queries.
        inverse_negative_penalty: (Q,) float64, INP of each query, NaN for skipped queries.
        first_match_rank: (Q,) int64, 1-based rank of each query's first correct match, 0 for skipped queries.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_skipped_queries: int
    average_precision: np.ndarray = field(repr=False)
    inverse_negative_penalty: np.ndarray = field(repr=False)
    first_match_rank: np.ndarray = field(repr=False)

    def summary(self, *, ranks: tuple[int, ...] = (1, 5, 10, 20)) -> dict[str, float]:
        """Flat metrics for logging: ``{"rank1": ..., "rank5": ..., "mAP": ..., "mINP": ...}`` (fractions)."""
        out = {f"rank{k}": float(self.cmc[k - 1]) for k in ranks if 1 <= k <= len(self.cmc)}
        out["mAP"] = self.mAP
        out["mINP"] = self.mINP
        out["num_valid_queries"] = float(self.num_valid_queries)
        out["num_skipped_queries"] = float(self.num_skipped_queries)
        return out


# --------------------------------------------------------------------------------------------------- validation


def as_feature_tensor(feats, *, name: str) -> torch.Tensor:
    """numpy/torch (N, D) real array -> CPU torch tensor, float32 (or float64 if given float64). Raises ValueError."""
    if isinstance(feats, torch.Tensor):
        t = feats.detach().cpu()
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(feats))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{name}: expected a numpy array or torch tensor of shape (N, D), got {type(feats)}"
            ) from err
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name}: expected real-valued features, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name}: expected shape (N, D), got {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: features have zero dimensions (shape {tuple(t.shape)})")
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous()
    with np.errstate(over="ignore", invalid="ignore"):  # fast path: a NaN or inf anywhere makes the sum non-finite
        if np.isfinite(t.numpy().sum()):  # (NumPy: one thread, no OpenMP barrier to wait at on a loaded machine)
            return t
    bad = ~torch.isfinite(t).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(f"{name}: {int(bad.sum())} rows contain NaN or infinite values (first rows: {rows})")
    return t


def _as_id_array(ids, *, name: str, length: int) -> np.ndarray:
    """numpy/torch/list of integer ids -> (length,) int64 numpy array. Raises ValueError."""
    a = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of ids, got shape {a.shape}")
    if a.shape[0] != length:
        raise ValueError(f"{name}: has {a.shape[0]} entries but the matching features/distances have {length} rows")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name}: expected integer ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def check_max_rank(max_rank: int) -> None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def check_metric(metric: str) -> None:
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"metric {metric!r} is not supported; valid metrics: {', '.join(DISTANCE_METRICS)}")


def default_chunk_rows(num_queries: int, num_gallery: int) -> int:
    rows = max(
        _CHUNK_ROW_ALIGNMENT, _CHUNK_ELEMENTS // max(num_gallery, 1) // _CHUNK_ROW_ALIGNMENT * _CHUNK_ROW_ALIGNMENT
    )
    return min(rows, num_queries)


def _check_chunk_size(chunk_size: int | None, num_queries: int, num_gallery: int) -> int:
    if chunk_size is None:
        return default_chunk_rows(num_queries, num_gallery)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of query rows or None, got {chunk_size!r}")
    return int(min(chunk_size, num_queries))


# ---------------------------------------------------------------------------------------------------- distances


@dataclass(frozen=True)
class PreparedFeatures:
    """Features augmented so that one matrix product yields the distances (no extra pass over the result).

    Euclidean: queries ``[q, |q|^2, 1]``, gallery ``[-2g, 1, |g|^2]`` -> ``|q|^2 + |g|^2 - 2 q.g``.
    Cosine: queries ``[q/|q|, 1]``, gallery ``[-g/|g|, 1]`` -> ``1 - cos(q, g)``. Scaling by -2 is exact.
    """

    augmented: torch.Tensor  # (N, D + 2) or (N, D + 1)
    sq_norms: torch.Tensor  # (N,) squared norms of the original features


def prepare_features(feats: torch.Tensor, *, metric: str, side: str) -> PreparedFeatures:
    """The augmented features of ``feats`` (a contiguous CPU float32/float64 tensor, see ``as_feature_tensor``).

    Computed with NumPy in the calling thread: a few passes over the features, far cheaper than torch's
    multi-threaded kernels here (each waits at an OpenMP barrier for its threads, which costs milliseconds when
    other processes load the machine). Deterministic: the same features always give the same bits.
    """
    f = feats.numpy()
    n, dim = f.shape
    sq = np.einsum("ij,ij->i", f, f)
    aug = np.empty((n, dim + (1 if metric == "cosine" else 2)), dtype=f.dtype)
    if metric == "cosine":
        norm = np.maximum(np.sqrt(sq), f.dtype.type(1e-12))  # as torch.nn.functional.normalize(eps=1e-12)
        np.divide(f, norm[:, None], out=aug[:, :dim])
        if side != "query":
            np.negative(aug[:, :dim], out=aug[:, :dim])
        aug[:, dim] = 1.0
    elif side == "query":
        aug[:, :dim] = f
        aug[:, dim] = sq
        aug[:, dim + 1] = 1.0
    else:
        np.multiply(f, f.dtype.type(-2.0), out=aug[:, :dim])
        aug[:, dim] = 1.0
        aug[:, dim + 1] = sq
    return PreparedFeatures(torch.from_numpy(aug), torch.from_numpy(sq))


def distance_block(
    q: PreparedFeatures, g: PreparedFeatures, start: int, stop: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(stop - start, G) distances between query rows [start, stop) and the whole gallery: one BLAS product.

    ``out``: a reused (>= stop - start, G) buffer; its first rows receive the result (saves page faults per chunk).
    """
    if out is None:
        return torch.mm(q.augmented[start:stop], g.augmented.T)
    return torch.mm(q.augmented[start:stop], g.augmented.T, out=out[: stop - start])


def check_distance_range(q: PreparedFeatures, g: PreparedFeatures, *, metric: str) -> None:
    """Reject features so large that their distances overflow (would otherwise give inf/NaN ranks)."""
    if metric != "euclidean":
        return
    bound = 4.0 * (float(q.sq_norms.max()) + float(g.sq_norms.max()))
    if not np.isfinite(bound) or bound > float(torch.finfo(q.augmented.dtype).max):
        raise ValueError(
            f"features are too large for {q.augmented.dtype} squared Euclidean distances (largest squared norms "
            f"{float(q.sq_norms.max()):.3g} / {float(g.sq_norms.max()):.3g}); rescale them or pass float64"
        )


def pairwise_distance(q_feats, g_feats, *, metric: str = "euclidean") -> torch.Tensor:
    """Full (Q, G) distance matrix, with exactly the arithmetic ``evaluate_rank`` uses chunk by chunk.

    Args:
        q_feats: (Q, D) query features, numpy or torch, any real dtype.
        g_feats: (G, D) gallery features.
        metric: ``"euclidean"`` (squared Euclidean distance) or ``"cosine"`` (1 - cosine similarity).

    Returns:
        (Q, G) CPU tensor, float32 (float64 if either input is float64). Needs Q*G*4 bytes: use it for small sets,
        for re-ranking tests and for the reference; ``evaluate_rank`` never builds it.
    """
    check_metric(metric)
    q_t, g_t = as_feature_tensor(q_feats, name="q_feats"), as_feature_tensor(g_feats, name="g_feats")
    q_t, g_t = common_dtype(q_t, g_t)
    if q_t.shape[1] != g_t.shape[1]:
        raise ValueError(f"q_feats has {q_t.shape[1]} dimensions but g_feats has {g_t.shape[1]}")
    qp, gp = prepare_features(q_t, metric=metric, side="query"), prepare_features(g_t, metric=metric, side="gallery")
    check_distance_range(qp, gp, metric=metric)
    return distance_block(qp, gp, 0, q_t.shape[0])


def common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype == b.dtype:
        return a, b
    return a.to(torch.float64), b.to(torch.float64)


# ---------------------------------------------------------------------------------------------- ranking by counting


@dataclass(frozen=True)
class _GalleryIndex:
    """Gallery ids grouped by person: ``order`` lists gallery indices sorted by (pid, index)."""

    pids: np.ndarray  # (G,) int64
    camids: np.ndarray  # (G,) int64
    order: np.ndarray  # (G,) int64
    pids_sorted: np.ndarray  # (G,) int64

    @classmethod
    def build(cls, pids: np.ndarray, camids: np.ndarray) -> _GalleryIndex:
        order = np.argsort(pids, kind="stable")
        return cls(pids=pids, camids=camids, order=order, pids_sorted=pids[order])

    def same_identity(self, q_pids: np.ndarray, q_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gallery items of each query's identity, in increasing gallery index.

        Returns:
            gidx: (b, M) int64 gallery indices (padding repeats a valid index), M = most items of one identity.
            positive: (b, M) bool, same id and another camera (the matches that count).
            junk: (b, M) bool, same id and same camera (removed from the query's list).
        """
        start = np.searchsorted(self.pids_sorted, q_pids, side="left")
        stop = np.searchsorted(self.pids_sorted, q_pids, side="right")
        counts = stop - start
        width = int(counts.max()) if counts.size else 0
        offsets = np.arange(width)
        member = offsets[None, :] < counts[:, None]
        gidx = self.order[np.minimum(start[:, None] + offsets[None, :], len(self.order) - 1)]
        same_cam = self.camids[gidx] == q_camids[:, None]
        return gidx, member & ~same_cam, member & same_cam


@dataclass(frozen=True)
class _QueryStatistics:
    """Per-query outcome of one chunk: (b,) arrays."""

    first_rank: np.ndarray  # int64, 0 when skipped
    ap: np.ndarray  # float64, NaN when skipped
    inp: np.ndarray  # float64, NaN when skipped


# Costs, in ns per gallery item and core, of the three exact ways to rank a row's positives. They only choose the
# fastest path for each row; every path gives the same, exact result. They differ several-fold between machines (on
# one AVX-512 core with NumPy's vectorised sort: sort 2.9, gather 0.9, share 1.0 + 2.9, count 0.26 with NumPy's
# passes; on the 2-core AMD VM of 2026-12: sort ~20 at 40k items, count 0.39 with NumPy's passes and 0.1 with the
# compiled ones), so ``None`` means "measured on this machine" (per-thread CPU
# time, once per process and gallery size; ``_measured_costs``); a number overrides the measurement (tests do).
_COST_SORT: float | None = None  # copy the row and sort all of it
_COST_GATHER: float | None = None  # gather the items at or below a positive (np.compress) ...
_COST_GATHER_SHARE: float | None = None  # ... plus, per share of the row gathered, moving and sorting them
_COST_COUNT: float | None = None  # count the items below one positive and those equal to it: two comparison passes
_CALIBRATION_REPEATS = 3


@functools.lru_cache(maxsize=16)
def _measured_costs(size_log2: int) -> tuple[float, float, float, float]:
    """(sort, gather, gather share, count) in ns per item, measured on a random float32 row of ``2**size_log2``
    items: the best of a few runs of each, in CPU time of the calling thread (other processes do not inflate it)."""
    n = 1 << size_log2
    row = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    middle, below_all = np.float32(0.0), np.float32(row.min() - 1)

    def per_item(fn) -> float:
        best = float("inf")
        for _ in range(_CALIBRATION_REPEATS):
            t0 = time.thread_time_ns()
            fn()
            best = min(best, time.thread_time_ns() - t0)
        return best / n

    sort = per_item(lambda: row.copy().sort())
    if scan.available():  # the compiled passes, per positive: 16 thresholds in one call, divided by 16
        many = np.full((1, 16), middle, dtype=row.dtype)
        out, index = np.zeros((1, 16), dtype=np.int64), np.zeros(1, dtype=np.int64)
        scan.count_between(row[None], index, index, many, index, index + 16, out, out.copy())  # compiles once
        count = per_item(lambda: scan.count_between(row[None], index, index, many, index, index + 16, out, out)) / 16
    else:
        count = per_item(lambda: (np.count_nonzero(row < middle), np.count_nonzero(row == middle)))
    gather = per_item(lambda: np.compress(row <= below_all, row))
    gather_half = per_item(lambda: np.compress(row <= middle, row).sort())  # gather and sort half the row
    costs = (sort, gather, 2.0 * max(gather_half - gather, 0.0), count)
    logger.debug("ranking path costs at %d items (ns per item): sort %.2f, gather %.2f + %.2f x share, count %.3f",
                 n, *costs)  # fmt: skip
    return costs


def _path_costs(num_gallery: int) -> tuple[float, float, float, float]:
    """(sort, gather, gather share, count): the module's overrides, else measured at about ``num_gallery`` items."""
    overrides = (_COST_SORT, _COST_GATHER, _COST_GATHER_SHARE, _COST_COUNT)
    if all(c is not None for c in overrides):
        return overrides
    measured = _measured_costs(min(max(int(num_gallery).bit_length(), 10), 17))
    return tuple(m if c is None else c for c, m in zip(overrides, measured, strict=True))


# Items per row in the strided sample that estimates how much of the row lies below each positive.
_SAMPLE_SIZE = 128
# Rows whose values are sorted whole are copied into a per-thread buffer and sorted this many items at a time.
_SORT_BLOCK_ELEMENTS = 2**18
# Tasks per thread and chunk: each ranks a block of the chunk's rows (several per thread balance the load).
_TASKS_PER_THREAD = 4

_thread_buffers = threading.local()


def _sort_buffer(rows: int, num_gallery: int, dtype: np.dtype) -> np.ndarray:
    """This thread's reused (rows, G) buffer, so that sorting a block of rows touches no fresh pages."""
    buf = getattr(_thread_buffers, "sort", None)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != num_gallery or buf.dtype != dtype:
        buf = _thread_buffers.sort = np.empty((rows, num_gallery), dtype=dtype)
    return buf[:rows]


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """(k, n) real values -> (k, n) int64 keys ordered like the values rounded to float32 within a row, and by row
    index across rows, so that one 1-D ``np.searchsorted`` searches every row at once. For estimates only: float64
    values are rounded."""
    x = values.astype(np.float32)
    x += np.float32(0.0)  # -0.0 -> +0.0: equal values get equal keys
    bits = x.view(np.int32).astype(np.int64)
    keys = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: the larger the magnitude, the smaller
    keys += np.arange(x.shape[0], dtype=np.int64)[:, None] << 32
    return keys


def _counting_plan(
    sample: np.ndarray, thresholds: np.ndarray, num_pos: np.ndarray, costs: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the fastest exact way to rank its positives, predicted from a strided sample of the row.

    Args:
        sample: (b, S) a strided sample of each row's distances (about ``_SAMPLE_SIZE`` of them).
        thresholds: (b, M) the positives' distances, increasing, +inf as padding.
        num_pos: (b,) positives per row.
        costs: ``_path_costs`` of the gallery size.

    Returns:
        sorted_count: (b,) positives to locate in sorted values (the rest are counted by comparison passes).
        whole_row: (b,) bool, sort the whole row rather than the items up to positive ``sorted_count - 1``.
    """
    sample = np.sort(sample, axis=1)
    b, size = sample.shape
    found = np.searchsorted(_sortable_keys(sample).ravel(), _sortable_keys(thresholds).ravel(), side="right")
    at_or_below = found.reshape(thresholds.shape) - np.arange(b)[:, None] * size
    share = at_or_below / size  # (b, M) estimated share of the row at or below each positive
    width = thresholds.shape[1]
    cost_sort, cost_gather, cost_share, cost_count = costs
    after = num_pos[:, None] - 1 - np.arange(width)[None, :]  # positives after a cut at c
    cut_cost = np.where(after >= 0, cost_gather + cost_share * share + cost_count * after, np.inf)
    cut = np.argmin(cut_cost, axis=1)
    best_cut = cut_cost[np.arange(len(cut)), cut]
    count_cost = cost_count * num_pos
    whole_row = cost_sort <= np.minimum(best_cut, count_cost)
    sorted_count = np.where(whole_row, num_pos, np.where(best_cut <= count_cost, cut + 1, 0))
    return sorted_count, whole_row


def _rank_rows(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    gallery: _GalleryIndex,
    costs: tuple[float, float, float, float],
    first_rank: np.ndarray,
    ap: np.ndarray,
    inp: np.ndarray,
) -> None:
    """First correct rank, AP and INP of each query row of ``dist`` (k, G), written into the (k,) outputs.

    Each positive's rank is the number of kept items before it, counted exactly in one of three ways chosen per row
    from a sample (whichever is predicted fastest; all give the same result): (1) sort the values of the whole row
    and binary-search each positive (random features: positives anywhere in the list); such rows are copied and
    sorted a block at a time; (2) gather only the items at or below some positive c, sort those, binary-search the
    positives up to c and count the items below each later positive with comparison passes (a trained model:
    positives near the top, maybe one or two far down); (3) comparison passes for every positive (very few
    positives). Junk below a positive is counted from the junk's own distances and subtracted; exact ties (another
    item at a positive's distance: the next sorted value equals it) are resolved by gallery index.
    """
    gidx, positive, junk = gallery.same_identity(q_pids, q_camids)
    num_pos = positive.sum(axis=1)
    rows = np.flatnonzero(num_pos)
    if rows.size == 0:
        return
    if rows.size < num_pos.size:
        gidx, positive, junk, num_pos = gidx[rows], positive[rows], junk[rows], num_pos[rows]
    num_gallery = dist.shape[1]
    width = int(num_pos.max())
    candidate_dist = dist[rows[:, None], gidx]

    # Positives' distances sorted by (distance, gallery index): gidx increases along each row and the sort is
    # stable, so equal distances keep gallery-index order. Non-positives become +inf and sort last (padding).
    thresholds = np.where(positive, candidate_dist, np.inf)
    perm = np.argsort(thresholds, axis=1, kind="stable")[:, :width]
    thresholds = np.take_along_axis(thresholds, perm, axis=1)
    pos_index = np.take_along_axis(gidx, perm, axis=1)
    num_junk = junk.sum(axis=1)
    junk_width = int(num_junk.max())
    junk_index = np.zeros((rows.size, 0), dtype=np.int64)
    junk_below = np.zeros(thresholds.shape, dtype=np.int64)
    if junk_width:
        first_junk = np.argsort(~junk, axis=1, kind="stable")[:, :junk_width]  # each row's junk, by gallery index
        junk_index = np.take_along_axis(gidx, first_junk, axis=1)
        junk_dist = np.where(
            np.take_along_axis(junk, first_junk, axis=1), np.take_along_axis(candidate_dist, first_junk, axis=1), np.inf
        )
        junk_below = np.count_nonzero(junk_dist[:, None, :] < thresholds[:, :, None], axis=2)

    sample = dist[:, :: max(1, num_gallery // _SAMPLE_SIZE)]
    sample = sample[rows] if rows.size < dist.shape[0] else sample
    sorted_count, whole_row = _counting_plan(sample, thresholds, num_pos, costs)
    below = np.zeros(thresholds.shape, dtype=np.int64)  # items, junk included, strictly below each positive
    tied = np.zeros(thresholds.shape, dtype=bool)  # another item at exactly the positive's distance

    whole = np.flatnonzero(whole_row)
    block = max(1, min(whole.size, _SORT_BLOCK_ELEMENTS // num_gallery))
    for start in range(0, whole.size, block):
        w = whole[start : start + block]
        values = _sort_buffer(w.size, num_gallery, dist.dtype)
        np.take(dist, rows[w], axis=0, out=values, mode="clip")
        values.sort(axis=1)  # NumPy's vectorised sort of values only (no indices); releases the GIL
        for i, r in enumerate(w):
            below[r] = values[i].searchsorted(thresholds[r])  # +inf padding: G
        found = below[w]
        next_value = np.take_along_axis(values, np.minimum(found + 1, num_gallery - 1), axis=1)
        tied[w] = (found + 1 < num_gallery) & (next_value == thresholds[w])

    at_or_below = np.zeros(thresholds.shape, dtype=np.int64)  # the same, at or below (rows not sorted whole)
    partial = np.flatnonzero(~whole_row)
    compiled = scan.available()
    for r in partial:
        row = dist[rows[r]]
        t = thresholds[r]
        cut = int(sorted_count[r])
        if cut:
            values = np.compress(row <= t[cut - 1], row)  # much faster than boolean-mask indexing
            values.sort()
            below[r, :cut] = values.searchsorted(t[:cut])
            at_or_below[r, :cut] = values.searchsorted(t[:cut], side="right")
        if not compiled:
            for j in range(cut, int(num_pos[r])):  # two comparison passes per positive beyond the cut
                below[r, j] = np.count_nonzero(row < t[j])
                at_or_below[r, j] = below[r, j] + np.count_nonzero(row == t[j])
    if compiled and partial.size:  # the same passes for every such row and positive, fused and compiled
        scan.count_between(dist, rows[partial], partial, thresholds, sorted_count[partial], num_pos[partial], below,
                           at_or_below)  # fmt: skip
    tied |= at_or_below - below > 1

    rank0 = below - junk_below  # kept items strictly below each positive
    many_ties = 2 * np.log2(max(num_gallery, 2))
    for r in np.flatnonzero(tied.any(axis=1)):
        row = dist[rows[r]]
        n = int(num_pos[r])
        junk_r = junk_index[r, : num_junk[r]]
        which = np.flatnonzero(tied[r])
        if which.size > many_ties:  # mostly ties (e.g. identical features): one stable argsort
            ordered = row.copy()
            ordered[junk_r] = np.inf
            position = np.empty(num_gallery, dtype=np.int64)
            position[np.argsort(ordered, kind="stable")] = np.arange(num_gallery)
            rank0[r, :n] = position[pos_index[r, :n]]
            continue
        junk_d = row[junk_r]
        for j in which:  # kept items at the positive's distance with a smaller gallery index come before it
            p, t = pos_index[r, j], thresholds[r, j]
            rank0[r, j] += np.count_nonzero(row[:p] == t) - np.count_nonzero((junk_r < p) & (junk_d == t))

    ranks = (rank0 + 1).astype(np.float64)  # 1-based ranks of the positives, increasing along each row
    j = np.arange(1, width + 1, dtype=np.float64)[None, :]
    is_pos = j <= num_pos[:, None]
    ap[rows] = np.where(is_pos, j / np.where(is_pos, ranks, 1.0), 0.0).sum(axis=1) / num_pos
    inp[rows] = num_pos / ranks[np.arange(rows.size), num_pos - 1]
    first_rank[rows] = rank0[:, 0] + 1


def _rank_chunk(
    dist: np.ndarray,
    q_pids: np.ndarray,
    q_camids: np.ndarray,
    gallery: _GalleryIndex,
    pool: ThreadPoolExecutor,
    num_threads: int,
) -> _QueryStatistics:
    """First correct rank, AP and INP of each query row of ``dist`` (b, G): blocks of rows are ranked by
    ``_rank_rows`` in the thread pool, each block wholly (ids, plan, ranks and statistics) in one task."""
    b = dist.shape[0]
    first_rank = np.zeros(b, dtype=np.int64)
    ap = np.full(b, np.nan)
    inp = np.full(b, np.nan)
    costs = _path_costs(dist.shape[1])  # measured here, once, rather than by several tasks at once
    bounds = np.linspace(0, b, min(b, _TASKS_PER_THREAD * num_threads) + 1).astype(np.int64)

    def rank_block(lo: int, hi: int) -> None:
        _rank_rows(
            dist[lo:hi], q_pids[lo:hi], q_camids[lo:hi], gallery, costs, first_rank[lo:hi], ap[lo:hi], inp[lo:hi]
        )

    list(pool.map(rank_block, bounds[:-1], bounds[1:]))
    return _QueryStatistics(first_rank, ap, inp)


def _summarise(stats: list[_QueryStatistics], *, max_rank: int, num_queries: int) -> RankResult:
    first_rank = np.concatenate([s.first_rank for s in stats]) if stats else np.zeros(0, dtype=np.int64)
    ap = np.concatenate([s.ap for s in stats]) if stats else np.zeros(0)
    inp = np.concatenate([s.inp for s in stats]) if stats else np.zeros(0)
    valid = first_rank > 0
    num_valid = int(valid.sum())
    num_skipped = num_queries - num_valid
    if num_valid == 0:
        raise ValueError(
            f"none of the {num_queries} queries has a correct match in the gallery after removing same-id "
            "same-camera items: check that query and gallery ids come from the same id space and that the gallery "
            "holds other cameras' images of the query identities"
        )
    if num_skipped:
        logger.warning(
            "%d of %d queries skipped: their identity has no gallery image from another camera",
            num_skipped,
            num_queries,
        )
    hits = np.bincount(np.minimum(first_rank[valid], max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hits) / num_valid
    return RankResult(
        cmc=cmc.astype(np.float64),
        mAP=float(ap[valid].mean()),
        mINP=float(inp[valid].mean()),
        num_valid_queries=num_valid,
        num_skipped_queries=num_skipped,
        average_precision=ap,
        inverse_negative_penalty=inp,
        first_match_rank=first_rank,
    )


def validate_ids(q_pids, g_pids, q_camids, g_camids, *, num_queries: int, num_gallery: int):
    if num_gallery == 0:
        raise ValueError("the gallery is empty: evaluation needs at least one gallery item")
    if num_queries == 0:
        raise ValueError("the query set is empty: evaluation needs at least one query")
    return (
        _as_id_array(q_pids, name="q_pids", length=num_queries),
        _as_id_array(g_pids, name="g_pids", length=num_gallery),
        _as_id_array(q_camids, name="q_camids", length=num_queries),
        _as_id_array(g_camids, name="g_camids", length=num_gallery),
    )


def evaluate_distance_chunks(
    distance_chunks,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    check_finite: bool = True,
) -> RankResult:
    """Rank metrics from an iterable of ``(start, stop, dist)`` query-row chunks covering [0, Q) in order.

    For producers of distances other than features (re-ranking): only one chunk is alive at a time. ``dist`` is a
    (stop - start, G) float32/float64 numpy array or CPU tensor; ``check_finite=False`` skips the NaN/inf scan for
    producers that guarantee finite values. Ids as in ``evaluate_rank``.
    """
    check_max_rank(max_rank)
    q_pids = _as_id_array(q_pids, name="q_pids", length=len(q_pids))
    q_camids = _as_id_array(q_camids, name="q_camids", length=len(q_pids))
    g_pids = _as_id_array(g_pids, name="g_pids", length=len(g_pids))
    g_camids = _as_id_array(g_camids, name="g_camids", length=len(g_pids))
    num_threads = max(1, torch.get_num_threads())
    gallery = _GalleryIndex.build(g_pids, g_camids)
    stats: list[_QueryStatistics] = []
    expected_start = 0
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        for start, stop, dist in distance_chunks:
            if start != expected_start:
                raise ValueError(f"distance chunks must cover the queries in order: got rows {start}:{stop}")
            d = dist.numpy() if isinstance(dist, torch.Tensor) else np.asarray(dist)
            if d.shape != (stop - start, len(g_pids)):
                raise ValueError(
                    f"distance chunk {start}:{stop} has shape {d.shape}, expected {(stop - start, len(g_pids))}"
                )
            if check_finite and not np.isfinite(d).all():
                raise ValueError(f"distances of query rows {start}:{stop} contain NaN or infinite values")
            stats.append(_rank_chunk(d, q_pids[start:stop], q_camids[start:stop], gallery, pool, num_threads))
            logger.debug("ranked query rows %d:%d of %d", start, stop, len(q_pids))
            expected_start = stop
    if expected_start != len(q_pids):
        raise ValueError(f"distance chunks covered {expected_start} query rows, expected {len(q_pids)}")
    return _summarise(stats, max_rank=max_rank, num_queries=len(q_pids))


def evaluate_rank(
    q_feats,
    g_feats,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> RankResult:
    """CMC, mAP and mINP of query features against gallery features, exact and memory-bounded.

    Args:
        q_feats: (Q, D) query features, numpy or torch (any real dtype; float16 is computed in float32).
        g_feats: (G, D) gallery features.
        q_pids, g_pids: (Q,), (G,) integer person ids.
        q_camids, g_camids: (Q,), (G,) integer camera ids.
        max_rank: length of the returned CMC curve.
        metric: ``"euclidean"`` (squared Euclidean) or ``"cosine"``; see ``pairwise_distance``.
        chunk_size: query rows per chunk; ``None`` picks a multiple of 64 keeping the (rows, G) distance buffer at
            128 MiB or less. Peak extra memory: that buffer, a copy of the features with 1-2 extra columns, and one
            row per thread.
        device: where the distances are computed (``evaluation_device``: None picks CUDA when present, else the
            CPU). The ranking runs on the CPU; the next chunk's distances are computed while this one is ranked.

    Returns:
        RankResult (see the module docstring for the protocol, ties and skipped queries).

    Uses ``torch.get_num_threads()`` threads, for the BLAS product and for ranking the rows.

    Raises:
        ValueError: mismatched lengths or dimensions, NaN/inf features, empty query set or gallery, unknown metric,
            or no query with a correct match at all.
    """
    check_metric(metric)
    check_max_rank(max_rank)
    q_t, g_t = as_feature_tensor(q_feats, name="q_feats"), as_feature_tensor(g_feats, name="g_feats")
    q_ids = validate_ids(q_pids, g_pids, q_camids, g_camids, num_queries=q_t.shape[0], num_gallery=g_t.shape[0])
    if q_t.shape[1] != g_t.shape[1]:
        raise ValueError(f"q_feats has {q_t.shape[1]} dimensions but g_feats has {g_t.shape[1]}")
    q_t, g_t = common_dtype(q_t, g_t)
    qp, gp = prepare_features(q_t, metric=metric, side="query"), prepare_features(g_t, metric=metric, side="gallery")
    check_distance_range(qp, gp, metric=metric)
    rows = _check_chunk_size(chunk_size, q_t.shape[0], g_t.shape[0])
    dev = evaluation_device(device)
    chunks = _overlapped_distance_chunks(qp, gp, rows, dev)
    return evaluate_distance_chunks(chunks, *q_ids, max_rank=max_rank, check_finite=False)


def evaluation_device(device: torch.device | str | None = None) -> torch.device:
    """The device ``evaluate_rank`` computes distances on: ``device``, or CUDA when present and the CPU otherwise.

    Raises:
        ValueError: a CUDA device was asked for but torch sees none (one line, before any work).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"evaluation device {str(device)!r}: torch sees no CUDA device here; use 'cpu' or None")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"evaluation device {str(device)!r}: expected 'cpu', 'cuda[:N]' or None")
    return dev


def _overlapped_distance_chunks(qp: PreparedFeatures, gp: PreparedFeatures, rows: int, device: torch.device):
    """``(start, stop, dist)`` chunks of the (Q, G) distances as CPU tensors; chunk k + 1 is computed (on
    ``device``, in a background thread) while the caller ranks chunk k, into the other of two reused CPU buffers
    (pinned memory on CUDA, filled by a non-blocking copy); a single chunk is computed in the calling thread.
    Numbers are those of ``distance_block`` on ``device``."""
    num_queries, num_gallery = qp.augmented.shape[0], gp.augmented.shape[0]
    on_gpu = device.type == "cuda"
    bounds = [(start, min(start + rows, num_queries)) for start in range(0, num_queries, rows)]
    buffers = [
        torch.empty((rows, num_gallery), dtype=qp.augmented.dtype, pin_memory=on_gpu)
        for _ in range(min(2, len(bounds)))
    ]
    if on_gpu:
        qp = PreparedFeatures(qp.augmented.to(device), qp.sq_norms)
        gp = PreparedFeatures(gp.augmented.to(device), gp.sq_norms)

    def compute(k: int, start: int, stop: int) -> torch.Tensor:
        out = buffers[k % 2][: stop - start]
        if on_gpu:
            out.copy_(distance_block(qp, gp, start, stop), non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            return out
        return distance_block(qp, gp, start, stop, out=buffers[k % 2])

    if len(bounds) == 1:  # nothing to overlap: no producer thread (its OpenMP team costs ~5 ms to start and end)
        yield 0, num_queries, compute(0, 0, num_queries)
        return
    with ThreadPoolExecutor(max_workers=1) as producer:
        pending = producer.submit(compute, 0, *bounds[0])
        for k, (start, stop) in enumerate(bounds):
            dist = pending.result()
            if k + 1 < len(bounds):  # the buffer of chunk k - 1, which the caller has finished ranking
                pending = producer.submit(compute, k + 1, *bounds[k + 1])
            yield start, stop, dist


def evaluate_distmat(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    *,
    max_rank: int = 50,
    chunk_size: int | None = None,
) -> RankResult:
    """CMC, mAP and mINP from a precomputed (Q, G) distance matrix (smaller = more similar).

    Args:
        distmat: (Q, G) numpy array or torch tensor of finite distances (float16 is widened to float32 exactly).
        q_pids, g_pids, q_camids, g_camids: as in ``evaluate_rank``.
        max_rank: length of the returned CMC curve.
        chunk_size: query rows processed at a time (``None``: about 128 MiB per buffer).

    Raises:
        ValueError: wrong shape, mismatched lengths, NaN/inf distances, empty query set or gallery.
    """
    check_max_rank(max_rank)
    if isinstance(distmat, torch.Tensor):
        dm = distmat.detach().cpu()
    else:
        dm = torch.from_numpy(np.asarray(distmat))
    if dm.ndim != 2:
        raise ValueError(f"distmat: expected shape (Q, G), got {tuple(dm.shape)}")
    if dm.dtype == torch.bool or dm.is_complex():
        raise ValueError(f"distmat: expected real distances, got dtype {dm.dtype}")
    q_ids = validate_ids(q_pids, g_pids, q_camids, g_camids, num_queries=dm.shape[0], num_gallery=dm.shape[1])
    dtype = torch.float64 if dm.dtype == torch.float64 else torch.float32
    rows = _check_chunk_size(chunk_size, dm.shape[0], dm.shape[1])

    def chunks():
        for start in range(0, dm.shape[0], rows):
            stop = min(start + rows, dm.shape[0])
            yield start, stop, dm[start:stop].to(dtype).contiguous()

    return evaluate_distance_chunks(chunks(), *q_ids, max_rank=max_rank)


# ------------------------------------------------------------------------------------------------ slow reference


def evaluate_rank_reference(distmat, q_pids, g_pids, q_camids, g_camids, *, max_rank: int = 50) -> RankResult:
    """The slow, obviously correct reference: full distances, a stable argsort of every row, a loop over queries.

    For tests and benchmarks only (it holds the (Q, G) argsort: Q*G*8 bytes). Same protocol and outputs as
    ``evaluate_distmat``, written the way torchreid's ``eval_market1501`` is, with a stable sort for ties.
    """
    dm = distmat.detach().cpu().numpy() if isinstance(distmat, torch.Tensor) else np.asarray(distmat)
    if dm.ndim != 2:
        raise ValueError(f"distmat: expected shape (Q, G), got {dm.shape}")
    q_pids, g_pids, q_camids, g_camids = validate_ids(
        q_pids, g_pids, q_camids, g_camids, num_queries=dm.shape[0], num_gallery=dm.shape[1]
    )
    num_q = dm.shape[0]
    check_max_rank(max_rank)
    indices = np.argsort(dm, axis=1, kind="stable")
    first_rank = np.zeros(num_q, dtype=np.int64)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    all_cmc = []
    for qi in range(num_q):
        order = indices[qi]
        remove = (g_pids[order] == q_pids[qi]) & (g_camids[order] == q_camids[qi])
        raw_cmc = (g_pids[order][~remove] == q_pids[qi]).astype(np.int64)
        if not raw_cmc.any():
            continue
        cum = raw_cmc.cumsum()
        cmc = np.minimum(cum, 1).astype(np.float64)
        cmc = np.concatenate([cmc, np.ones(max(0, max_rank - len(cmc)))])  # list shorter than max_rank: stays 1
        all_cmc.append(cmc[:max_rank])
        positions = np.flatnonzero(raw_cmc)
        first_rank[qi] = positions[0] + 1
        precision = cum / np.arange(1, len(cum) + 1)
        ap[qi] = (precision * raw_cmc).sum() / raw_cmc.sum()
        inp[qi] = cum[positions[-1]] / (positions[-1] + 1)
    num_valid = len(all_cmc)
    if num_valid == 0:
        raise ValueError(f"none of the {num_q} queries has a correct match in the gallery")
    valid = first_rank > 0
    return RankResult(
        cmc=np.mean(all_cmc, axis=0),
        mAP=float(np.mean(ap[valid])),
        mINP=float(np.mean(inp[valid])),
        num_valid_queries=num_valid,
        num_skipped_queries=num_q - num_valid,
        average_precision=ap,
        inverse_negative_penalty=inp,
        first_match_rank=first_rank,
    )
