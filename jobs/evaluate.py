"""Evaluate a registered re-ID feature model on a dataset's query/gallery split; log and tag the results in MLflow.

    python jobs/evaluate.py --model models:/reid-condensenet@candidate --data s3://reid-data/MSMT17_V1 \
        --layout msmt17 --flip --rerank
    python jobs/evaluate.py --model runs:/RUN_ID/model --data /data/flima --layout flima \
        --layout-option test_session=s13
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/evaluate.py --model ... --data ...

Input: a feature model from the MLflow registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``; resolved once,
the pinned version is used throughout) or from a run (``runs:/RUN_ID/model``), as ``jobs/train_reid.py`` registers
them: images (N, 3, H, W), ImageNet-normalised -> L2-normalised features (N, D); or the Dual-Stream CNN's (N, 6, S, S),
the person image and its face crop stacked on channels. The input size comes from the model's MLflow signature.

Everything that can be wrong with the inputs (arguments, dataset location and layout, a query set without any match,
MLflow, the model URI, the model's input and output shapes) fails here, in one line ``error: ...`` with exit code 2,
before Ray starts.

What it computes and logs (features on a pool of Ray actors, the Market-1501 / MSMT17 metrics with optional
re-ranking, the CMC curve and ranked lists, the model version's ``eval.<dataset>.*`` tags that ``jobs/review_models.py
promote --metric eval.msmt17.mAP`` gates on): ``reid_core/workflows/evaluate.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import EVAL_METRICS, LAYOUTS  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import evaluate  # noqa: E402

SMOKE_TEST = {"max_queries": 16, "max_gallery": 96, "batch_size": 16, "chunk_size": 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=evaluate.MODEL_URI_FORMS)
    parser.add_argument("--data", required=True, help="dataset root: s3://bucket/prefix or a local folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="msmt17", help="dataset layout (default msmt17)")
    parser.add_argument("--layout-option", action="append", default=[], metavar="KEY=VALUE",
                        help="the layout reader's option, e.g. test_session=s13 (flima), version=v2 (msmt17)")  # fmt: skip
    parser.add_argument("--dataset-name", help="short name in the model version's tags eval.<name>.* "
                                               "(default: the last folder of --data)")  # fmt: skip
    parser.add_argument("--metric", choices=EVAL_METRICS, default="euclidean", help="distance (default euclidean)")
    parser.add_argument("--max-rank", type=int, default=50, help="length of the CMC curve (default 50)")
    parser.add_argument("--flip", action="store_true", help="average each image's feature with its mirror image's")
    parser.add_argument("--rerank", action="store_true", help="also k-reciprocal re-ranking (metrics rerank.*)")
    parser.add_argument("--rerank-k1", type=int, default=20, help="re-ranking k1 (default 20)")
    parser.add_argument("--rerank-k2", type=int, default=6, help="re-ranking k2 (default 6)")
    parser.add_argument("--rerank-lambda", type=float, default=0.3, help="re-ranking λ (default 0.3)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size, when the model's signature does not fix it (must agree with it)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    parser.add_argument("--chunk-size", type=int, default=512, help="images per Ray task (default 512)")
    parser.add_argument("--workers", type=int, default=0, help="Ray actors holding the model (0 = cluster CPUs)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per actor (default 1)")
    parser.add_argument("--max-queries", type=int, help="evaluate an evenly spaced subset of this many queries")
    parser.add_argument("--max-gallery", type=int, help="keep this many gallery images (the queries' identities "
                                                        "first, then the others in order)")  # fmt: skip
    parser.add_argument("--ranked-lists", type=int, default=8, help="queries on the ranked-list page (default 8)")
    parser.add_argument(
        "--experiment", default=evaluate.DEFAULT_EXPERIMENT, help=f"MLflow experiment ({evaluate.DEFAULT_EXPERIMENT})"
    )
    parser.add_argument("--run-name", help="MLflow run name (default eval-NAME-vVERSION-DATASET)")
    parser.add_argument("--tracking-uri", help="MLflow server (default MLFLOW_TRACKING_URI / .stack/env)")
    parser.add_argument("--no-tags", action="store_true", help="do not tag the model version with the results")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"a few images ({SMOKE_TEST['max_queries']} queries, {SMOKE_TEST['max_gallery']} "
                             "gallery): checks the whole path in a minute")  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke_test:  # the smoke test's sizes are defaults: explicit arguments still win
        parser.set_defaults(**SMOKE_TEST)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per model download otherwise
    spec = evaluate.EvaluationSpec(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(evaluate.EvaluationSpec)}
    )
    try:
        pre = evaluate.preflight(spec)
    except (storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet (LayoutError and RegistryError are among these).
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Logging starts after the checks, so that a refused input is exactly one line on stderr (force: importing
    # mlflow.pytorch during the checks installs a root handler at level ERROR).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        out = evaluate.run_evaluation(spec, pre)
    except evaluate.EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out.summary(spec, pre))
    return 0


if __name__ == "__main__":
    sys.exit(main())
