"""Face-score curves of GAN runs: how close each run's fixed-noise samples came to faces that Δ detects, per epoch.

    python jobs/face_scores.py --experiment dcgan-guidance-mechanism --runs gx-plain-s0 gx-weighted-s0 \
        --image-size 128 64 --samples 64

Reads each run's logged sample grids (``samples/epoch_NNN.png``) from MLflow, scores every sample with the one
person-crop face detector (``FaceDetector.best_scores``: noise and faceless persons about -1, detected faces 0.15 and
more) and logs one analysis run in the same experiment with ``<run>.face_score_median`` / ``_max`` /
``.face_detected`` per epoch and a plot ``face_scores.png``. For runs trained before training logged the face score
itself; details in ``reid_core/workflows/face_progress.py``. Errors (no such run, grids of another size, MLflow
unreachable) are one line ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import tracking  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import face_progress  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="the MLflow experiment of the GAN runs")
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN_NAME", help="GAN run names")
    parser.add_argument("--image-size", type=int, nargs=2, required=True, metavar=("H", "W"),
                        help="the runs' image size (data.image_size)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=64, help="samples per grid (tracking.num_samples; default 64)")
    parser.add_argument("--run-name", help="the analysis run's name (default face-scores-<time>)")
    parser.add_argument("--tracking-uri", help="MLflow server (default MLFLOW_TRACKING_URI / .stack/env)")
    parser.add_argument("--smoke-test", action="store_true", help="score only the first and last grid of each run")
    args = parser.parse_args(argv)
    if min(args.image_size) < 8 or args.samples < 1:
        parser.error(f"--image-size must be at least 8 px a side and --samples at least 1; got "
                     f"{args.image_size} and {args.samples}")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_server(uri)
        curves = face_progress.face_score_curves(
            uri,
            args.experiment,
            args.runs,
            image_size=tuple(args.image_size),
            count=args.samples,
            ends_only=args.smoke_test,
        )
    except (tracking.TrackingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.run_name or f"face-scores-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = face_progress.log_face_score_curves(uri, args.experiment, curves, run_name=name)
    print(f"=== face scores (run {name}, {run_id}) ===")
    print(f"{'run':<24} {'epochs':>6} {'first median':>12} {'last median':>11} {'best max':>9} {'detected':>8}")
    for c in curves:
        print(f"{c.run_name:<24} {len(c.epochs):>6} {c.median[0]:>12.3f} {c.median[-1]:>11.3f} "
              f"{max(c.maximum):>9.3f} {sum(c.detected):>8}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
