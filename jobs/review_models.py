"""Review the MLflow model registry: list, compare, promote (gated alias ``champion``) and report.

    python jobs/review_models.py list [--name NAME]
    python jobs/review_models.py compare NAME V1 V2            # V: a version number or an alias (champion, @candidate)
    python jobs/review_models.py promote NAME VERSION [--metric mAP] [--reason TEXT] [--force]
    python jobs/review_models.py report [--name NAME] [--out review.md|review.html]

Only ``MlflowClient`` and aliases (stages are deprecated). A version's metrics are its run's latest values (Rank-1,
mAP, mINP for re-ID models; face rate and losses for GAN generators), plus the results ``jobs/evaluate.py`` tagged it
with (``eval.<dataset>.mAP``, ...: ``promote --metric eval.msmt17.mAP`` gates on them); λ1, λ2, the guidance mode and
the dataset come from the version's tags (as ``jobs/train_gan.py`` / ``jobs/train_reid.py`` register them), else from
its run's params.

``promote`` refuses (exit 2, one line) a version whose gate metric is worse than the current champion's on the same
dataset, a version or champion without that metric or with a non-finite value (NaN, infinity), or a champion whose
value was measured on another dataset (an ``eval.<dataset>.*`` metric: the dataset it was evaluated on; any other
metric: its training run's ``data.uri``), unless ``--force``;
it records who, when and why as tags ``champion.*`` on the promoted version.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import tracking  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import registry_review as review  # noqa: E402
from reid_core.workflows.registry_review import CHAMPION_ALIAS, REVIEW_EXPERIMENT  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI or the embedded stack)")
    commands = parser.add_subparsers(dest="command", required=True)

    def metric_list(text: str) -> list[str]:
        return [m.strip() for m in text.split(",") if m.strip()]

    listing = commands.add_parser("list", help="registered models and their versions as a table")
    listing.add_argument("--name", help="only this registered model")
    listing.add_argument("--metrics", type=metric_list, help="metric columns, e.g. rank1,mAP (default: what exists)")

    compare = commands.add_parser("compare", help="two versions side by side, with links to their pictures")
    compare.add_argument("name")
    compare.add_argument("first", metavar="V1", help="version number or alias")
    compare.add_argument("second", metavar="V2", help="version number or alias")

    promote = commands.add_parser("promote", help=f"move alias @{CHAMPION_ALIAS} to a version, gated on a metric")
    promote.add_argument("name")
    promote.add_argument("version", help="version number or alias (e.g. candidate)")
    promote.add_argument("--metric", default="mAP", help="the gate's metric (default mAP)")
    promote.add_argument("--direction", choices=("auto", "higher", "lower"), default="auto",
                         help="which way is better (auto: lower for loss*, else higher)")  # fmt: skip
    promote.add_argument("--force", action="store_true", help="promote even when the gate refuses")
    promote.add_argument("--reason", help="why (recorded as tag champion.reason)")

    report = commands.add_parser("report", help="a Markdown/HTML page of the registry, also logged to MLflow")
    report.add_argument("--name", help="only this registered model")
    report.add_argument("--out", help="file to write; .html for HTML with embedded pictures (default: .md)")
    report.add_argument("--metrics", type=metric_list, help="metric columns (default: what exists)")
    report.add_argument("--embed", type=int, default=2, help="HTML: pictures per version inlined (default 2)")
    report.add_argument(
        "--experiment", default=REVIEW_EXPERIMENT, help=f"MLflow experiment (default {REVIEW_EXPERIMENT})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    load_env_defaults()
    try:
        uri = tracking.resolve_tracking_uri(args.tracking_uri)
        tracking.check_server(uri)
        client = tracking.client(uri)
        if args.command == "list":
            print(review.command_list(uri, client, name=args.name, metrics=args.metrics))
        elif args.command == "compare":
            print(review.command_compare(uri, client, name=args.name, first=args.first, second=args.second))
        elif args.command == "promote":
            print(review.command_promote(uri, client, name=args.name, version=args.version, metric=args.metric,
                                         direction=args.direction, force=args.force, reason=args.reason))  # fmt: skip
        else:
            path, run_id = review.command_report(uri, client, name=args.name, out=args.out, metrics=args.metrics,
                                                 embed=args.embed, experiment=args.experiment)  # fmt: skip
            print(f"report: {path} (logged to MLflow run {run_id}, experiment {args.experiment!r})")
    except (tracking.TrackingError, review.ReviewError) as exc:  # RegistryError is a TrackingError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
