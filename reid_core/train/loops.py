"""Per-worker training loops: the only code that touches ``ray.train``.

Each loop rebuilds its typed config from the plain dict Ray hands it, opens its shard of the data through
``reid_core.storage``, builds DeepSpeed engines, resumes from the run's newest checkpoint (``_checkpoint_to_resume``),
runs pure steps from ``steps.py``, and at the end of every epoch has every rank save its checkpoint shard and call
``ray.train.report``.
Only rank 0 logs to MLflow, in the background (``tracking.EpochLogger``: MLflow being down does not stop training).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from reid_core import tracking
from reid_core.config import GanJobConfig, from_dict
from reid_core.train.schedule import cosine_lr, learning_rate  # noqa: F401 (cosine_lr: re-exported)

log = logging.getLogger(__name__)


def ray_scaling_config(scaling):
    """Ray Train's ``ScalingConfig`` for ``scaling`` (a ``config.ScalingConfig``): a fixed worker count, or
    ``(min_workers, num_workers)`` for elastic training (Train V2 restarts the worker group at the size the cluster's
    resources allow, between the two); 1 GPU per worker on GPUs; the placement-group strategy."""
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=scaling.num_workers if scaling.min_workers is None else (scaling.min_workers, scaling.num_workers),
        use_gpu=scaling.use_gpu,
        resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})},
        placement_strategy=scaling.placement_strategy,
    )


def make_trainer(loop, loop_config: dict, *, scaling, run, settings, outage_seconds: float = 0.0, callbacks=None):
    """The ``TorchTrainer`` every job builds: workers from ``scaling`` (a ``config.ScalingConfig``), run name, S3
    checkpoint storage (riding out ``outage_seconds`` of S3 trouble), failure and checkpoint policy from ``run`` (a
    ``config.RunConfig``); ``callbacks``: Ray Train ``UserCallback``s (a Tune trial passes the one that forwards
    validation metrics to Tune)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from reid_core import storage

    storage_path, storage_fs = storage.ray_storage(run.storage, settings, outage_seconds=outage_seconds)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ray_scaling_config(scaling),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints),
            callbacks=list(callbacks or []),
        ),
    )


def loader_kwargs(workers: int, *, use_gpu: bool) -> dict:
    """DataLoader settings of the training loops: ``workers`` processes (forkserver: s3fs is not fork-safe; kept
    across epochs), each reading ``prefetch_factor`` batches ahead; on GPUs batches land in pinned (page-locked) host
    memory so that ``.to(device, non_blocking=True)`` copies them asynchronously."""
    kwargs: dict = {"num_workers": workers, "pin_memory": bool(use_gpu)}
    if workers:
        kwargs.update(multiprocessing_context="forkserver", persistent_workers=True, prefetch_factor=4)
    return kwargs


def _setup_accelerator(use_gpu: bool) -> None:
    """DeepSpeed picks its accelerator at import: select the CPU one explicitly unless the run is on GPUs."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"


def sample_grid(images: torch.Tensor, nrow: int = 16):
    """(N, 3, H, W) in [-1, 1] -> a PIL image grid."""
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    return to_pil_image(grid)


def fixed_noise_samples(generator: torch.nn.Module, fixed_noise: torch.Tensor) -> torch.Tensor:
    """G(z) for the fixed noise, with batch statistics as in training (DC-GAN's running statistics lag far behind
    early on and give grey images in eval mode), on a copy so the real generator's buffers are not touched."""
    import copy

    sampler = copy.deepcopy(generator).train()
    with torch.no_grad():
        return sampler(fixed_noise.to(next(sampler.parameters()).dtype))


# The MLflow run tag through which rank 0 tells the driver that training stopped on purpose (a non-finite loss), as
# "<attempt> <one-line reason>"; ``attempt`` is the driver's ``loop_config["attempt"]``, so an older stop of a continued
# run is never read as this one's.
STOP_TAG = "training.stopped"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite. Not transient: a restart from the last checkpoint diverges again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # Ray ships worker errors by pickling: keep the message intact
        return (type(self), (self.message,))


def non_finite_losses(values: dict[str, float], *, rank: int, world: int, epoch: int, step: int) -> str | None:
    """One line naming the epoch, step, rank and every non-finite loss of this step on any rank; None when all are
    finite. Every rank calls it at the same step with the same keys: each contributes its own row of a
    (world, keys) table, summed across ranks (one small all-reduce), so every rank takes the same decision and none
    is left waiting in a collective."""
    import math

    keys = sorted(values)
    table = torch.zeros(world, len(keys), dtype=torch.float64)
    table[rank] = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(table)  # other ranks' rows are 0 in this copy: the sum is each rank's own value
    bad = [
        (r, k, v) for r in range(world) for k, v in zip(keys, table[r].tolist(), strict=True) if not math.isfinite(v)
    ]
    if not bad:
        return None
    shown = ", ".join(f"{k} = {v} (rank {r})" for r, k, v in bad[:4]) + (" ..." if len(bad) > 4 else "")
    return f"non-finite loss at epoch {epoch}, step {step}: {shown}"


def _stop_training(message: str, *, rank: int, epoch_log, flush_seconds: float, mlflow_uri: str, run_id: str,
                   attempt: str | None) -> None:  # fmt: skip
    """Every rank ends its loop here on a non-finite loss, without a report: Ray Train sees a normal end (no
    worker-group restart is spent on an error that would come back), and rank 0 tells the driver why through the run's
    ``STOP_TAG``. The driver then marks the run FAILED and registers nothing. If rank 0 cannot tell it (MLflow
    down), it raises instead: the job still fails with this message."""
    log.error("rank %d: %s: stopping", rank, message)
    if rank != 0:
        return
    epoch_log.close(flush_seconds)
    try:
        tracking.set_run_tags(mlflow_uri, run_id, {STOP_TAG: f"{attempt} {message}"})
    except Exception as exc:  # noqa: BLE001 - any failure to record it: fail loudly instead
        raise NonFiniteLossError(message) from exc


def gan_records(cfg: GanJobConfig, *, world_size: int) -> list:
    """The GAN's training images of ``cfg``: split ``data.split`` of ``data.uri``, the first ``data.max_images``.
    The preflight and every Ray Train worker read them here. Raises ``ConfigError`` when there are none, or when they
    give no full batch of ``optim.batch_size`` per worker on ``world_size`` workers."""
    from reid_core.config import ConfigError
    from reid_core.data import read_layout

    records = getattr(read_layout(cfg.data.uri, cfg.data.layout), cfg.data.split, None)
    if not records:
        raise ConfigError(f"data.split: {cfg.data.uri} has no {cfg.data.split!r} images")
    records = records[: cfg.data.max_images or len(records)]
    if len(records) // world_size < cfg.optim.batch_size:
        raise ConfigError(
            f"optim.batch_size: {len(records)} images on {world_size} workers give no full batch of "
            f"{cfg.optim.batch_size} per worker"
        )
    return records


def train_gan_loop(loop_config: dict) -> None:
    """Ray Train worker: DC-GAN with two DeepSpeed engines (generator and discriminator, each its own config)."""
    import ray.train

    cfg = from_dict(GanJobConfig, loop_config["job"])
    _setup_accelerator(cfg.scaling.use_gpu)
    _setup_storage(cfg.storage)
    import deepspeed
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from reid_core.data import ReIDDataset, build_transforms
    from reid_core.models import build_model
    from reid_core.train.checkpoint import CRITIC, DISCRIMINATOR, GENERATOR, restore_engines, save_engines
    from reid_core.train.deepspeed import deepspeed_config, init_distributed, needs_torch_optimizer
    from reid_core.train.steps import Guidance, gan_step, prepare_fakes

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mlflow_uri, run_id = loop_config["mlflow_uri"], loop_config["run_id"]
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    init_distributed(cfg.scaling.use_gpu)

    # --- data: this rank's shard of the split, equal length on every rank (collectives need equal step counts)
    records = gan_records(cfg, world_size=world)
    h, w = cfg.data.image_size
    dataset = ReIDDataset(
        records,
        build_transforms(h, w, train=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),  # -> [-1, 1] like tanh
        on_bad_image=cfg.data.on_bad_image,
        decode_size=(h, w),  # JPEGs decoded at a reduced scale that the resize still shrinks
    )
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.run.seed, drop_last=True
    )
    batches = dataset.read_ahead(BatchSampler(sampler, cfg.optim.batch_size, drop_last=True))
    loader = DataLoader(dataset, batch_sampler=batches, **loader_kwargs(0, use_gpu=cfg.scaling.use_gpu))

    # --- models and engines: a fresh DeepSpeed config and optimizer each (DeepSpeed #1975)
    gen_model = build_model("dcgan_generator", z_dim=cfg.model.z_dim, width=cfg.model.width, image_size=(h, w))
    disc_model = build_model("dcgan_discriminator", width=cfg.model.width, image_size=(h, w))
    engines = {}
    for name, model in ((GENERATOR, gen_model), (DISCRIMINATOR, disc_model)):
        ds_cfg = deepspeed_config(
            micro_batch_size=cfg.optim.batch_size, world_size=world, use_gpu=cfg.scaling.use_gpu,
            precision=cfg.scaling.precision, zero_stage=cfg.scaling.zero_stage, lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
        )  # fmt: skip
        optimizer = (
            torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
            if needs_torch_optimizer(ds_cfg)
            else None
        )
        engines[name], *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    guidance = Guidance(cfg.guidance.mode, cfg.guidance.lambda1, cfg.guidance.lambda2)
    if guidance.mode == "critic":
        critic_model = build_model("face_presence")
        ds_cfg = deepspeed_config(micro_batch_size=cfg.optim.batch_size, world_size=world, use_gpu=cfg.scaling.use_gpu,
                                  precision=cfg.scaling.precision, zero_stage=cfg.scaling.zero_stage, lr=cfg.optim.lr)  # fmt: skip
        optimizer = (
            torch.optim.Adam(critic_model.parameters(), lr=cfg.optim.lr) if needs_torch_optimizer(ds_cfg) else None
        )
        engines[CRITIC], *_ = deepspeed.initialize(model=critic_model, optimizer=optimizer, config=ds_cfg)
    gen, disc, critic = engines[GENERATOR], engines[DISCRIMINATOR], engines.get(CRITIC)

    # --- Δ(x) of every real image, once: on the original image (where a face is detectable), split across ranks
    detector = gan_face_detector(cfg.guidance.detector_workers)
    t_delta = time.perf_counter()
    face_absent_real = face_absent_table(records, detector, rank=rank, world=world, on_bad_image=cfg.data.on_bad_image)
    log.info("rank %d: Δ of %d real images in %.1f s (share without a face: %.3f)", rank, len(records),
             time.perf_counter() - t_delta, float(face_absent_real.mean()))  # fmt: skip

    # --- resume: the run's newest checkpoint (after a worker failure or a resubmission)
    start_epoch = 0
    checkpoint = _checkpoint_to_resume(cfg)
    if checkpoint is not None:
        meta, checkpoint = restore_engines(checkpoint, engines, world_size=world)
        start_epoch = meta["epoch"] + 1
        log.info("rank %d resumed from epoch %d (%s)", rank, meta["epoch"], checkpoint.path)

    fixed_noise = torch.randn(cfg.tracking.num_samples, cfg.model.z_dim, generator=torch.Generator().manual_seed(1234))
    step_rng = torch.Generator(device=device).manual_seed(cfg.run.seed * 1000 + rank)
    epoch_log = _epoch_logger(mlflow_uri, run_id) if rank == 0 else None

    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        t_epoch = time.perf_counter()
        # The next step's G(z) and its Δ are started right after each step: detection runs while the next batch is
        # loaded and copied, not while the accelerator waits at the discriminator's loss.
        ahead = dict(z_dim=cfg.model.z_dim, device=device, generator=step_rng, guidance=guidance,
                     detect_faces=detector.submit)  # fmt: skip
        prepared = prepare_fakes(gen, cfg.optim.batch_size, **ahead)
        for batch in loader:
            out = gan_step(
                gen, disc, batch["image"].to(device, non_blocking=True), z_dim=cfg.model.z_dim, g_steps=cfg.optim.g_steps,
                generator=step_rng, guidance=guidance, face_absent_real=face_absent_real[batch["index"]],
                critic=critic, prepared=prepared,
            )  # fmt: skip
            losses = {k: v for k, v in out.items() if k.startswith("loss")}
            stop = non_finite_losses(losses, rank=rank, world=world, epoch=epoch, step=steps)
            if stop is not None:
                _stop_training(stop, rank=rank, epoch_log=epoch_log, flush_seconds=cfg.tracking.flush_seconds,
                               mlflow_uri=mlflow_uri, run_id=run_id, attempt=loop_config.get("attempt"))  # fmt: skip
                return
            prepared = prepare_fakes(gen, cfg.optim.batch_size, **ahead)
            for k, v in out.items():
                sums[k] += v
            steps += 1
        epoch_seconds = time.perf_counter() - t_epoch
        # Mean over this rank's steps, then over ranks: every rank contributes equally (equal step counts).
        keys = sorted(sums)
        stacked = torch.tensor([sums[k] / steps for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(stacked)
        metrics = {k: float(v) / world for k, v in zip(keys, stacked.tolist(), strict=True)}
        metrics.update(
            epoch=epoch,
            images_per_second=steps * cfg.optim.batch_size * world / epoch_seconds,
            skipped_images=float(dataset.stats()["skipped"]),
        )

        with tempfile.TemporaryDirectory() as tmp:
            save_engines(tmp, engines, epoch=epoch, rank=rank, world_size=world,
                         extra={"model": {"z_dim": cfg.model.z_dim, "width": cfg.model.width, "image_size": [h, w]}})  # fmt: skip
            if epoch_log is not None:
                _log_gan_epoch(epoch_log, metrics, gen.module, fixed_noise, epoch, detector)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if epoch_log is not None:
        epoch_log.close(cfg.tracking.flush_seconds)


def gan_face_detector(workers: int | None):
    """The GAN loop's Δ for real images and fakes: the one person-crop setting (``FaceDetector.for_person_crops``),
    the same as distractor synthesis (``distractors.face_detector_settings``) and evaluation."""
    from reid_core.guidance.faces import FaceDetector

    return FaceDetector.for_person_crops(workers=workers)


def face_absent_table(
    records, detector, *, rank: int, world: int, chunk: int = 64, on_bad_image: str = "raise"
) -> torch.Tensor:
    """Δ (1 = no face) of every record's original image (its person box when it has one), (len(records),) float32:
    each rank detects its share (records rank, rank + world, ...), then the shares are all-gathered so every rank
    holds the whole table.

    on_bad_image: ``data.on_bad_image``. With ``"skip"`` a missing or undecodable image gets Δ = 1 and a warning
    (the data loader replaces it by another image, so its Δ is never used); with ``"raise"`` it fails here, naming it.
    """
    import torch.distributed as dist

    from reid_core.data import BadImageError, load_image
    from reid_core.data.dataset import crop_to_box
    from reid_core.data.shards import read_record_bytes

    mine = list(range(rank, len(records), world))
    values = torch.ones(len(records))
    bad = 0
    for start in range(0, len(mine), chunk):
        idx = mine[start : start + chunk]
        try:
            data = read_record_bytes([records[i] for i in idx])  # plain objects or packed shards alike
        except FileNotFoundError:
            if on_bad_image != "skip":
                raise
            data = {}  # read one by one to tell which are missing
            for i in idx:
                try:
                    data.update(read_record_bytes([records[i]]))
                except FileNotFoundError:
                    pass
        images, found = [], []
        for i in idx:
            r = records[i]
            try:
                if r.path not in data:
                    raise BadImageError(r.path, "file not found")
                images.append(crop_to_box(load_image(data[r.path], path=r.path), r.box, r.path))
                found.append(i)
            except BadImageError as err:
                if on_bad_image != "skip":
                    raise
                bad += 1
                log.warning("face detection: %s; Δ = 1 (data.on_bad_image=skip: the loader replaces it)", err)
        if images:
            values[found] = detector.detect(images).face_absent
    if bad:
        log.warning("face detection: %d bad images of %d skipped on rank %d", bad, len(mine), rank)
    if world > 1:
        # Every rank contributes its own entries (others stay 0 in its copy); a sum then assembles the table.
        part = torch.zeros(len(records))
        part[mine] = values[mine]
        dist.all_reduce(part)
        values = part
    return values


def _log_gan_epoch(
    epoch_log: tracking.EpochLogger, metrics: dict, generator, fixed_noise: torch.Tensor, epoch: int, detector
) -> None:
    """Rank 0: queue the epoch's metrics, the face rate of the fixed-noise samples (share with a detectable face),
    their face scores (median and max of each sample's best window, ``FaceDetector.best_scores``: progress towards
    detectable faces while the face rate is still 0) and their grid (fixed noise, so epochs are comparable) for
    MLflow (``tracking.EpochLogger``: MLflow being down does not stop training)."""
    samples = fixed_noise_samples(generator, fixed_noise)
    scores = detector.best_scores(samples)
    metrics = {**metrics, "face_rate": detector.detect(samples).face_rate,
               "face_score_median": float(np.median(scores)), "face_score_max": float(scores.max())}  # fmt: skip
    epoch_log.log(epoch, {k: v for k, v in metrics.items() if k != "epoch"},
                  pictures={f"samples/epoch_{epoch:03d}.png": sample_grid(samples)})  # fmt: skip


def _epoch_logger(uri: str, run_id: str) -> tracking.EpochLogger:
    """Rank 0's MLflow logging, in the background; this worker process logs only through it."""
    tracking.quick_retries()
    return tracking.EpochLogger(uri, run_id)


def _checkpoint_to_resume(cfg):
    """Ray's latest registered checkpoint of the run, or a newer one in the run's folder that Ray has not registered
    (``checkpoint.checkpoint_to_resume``); None for a fresh run."""
    import ray.train

    from reid_core import storage
    from reid_core.train.checkpoint import checkpoint_to_resume

    settings = storage.resolve_settings(cfg.storage.endpoint_url, cfg.storage.region)
    path, fs = storage.ray_storage(cfg.run.storage, settings, outage_seconds=cfg.storage.outage_seconds)
    return checkpoint_to_resume(ray.train.get_checkpoint(), f"{path.rstrip('/')}/{cfg.run.name}", fs)


def _setup_storage(storage_cfg) -> None:
    """The job's ``storage`` section in this worker: its endpoint and region (when set) for every S3 access of the
    process, and mid-run reads that ride out an outage of ``outage_seconds``."""
    from reid_core import storage

    storage.use_endpoint(storage_cfg.endpoint_url, storage_cfg.region)
    storage.set_outage_budget(storage_cfg.outage_seconds)


# ------------------------------------------------------------------------------------------------ re-ID training
def reid_model_kwargs(name: str, *, num_classes: int, feature_dim: int, dropout_rate: float, image_size, face_size,
                      bnneck: bool = False, last_stride: int = 2):  # fmt: skip
    """Keyword arguments of ``build_model(name, ...)`` for the re-ID models (saved in the checkpoint's meta); the
    recipe options only when set, so a checkpoint of the plain recipe has the meta it always had."""
    from reid_core.config import is_dual_stream

    kwargs = {"num_classes": num_classes, "feature_dim": feature_dim, "dropout_rate": dropout_rate}
    kwargs.update({"bnneck": True} if bnneck else {}, **({"last_stride": last_stride} if last_stride != 2 else {}))
    if is_dual_stream(name):
        kwargs.update(image_size=int(image_size[0]), face_size=int(face_size))
    return kwargs


@dataclass(frozen=True)
class ReidTrainingSet:
    """The re-ID job's training data as ``build_training_set`` reads it."""

    splits: Any  # data.Splits of ``data.uri``: train, query, gallery
    pid_map: dict  # original identity -> training label 0..N-1 (``limit_training``)
    training: Any  # data.training_set.TrainingSet: the real records, then the distractor class
    distractors: Any  # data.training_set.DistractorSet of ``distractors.uri``, or None
    per_batch: int  # distractors in each batch
    sampler: Any  # data.training_set.MixedBatchSampler of ``rank``
    steps_per_epoch: int  # full batches per worker and epoch (``len(sampler)``)


def build_training_set(cfg, *, world_size: int, rank: int = 0, settings=None) -> ReidTrainingSet:
    """The one definition of the re-ID training set of ``cfg`` (a ``config.ReidJobConfig``): the layout's training
    split (``data.max_images``), then the distractor set (``distractors.*``) as class N, the distractors per batch and
    rank ``rank``'s batches of P identities × K images on ``world_size`` workers. The job's preflight calls it (on
    the driver, ``rank`` 0) and so does every Ray Train worker (``train_reid_loop``), so both see the same data.

    Raises ``ConfigError`` when the data give no full batch per worker.
    """
    from reid_core.config import ConfigError
    from reid_core.data import read_layout
    from reid_core.data.training_set import (
        MixedBatchSampler,
        distractors_per_batch,
        limit_training,
        read_distractor_set,
        training_records,
    )

    splits = read_layout(cfg.data.uri, cfg.data.layout, **cfg.data.options)
    real, pid_map = limit_training(splits.train, cfg.data.max_images)
    distractors = None
    if cfg.distractors.uri:
        distractors = read_distractor_set(cfg.distractors.uri, max_images=cfg.distractors.max_images, settings=settings)
    training = training_records(real, distractors)
    per_batch = distractors_per_batch(batch_size=cfg.batch_size, num_real=training.num_real,
                                      num_generated=training.num_generated, per_batch=cfg.distractors.per_batch)  # fmt: skip
    sampler = MixedBatchSampler(
        training, identities_per_batch=cfg.optim.identities_per_batch,
        images_per_identity=cfg.optim.images_per_identity, distractors_per_batch=per_batch, seed=cfg.run.seed,
        rank=rank, world_size=world_size,
    )  # fmt: skip
    if len(sampler) == 0:
        raise ConfigError(
            f"optim.identities_per_batch: {training.num_real} training images of {training.num_classes} identities "
            f"give no full batch of {cfg.optim.identities_per_batch}×{cfg.optim.images_per_identity} per worker on "
            f"{world_size} workers"
        )
    return ReidTrainingSet(splits=splits, pid_map=pid_map, training=training, distractors=distractors,
                           per_batch=per_batch, sampler=sampler, steps_per_epoch=len(sampler))  # fmt: skip


def train_reid_loop(loop_config: dict) -> None:
    """Ray Train worker: a re-ID network (CondenseNet or Dual-Stream) on real identities + the distractor class.

    One DeepSpeed engine. Every step: training progress p = (epoch + step / steps) / epochs is passed explicitly to the
    learning-rate schedule and to CondenseNet's condensation (its stages fall in the first half, pruned masks are
    buffers, so they are in the checkpoint); the loss is ``reid_loss`` (distractor class or LSRO) plus the group lasso.
    Each epoch every rank saves its checkpoint shard and reports; rank 0 logs loss / accuracy to MLflow.
    """
    import ray.train

    from reid_core.config import ReidJobConfig, is_dual_stream

    cfg = from_dict(ReidJobConfig, loop_config["job"])
    _setup_accelerator(cfg.scaling.use_gpu)
    _setup_storage(cfg.storage)
    import deepspeed
    from torch.utils.data import DataLoader

    from reid_core.data import ReIDDataset, build_transforms
    from reid_core.data.training_set import FaceStreamDataset, all_face_boxes
    from reid_core.models import build_model
    from reid_core.models.condense import learned_group_convs
    from reid_core.train.checkpoint import REID_MODEL, restore_engines, save_engines
    from reid_core.train.deepspeed import deepspeed_config, init_distributed
    from reid_core.train.steps import ReidLoss, reid_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    mlflow_uri, run_id = loop_config["mlflow_uri"], loop_config["run_id"]
    torch.manual_seed(cfg.run.seed + rank)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    init_distributed(cfg.scaling.use_gpu)
    dual = is_dual_stream(cfg.model.name)

    # --- data: real identities 0..N-1, then the distractor class N (the training set the preflight checked)
    data = build_training_set(cfg, world_size=world, rank=rank)
    splits, training, per_batch, sampler, steps = (data.splits, data.training, data.per_batch, data.sampler,
                                                   data.steps_per_epoch)  # fmt: skip
    h, w = cfg.data.image_size
    if dual:
        from reid_core.guidance.faces import FaceDetector

        t_faces = time.perf_counter()
        with FaceDetector.for_person_crops(workers=max(1, int(cfg.scaling.cpus_per_worker))) as detector:
            boxes = all_face_boxes(training.records, detector, rank=rank, world=world)
        log.info("rank %d: face boxes of %d records in %.1f s (%d with a face)", rank, len(boxes),
                 time.perf_counter() - t_faces, sum(b is not None for b in boxes.values()))  # fmt: skip
        dataset = FaceStreamDataset(training.records, boxes, image_size=h, face_size=cfg.model.face_size, train=True,
                                    flip_p=cfg.data.flip, on_bad_image=cfg.data.on_bad_image)  # fmt: skip
    else:
        dataset = ReIDDataset(training.records, build_transforms(h, w, train=True, flip_p=cfg.data.flip,
                              pad=cfg.data.pad, erase_p=cfg.data.random_erasing), on_bad_image=cfg.data.on_bad_image, decode_size=(h, w))  # fmt: skip
    batches = sampler
    if not cfg.data.loader_workers and isinstance(dataset, ReIDDataset):
        batches = dataset.read_ahead(sampler)  # in-process: the next batches' bytes are read while this one trains
    loader = DataLoader(dataset, batch_sampler=batches,
                        **loader_kwargs(cfg.data.loader_workers, use_gpu=cfg.scaling.use_gpu))  # fmt: skip
    is_generated = training.is_generated

    # --- model and engine: the torch optimizer (SGD + Nesterov or Adam) is passed to DeepSpeed on every path
    model_kwargs = reid_model_kwargs(cfg.model.name, num_classes=training.num_classes, feature_dim=cfg.model.feature_dim,
                                     dropout_rate=cfg.model.dropout_rate, image_size=(h, w),
                                     face_size=cfg.model.face_size, bnneck=cfg.model.bnneck,
                                     last_stride=cfg.model.last_stride)  # fmt: skip
    model = build_model(cfg.model.name, **model_kwargs)
    if cfg.model.pretrained:  # a resumed run overwrites it with its checkpoint below
        from reid_core.models.pretrained import load_pretrained
        from reid_core.train.pretrained import read_state_dict

        copied = load_pretrained(model, read_state_dict(cfg.model.pretrained), uri=cfg.model.pretrained)
        log.info("rank %d: backbone initialised from %s (%d tensors)", rank, cfg.model.pretrained, copied)
    condenses = bool(learned_group_convs(model))
    ds_cfg = deepspeed_config(micro_batch_size=sampler.batch_size, world_size=world, use_gpu=cfg.scaling.use_gpu,
                              precision=cfg.scaling.precision, zero_stage=cfg.scaling.zero_stage, lr=cfg.optim.lr)  # fmt: skip
    ds_cfg.pop("optimizer", None)  # DeepSpeed's own section is Adam; the recipe is SGD: pass a torch optimizer
    ds_cfg["zero_allow_untested_optimizer"] = True
    if cfg.optim.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                    nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)  # fmt: skip
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    dtype = torch.bfloat16 if cfg.scaling.precision == "bf16" else torch.float32
    step_loss = ReidLoss(mode=cfg.loss.mode, label_smoothing=cfg.loss.label_smoothing,
                         triplet=0.0 if dual else cfg.loss.triplet, triplet_margin=cfg.loss.triplet_margin,
                         group_lasso=cfg.loss.group_lasso if condenses else 0.0,
                         face_presence=cfg.loss.face_presence if dual else 0.0)  # fmt: skip

    # --- resume: the run's newest checkpoint (masks and condensing stages are buffers: restored too)
    start_epoch = 0
    checkpoint = _checkpoint_to_resume(cfg)
    if checkpoint is not None:
        meta, checkpoint = restore_engines(checkpoint, {REID_MODEL: engine}, world_size=world)
        start_epoch = meta["epoch"] + 1
        log.info("rank %d resumed from epoch %d (%s)", rank, meta["epoch"], checkpoint.path)

    extra_meta = {
        "model": {"name": cfg.model.name, "kwargs": model_kwargs},
        "image_size": [h, w],
        "num_classes": training.num_classes,
        "num_real": training.num_real,
        "num_generated": training.num_generated,
        "distractors_per_batch": per_batch,
        "steps_per_epoch": steps,
    }
    validate = _validation(cfg, splits, dual, device) if cfg.eval.every_epochs and rank == 0 else None
    log.info("rank %d: %d real images of %d identities + %d distractors; %d steps/epoch of %d+%d images",
             rank, training.num_real, training.num_classes, training.num_generated, steps, cfg.batch_size, per_batch)  # fmt: skip

    epoch_log = _epoch_logger(mlflow_uri, run_id) if rank == 0 else None
    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        engine.train()
        # The same keys on every rank: they are all-reduced as one tensor.
        sums = dict.fromkeys(("loss", "correct", "real", "distractor_correct", "generated", "skipped_images",
                              "group_lasso", "face_presence_loss", "triplet"), 0.0)  # fmt: skip
        t_epoch = time.perf_counter()
        for step, batch in enumerate(loader):
            progress = (epoch + step / steps) / cfg.optim.epochs
            lr = learning_rate(cfg.optim.lr, progress, schedule=cfg.optim.schedule, epochs=cfg.optim.epochs,
                               warmup_epochs=cfg.optim.warmup_epochs, warmup_factor=cfg.optim.warmup_factor,
                               milestones=cfg.optim.step_milestones, gamma=cfg.optim.step_gamma)  # fmt: skip
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            if condenses:
                engine.module.apply_condensation(progress)
            images = batch["image"].to(device, dtype, non_blocking=True)  # from pinned memory on GPUs
            labels = batch["pid"].to(device, non_blocking=True)
            generated = is_generated[batch["index"]].to(device)
            face = {}
            if dual:
                face = {"face_crop": batch["face_crop"].to(device, dtype, non_blocking=True),
                        "has_face": batch["has_face"].to(device, non_blocking=True)}  # fmt: skip
            out, stop = reid_step(engine, images, labels, generated, num_classes=training.num_classes, loss=step_loss,
                                  check=partial(non_finite_losses, rank=rank, world=world, epoch=epoch, step=step),
                                  **face)  # fmt: skip
            if stop is not None:  # nothing was updated
                _stop_training(stop, rank=rank, epoch_log=epoch_log, flush_seconds=cfg.tracking.flush_seconds,
                               mlflow_uri=mlflow_uri, run_id=run_id, attempt=loop_config.get("attempt"))  # fmt: skip
                return
            for key in sums.keys() & out.keys():
                sums[key] += out[key]
            sums["skipped_images"] += float(batch["skipped"].sum())
        epoch_seconds = time.perf_counter() - t_epoch

        # Sums over ranks (equal step counts on every rank), then means.
        keys = sorted(sums)
        stacked = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(stacked)
        total_sums = dict(zip(keys, stacked.tolist(), strict=True))
        metrics = {
            "loss": total_sums["loss"] / (steps * world),
            "accuracy": total_sums["correct"] / max(total_sums["real"], 1.0),
            "lr": lr,
            "epoch": epoch,
            "images_per_second": steps * sampler.batch_size * world / epoch_seconds,
            "skipped_images": total_sums["skipped_images"],
        }
        if cfg.loss.triplet:
            metrics["triplet"] = total_sums["triplet"] / (steps * world)
        if condenses and cfg.loss.group_lasso:
            metrics["group_lasso"] = total_sums["group_lasso"] / (steps * world)
        if dual:
            # Share of the training images whose face stream sees a face (dlib box or the tagged head region).
            metrics["train_face_share"] = sum(b is not None for b in boxes.values()) / max(len(boxes), 1)
            if cfg.loss.face_presence:
                metrics["face_presence_loss"] = total_sums["face_presence_loss"] / (steps * world)
        if cfg.loss.mode == "distractor_class" and total_sums["generated"]:
            metrics["distractor_accuracy"] = total_sums["distractor_correct"] / total_sums["generated"]
        if condenses:
            metrics["condensing_stage"] = float(min(int(m.stage) for m in learned_group_convs(engine.module)))

        if validate is not None and ((epoch + 1) % cfg.eval.every_epochs == 0 or epoch + 1 == cfg.optim.epochs):
            metrics.update(validate(engine.module))  # rank 0 only: the others' reports carry no val_* keys

        with tempfile.TemporaryDirectory() as tmp:
            save_engines(tmp, {REID_MODEL: engine}, epoch=epoch, rank=rank, world_size=world, extra=extra_meta)
            if epoch_log is not None:
                epoch_log.log(epoch, {k: v for k, v in metrics.items() if k != "epoch"})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    if epoch_log is not None:
        epoch_log.close(cfg.tracking.flush_seconds)


def _validation(cfg, splits, dual: bool, device):
    """Rank 0's per-epoch validation (``eval.every_epochs``): a function model -> {"val_rank1", "val_mAP", "val_mINP"}
    (fractions) on the query/gallery split, with the training-form model in eval mode (float32), no flip.

    This is what a λ search's early stopping (ASHA) compares trials on: the downstream retrieval metric, not a loss.
    The final, converted model is evaluated again after training (``pipeline.finalize``).
    """
    import copy

    from reid_core.evaluation.features import evaluate_splits, evaluation_face_boxes

    face_boxes = None
    if dual:
        face_boxes = evaluation_face_boxes(splits.query + splits.gallery,
                                           workers=max(1, int(cfg.scaling.cpus_per_worker)))  # fmt: skip

    def validate(model: torch.nn.Module) -> dict[str, float]:
        if next(model.parameters()).dtype != torch.float32:
            model = copy.deepcopy(model).float()
        t0 = time.perf_counter()
        summary, _ = evaluate_splits(model, splits.query, splits.gallery, image_size=tuple(cfg.data.image_size),
                                     batch_size=cfg.eval.batch_size, metric=cfg.eval.metric,
                                     max_rank=cfg.eval.max_rank, face_boxes=face_boxes, face_size=cfg.model.face_size,
                                     device=device)  # fmt: skip
        model.train()
        out = {f"val_{k}": float(summary[k]) for k in ("rank1", "mAP", "mINP")}
        out["val_seconds"] = time.perf_counter() - t0
        return out

    return validate
