"""Benchmark of the re-ID evaluation (issue 6, item 8): speed, exactness and memory of ``evaluate_rank``.

(a) ``evaluate_rank`` against the slow reference (full distance matrix, stable argsort of every row, loop over
    queries) on 4,000 x 40,000 x 256-d. Both get their distances from the same torch matrix product, so the
    difference is the ranking. Targets: >= 5x faster, identical numbers, <= 2x the bare matrix product.
(b) MSMT17 scale, 11,659 x 82,161 x 512-d random features: time, peak resident memory above the features
    (target <= 2 GiB) and the ratio to the bare query x gallery matrix product (target <= 1.5x).
(c) The same with k-reciprocal re-ranking (its floor is the N x N product over queries + gallery, N = 93,820).

The bare product is ``torch.mm(q_chunk, g.T, out=buffer)`` over the same query chunks evaluate_rank uses (no
allocation, no page faults): the physical floor of any exact evaluation, and the denominator of the targets. The
one-call ``torch.mm(q, g.T)`` of the whole matrix (what the naive evaluations start with; it allocates Q*G*4 bytes)
is printed too. Each section runs in its own process so that one section's freed memory cannot hide another's peak.
The machine's load average is printed around each section: other processes sharing the CPU make every time noisy.
``--quick`` is a smoke test: at its small sizes fixed per-row costs dominate and its ratios say little.

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

GIB = 2**30
ROUNDS = 3  # timed runs of evaluate_rank and of the bare product, interleaved; the best of each is reported


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
    "a": Sizes(1000, 10000, 128, 400, 6),
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


def cpu_ratio_line(eval_cpu: list[float], mm_cpu: list[float], target: float) -> str:
    ratio = min(eval_cpu) / min(mm_cpu)
    return (f"  the same in CPU time of this process        {ratio:8.2f} x   target <= {target:g}x   {verdict(ratio <= target)}"
            f"   (best CPU s: product {min(mm_cpu):.2f}, evaluate_rank {min(eval_cpu):.2f})")  # fmt: skip


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def section_a(s: Sizes) -> None:
    print(
        f"(a) evaluate_rank vs the reference: {s.queries} q x {s.gallery} g x {s.dim}-d, {torch.get_num_threads()} threads"
    )
    for kind in ("random", "identity"):
        q, g, ids = make_data(s, kind=kind)
        rows = default_chunk_rows(s.queries, s.gallery)
        mm_times, fast_times, mm_cpu, fast_cpu = [], [], [], []
        for _ in range(ROUNDS):  # interleaved, best of ROUNDS: other processes share the CPU
            _, c, t = timed_cpu(lambda q=q, g=g, rows=rows: bare_product_seconds(q, g, rows))
            mm_times.append(t)
            mm_cpu.append(c)
            t, c, fast = timed_cpu(lambda q=q, g=g, ids=ids: evaluate_rank(q, g, *ids))
            fast_times.append(t)
            fast_cpu.append(c)
        t_full = full_product_seconds(q, g)
        t0 = time.perf_counter()
        distmat = pairwise_distance(q, g)
        t_dist = time.perf_counter() - t0
        ref = evaluate_rank_reference(distmat, *ids)
        t_rank = time.perf_counter() - t0 - t_dist
        del distmat
        t_ref = t_dist + t_rank
        t_mm, t_fast = min(mm_times), min(fast_times)
        cmc_diff = float(np.abs(fast.cmc - ref.cmc).max())
        ranks_equal = bool(np.array_equal(fast.first_match_rank, ref.first_match_rank))
        ap_diff = float(np.nanmax(np.abs(fast.average_precision - ref.average_precision)))
        inp_diff = float(np.nanmax(np.abs(fast.inverse_negative_penalty - ref.inverse_negative_penalty)))
        identical = cmc_diff == 0.0 and ranks_equal and ap_diff < 1e-12 and inp_diff < 1e-12
        print(f"  [{kind} features: mAP {fast.mAP:.4f}, rank-1 {fast.cmc[0]:.4f}, mINP {fast.mINP:.4f}]")
        print(f"  bare matrix product (chunks of {rows} rows)  {t_mm:8.2f} s   runs {_runs(mm_times)}")
        print(f"  reference: distances {t_dist:.2f} s + argsort/loop {t_rank:.2f} s  {t_ref:8.2f} s")
        print(f"  evaluate_rank                               {t_fast:8.2f} s   runs {_runs(fast_times)}")
        speedup, ratio = t_ref / t_fast, t_fast / t_mm
        print(
            f"  speed-up over the reference                 {speedup:8.1f} x   target >= 5x   {verdict(speedup >= 5)}"
        )
        print(f"  evaluate_rank / bare product                {ratio:8.2f} x   target <= 2x   {verdict(ratio <= 2)}")
        print(cpu_ratio_line(fast_cpu, mm_cpu, 2))
        print(f"  (one-call full product {t_full:.2f} s: evaluate_rank / it = {t_fast / t_full:.2f} x)")
        print(
            f"  numbers vs reference: |mAP diff| {abs(fast.mAP - ref.mAP):.1e}, |mINP diff| {abs(fast.mINP - ref.mINP):.1e},"
            f" CMC max |diff| {cmc_diff:.1e}, per-query AP / INP max |diff| {ap_diff:.1e} / {inp_diff:.1e},"
            f" first-match ranks equal: {ranks_equal}   identical: {verdict(identical)}"
        )


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.2f}" for t in times)


def section_b(s: Sizes) -> None:
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
        for _ in range(ROUNDS - 1):  # interleaved, best of ROUNDS: other processes share the CPU
            t, c, _ = timed_cpu(lambda q=q, g=g, ids=ids: evaluate_rank(q, g, *ids))
            eval_times.append(t)
            eval_cpu.append(c)
            _, c, t = timed_cpu(lambda q=q, g=g, rows=rows: bare_product_seconds(q, g, rows))
            mm_times.append(t)
            mm_cpu.append(c)
        t_eval, t_mm = min(eval_times), min(mm_times)
        ratio = t_eval / t_mm
        t_full = full_product_seconds(q, g)
        print(
            f"  [{kind} features: mAP {res.mAP:.4f}, rank-1 {res.cmc[0]:.4f}, mINP {res.mINP:.4f}, {res.num_valid_queries} valid / {res.num_skipped_queries} skipped queries]"
        )
        print(f"  bare matrix product (chunks of {rows} rows)  {t_mm:8.2f} s   runs {_runs(mm_times)}")
        print(f"  evaluate_rank                               {t_eval:8.2f} s   runs {_runs(eval_times)}")
        print(
            f"  evaluate_rank / bare product                {ratio:8.2f} x   target <= 1.5x   {verdict(ratio <= 1.5)}"
        )
        print(cpu_ratio_line(eval_cpu, mm_cpu, 1.5))
        print(f"  (one-call full product {t_full:.2f} s: evaluate_rank / it = {t_eval / t_full:.2f} x)")
        print(
            f"  peak resident memory above the features     {mem.extra / GIB:8.2f} GiB  target <= 2 GiB   "
            f"{verdict(mem.extra <= 2 * GIB)}   (the dense distance matrix alone: {s.queries * s.gallery * 4 / GIB:.1f} GiB)"
        )
        del q, g


def section_c(s: Sizes) -> None:
    n = s.queries + s.gallery
    print(f"(c) k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3): {s.queries} q x {s.gallery} g x {s.dim}-d, N = {n}")
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    logging.getLogger("reid_core.metrics.reranking").setLevel(logging.INFO)  # prints the sparse encodings' sizes
    q, g, ids = make_data(s, kind="random")
    rows = default_chunk_rows(s.queries, s.gallery)
    t_mm = bare_product_seconds(q, g, rows)
    floor = t_mm * (n * n) / (s.queries * s.gallery)
    t_plain, plain = timed(lambda: evaluate_rank(q, g, *ids))
    with PeakMemory() as mem:
        t_rr, rr = timed(lambda: evaluate_rank_reranked(q, g, *ids, k1=20, k2=6, lambda_value=0.3))
    print(f"  [random features] bare q x g product {t_mm:.2f} s -> N x N product ~ {floor:.1f} s (x N^2 / (Q G))")
    print(f"  evaluate_rank (no re-ranking)               {t_plain:8.2f} s   mAP {plain.mAP:.4f}")
    print(
        f"  evaluate_rank_reranked                      {t_rr:8.2f} s   mAP {rr.mAP:.4f}   ({t_rr / floor:.2f}x the N x N product)"
    )
    print(
        f"  peak resident memory above the features     {mem.extra / GIB:8.2f} GiB  "
        f"(one dense N x N float32 matrix: {n * n * 4 / GIB:.1f} GiB)"
    )


SECTIONS = {"a": section_a, "b": section_b, "c": section_c}


def load_average() -> str:
    """The machine's 1-minute load average: on a shared machine, above ~0 means other processes took CPU time."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--skip-rerank", action="store_true", help="skip section (c)")
    parser.add_argument("--section", choices=sorted(SECTIONS), help="run one section in this process")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.section:
        SECTIONS[args.section](sizes[args.section])
        return
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs, quick={args.quick}", flush=True)
    for name in SECTIONS:
        if name == "c" and args.skip_rerank:
            continue
        cmd = [sys.executable, __file__, "--section", name] + (["--quick"] if args.quick else [])
        print(f"[load average before ({name}): {load_average()}]", flush=True)
        subprocess.run(cmd, check=True)
        print(f"[load average after ({name}): {load_average()}]\n", flush=True)


if __name__ == "__main__":
    main()
