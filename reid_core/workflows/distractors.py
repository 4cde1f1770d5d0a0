"""The distractor set: N images from a DC-GAN generator, written with a manifest and metadata to S3 or a folder.

``preflight`` checks a ``SynthesisSpec`` before any work; ``run_synthesis`` writes the set and records it in an MLflow
run. ``jobs/synthesize.py`` (whose options are the spec's fields) and the λ search (``reid_core/workflows/search.py``)
both call them. Design and measurements: docs/distractors.md.

The distractor set (the re-ID training job reads it as one extra class)::

    OUT/distractors.json     metadata; written LAST: a set without it is incomplete and must not be used
    OUT/manifest.csv         header ``path,index,seed,face_absent``; one row per image, sorted by index
    OUT/images/000000.jpg    RGB JPEG, quality 95, 4:4:4 (or PNG with ``--format png``), H×W of the generator

- ``path``: key relative to OUT, ``images/<index zero-padded to max(6, digits of N-1)>.jpg|.png``.
- ``index``: 0 .. N-1. ``seed``: the set's ``--seed`` (every row the same; with ``index`` it reproduces the image).
- ``face_absent``: Δ(x), dlib's HOG detector on the stored pixels before encoding: 1 = no face, 0 = a face.
- ``distractors.json`` keys: ``format`` ("reid-distractors/1"), ``num_images``, ``image_size`` [H, W], ``channels``,
  ``image_format`` ("jpeg" | "png"), ``jpeg_quality``, ``manifest``, ``images``, ``seed``, ``z_dim``, ``noise``,
  ``batch_norm``, ``standing_statistics``, ``face_rate`` (share with a face), ``faces``, ``face_detector``,
  ``generator`` {``model_uri``, ``name``, ``version``, ``run_id``, ``pinned_uri``}, ``mlflow`` {``tracking_uri``,
  ``experiment``, ``run_id``}, ``created_at`` (UTC ISO 8601), ``seconds``.

Determinism: image i depends only on (generator version, seed, i). Its noise is ``z_i = numpy.random.default_rng(
numpy.random.SeedSequence(seed, spawn_key=(0, i))).standard_normal(z_dim, dtype=float32)``; the generator runs in eval
mode, so an image does not depend on its batch; batches and chunks start at multiples of the batch size, so the same
images are computed together whatever the number of workers (bit-identical on the same hardware and libraries).
``--batch-norm standing`` (default) first replaces the batch-norm running statistics by standing statistics (BigGAN):
the exact mean of the batch statistics over 1,024 noise vectors of another stream (spawn_key (1, k)), i.e. the
train-mode behaviour DC-GAN samples are drawn with, without the dependence on the batch; ``running`` keeps the
registered statistics.

Work: chunks of ``--chunk-size`` images. One chunk or ``--workers 1``: in this process (face detection on a pool of
all CPUs). Otherwise one Ray task per chunk (1 CPU: generate, detect, encode, upload), ``--workers`` at a time (0 = the
cluster's CPUs); a chunk is idempotent, so a retried task rewrites the same objects.

MLflow: a run in ``--experiment`` ("distractors") with params, the generator version as its input (tags
``input_model.*`` and MLflow 3's model lineage), metrics ``face_rate``, ``faces``, ``num_images``, ``seconds``,
``images_per_second``, artifacts ``samples/distractors.png`` (first 64 stored images) and ``distractors.json``; the
model version gets tags ``distractors.uri``, ``distractors.run_id``, ``distractors.face_rate`` (latest set).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch
from torch import nn

from reid_core import storage, tracking

log = logging.getLogger(__name__)

FORMAT = "reid-distractors/1"
METADATA_FILE = "distractors.json"
MANIFEST_FILE = "manifest.csv"
IMAGES_DIR = "images"
MANIFEST_COLUMNS = ("path", "index", "seed", "face_absent")
IMAGE_FORMATS = {"jpeg": "jpg", "png": "png"}
IMAGE_NAME = re.compile(rf"{IMAGES_DIR}/[0-9]{{6,}}\.(?:{'|'.join(IMAGE_FORMATS.values())})")  # see image_path
JPEG_QUALITY = 95
# SeedSequence spawn keys: (IMAGE_STREAM, i) gives image i's noise, (STANDING_STREAM, k) standing-statistics batch k.
IMAGE_STREAM = 0
STANDING_STREAM = 1
STANDING_SAMPLES = 1024
STANDING_BATCH = 64  # DC-GAN's training batch size: standing statistics average statistics of batches of this size
GRID_IMAGES = 64
WRITE_BATCH = 256  # objects per storage.write_many call: bounded memory, many requests in flight


@dataclass
class SynthesisSpec:
    """What to synthesise and where (the job's command-line options; ``jobs/synthesize.py --help`` explains each)."""

    model: str  # models:/NAME@ALIAS or models:/NAME/VERSION
    out: str  # s3://bucket/prefix or a local folder
    num_images: int = 48_000
    batch_size: int = 64
    chunk_size: int = 512  # images per Ray task; a multiple of batch_size
    workers: int = 0  # Ray tasks at a time; 1 = in this process; 0 = all CPUs of the cluster
    seed: int = 0
    image_format: str = "jpeg"  # jpeg | png
    batch_norm: str = "standing"  # standing | running
    experiment: str = "distractors"
    run_name: str | None = None  # default distractors-NAME-vVERSION-nN-sSEED
    tracking_uri: str | None = None
    overwrite: bool = False


# --------------------------------------------------------------------------------------------- pure: indices, noise
def index_ranges(num_images: int, chunk_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering 0 .. num_images-1, each ``chunk_size`` long except the last.

    Chunks start at multiples of ``chunk_size``; with ``chunk_size`` a multiple of the batch size, every batch of every
    chunk starts at a multiple of the batch size, whatever the number of workers.
    """
    if num_images < 1 or chunk_size < 1:
        raise ValueError(f"index_ranges: num_images and chunk_size must be ≥ 1; got {num_images}, {chunk_size}")
    return [(start, min(start + chunk_size, num_images)) for start in range(0, num_images, chunk_size)]


def batch_ranges(start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) cut at the multiples of ``batch_size`` (global batch boundaries, not relative to ``start``)."""
    if batch_size < 1 or not 0 <= start <= stop:
        raise ValueError(f"batch_ranges: need 0 ≤ start ≤ stop, batch_size ≥ 1, got {start}, {stop}, {batch_size}")
    cuts = [start, *range((start // batch_size + 1) * batch_size, stop, batch_size), stop]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def image_noise(seed: int, indices: Sequence[int], z_dim: int) -> torch.Tensor:
    """Noise of the images ``indices``: (len(indices), z_dim) float32 N(0, 1); row j depends only on (seed, indices[j]).

    z_i = default_rng(SeedSequence(seed, spawn_key=(0, i))).standard_normal(z_dim, dtype=float32).
    """
    if seed < 0 or z_dim < 1:
        raise ValueError(f"image_noise: seed must be ≥ 0 and z_dim ≥ 1; got seed {seed}, z_dim {z_dim}")
    rows = [
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(IMAGE_STREAM, int(i)))).standard_normal(
            z_dim, dtype=np.float32
        )
        for i in indices
    ]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, z_dim)


def tanh_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generator output (N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 in [0, 255], channels last (PIL/JPEG order).

    v -> round((v + 1) · 127.5): -1 -> 0, 0 -> 128, 1 -> 255, evenly spaced bins; values outside [-1, 1] are clamped.
    """
    if images.ndim != 4:
        raise ValueError(f"tanh_to_uint8 expects (N, C, H, W) images; got shape {tuple(images.shape)}")
    x = images.detach().to(device="cpu", dtype=torch.float32).clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def with_standing_batch_norm(
    generator: nn.Module, *, seed: int, z_dim: int, samples: int = STANDING_SAMPLES, batch_size: int = STANDING_BATCH
) -> nn.Module:
    """A copy of ``generator`` in eval mode whose batch-norm running statistics are the exact averages of the batch
    statistics over ``samples`` noise vectors (batches of ``batch_size``, noise stream spawn_key (1, k)).

    The original is not modified. A generator without batch norm comes back as an eval-mode copy.
    """
    if samples < batch_size or batch_size < 2:
        raise ValueError(
            f"standing statistics need batch_size ≥ 2 and samples ≥ batch_size; got {samples}, {batch_size}"
        )
    model = copy.deepcopy(generator)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the running statistics become the plain mean over batches
    model.train()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.no_grad():
        for k in range(samples // batch_size):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(STANDING_STREAM, k)))
            z = torch.from_numpy(rng.standard_normal((batch_size, z_dim), dtype=np.float32))
            model(z.to(device=device, dtype=dtype))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def image_path(index: int, num_images: int, image_format: str) -> str:
    """The image's key relative to the set's root: ``images/000042.jpg`` (at least 6 digits, all the same width)."""
    width = max(6, len(str(num_images - 1)))
    return f"{IMAGES_DIR}/{index:0{width}d}.{IMAGE_FORMATS[image_format]}"


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    """(H, W, 3) uint8 -> JPEG (quality 95, 4:4:4: small images keep their colour edges) or PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    elif image_format == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        raise ValueError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    return buf.getvalue()


def face_detector_settings(image_size: tuple[int, int]) -> dict:
    """FaceDetector keyword arguments for generated images of ``image_size`` (H, W): the one person-crop setting of
    ``reid_core.guidance.faces.person_crop_settings`` (it handles every size, stretched 128×128 persons included)."""
    from reid_core.guidance.faces import person_crop_settings

    h, w = image_size
    if h < 1 or w < 1:
        raise ValueError(f"face_detector_settings: image size must be (H, W) in pixels; got {image_size!r}")
    return person_crop_settings()


# ----------------------------------------------------------------------------------------------- one range of images
def synthesize_range(
    generator: nn.Module,
    *,
    start: int,
    stop: int,
    num_images: int,
    seed: int,
    z_dim: int,
    batch_size: int,
    out: str,
    image_format: str,
    detector,
    settings: storage.S3Settings | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, int, int, int]]:
    """Generate images start .. stop-1, detect faces, write them under ``out``; returns their manifest rows
    ``(path, index, seed, face_absent)`` in index order.

    generator: eval mode, z (B, z_dim) -> (B, 3, H, W) in [-1, 1]. detector: a ``FaceDetector`` (its ``submit`` runs
    while the next batch is generated when it has a pool). progress: called with the number of images of each batch.
    """
    device = next(generator.parameters()).device
    dtype = next(generator.parameters()).dtype
    rows: list[tuple[str, int, int, int]] = []
    pending_writes: dict[str, bytes] = {}
    pending_faces = None  # (indices, Future[FaceDetections]) of the previous batch

    def collect(indices: range, future) -> None:
        absent = future.result().face_absent.tolist()
        rows.extend(
            (image_path(i, num_images, image_format), i, seed, int(a)) for i, a in zip(indices, absent, strict=True)
        )
        if progress is not None:
            progress(len(indices))

    for a, b in batch_ranges(start, stop, batch_size):
        with torch.no_grad():
            fake = generator(image_noise(seed, range(a, b), z_dim).to(device=device, dtype=dtype))
        if fake.ndim != 4 or fake.shape[0] != b - a or fake.shape[1] != 3:
            raise ValueError(f"the generator returned shape {tuple(fake.shape)} for {b - a} noise vectors; expected "
                             f"({b - a}, 3, H, W) RGB images in [-1, 1]")  # fmt: skip
        pixels = tanh_to_uint8(fake).numpy()
        future = detector.submit(list(pixels))  # the stored pixels, before JPEG encoding
        for i, image in zip(range(a, b), pixels, strict=True):
            url = storage.join(out, image_path(i, num_images, image_format))
            pending_writes[url] = encode_image(image, image_format)
        if len(pending_writes) >= WRITE_BATCH:
            storage.write_many(pending_writes, settings)
            pending_writes.clear()
        if pending_faces is not None:
            collect(*pending_faces)
        pending_faces = (range(a, b), future)
    storage.write_many(pending_writes, settings)
    if pending_faces is not None:
        collect(*pending_faces)
    return rows


def _synthesize_chunk_task(
    generator: nn.Module, start: int, stop: int, params: dict
) -> list[tuple[str, int, int, int]]:
    """Ray task body: one chunk with an in-process detector (the task holds one CPU)."""
    from reid_core.guidance.faces import FaceDetector

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    settings = storage.resolve_settings()
    with FaceDetector(workers=0, **params.pop("detector")) as detector:
        return synthesize_range(generator, start=start, stop=stop, detector=detector, settings=settings, **params)


def check_args(args: SynthesisSpec) -> None:
    tracking.parse_model_uri(args.model)  # syntax only: the registry is asked after MLflow answers
    if args.num_images < 1:
        raise ValueError(f"--num-images must be ≥ 1; got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1; got {args.batch_size}")
    if args.chunk_size < 1 or args.chunk_size % args.batch_size:
        raise ValueError(
            f"--chunk-size must be a positive multiple of --batch-size ({args.batch_size}) so that batches start at "
            f"the same indices whatever the number of workers; got {args.chunk_size}"
        )
    if args.workers < 0:
        raise ValueError(f"--workers must be ≥ 0 (0 = all CPUs of the Ray cluster); got {args.workers}")
    if args.seed < 0:
        raise ValueError(f"--seed must be ≥ 0; got {args.seed}")


def check_output(out: str, overwrite: bool, settings: storage.S3Settings) -> list[str]:
    """The output is reachable and empty, or (with ``overwrite``) holds only a distractor set's files: returns the
    files to delete before writing."""
    storage.check_location(out, settings)
    existing = storage.list_files(out, settings)
    if not existing:
        return []
    if not overwrite:
        raise storage.StorageError(
            f"{out} is not empty ({len(existing)} objects, e.g. {existing[0]}); pass --overwrite to replace a "
            "distractor set there, or choose another --out"
        )
    # list_files gives S3 URLs for S3 and absolute paths for local folders
    root = (out if storage.is_s3(out) else storage.filesystem(out)[1]).rstrip("/") + "/"
    foreign = [f for f in existing if not (f.startswith(root) and _part_of_set(f[len(root) :]))]
    if foreign:
        raise storage.StorageError(
            f"refusing to overwrite {out}: it holds {len(foreign)} objects that are not part of a distractor "
            f"set (e.g. {foreign[0]}); choose another --out"
        )
    return existing


def _part_of_set(relative: str) -> bool:
    """A name this job writes (``image_path``): only such files are ever deleted by ``--overwrite``."""
    return relative in (METADATA_FILE, MANIFEST_FILE) or IMAGE_NAME.fullmatch(relative) is not None


def as_dcgan_generator(model: nn.Module) -> nn.Module | None:
    """An eager reid_core DC-GAN ``Generator`` (eval mode) computing exactly what ``model`` computes, or None.

    MLflow 3 registers PyTorch models as ``torch.export`` programs: they keep the ``state_dict`` but lose the class,
    its attributes and train mode, which standing statistics need. The generator is rebuilt from the weights' shapes
    (z_dim, width, channels) and the output size, loaded strictly, and used only if its outputs equal the model's.
    """
    from reid_core.models.dcgan import Generator

    if isinstance(model, Generator):
        return model.float().eval()
    try:
        state = model.state_dict()
        first = state["net.0.weight"]  # (z_dim, c, h0, w0): the projection of z onto the seed grid
        convs = [k for k in state if k.startswith("net.") and k.endswith(".weight") and state[k].ndim == 4]
        last = state[max(convs, key=lambda k: int(k.split(".")[1]))]  # (width, channels, 4, 4): the output layer
        z_dim, width, channels = int(first.shape[0]), int(last.shape[0]), int(last.shape[1])
        z = image_noise(0, range(4), z_dim)
        with torch.no_grad():
            expected = model(z).float()
        eager = Generator(z_dim=z_dim, width=width, image_size=tuple(expected.shape[2:]), channels=channels)
        eager.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        eager.eval()
        with torch.no_grad():
            same = torch.allclose(eager(z), expected, atol=1e-5)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
        log.info("the registered model is not a reid_core DC-GAN generator (%s: %s)", type(exc).__name__, exc)
        return None
    return eager if same else None


def load_generator(mlflow_uri: str, ref: tracking.ModelVersionRef, batch_norm: str) -> tuple[nn.Module, int]:
    """The registered generator on the CPU in eval mode and its noise size z_dim; checked with a forward pass.

    A reid_core DC-GAN generator comes back as an eager ``Generator`` (see ``as_dcgan_generator``); any other
    generator is used as loaded, with z_dim from its MLflow signature, and only with ``batch_norm="running"``.
    """
    try:
        model = tracking.load_pytorch_model(mlflow_uri, ref.uri, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported in one line, naming the version
        raise ValueError(f"cannot load {ref.uri} (from {ref.source}): {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{ref.uri} is not a PyTorch module (got {type(model).__name__})")
    generator = as_dcgan_generator(model)
    if generator is not None:
        z_dim = generator.z_dim
    else:
        if batch_norm == "standing":
            raise ValueError(
                f"{ref.uri} is not a reid_core DC-GAN generator, so its batch-norm statistics cannot be recomputed; "
                "pass --batch-norm running to use the registered ones"
            )
        shape = tracking.model_input_shape(mlflow_uri, ref.uri)
        if not shape or len(shape) != 2 or shape[1] < 1:
            raise ValueError(f"{ref.uri}: its MLflow signature gives no (batch, z_dim) noise input (got {shape})")
        generator, z_dim = model, shape[1]
    with torch.no_grad():
        probe = generator(image_noise(0, [0, 1], z_dim))
    if probe.ndim != 4 or probe.shape[:2] != (2, 3):
        raise ValueError(
            f"{ref.uri}: expected (N, 3, H, W) RGB images from (N, {z_dim}) noise; got {tuple(probe.shape)}"
        )
    if not torch.isfinite(probe).all() or probe.abs().max() > 1.0 + 1e-4:
        raise ValueError(f"{ref.uri}: outputs are not in [-1, 1] (tanh) or not finite: is this a generator?")
    return generator, z_dim


@dataclass(frozen=True)
class SynthesisPlan:
    """What ``preflight`` checked and loaded for ``run_synthesis``."""

    mlflow_uri: str  # the MLflow server, resolved and reachable
    ref: tracking.ModelVersionRef  # the generator's registered version
    settings: storage.S3Settings  # S3 settings of the environment
    to_delete: list[str]  # the previous set's files at ``--out`` (``--overwrite``), deleted before writing
    generator: nn.Module  # the generator on the CPU in eval mode (``load_generator``)
    z_dim: int  # its noise size


def preflight(args: SynthesisSpec) -> SynthesisPlan:
    """Check arguments, MLflow, the model URI and the output before Ray starts; load the generator."""
    check_args(args)
    mlflow_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    tracking.check_server(mlflow_uri)
    ref = tracking.resolve_model_version(mlflow_uri, args.model)
    settings = storage.resolve_settings()
    to_delete = check_output(args.out, args.overwrite, settings)
    generator, z_dim = load_generator(mlflow_uri, ref, args.batch_norm)
    return SynthesisPlan(mlflow_uri=mlflow_uri, ref=ref, settings=settings, to_delete=to_delete, generator=generator,
                         z_dim=z_dim)  # fmt: skip


def run_synthesis(args: SynthesisSpec, pre: SynthesisPlan, *, tags: dict[str, str] | None = None) -> dict:
    """Write the set checked by ``preflight`` and record it in an MLflow run (``tags`` added to the run's).

    Returns {"run_id", "metadata" (the set's distractors.json), "mode" (in-process or Ray), "ref"}.
    """
    mlflow_uri, ref, settings, z_dim = pre.mlflow_uri, pre.ref, pre.settings, pre.z_dim
    run_name = args.run_name or f"distractors-{ref.name}-v{ref.version}-n{args.num_images}-s{args.seed}"
    params = {
        "model_uri": args.model,
        "model_name": ref.name,
        "model_version": ref.version,
        "num_images": args.num_images,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "workers": args.workers,
        "image_format": args.image_format,
        "batch_norm": args.batch_norm,
        "out": args.out,
        "z_dim": z_dim,
    }
    tags = {"job": "synthesize", "distractors.uri": args.out, **(tags or {})}
    run_id = tracking.start_run(mlflow_uri, args.experiment, run_name, params, tags=tags)
    try:
        tracking.log_model_version_input(mlflow_uri, run_id, ref)
        if pre.to_delete:
            log.info("--overwrite: deleting the %d objects of the previous set at %s", len(pre.to_delete), args.out)
            storage.delete_files(pre.to_delete, settings)
        summary = synthesize(args, pre.generator, z_dim, settings)
        metadata = finish_set(args, summary, ref, mlflow_uri, run_id, settings)
        log_set(mlflow_uri, run_id, ref, args, metadata, settings)
    except BaseException:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")
    return {"run_id": run_id, "metadata": metadata, "mode": summary["mode"], "ref": ref}


def synthesize(args: SynthesisSpec, generator: nn.Module, z_dim: int, settings: storage.S3Settings) -> dict:
    """Generate and write all images; returns {"rows", "image_size", "z_dim", "mode", "seconds", "detector"}."""
    from tqdm import tqdm

    from reid_core.guidance.faces import FaceDetector

    t0 = time.perf_counter()
    if args.batch_norm == "standing":
        generator = with_standing_batch_norm(generator, seed=args.seed, z_dim=z_dim)
    with torch.no_grad():
        image_size = tuple(generator(image_noise(args.seed, [0], z_dim)).shape[2:])
    detector_kwargs = face_detector_settings(image_size)
    chunks = index_ranges(args.num_images, args.chunk_size)
    params = dict(num_images=args.num_images, seed=args.seed, z_dim=z_dim, batch_size=args.batch_size, out=args.out,
                  image_format=args.image_format)  # fmt: skip
    rows: list[tuple[str, int, int, int]] = []
    with tqdm(total=args.num_images, unit="img", desc=f"distractors -> {args.out}", disable=None) as bar:
        if args.workers == 1 or len(chunks) == 1:
            mode = "in-process"
            with FaceDetector(**detector_kwargs) as detector:
                for k, (start, stop) in enumerate(chunks):
                    rows += synthesize_range(generator, start=start, stop=stop, detector=detector, settings=settings,
                                             progress=bar.update, **params)  # fmt: skip
                    _log_progress(k + 1, len(chunks), stop - start, rows, t0)
        else:
            workers, rows = _run_on_ray(
                generator, chunks, args.workers, {**params, "detector": detector_kwargs}, bar, t0
            )
            mode = f"Ray, {workers} workers"
    rows.sort(key=lambda r: r[1])
    if [r[1] for r in rows] != list(range(args.num_images)):
        raise RuntimeError(f"internal error: {len(rows)} manifest rows for {args.num_images} images")
    detector = FaceDetector(workers=0, **detector_kwargs)  # for its settings only: no pool starts
    detector_meta = {
        "name": "dlib HOG frontal face detector (reid_core.guidance.faces.FaceDetector.for_person_crops)",
        "scale": detector.scale_for(image_size[0]),
        "top_fraction": detector.top_fraction,
        "score_threshold": detector.score_threshold,
        "resize_to": list(rs) if (rs := detector.detect_size(*image_size)) else None,
    }
    seconds = time.perf_counter() - t0
    return {"rows": rows, "image_size": image_size, "z_dim": z_dim, "mode": mode, "seconds": seconds,
            "detector": detector_meta}  # fmt: skip


def _log_progress(done_chunks: int, total_chunks: int, n: int, rows: list, t0: float) -> None:
    elapsed = time.perf_counter() - t0
    log.info("chunk %d/%d done (%d images; %d in total, %.1f images/s)", done_chunks, total_chunks, n, len(rows),
             len(rows) / max(elapsed, 1e-9))  # fmt: skip


def _run_on_ray(generator: nn.Module, chunks: list[tuple[int, int]], workers: int, params: dict, bar, t0: float):
    """Every chunk a Ray task (1 CPU), at most ``workers`` in flight (0 = the cluster's CPUs)."""
    import ray

    from reid_core.runtime import init_ray_for_job

    if not ray.is_initialized():  # a job driver starts Ray; a Tune trial runs inside it already
        init_ray_for_job()
    if workers == 0:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(workers, len(chunks))
    log.info("%d chunks on Ray, %d at a time", len(chunks), workers)
    task = ray.remote(num_cpus=1, max_retries=3)(_synthesize_chunk_task)
    model_ref = ray.put(generator)
    queue = list(chunks)
    running: dict = {}
    rows: list[tuple[str, int, int, int]] = []
    done = 0
    while queue or running:
        while queue and len(running) < workers:
            start, stop = queue.pop(0)
            running[task.remote(model_ref, start, stop, dict(params))] = (start, stop)
        finished, _ = ray.wait(list(running), num_returns=1)
        for ref in finished:
            start, stop = running.pop(ref)
            rows += ray.get(ref)
            done += 1
            bar.update(stop - start)
            _log_progress(done, len(chunks), stop - start, rows, t0)
    return workers, rows


def finish_set(args, summary: dict, ref: tracking.ModelVersionRef, mlflow_uri: str, run_id: str, settings) -> dict:
    """Write ``manifest.csv``, then ``distractors.json`` (last: its presence marks a complete set)."""
    rows = summary["rows"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    storage.write_bytes(storage.join(args.out, MANIFEST_FILE), text.getvalue().encode(), settings)
    faces = sum(1 for r in rows if r[3] == 0)
    metadata = {
        "format": FORMAT,
        "num_images": len(rows),
        "image_size": list(summary["image_size"]),
        "channels": 3,
        "image_format": args.image_format,
        "jpeg_quality": JPEG_QUALITY if args.image_format == "jpeg" else None,
        "manifest": MANIFEST_FILE,
        "images": IMAGES_DIR + "/",
        "seed": args.seed,
        "z_dim": summary["z_dim"],
        "noise": "z_i = numpy.random.default_rng(numpy.random.SeedSequence(seed, spawn_key=(0, i)))"
        ".standard_normal(z_dim, dtype=numpy.float32)",
        "batch_norm": args.batch_norm,
        "standing_statistics": (
            {"samples": STANDING_SAMPLES, "batch_size": STANDING_BATCH, "noise": "spawn_key=(1, k) for batch k"}
            if args.batch_norm == "standing"
            else None
        ),
        "face_rate": faces / len(rows),
        "faces": faces,
        "face_detector": summary["detector"],
        "generator": {
            "model_uri": args.model,
            "name": ref.name,
            "version": ref.version,
            "run_id": ref.run_id,
            "pinned_uri": ref.uri,
        },  # fmt: skip
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": args.experiment, "run_id": run_id},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(summary["seconds"], 3),
    }
    storage.write_bytes(storage.join(args.out, METADATA_FILE), json.dumps(metadata, indent=2).encode(), settings)
    return metadata


def log_set(mlflow_uri: str, run_id: str, ref: tracking.ModelVersionRef, args, metadata: dict, settings) -> None:
    """Metrics, the sample grid (first stored images, read back) and the metadata to the run; the link to the set on
    the generator's model version."""
    from PIL import Image
    from torchvision.transforms.v2.functional import to_pil_image
    from torchvision.utils import make_grid

    n = metadata["num_images"]
    urls = [storage.join(args.out, image_path(i, n, args.image_format)) for i in range(min(GRID_IMAGES, n))]
    stored = storage.read_many(urls, settings)
    images = [Image.open(io.BytesIO(stored[u])).convert("RGB") for u in urls]
    grid = make_grid(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]), nrow=16)
    tracking.log_png(mlflow_uri, run_id, to_pil_image(grid), "samples/distractors.png")
    tracking.log_text(mlflow_uri, run_id, json.dumps(metadata, indent=2), METADATA_FILE)
    metrics = {
        "face_rate": metadata["face_rate"],
        "faces": metadata["faces"],
        "num_images": n,
        "seconds": metadata["seconds"],
        "images_per_second": n / max(metadata["seconds"], 1e-9),
    }
    tracking.log_metrics(mlflow_uri, run_id, metrics, step=0)
    link = {"distractors.uri": args.out, "distractors.run_id": run_id, "distractors.face_rate": metadata["face_rate"]}
    tracking.set_model_version_tags(mlflow_uri, ref.name, ref.version, link)
