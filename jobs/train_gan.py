"""Train the (face-guided) DC-GAN on Ray Train with two DeepSpeed engines; register the generator in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_gan.py --config configs/gan.yaml
    python jobs/train_gan.py --config configs/demo.yaml --set optim.epochs=3     # local Ray, or RAY_ADDRESS

Everything that can be wrong with the inputs (config, dataset, S3, MLflow) fails here, in one line, before any worker
starts. Running again with the same ``run.name`` resumes from the run's last checkpoint and continues its MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, GanJobConfig, load_config  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import pipeline  # noqa: E402

log = logging.getLogger("train_gan")

SMOKE_TEST = [
    "optim.epochs=2",
    "optim.batch_size=16",
    "model.width=16",
    "data.image_size=[64,32]",
    "data.max_images=256",
    "tracking.num_samples=16",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gan.yaml", help="YAML file (default configs/gan.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=1e-3")
    parser.add_argument("--smoke-test", action="store_true", help="2 tiny epochs: checks the whole path in minutes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    load_env_defaults()
    try:
        cfg = load_config(GanJobConfig, args.config, (SMOKE_TEST if args.smoke_test else []) + args.set)
        mlflow_uri, n_images = pipeline.preflight_gan(cfg)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        out = pipeline.run_gan(cfg, mlflow_uri, n_images)
    except pipeline.PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    run_id, version = out.run_id, out.version
    run = tracking.client(mlflow_uri).get_run(run_id)
    run_page = f"{mlflow_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    print("\n=== train_gan summary ===")
    print(f"MLflow run:        {run_id} (experiment {cfg.tracking.experiment!r})")
    print(f"                   {run_page}")
    print(f"registered model:  {cfg.tracking.registered_model} version {version} (alias @{cfg.tracking.alias})")
    print(f"sample grids:      {run.info.artifact_uri}/samples/ (Artifacts tab of the run page)")
    print(f"checkpoint:        {out.checkpoint.path}")
    print(f"last epoch:        { ({k: round(v, 4) for k, v in out.metrics.items()}) }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
