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
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, GanJobConfig, flatten, load_config, to_dict  # noqa: E402
from reid_core.stack import init_ray_for_job, load_env_defaults  # noqa: E402

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


def preflight(cfg: GanJobConfig) -> tuple[str, int]:
    """Check the dataset, checkpoint storage and MLflow before Ray starts. Returns (MLflow URI, images in split)."""
    from reid_core.data import read_layout

    settings = storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region)
    storage.check_location(cfg.data.uri, settings, must_exist=True)
    splits = read_layout(cfg.data.uri, cfg.data.layout)
    records = getattr(splits, cfg.data.split, None)
    if not records:
        raise ConfigError(f"data.split: {cfg.data.uri} has no {cfg.data.split!r} images")
    n = min(len(records), cfg.data.max_images or len(records))
    if n // cfg.scaling.num_workers < cfg.optim.batch_size:
        raise ConfigError(
            f"optim.batch_size: {n} images on {cfg.scaling.num_workers} workers give no full batch of "
            f"{cfg.optim.batch_size} per worker"
        )
    storage.check_location(cfg.run.storage, settings)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_server(uri)
    return uri, n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_env_defaults()
    try:
        cfg = load_config(GanJobConfig, args.config, (SMOKE_TEST if args.smoke_test else []) + args.set)
        mlflow_uri, n_images = preflight(cfg)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from reid_core.train.loops import make_trainer, train_gan_loop

    run_id = tracking.find_run(mlflow_uri, cfg.tracking.experiment, cfg.run.name)
    if run_id is None:
        params = {**flatten(to_dict(cfg)), "data.num_images": n_images}
        run_id = tracking.start_run(mlflow_uri, cfg.tracking.experiment, cfg.run.name, params,
                                    tags={"job": "train_gan", "guidance.mode": cfg.guidance.mode})  # fmt: skip
    else:
        log.info("continuing MLflow run %s (run name %r): Ray resumes from its last checkpoint", run_id, cfg.run.name)

    init_ray_for_job(use_gpu=cfg.scaling.use_gpu)
    trainer = make_trainer(
        train_gan_loop,
        {"job": to_dict(cfg), "mlflow_uri": mlflow_uri, "run_id": run_id},
        scaling=cfg.scaling,
        run=cfg.run,
        settings=storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region),
    )
    try:
        result = trainer.fit()
    except Exception:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    if result.checkpoint is None:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        print("error: training reported no checkpoint", file=sys.stderr)
        return 1

    version = register_generator(cfg, mlflow_uri, run_id, result.checkpoint)
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")
    run = tracking.client(mlflow_uri).get_run(run_id)
    run_page = f"{mlflow_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    print("\n=== train_gan summary ===")
    print(f"MLflow run:        {run_id} (experiment {cfg.tracking.experiment!r})")
    print(f"                   {run_page}")
    print(f"registered model:  {cfg.tracking.registered_model} version {version} (alias @{cfg.tracking.alias})")
    print(f"sample grids:      {run.info.artifact_uri}/samples/ (Artifacts tab of the run page)")
    print(f"checkpoint:        {result.checkpoint.path}")
    print(f"last epoch:        { ({k: round(v, 4) for k, v in (result.metrics or {}).items()}) }")
    return 0


def register_generator(cfg: GanJobConfig, mlflow_uri: str, run_id: str, checkpoint) -> str:
    """Load the final generator from the checkpoint's plain weights; log it with a signature and register it."""
    import torch

    from reid_core.models import build_model
    from reid_core.train.checkpoint import read_meta

    with tempfile.TemporaryDirectory() as tmp:
        directory = checkpoint.to_directory(tmp)
        meta = read_meta(directory)
        gen = build_model("dcgan_generator", **meta["model"])
        gen.load_state_dict(torch.load(Path(directory) / "generator.pt", map_location="cpu", weights_only=True))
    gen.eval()
    z = torch.randn(4, meta["model"]["z_dim"], generator=torch.Generator().manual_seed(0))
    return tracking.log_and_register_pytorch_model(
        mlflow_uri, run_id, gen, name="generator", registered_model=cfg.tracking.registered_model,
        input_example=z.numpy(), alias=cfg.tracking.alias,
        tags={"lambda1": cfg.guidance.lambda1, "lambda2": cfg.guidance.lambda2, "guidance.mode": cfg.guidance.mode,
              "data.uri": cfg.data.uri, "epochs": meta["epoch"] + 1},
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
