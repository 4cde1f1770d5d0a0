"""The reusable cores of the training jobs: GAN training, re-ID training with distractors, and their checks.

``jobs/train_gan.py`` and ``jobs/train_reid.py`` parse a config, call ``preflight_*`` (every input problem raises a
``ConfigError`` / ``StorageError`` / ``TrackingError`` / ``ValueError`` naming what to fix, before Ray starts; the
last check joins Ray to see that the cluster can hold the workers at all), then
``run_gan`` / ``run_reid`` (MLflow run, ``TorchTrainer.fit``, registration) and print a summary. The λ search
(``reid_core/workflows/search.py``) calls the same functions inside each Tune trial; the distractor synthesis between them
is ``reid_core.workflows.distractors``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reid_core import storage, tracking
from reid_core.config import REID_EXPORTS, ConfigError, GanJobConfig, ReidJobConfig, flatten, is_dual_stream, to_dict

log = logging.getLogger(__name__)

# Converted and trained features must agree to this relative tolerance (float32 rounding of a different summation).
CONVERT_TOLERANCE = 1e-4


class PipelineError(RuntimeError):
    """A stage ran but produced nothing usable (e.g. training reported no checkpoint); its MLflow run is FAILED."""


def _ensure_ray(use_gpu: bool) -> None:
    """A job driver starts (or joins) Ray here; inside a Tune trial Ray is already up and is used as it is."""
    import ray

    from reid_core.runtime import init_ray_for_job

    if not ray.is_initialized():
        init_ray_for_job(use_gpu=use_gpu)


def workers_that_fit(nodes: list[dict[str, float]], bundle: dict[str, float], strategy: str) -> int:
    """How many worker bundles ``bundle`` (e.g. {"CPU": 1.0}) the nodes' total resources (``nodes``: one dict each)
    can hold at once under the placement-group ``strategy``."""
    per_node = [min(int(res.get(k, 0.0) // v) for k, v in bundle.items() if v > 0) for res in nodes]
    if strategy == "STRICT_PACK":
        return max(per_node, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    return sum(per_node)


def check_cluster_resources(scaling) -> None:
    """Fail in one line when the Ray cluster cannot hold the run's workers (``scaling``: a ``config.ScalingConfig``):
    Ray Train would otherwise wait for them forever. Compared with the total resources of the alive nodes (what other
    jobs use now frees up later). An autoscaling cluster adds nodes only once asked, so there the check waits up to
    ``scaling.resource_wait_seconds`` (set in the cluster configs; 0, the default, fails at once). Starts or joins
    Ray."""
    import ray

    _ensure_ray(scaling.use_gpu)
    bundle = {"CPU": float(scaling.cpus_per_worker), **({"GPU": 1.0} if scaling.use_gpu else {})}
    need = scaling.min_workers or scaling.num_workers
    deadline = time.monotonic() + scaling.resource_wait_seconds
    while True:
        nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
        fit = workers_that_fit(nodes, bundle, scaling.placement_strategy)
        if fit >= need:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            break
        log.info("waiting up to %.0f s for nodes (scaling.resource_wait_seconds): %d of %d workers fit now", left, fit,
                 need)  # fmt: skip
        time.sleep(min(10.0, left))
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    have = ", ".join(f"{v:g} {k}" for k, v in totals.items())
    key = "scaling.min_workers" if scaling.min_workers else "scaling.num_workers"
    waited = (
        f" after waiting {scaling.resource_wait_seconds:g} s for more nodes"
        if scaling.resource_wait_seconds
        else " (an autoscaling cluster: set scaling.resource_wait_seconds to wait for its nodes)"
    )
    raise ConfigError(
        f"{key}: {need} workers of {', '.join(f'{v:g} {k}' for k, v in bundle.items())} each "
        f"({scaling.placement_strategy}) cannot run on this Ray cluster: its {len(nodes)} alive nodes hold {have} in "
        f"all, room for {fit}{waited}; lower {key} or scaling.cpus_per_worker, or add nodes"
    )


def _train(loop, cfg, mlflow_uri: str, *, params: dict, tags: dict, settings, callbacks):
    """The MLflow run named ``cfg.run.name`` (continued when it exists, else created with ``params`` and ``tags``),
    then ``loop`` on a ``TorchTrainer`` (``make_trainer``). Returns (run id, ``Result``, seconds in ``fit``)."""
    from reid_core.train.loops import make_trainer

    run_id = tracking.find_run(mlflow_uri, cfg.tracking.experiment, cfg.run.name)
    if run_id is None:
        run_id = tracking.start_run(mlflow_uri, cfg.tracking.experiment, cfg.run.name, params, tags=tags)
    else:
        log.info("continuing MLflow run %s (run name %r): Ray resumes from its last checkpoint", run_id, cfg.run.name)
        tracking.client(mlflow_uri).update_run(run_id, status="RUNNING")  # it may have ended FAILED or KILLED
    _ensure_ray(cfg.scaling.use_gpu)
    attempt = uuid.uuid4().hex  # names this fit's stop tag (loops.STOP_TAG) apart from a continued run's older ones
    trainer = make_trainer(loop, {"job": to_dict(cfg), "mlflow_uri": mlflow_uri, "run_id": run_id, "attempt": attempt},
                           scaling=cfg.scaling, run=cfg.run, settings=settings,
                           outage_seconds=cfg.storage.outage_seconds, callbacks=callbacks)  # fmt: skip
    t0 = time.perf_counter()
    result = _fit(trainer, mlflow_uri, run_id, cfg.run, settings, attempt=attempt)
    return run_id, result, time.perf_counter() - t0


def _fit(trainer, mlflow_uri: str, run_id: str, run, settings, *, attempt: str | None = None):
    """``trainer.fit()``; the run is FAILED when it raises, when the workers stopped it (a non-finite loss, told
    through the run's ``loops.STOP_TAG`` for ``attempt``) or when it reports no checkpoint. A training failure
    (workers or Ray Train's controller, after ``run.max_failures`` restarts) becomes a ``PipelineError`` that says, in
    one line, what failed first and how to resume; a stop says what diverged and that resuming would not help."""
    from ray.train import TrainingFailedError

    from reid_core.train.loops import STOP_TAG

    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise PipelineError(training_failure(exc, run, settings)) from exc
    except Exception:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    except BaseException:
        # A stopped job: `ray job stop` sends SIGTERM, which Ray's driver handler turns into SystemExit (Ctrl-C:
        # KeyboardInterrupt). The run does not stay RUNNING; the next run of that name continues it.
        tracking.set_terminated(mlflow_uri, run_id, "KILLED")
        raise
    stopped = tracking.client(mlflow_uri).get_run(run_id).data.tags.get(STOP_TAG, "")
    if attempt and stopped.startswith(f"{attempt} "):
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise PipelineError(
            f"training stopped: {stopped.removeprefix(attempt).strip()}. Nothing was registered; the same "
            "configuration would diverge again: lower optim.lr or check the data before running again"
        )
    if result.checkpoint is None:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise PipelineError("training reported no checkpoint")
    return result


def training_failure(exc: Exception, run, settings=None) -> str:
    """One line for a Ray Train ``TrainingFailedError``: the first failing rank's error (or the controller's), the
    restart budget it exhausted and where the checkpoints to resume from are. pyarrow's S3 errors (Ray's checkpoint
    uploads and run state) name host and port only: the endpoint as configured (``settings``) is added."""
    from ray.train import ControllerError, WorkerGroupError

    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        rank, error = min(exc.worker_failures.items(), key=lambda item: item[0])
        where = f"rank {rank}, after run.max_failures = {run.max_failures} restarts"
    elif isinstance(exc, ControllerError):
        error, where = exc.controller_failure, "Ray Train's controller, which Ray does not restart"
    else:
        error, where = exc, "training"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    if not message.startswith(type(error).__name__):
        message = f"{type(error).__name__}: {message}"
    if "AWS Error" in message and settings is not None:
        message = f"{message} (S3 endpoint {settings.describe()})"
    return (
        f"training failed ({where}): {message}. The checkpoints "
        f"are kept in {run.storage.rstrip('/')}/{run.name}: run the same command (same run.name) to resume"
    )


# ------------------------------------------------------------------------------------------------------------ GAN
def preflight_gan(cfg: GanJobConfig) -> tuple[str, int]:
    """Check the dataset, checkpoint storage and MLflow before Ray starts. Returns (MLflow URI, images in split)."""
    from reid_core.train.loops import gan_records

    settings = storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region)
    storage.check_location(cfg.data.uri, settings, must_exist=True)
    n = len(gan_records(cfg, world_size=cfg.scaling.num_workers))
    storage.check_location(cfg.run.storage, settings)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_server(uri)
    check_cluster_resources(cfg.scaling)
    return uri, n


@dataclass
class GanOutcome:
    run_id: str  # the MLflow run of the GAN training
    version: str  # the registered generator's version
    checkpoint: Any  # ray.train.Checkpoint of the last epoch
    metrics: dict  # the last epoch's reported metrics (may be empty)


def run_gan(
    cfg: GanJobConfig, mlflow_uri: str, n_images: int, *, tags: dict[str, str] | None = None, callbacks=None
) -> GanOutcome:
    """Train the GAN of ``cfg`` (checked by ``preflight_gan``) on Ray Train and register its generator.

    The MLflow run is named ``cfg.run.name``: a run of that name is continued (Ray resumes from its last checkpoint).
    ``tags`` are added to a new run; ``callbacks`` go to the trainer's ``RunConfig``.
    """
    from reid_core.train.loops import train_gan_loop

    params = {**flatten(to_dict(cfg)), "data.num_images": n_images}
    run_tags = {"job": "train_gan", "guidance.mode": cfg.guidance.mode, **(tags or {})}
    settings = storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region)
    run_id, result, _ = _train(train_gan_loop, cfg, mlflow_uri, params=params, tags=run_tags, settings=settings,
                               callbacks=callbacks)  # fmt: skip
    try:
        version = register_generator(cfg, mlflow_uri, run_id, result.checkpoint)
    except Exception:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")
    return GanOutcome(run_id=run_id, version=version, checkpoint=result.checkpoint, metrics=dict(result.metrics or {}))


def register_generator(cfg: GanJobConfig, mlflow_uri: str, run_id: str, checkpoint) -> str:
    """Load the final generator from the checkpoint's plain weights; log it with a signature and register it."""
    import torch

    from reid_core.models import build_model
    from reid_core.train.checkpoint import GENERATOR, load_model

    gen, meta = load_model(checkpoint, GENERATOR, lambda meta: build_model("dcgan_generator", **meta["model"]))
    z = torch.randn(4, meta["model"]["z_dim"], generator=torch.Generator().manual_seed(0))
    return tracking.log_and_register_pytorch_model(
        mlflow_uri, run_id, gen, name="generator", registered_model=cfg.tracking.registered_model,
        input_example=z.numpy(), alias=cfg.tracking.alias,
        tags={"lambda1": cfg.guidance.lambda1, "lambda2": cfg.guidance.lambda2, "guidance.mode": cfg.guidance.mode,
              "data.uri": cfg.data.uri, "epochs": meta["epoch"] + 1},
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ re-ID
@dataclass(frozen=True)
class ReidPlan:
    """What ``preflight_reid`` checked and ``run_reid`` uses."""

    mlflow_uri: str  # the MLflow server, resolved and reachable
    settings: Any  # storage.S3Settings of the job's ``storage`` section
    splits: Any  # data.Splits of ``data.uri``: train, query, gallery
    pid_map: dict  # original identity -> training label 0..N-1 (``limit_training``)
    training: Any  # data.training_set.TrainingSet: the real records, then the distractor class
    distractors: Any  # data.training_set.DistractorSet of ``distractors.uri``, or None
    per_batch: int  # distractors in each batch
    steps_per_epoch: int  # full batches per worker and epoch


@dataclass(frozen=True)
class FinalModel:
    """What ``finalize`` made of the trained model."""

    metrics: dict  # retrieval (and FLIMA ID) metrics, FLOPs, parameters, the conversion's difference
    version: str  # the registered model version
    converted: bool  # whether the CondenseNet was converted to its deployment form
    exports: list  # the exported files' names (TorchScript, ONNX when it exported)
    seconds: float  # conversion + evaluation + registration


@dataclass(frozen=True)
class ReidResult:
    """What ``run_reid`` returns."""

    run_id: str  # the MLflow run of the training
    final: FinalModel
    checkpoint: Any  # ray.train.Checkpoint of the last epoch
    last_metrics: dict  # the last epoch's reported metrics
    fit_seconds: float  # seconds in ``TorchTrainer.fit``


def preflight_reid(cfg: ReidJobConfig) -> ReidPlan:
    """Check the dataset, the distractor set, checkpoint storage and MLflow before Ray starts."""
    from reid_core.train.loops import build_training_set

    settings = storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region)
    storage.check_location(cfg.data.uri, settings, must_exist=True)
    if cfg.distractors.uri:
        storage.check_location(cfg.distractors.uri, settings, must_exist=True)
    data = build_training_set(cfg, world_size=cfg.scaling.num_workers, settings=settings)
    training = data.training
    if cfg.model.pretrained:  # read and matched against the model here, so a wrong checkpoint costs no cluster time
        check_pretrained(cfg, training.num_classes, settings)
    storage.check_location(cfg.run.storage, settings)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_server(uri)
    check_cluster_resources(cfg.scaling)
    return ReidPlan(mlflow_uri=uri, settings=settings, splits=data.splits, pid_map=data.pid_map, training=training,
                    distractors=data.distractors, per_batch=data.per_batch,
                    steps_per_epoch=data.steps_per_epoch)  # fmt: skip


def check_pretrained(cfg: ReidJobConfig, num_classes: int, settings) -> None:
    """Load ``model.pretrained`` into the configured model once; raises ``ValueError`` (one line) if it cannot."""
    from reid_core.models import build_model
    from reid_core.models.pretrained import load_pretrained
    from reid_core.train.loops import reid_model_kwargs
    from reid_core.train.pretrained import read_state_dict

    if not cfg.model.pretrained.startswith(("https://", "http://")):
        storage.check_location(cfg.model.pretrained, settings, must_exist=True)
    kwargs = reid_model_kwargs(cfg.model.name, num_classes=num_classes, feature_dim=cfg.model.feature_dim,
                               dropout_rate=cfg.model.dropout_rate, image_size=cfg.data.image_size,
                               face_size=cfg.model.face_size, bnneck=cfg.model.bnneck,
                               last_stride=cfg.model.last_stride)  # fmt: skip
    state = read_state_dict(cfg.model.pretrained, settings)
    load_pretrained(build_model(cfg.model.name, **kwargs), state, uri=f"model.pretrained: {cfg.model.pretrained}")


def run_reid(cfg: ReidJobConfig, pre: ReidPlan, *, tags: dict[str, str] | None = None, callbacks=None) -> ReidResult:
    """Train the re-ID model of ``cfg`` (checked by ``preflight_reid``, whose result is ``pre``) on Ray Train, then
    convert, evaluate, register and export it (``finalize``).

    The MLflow run is named ``cfg.run.name`` (continued when it exists: Ray resumes from its last checkpoint). ``tags``
    are added to a new run; ``callbacks`` go to the trainer's ``RunConfig``. The registered version gets the alias
    ``cfg.tracking.alias`` (none when it is None).
    """
    from reid_core.train.loops import train_reid_loop

    mlflow_uri, training = pre.mlflow_uri, pre.training
    params = {**flatten(to_dict(cfg)), "data.num_train_images": training.num_real,
              "data.num_train_ids": training.num_classes, "distractors.num_images": training.num_generated,
              "distractors.per_batch_used": pre.per_batch, "steps_per_epoch": pre.steps_per_epoch}  # fmt: skip
    run_tags = {"job": "train_reid", "model": cfg.model.name, "loss.mode": cfg.loss.mode,
                "distractors": "yes" if training.num_generated else "no"}  # fmt: skip
    if pre.distractors is not None:
        generator = pre.distractors.metadata.get("generator") or {}
        run_tags.update({"distractors.uri": cfg.distractors.uri,
                         "distractors.generator": generator.get("pinned_uri", "unknown")})  # fmt: skip
    run_id, result, fit_seconds = _train(train_reid_loop, cfg, mlflow_uri, params=params, tags={**run_tags, **(tags or {})},
                                         settings=pre.settings, callbacks=callbacks)  # fmt: skip
    try:
        final = finalize(cfg, pre, mlflow_uri, run_id, result.checkpoint)
    except Exception:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")
    return ReidResult(run_id=run_id, final=final, checkpoint=result.checkpoint,
                      last_metrics=dict(result.metrics or {}), fit_seconds=fit_seconds)  # fmt: skip


def load_trained_model(checkpoint):
    """(model in eval mode, checkpoint meta) from the checkpoint's plain weights (``checkpoint.load_model``)."""
    from reid_core.models import build_model
    from reid_core.train.checkpoint import REID_MODEL, load_model

    return load_model(
        checkpoint, REID_MODEL, lambda meta: build_model(meta["model"]["name"], **meta["model"]["kwargs"])
    )


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


def deploy_form(model, example):
    """The model to register: CondenseNet converted (``convert_checked``); a model without learned group convolutions
    (``resnet50``) as it is. Returns (deploy, condensing stages applied now, relative difference, converted)."""
    from reid_core.models.condense import learned_group_convs

    if not learned_group_convs(model):
        return model, 0, 0.0, False
    deploy, stages, diff = convert_checked(model, example)
    return deploy, stages, diff, True


def export_torchscript(feature_model, example, path: Path) -> None:
    """Trace the feature model to TorchScript and check the traced outputs equal the eager ones."""
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(feature_model, example, check_trace=False)
        if not torch.allclose(traced(example), feature_model(example), atol=1e-5):
            raise RuntimeError("the traced TorchScript model's features differ from the eager model's")
    traced.save(str(path))


def export_onnx(feature_model, example, path: Path) -> None:
    """Export to one self-contained ONNX file (weights inside, dynamic batch) and check that onnxruntime gives the eager
    model's features, on a batch of another size than the export example."""
    import numpy as np
    import onnxruntime
    import torch

    torch.onnx.export(feature_model, (example,), str(path), input_names=["images"], output_names=["features"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False)  # fmt: skip
    check = torch.cat([example, example[:1]])
    with torch.no_grad():
        expected = feature_model(check).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": check.numpy()})
    if not np.allclose(got, expected, atol=1e-5):
        raise RuntimeError(f"the ONNX model's features differ from the eager model's (max |diff| "
                           f"{np.abs(got - expected).max():.2e})")  # fmt: skip


def finalize(cfg: ReidJobConfig, pre: ReidPlan, mlflow_uri: str, run_id: str, checkpoint) -> FinalModel:
    """Convert, check, evaluate, count, log, register and export the final model."""
    import torch

    from reid_core.evaluation.features import (
        DualStreamFeatureModel,
        FeatureModel,
        classify_identities,
        evaluate_splits,
        evaluation_face_boxes,
    )

    t0 = time.perf_counter()
    splits, settings = pre.splits, pre.settings
    model, meta = load_trained_model(checkpoint)
    h, w = meta["image_size"]
    dual = is_dual_stream(meta["model"]["name"])
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    face_boxes = None
    if dual:
        face_boxes = evaluation_face_boxes(splits.query + splits.gallery, settings=settings)
        example = torch.randn(2, 6, h, h, generator=torch.Generator().manual_seed(0))
        example[1, 3:] = 0  # the second example has no face
        deploy, stages, diff = model, 0, 0.0
        training_form = feature_model = DualStreamFeatureModel(model).eval()
        converted = False
    else:
        example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        training_form = FeatureModel(model).eval()
        deploy, stages, diff, converted = deploy_form(model, example)
        feature_model = FeatureModel(deploy).eval()

    common = dict(image_size=(h, w), batch_size=cfg.eval.batch_size, face_boxes=face_boxes,
                  face_size=cfg.model.face_size, device=device, settings=settings)  # fmt: skip
    metrics, _ = evaluate_splits(deploy.to(device), splits.query, splits.gallery, flip=cfg.eval.flip,
                                 metric=cfg.eval.metric, max_rank=cfg.eval.max_rank, **common)  # fmt: skip
    if cfg.data.layout == "flima":
        result = classify_identities(deploy, splits.query + splits.gallery, pid_map=pre.pid_map, **common)
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
    exports = export_artifacts(mlflow_uri, run_id, feature_model, example, cfg.tracking.exports)
    return FinalModel(metrics=metrics, version=version, converted=converted, exports=exports,
                      seconds=time.perf_counter() - t0)  # fmt: skip


def export_artifacts(mlflow_uri: str, run_id: str, feature_model, example, wanted=REID_EXPORTS) -> list[str]:
    """Of ``wanted``: TorchScript (must work) and ONNX (when it exports cleanly: the reason is logged and tagged
    otherwise). Returns the logged files' names."""
    exports = []
    with tempfile.TemporaryDirectory() as tmp:
        if "torchscript" in wanted:
            path = Path(tmp) / "model.torchscript.pt"
            export_torchscript(feature_model, example, path)
            tracking.log_artifact_file(mlflow_uri, run_id, path, "export")
            exports.append(path.name)
        if "onnx" not in wanted:
            return exports
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
