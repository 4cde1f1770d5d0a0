"""Train ID-CondenseNet or the Dual-Stream CNN with the distractor class on Ray Train + DeepSpeed; register it in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_reid.py \
        --config configs/reid_msmt17.yaml --set distractors.uri=s3://my-reid-data/distractors/dcgan-v3
    python jobs/train_reid.py --config configs/reid_demo.yaml --smoke-test      # local Ray, or RAY_ADDRESS

Everything that can be wrong with the inputs (config, dataset, distractor set, S3, MLflow) fails here, in one line
``error: ...`` with exit code 2, before Ray starts. Running again with the same ``run.name`` resumes from the run's last
checkpoint and continues its MLflow run.

After training, the driver loads the final weights; for CondenseNet it applies any condensing stage still due
(``finish_condensation``) and converts the model to its deploy form (``convert``: index-select + group convolution),
checking that the converted model's features equal the trained model's. It then evaluates the deploy model on
query/gallery (Rank-1/5/10, mAP, mINP; FLIMA also ID precision / recall / F1), counts its FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` (one image; FLOPs = 2 × multiply-adds), logs it to MLflow as a feature
model (images -> L2-normalised features) with parameters and metrics, registers it with alias ``candidate``, and
logs a TorchScript export (and an ONNX export when it exports cleanly) as artifacts under ``export/``.

The registered model takes (N, 3, H, W) images normalised with the ImageNet mean/std (``build_transforms``); the
Dual-Stream model takes (N, 6, S, S): the person image and its face crop stacked on channels (zeros: no face).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, ReidJobConfig, flatten, is_dual_stream, load_config, to_dict  # noqa: E402
from reid_core.stack import init_ray_for_job, load_env_defaults  # noqa: E402

log = logging.getLogger("train_reid")

SMOKE_TEST = [
    "optim.epochs=2",
    "optim.identities_per_batch=4",
    "optim.images_per_identity=4",
    "data.max_images=128",
    "distractors.max_images=64",
    "distractors.per_batch=4",
    "eval.batch_size=64",
]
# Converted and trained features must agree to this relative tolerance (float32 rounding of a different summation).
CONVERT_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/reid_msmt17.yaml", help="YAML file (default configs/reid_msmt17.yaml)"
    )
    parser.add_argument("--model", help="shortcut for --set model.name=... (condensenet74, dual_stream, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=0.05")
    parser.add_argument("--smoke-test", action="store_true", help="2 tiny epochs: checks the whole path in minutes")
    return parser.parse_args(argv)


def preflight(cfg: ReidJobConfig) -> dict:
    """Check the dataset, the distractor set, checkpoint storage and MLflow before Ray starts."""
    from reid_core.data import RandomIdentitySampler, read_layout
    from reid_core.train.reid_data import (
        distractors_per_batch,
        limit_training,
        read_distractor_set,
        training_records,
    )

    settings = storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region)
    storage.check_location(cfg.data.uri, settings, must_exist=True)
    splits = read_layout(cfg.data.uri, cfg.data.layout, **cfg.data.options)
    real, pid_map = limit_training(splits.train, cfg.data.max_images)
    distractors = None
    if cfg.distractors.uri:
        storage.check_location(cfg.distractors.uri, settings, must_exist=True)
        distractors = read_distractor_set(cfg.distractors.uri, max_images=cfg.distractors.max_images, settings=settings)
    training = training_records(real, distractors)
    batches = len(RandomIdentitySampler(training.real, batch_size=cfg.batch_size,
                                        num_instances=cfg.optim.images_per_identity,
                                        world_size=cfg.scaling.num_workers)) // cfg.batch_size  # fmt: skip
    if batches == 0:
        raise ConfigError(
            f"optim.identities_per_batch: {training.num_real} training images of {training.num_classes} identities "
            f"give no full batch of {cfg.optim.identities_per_batch}×{cfg.optim.images_per_identity} per worker on "
            f"{cfg.scaling.num_workers} workers"
        )
    per_batch = distractors_per_batch(batch_size=cfg.batch_size, num_real=training.num_real,
                                      num_generated=training.num_generated, per_batch=cfg.distractors.per_batch)  # fmt: skip
    storage.check_location(cfg.run.storage, settings)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_server(uri)
    return {"mlflow_uri": uri, "splits": splits, "pid_map": pid_map, "training": training, "distractors": distractors,
            "per_batch": per_batch, "steps_per_epoch": batches, "settings": settings}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    overrides = (SMOKE_TEST if args.smoke_test else []) + ([f"model.name={args.model}"] if args.model else [])
    try:
        cfg = load_config(ReidJobConfig, args.config, overrides + args.set)
        pre = preflight(cfg)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Logging starts after the checks, so that a refused input is exactly one line on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mlflow_uri, training = pre["mlflow_uri"], pre["training"]

    from reid_core.train.loops import make_trainer, train_reid_loop

    run_id = tracking.find_run(mlflow_uri, cfg.tracking.experiment, cfg.run.name)
    if run_id is None:
        params = {**flatten(to_dict(cfg)), "data.num_train_images": training.num_real,
                  "data.num_train_ids": training.num_classes, "distractors.num_images": training.num_generated,
                  "distractors.per_batch_used": pre["per_batch"], "steps_per_epoch": pre["steps_per_epoch"]}  # fmt: skip
        tags = {"job": "train_reid", "model": cfg.model.name, "loss.mode": cfg.loss.mode,
                "distractors": "yes" if training.num_generated else "no"}  # fmt: skip
        if pre["distractors"] is not None:
            generator = pre["distractors"].metadata.get("generator") or {}
            tags.update({"distractors.uri": cfg.distractors.uri,
                         "distractors.generator": generator.get("pinned_uri", "unknown")})  # fmt: skip
        run_id = tracking.start_run(mlflow_uri, cfg.tracking.experiment, cfg.run.name, params, tags=tags)
    else:
        log.info("continuing MLflow run %s (run name %r): Ray resumes from its last checkpoint", run_id, cfg.run.name)

    init_ray_for_job(use_gpu=cfg.scaling.use_gpu)
    trainer = make_trainer(
        train_reid_loop,
        {"job": to_dict(cfg), "mlflow_uri": mlflow_uri, "run_id": run_id},
        scaling=cfg.scaling,
        run=cfg.run,
        settings=pre["settings"],
    )
    t_fit = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    fit_seconds = time.perf_counter() - t_fit
    if result.checkpoint is None:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        print("error: training reported no checkpoint", file=sys.stderr)
        return 1

    try:
        final = finalize(cfg, pre, mlflow_uri, run_id, result.checkpoint)
    except Exception:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")

    m = final["metrics"]
    art = tracking.artifact_uri(mlflow_uri, run_id)
    print("\n=== train_reid summary ===")
    print(f"MLflow run:        {run_id} ({mlflow_uri}, experiment {cfg.tracking.experiment!r})")
    print(f"registered model:  {cfg.tracking.registered_model} version {final['version']} "
          f"(alias @{cfg.tracking.alias}; converted={final['converted']})")  # fmt: skip
    print(f"training data:     {training.num_real} images of {training.num_classes} identities + "
          f"{training.num_generated} distractors ({pre['per_batch']} per batch, loss {cfg.loss.mode})")  # fmt: skip
    print(f"retrieval:         Rank-1 {m['rank1']:.4f}  Rank-5 {m['rank5']:.4f}  Rank-10 {m['rank10']:.4f}  "
          f"mAP {m['mAP']:.4f}  mINP {m['mINP']:.4f}  ({int(m['num_valid_queries'])} queries)")  # fmt: skip
    if "f1_macro" in m:
        print(f"ID classification: P {m['precision_macro']:.4f}  R {m['recall_macro']:.4f}  F1 {m['f1_macro']:.4f}")
    print(f"model:             {m['params'] / 1e6:.3f} M parameters, {m['flops'] / 1e6:.1f} MFLOPs per image "
          f"(training form {m['params_training_form'] / 1e6:.3f} M, {m['flops_training_form'] / 1e6:.1f} MFLOPs)")  # fmt: skip
    print(f"exports:           {art}/export/ ({', '.join(final['exports']) or 'none'})")
    print(f"checkpoint:        {result.checkpoint.path}")
    print(f"time:              {fit_seconds:.1f} s training, {final['seconds']:.1f} s conversion + evaluation")
    last = {k: round(v, 4) for k, v in (result.metrics or {}).items() if isinstance(v, float | int)}
    print(f"last epoch:        {last}")
    return 0


# ------------------------------------------------------------------------------------------------ after fit()
def load_trained_model(checkpoint):
    """(model in eval mode, checkpoint meta) from the checkpoint's plain weights (``model.pt``; world-size free)."""
    import torch

    from reid_core.models import build_model
    from reid_core.train.checkpoint import read_meta

    with tempfile.TemporaryDirectory() as tmp:
        directory = checkpoint.to_directory(tmp)
        meta = read_meta(directory)
        model = build_model(meta["model"]["name"], **meta["model"]["kwargs"])
        model.load_state_dict(torch.load(Path(directory) / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), meta


def count_flops(model, example) -> int:
    """FLOPs of one forward pass (``torch.utils.flop_counter``: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return int(counter.get_total_flops())


def convert_checked(model, example):
    """CondenseNet: finish condensation, convert, and check the features agree. Returns (deploy, stages, rel. diff)."""
    import torch

    from reid_core.models.condense import convert, finish_condensation

    stages = finish_condensation(model)
    if stages:
        log.warning("%d layer-stages of condensation were still due at the end of training: applied now", stages)
    deploy = convert(model)
    with torch.no_grad():
        trained, converted = model.forward_features(example), deploy.forward_features(example)
    diff = float((trained - converted).abs().max() / trained.abs().max().clamp(min=1e-12))
    if not diff <= CONVERT_TOLERANCE:
        raise RuntimeError(f"converted CondenseNet differs from the trained one: max relative feature difference "
                           f"{diff:.2e} > {CONVERT_TOLERANCE:.0e}; not registering it")  # fmt: skip
    log.info("converted CondenseNet: features equal the trained model's (max relative difference %.2e)", diff)
    return deploy, stages, diff


def export_torchscript(feature_model, example, path: Path) -> None:
    """Trace the feature model to TorchScript and check the traced outputs equal the eager ones."""
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(feature_model, example, check_trace=False)
        if not torch.allclose(traced(example), feature_model(example), atol=1e-5):
            raise RuntimeError("the traced TorchScript model's features differ from the eager model's")
    traced.save(str(path))


def export_onnx(feature_model, example, path: Path) -> None:
    import torch

    torch.onnx.export(feature_model, (example,), str(path), input_names=["images"], output_names=["features"],
                      dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})  # fmt: skip


def finalize(cfg: ReidJobConfig, pre: dict, mlflow_uri: str, run_id: str, checkpoint) -> dict:
    """Convert, check, evaluate, count, log, register and export the final model. Returns what the summary prints."""
    import torch

    from reid_core.train.evaluation import (
        DualStreamFeatureModel,
        FeatureModel,
        classify_identities,
        evaluate_splits,
    )

    t0 = time.perf_counter()
    splits, settings = pre["splits"], pre["settings"]
    model, meta = load_trained_model(checkpoint)
    h, w = meta["image_size"]
    dual = is_dual_stream(meta["model"]["name"])
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    face_boxes = None
    if dual:
        from reid_core.guidance.faces import FaceDetector
        from reid_core.train.reid_data import face_boxes as find_face_boxes

        records = list(dict.fromkeys(splits.query + splits.gallery))
        with FaceDetector(workers=None) as detector:
            found = find_face_boxes(records, detector, settings=settings)
        face_boxes = {r: found[i] for i, r in enumerate(records)}
        example = torch.randn(2, 6, h, h, generator=torch.Generator().manual_seed(0))
        example[1, 3:] = 0  # the second example has no face
        deploy, stages, diff = model, 0, 0.0
        training_form = feature_model = DualStreamFeatureModel(model).eval()
        converted = False
    else:
        example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        training_form = FeatureModel(model).eval()
        deploy, stages, diff = convert_checked(model, example)
        feature_model = FeatureModel(deploy).eval()
        converted = True

    common = dict(image_size=(h, w), batch_size=cfg.eval.batch_size, face_boxes=face_boxes,
                  face_size=cfg.model.face_size, device=device, settings=settings)  # fmt: skip
    metrics, _ = evaluate_splits(deploy.to(device), splits.query, splits.gallery, flip=cfg.eval.flip,
                                 metric=cfg.eval.metric, max_rank=cfg.eval.max_rank, **common)  # fmt: skip
    if cfg.data.layout == "flima":
        result = classify_identities(deploy, splits.query + splits.gallery, pid_map=pre["pid_map"], **common)
        metrics.update(result.summary())
    deploy.cpu()
    metrics.update(
        flops=float(count_flops(feature_model, example[:1])),
        flops_training_form=float(count_flops(training_form, example[:1])),
        params=float(sum(p.numel() for p in deploy.parameters())),
        params_training_form=float(sum(p.numel() for p in model.parameters())),
        convert_max_rel_diff=diff,
        condensing_stages_finished_after_training=float(stages),
    )
    tracking.log_metrics(mlflow_uri, run_id, metrics, step=meta["epoch"] + 1)
    version = tracking.log_and_register_pytorch_model(
        mlflow_uri, run_id, feature_model, name="model", registered_model=cfg.tracking.registered_model,
        input_example=example.numpy(), alias=cfg.tracking.alias,
        tags={"model": meta["model"]["name"], "converted": converted, "loss.mode": cfg.loss.mode,
              "distractors.uri": cfg.distractors.uri or "none", "num_distractors": meta["num_generated"],
              "data.uri": cfg.data.uri, "image_size": f"{h}x{w}", "epochs": meta["epoch"] + 1,
              "rank1": round(metrics["rank1"], 4), "mAP": round(metrics["mAP"], 4),
              "input": "images (N, 6, S, S): person + face crop" if dual else "images (N, 3, H, W), ImageNet-normalised",
              "output": "L2-normalised features (N, D)"},
    )  # fmt: skip
    exports = export_artifacts(mlflow_uri, run_id, feature_model, example)
    return {"metrics": metrics, "version": version, "converted": converted, "exports": exports,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def export_artifacts(mlflow_uri: str, run_id: str, feature_model, example) -> list[str]:
    """TorchScript (must work) and ONNX (when it exports cleanly: the reason is logged and tagged otherwise)."""
    exports = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.torchscript.pt"
        export_torchscript(feature_model, example, path)
        tracking.log_artifact_file(mlflow_uri, run_id, path, "export")
        exports.append(path.name)
        path = Path(tmp) / "model.onnx"
        try:
            export_onnx(feature_model, example, path)
        except Exception as exc:  # noqa: BLE001 - optional export: reported in the log and on the run
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            log.warning("ONNX export skipped: %s", reason)
            tracking.set_run_tags(mlflow_uri, run_id, {"export.onnx": f"failed: {reason}"})
        else:
            tracking.log_artifact_file(mlflow_uri, run_id, path, "export")
            tracking.set_run_tags(mlflow_uri, run_id, {"export.onnx": "ok"})
            exports.append(path.name)
    return exports


if __name__ == "__main__":
    sys.exit(main())
