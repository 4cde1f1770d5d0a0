"""Benchmark of the re-ID evaluation (issue 6, item 8): speed, exactness and memory of ``evaluate_rank``.

(a) ``evaluate_rank`` against the slow reference (full distance matrix, stable argsort of every row, loop over
    queries) on 4,000 x 40,000 x 256-d. Both get their distances from the same torch matrix product, so the
    difference is the ranking. Targets: >= 5x faster, identical numbers, <= 2x the bare matrix product.
(b) MSMT17 scale, 11,659 x 82,161 x 512-d random features: time, peak resident memory above the features
    (target <= 2 GiB) and the ratio to the bare query x gallery matrix product (target <= 1.5x).
(c) The same with k-reciprocal re-ranking: time, peak memory (target <= 2 GiB) and the ratio to the N x N product
    over queries + gallery (N = 93,820), measured, not extrapolated.

Every time is the median of ROUNDS interleaved rounds; in each round the baseline (the bare product, and in (a) the
reference) is timed the same way as the code measured. Verdicts are computed by the bench (bench/_results.py), which
writes its figures to bench/results.json.

The bare product is ``torch.mm(q_chunk, g.T, out=buffer)`` over the same query chunks evaluate_rank uses (no
allocation, no page faults): the physical floor of any exact evaluation, and the denominator of the targets. The
one-call ``torch.mm(q, g.T)`` of the whole matrix (what the naive evaluations start with; it allocates Q*G*4 bytes)
is printed too. Each section runs in its own process so that one section's freed memory cannot hide another's peak.
The machine's load average is printed at the start and end of each section: other processes make every time noisy.
``--quick`` is a smoke test: (a) keeps its size but times the reference in the first round only; at the small sizes
of (b) and (c) fixed per-row costs dominate and their ratios say little.

Two kinds of features: ``random`` (i.i.d. Gaussian, as the issue asks; near-zero mAP) is the worst case for the
ranking, since a query's positives are anywhere in its list and whole rows have to be sorted; ``identity`` (a
Gaussian centre per identity plus Gaussian noise: mAP ~0.25, rank-1 ~0.7 like a trained MSMT17 model, though with a
lower mINP ~0.01, i.e. some positive far down most lists) is closer to real use.

    .venv/bin/python bench/eval_speed.py [--quick] [--skip-rerank]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_core.metrics.rank import (  # noqa: E402
    default_chunk_rows,
    evaluate_rank,
    evaluate_rank_reference,
    pairwise_distance,
)
from reid_core.metrics.reranking import evaluate_rank_reranked  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import Report, median_of_rounds, read_results  # noqa: E402

GIB = 2**30
ROUNDS = 3  # interleaved rounds (5 with --quick): baseline and measured code once each per round; medians reported


@dataclass(frozen=True)
class Sizes:
    queries: int
    gallery: int
    dim: int
    identities: int
    cameras: int


FULL = {
    "a": Sizes(4000, 40000, 256, 1500, 6),
    "b": Sizes(11659, 82161, 512, 3060, 15),
    "c": Sizes(11659, 82161, 512, 3060, 15),
}
QUICK = {
    "a": FULL["a"],  # the size: at 1,000 x 10,000 x 128 the product takes ~20 ms and fixed costs decide
    "b": Sizes(2000, 20000, 256, 700, 15),
    "c": Sizes(1000, 8000, 256, 300, 15),
}


def make_data(s: Sizes, *, kind: str = "random", seed: int = 0):
    """Float32 features (Q, D), (G, D) and (q_pids, g_pids, q_camids, g_camids)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ids = (
        rng.integers(0, s.identities, s.queries),
        rng.integers(0, s.identities, s.gallery),
        rng.integers(0, s.cameras, s.queries),
        rng.integers(0, s.cameras, s.gallery),
    )
    q = torch.randn(s.queries, s.dim, generator=gen)
    g = torch.randn(s.gallery, s.dim, generator=gen)
    if kind == "identity":
        centres = torch.randn(s.identities, s.dim, generator=gen)
        noise = 2.0 * (s.dim / 256) ** 0.25  # same separation at every dimension
        q = centres[torch.from_numpy(ids[0])] + noise * q
        g = centres[torch.from_numpy(ids[1])] + noise * g
    return q, g, ids


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory of this process during a block, above the resident memory at its start.

    Uses the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) when allowed, and a 2 ms
    sampling thread otherwise; reports the larger of the two.
    """

    def __enter__(self):
        gc.collect()
        self.hwm_reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            pass
        self.start = rss_bytes()
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = self.sampled
        if self.hwm_reset:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        self.extra = peak - self.start


def bare_product_seconds(q: torch.Tensor, g: torch.Tensor, rows: int) -> float:
    """The query x gallery product alone, chunk by chunk into one reused buffer."""
    buf = torch.empty(rows, g.shape[0], dtype=q.dtype)
    gt = g.T
    t0 = time.perf_counter()
    for start in range(0, q.shape[0], rows):
        stop = min(start + rows, q.shape[0])
        torch.mm(q[start:stop], gt, out=buf[: stop - start])
    return time.perf_counter() - t0


def full_product_seconds(q: torch.Tensor, g: torch.Tensor) -> float:
    """The whole (Q, G) product in one call, as the naive evaluations do (allocates and touches Q*G*4 bytes)."""
    t0 = time.perf_counter()
    out = torch.mm(q, g.T)
    seconds = time.perf_counter() - t0
    del out
    return seconds


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_cpu(fn):
    """(wall s, CPU s of this process (all its threads), result). On a shared machine the wall time grows with the
    other processes' load; the CPU time mostly does not, so the ratio of CPU times is the steadier figure."""
    c0 = time.process_time()
    t, out = timed(fn)
    return t, time.process_time() - c0, out


def median(values: list[float]) -> float:
    return median_of_rounds(values)


def section_a(s: Sizes, report: Report, *, reference_rounds: int | None = None) -> None:
    """``reference_rounds``: rounds that also time the reference (all by default; ``--quick``: the first only, as
    it takes ~20x the evaluation and its target, >= 5x, is not close)."""
    reference_rounds = ROUNDS if reference_rounds is None else reference_rounds
    print(
        f"(a) evaluate_rank vs the reference: {s.queries} q x {s.gallery} g x {s.dim}-d, {torch.get_num_threads()} threads"
    )
    for kind in ("random", "identity"):
        q, g, ids = make_data(s, kind=kind)
        rows = default_chunk_rows(s.queries, s.gallery)
        mm_times, fast_times, mm_cpu, fast_cpu, ref_times, dist_times = [], [], [], [], [], []
        for round_ in range(ROUNDS):  # interleaved: a load change from other processes hits all three alike
            _, c, t = timed_cpu(lambda q=q, g=g, rows=rows: bare_product_seconds(q, g, rows))
            mm_times.append(t)
            mm_cpu.append(c)
            t, c, fast = timed_cpu(lambda q=q, g=g, ids=ids: evaluate_rank(q, g, *ids))
            fast_times.append(t)
            fast_cpu.append(c)
            if round_ >= reference_rounds:
                continue
            t0 = time.perf_counter()
            distmat = pairwise_distance(q, g)
            dist_times.append(time.perf_counter() - t0)
            ref = evaluate_rank_reference(distmat, *ids)
            ref_times.append(time.perf_counter() - t0)
            del distmat
        t_full = full_product_seconds(q, g)
        t_mm, t_fast, t_ref, t_dist = median(mm_times), median(fast_times), median(ref_times), median(dist_times)
        differing = int(np.count_nonzero(fast.cmc != ref.cmc))
        differing += int(np.count_nonzero(fast.first_match_rank != ref.first_match_rank))
        for got, want in ((fast.average_precision, ref.average_precision),
                          (fast.inverse_negative_penalty, ref.inverse_negative_penalty)):  # fmt: skip
            both_nan = np.isnan(got) & np.isnan(want)
            differing += int(np.count_nonzero(~both_nan & ~(np.abs(got - want) < 1e-12)))
        print(f"  [{kind} features: mAP {fast.mAP:.4f}, rank-1 {fast.cmc[0]:.4f}, mINP {fast.mINP:.4f}]")
        print(f"  bare matrix product (chunks of {rows} rows)  {t_mm:8.2f} s   median of runs {_runs(mm_times)}")
        print(
            f"  reference (distances {t_dist:.2f} s + argsort/loop)  {t_ref:8.2f} s   median of runs {_runs(ref_times)}"
        )
        print(f"  evaluate_rank                               {t_fast:8.2f} s   median of runs {_runs(fast_times)}")
        print(f"  (one-call full product {t_full:.2f} s: evaluate_rank / it = {t_fast / t_full:.2f} x)")
        size = f"{s.queries}×{s.gallery}×{s.dim}-d, {kind} features"
        report.figure(f"(a) evaluate_rank speed-up over the full-argsort reference, {size}", t_ref / t_fast, "x",
                      target=(">=", 5))  # fmt: skip
        report.figure(f"(a) CMC / first-match / AP / INP entries that differ from the reference, {size}", differing, "",
                      target=("<=", 0))  # fmt: skip
        report.figure(f"(a) evaluate_rank / bare query×gallery product, wall clock, {size}", t_fast / t_mm, "x",
                      target=("<=", 2))  # fmt: skip
        report.figure(f"(a) evaluate_rank / bare query×gallery product, CPU time, {size}",
                      median(fast_cpu) / median(mm_cpu), "x", target=("<=", 2))  # fmt: skip


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def section_b(s: Sizes, report: Report) -> None:
    feat_gib = (s.queries + s.gallery) * s.dim * 4 / GIB
    print(
        f"(b) MSMT17 scale: {s.queries} q x {s.gallery} g x {s.dim}-d ({feat_gib:.2f} GiB of features), {torch.get_num_threads()} threads"
    )
    for kind in ("random", "identity"):
        q, g, ids = make_data(s, kind=kind)
        rows = default_chunk_rows(s.queries, s.gallery)
        with PeakMemory() as mem:
            t_eval, c_eval, res = timed_cpu(lambda q=q, g=g, ids=ids: evaluate_rank(q, g, *ids))
        _, c_mm, t_mm = timed_cpu(lambda q=q, g=g, rows=rows: bare_product_seconds(q, g, rows))
        mm_times, eval_times, mm_cpu, eval_cpu = [t_mm], [t_eval], [c_mm], [c_eval]
        for _ in range(ROUNDS - 1):  # interleaved: a load change from other processes hits both alike
            t, c, _ = timed_cpu(lambda q=q, g=g, ids=ids: evaluate_rank(q, g, *ids))
            eval_times.append(t)
            eval_cpu.append(c)
            _, c, t = timed_cpu(lambda q=q, g=g, rows=rows: bare_product_seconds(q, g, rows))
            mm_times.append(t)
            mm_cpu.append(c)
        t_eval, t_mm = median(eval_times), median(mm_times)
        t_full = full_product_seconds(q, g)
        print(
            f"  [{kind} features: mAP {res.mAP:.4f}, rank-1 {res.cmc[0]:.4f}, mINP {res.mINP:.4f}, {res.num_valid_queries} valid / {res.num_skipped_queries} skipped queries]"
        )
        print(f"  bare matrix product (chunks of {rows} rows)  {t_mm:8.2f} s   median of runs {_runs(mm_times)}")
        print(f"  evaluate_rank                               {t_eval:8.2f} s   median of runs {_runs(eval_times)}")
        print(f"  (one-call full product {t_full:.2f} s: evaluate_rank / it = {t_eval / t_full:.2f} x; "
              f"the dense distance matrix alone: {s.queries * s.gallery * 4 / GIB:.1f} GiB)")  # fmt: skip
        size = f"{s.queries}×{s.gallery}×{s.dim}-d, {kind} features"
        report.figure(f"(b) evaluate_rank / bare query×gallery product, wall clock, {size}", t_eval / t_mm, "x",
                      target=("<=", 1.5))  # fmt: skip
        report.figure(f"(b) evaluate_rank / bare query×gallery product, CPU time, {size}",
                      median(eval_cpu) / median(mm_cpu), "x", target=("<=", 1.5))  # fmt: skip
        report.figure(f"(b) evaluate_rank peak resident memory above the features, {size}", mem.extra / GIB, "GiB",
                      target=("<=", 2))  # fmt: skip
        del q, g


def square_product_seconds(x: torch.Tensor, rows: int) -> float:
    """The N x N product of all features (queries and gallery) with themselves, chunked like the bare product:
    what k-reciprocal re-ranking cannot do without (its neighbour lists cover queries and gallery alike)."""
    return bare_product_seconds(x, x, rows)


def section_c(s: Sizes, report: Report) -> None:
    n = s.queries + s.gallery
    print(f"(c) k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3): {s.queries} q x {s.gallery} g x {s.dim}-d, N = {n}")
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    logging.getLogger("reid_core.metrics.reranking").setLevel(logging.INFO)  # prints the sparse encodings' sizes
    q, g, ids = make_data(s, kind="random")
    everything = torch.cat([q, g])
    rows = default_chunk_rows(n, n)
    square_times, plain_times, rr_times = [], [], []
    for round_ in range(ROUNDS):  # interleaved: a load change from other processes hits all three alike
        square_times.append(square_product_seconds(everything, rows))
        t, plain = timed(lambda: evaluate_rank(q, g, *ids))
        plain_times.append(t)
        if round_ == 0:
            with PeakMemory() as mem:
                t, rr = timed(lambda: evaluate_rank_reranked(q, g, *ids, k1=20, k2=6, lambda_value=0.3))
            logging.getLogger("reid_core.metrics.reranking").setLevel(logging.WARNING)  # once is enough
        else:
            t, rr = timed(lambda: evaluate_rank_reranked(q, g, *ids, k1=20, k2=6, lambda_value=0.3))
        rr_times.append(t)
    t_square, t_plain, t_rr = median(square_times), median(plain_times), median(rr_times)
    print(
        f"  [random features] N x N product (chunks of {rows} rows) {t_square:8.2f} s   median of runs {_runs(square_times)}"
    )
    print(
        f"  evaluate_rank (no re-ranking)               {t_plain:8.2f} s   mAP {plain.mAP:.4f}   runs {_runs(plain_times)}"
    )
    print(f"  evaluate_rank_reranked                      {t_rr:8.2f} s   mAP {rr.mAP:.4f}   runs {_runs(rr_times)}")
    print(f"  (one dense N x N float32 matrix: {n * n * 4 / GIB:.1f} GiB)")
    size = f"N = {n} ({s.queries}+{s.gallery}), {s.dim}-d"
    report.figure(f"(c) evaluate_rank_reranked, {size}", t_rr, "s")
    report.figure(f"(c) evaluate_rank_reranked / the measured N×N product, {size}", t_rr / t_square, "x")
    report.figure(f"(c) evaluate_rank_reranked peak resident memory above the features, {size}", mem.extra / GIB,
                  "GiB", target=("<=", 2))  # fmt: skip


SECTIONS = {"a": section_a, "b": section_b, "c": section_c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--skip-rerank", action="store_true", help="skip section (c)")
    parser.add_argument("--section", choices=sorted(SECTIONS), help="run one section in this process")
    parser.add_argument("--figures-to", type=Path, help=argparse.SUPPRESS)  # a section's figures, for the parent
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.quick:
        global ROUNDS
        ROUNDS = 5  # small sizes: more rounds are cheap, and each time is short and noisier
    if args.section:
        report = Report(f"section ({args.section})", quick=args.quick, path=args.figures_to)
        kwargs = {"reference_rounds": 1} if args.quick and args.section == "a" else {}
        SECTIONS[args.section](sizes[args.section], report, **kwargs)
        report.write()
        return
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, quick={args.quick}", flush=True)
    report = Report("bench/eval_speed.py", quick=args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        for name in SECTIONS:
            if name == "c" and args.skip_rerank:
                continue
            out = Path(tmp, f"{name}.json")
            cmd = [sys.executable, __file__, "--section", name, "--figures-to", str(out)]
            subprocess.run(cmd + (["--quick"] if args.quick else []), check=True)
            report.extend(read_results(out)[f"section ({name})"]["figures"])
            print(flush=True)
    report.write()


if __name__ == "__main__":
    main()
