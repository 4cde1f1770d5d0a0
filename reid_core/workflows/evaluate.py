"""Evaluation of a registered re-ID feature model on a dataset's query/gallery split, on Ray; results to MLflow.

``jobs/evaluate.py`` parses its command line into an ``EvaluationSpec``, calls ``preflight`` (every input problem
raises a ``StorageError`` / ``TrackingError`` / ``ValueError`` naming what to fix, before Ray starts), then
``run_evaluation`` and prints a summary.

Features: query + gallery records are cut into chunks of ``--chunk-size`` images, served in order by a pool of
``--workers`` Ray actors (``--cpus-per-worker`` CPUs each), each of which loads the registered model once and runs
batch inference (``--batch-size`` images per forward pass, images read from S3 with many requests in flight). With
``--flip`` a feature is the normalised sum of the image's and its mirror image's (normalised) features. For the
Dual-Stream model each actor also finds the face boxes of its chunk with the detector only (dlib HOG; never the
dataset's face tags), as ``train_reid``'s evaluation does. Progress: a tqdm bar and one log line per chunk.

Metrics (``reid_core.metrics.evaluate_rank``, the Market-1501 / MSMT17 protocol: same-id same-camera gallery images
are junk, queries without a match are skipped and counted): ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP``,
``num_valid_queries``, ``num_skipped_queries``; with ``--rerank`` also ``rerank.*`` (k-reciprocal re-ranking,
Zhong et al. 2017, bounded memory). FLIMA: the retrieval metrics of its documented query/gallery split of the
held-out session (``docs/flima.md``). FLIMA's ID precision / recall / F1 need the identity classifier, which the
registered feature model does not have (it ends at the feature layer): they are not reported here (the log says so);
``jobs/train_reid.py`` reports them after training, from the trained model's classifier.

MLflow: a new run in ``--experiment`` ("reid-eval") with params (model URI, resolved version, dataset, layout, flip,
re-ranking, metric, ...), the metrics above, ``plots/cmc.png`` (the CMC curve, re-ranked curve too) and
``plots/ranked_lists.png`` (``--ranked-lists`` queries with their top-10, ``reid_core.viz``; always the original
distances); the model version is the run's input (tags ``input_model.*`` and MLflow 3's model lineage). The model
version gets tags ``eval.<dataset>.<metric>`` (``eval.msmt17.mAP``, ``eval.msmt17.rank1``, ...,
``eval.msmt17.rerank.mAP``) plus ``eval.<dataset>.data.uri``, ``.run_id``, ``.subset``, ``.flip``, ``.metric``;
``<dataset>`` is ``--dataset-name`` (default: the last folder of ``--data``). ``jobs/review_models.py promote NAME V
--metric eval.msmt17.mAP`` gates on them. A ``runs:/`` model that was never registered gets no tags (logged).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from reid_core import storage, tracking

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "reid-eval"
CMC_RANKS = (1, 5, 10)
RANKED_LIST_TOP_K = 10
MODEL_URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"


class EvaluationError(RuntimeError):
    """The evaluation started but an image could not be read; its MLflow run is FAILED. The message names both."""


@dataclass
class EvaluationSpec:
    """What to evaluate, on what, and how (the job's command-line options; ``jobs/evaluate.py --help`` explains each)."""

    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model
    data: str  # dataset root: s3://bucket/prefix or a local folder
    layout: str = "msmt17"
    layout_option: list[str] = field(default_factory=list)  # KEY=VALUE items
    dataset_name: str | None = None  # the <dataset> of the version tags eval.<dataset>.* (default: from data)
    metric: str = "euclidean"
    max_rank: int = 50
    flip: bool = False
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    image_size: list[int] | None = None  # [H, W], when the model's signature does not fix it
    batch_size: int = 128
    chunk_size: int = 512
    workers: int = 0  # Ray actors holding the model (0 = cluster CPUs)
    cpus_per_worker: int = 1
    max_queries: int | None = None
    max_gallery: int | None = None
    ranked_lists: int = 8
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None  # default eval-NAME-vVERSION-DATASET
    tracking_uri: str | None = None
    no_tags: bool = False


# ------------------------------------------------------------------------------------------------ checks
def parse_layout_options(items: list[str]) -> dict:
    """``["test_session=s13", "queries_per_camera=2"]`` -> ``{"test_session": "s13", "queries_per_camera": 2}``
    (values parsed as YAML)."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--layout-option {item!r}: expected KEY=VALUE, e.g. test_session=s13")
        try:
            options[key.strip()] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            options[key.strip()] = text
    return options


def check_model_uri(model_uri: str) -> None:
    """Syntax only (the registry is asked after MLflow answers)."""
    try:
        if model_uri.startswith("runs:/"):
            tracking.parse_run_model_uri(model_uri)
        else:
            tracking.parse_model_uri(model_uri)
    except tracking.RegistryError:
        raise tracking.RegistryError(f"model URI {model_uri!r} is not valid: expected {MODEL_URI_FORMS}") from None


def check_spec(spec: EvaluationSpec) -> dict:
    """Argument values; returns the parsed layout options."""
    check_model_uri(spec.model)
    for name in ("max_rank", "batch_size", "chunk_size", "cpus_per_worker", "rerank_k1", "rerank_k2"):
        if getattr(spec, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1; got {getattr(spec, name)}")
    for name in ("workers", "ranked_lists"):
        if getattr(spec, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 0; got {getattr(spec, name)}")
    for name in ("max_queries", "max_gallery"):
        value = getattr(spec, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1; got {value}")
    if spec.rerank_k2 > spec.rerank_k1 + 1:
        raise ValueError(f"--rerank-k2 ({spec.rerank_k2}) must be ≤ --rerank-k1 + 1 ({spec.rerank_k1 + 1})")
    if not 0.0 <= spec.rerank_lambda <= 1.0:
        raise ValueError(f"--rerank-lambda must be in [0, 1]; got {spec.rerank_lambda}")
    if spec.image_size is not None and min(spec.image_size) < 1:
        raise ValueError(f"--image-size must be two positive sides H W; got {spec.image_size}")
    if spec.dataset_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.dataset_name):
        raise ValueError(f"--dataset-name {spec.dataset_name!r}: use letters, digits, '_', '.', '-' (a tag key part)")
    return parse_layout_options(spec.layout_option)


def dataset_short_name(data_uri: str, explicit: str | None = None) -> str:
    """The ``<dataset>`` of the tags ``eval.<dataset>.*``: ``explicit``, else the last folder of ``data_uri``
    lower-cased, other characters than letters, digits, ``_.-`` replaced by ``_`` (``s3://b/x/MSMT17_V1`` ->
    ``msmt17_v1``)."""
    if explicit:
        return explicit
    last = data_uri.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    return re.sub(r"[^a-z0-9_.-]", "_", last.lower()).strip("._-") or "dataset"


# ------------------------------------------------------------------------------------------------ pure: splits
def limit_splits(query: list, gallery: list, max_queries: int | None, max_gallery: int | None) -> tuple[list, list]:
    """A deterministic subset for quick runs: ``max_queries`` queries evenly spaced over the query list (first and
    last included), and ``max_gallery`` gallery records: those of the kept queries' identities first, then the
    others, each group in its original order (the result keeps the gallery's original order)."""
    if max_queries is not None and max_queries < len(query):
        picks = np.unique(np.linspace(0, len(query) - 1, num=max_queries).round().astype(int))
        query = [query[i] for i in picks]
    if max_gallery is not None and max_gallery < len(gallery):
        wanted = {r.pid for r in query}
        ranked = sorted(range(len(gallery)), key=lambda i: (gallery[i].pid not in wanted, i))
        gallery = [gallery[i] for i in sorted(ranked[:max_gallery])]
    return query, gallery


def count_answerable(query: list, gallery: list) -> int:
    """Queries with at least one gallery image of their identity from another camera (the protocol's positives)."""
    cameras: dict[int, set[int]] = {}
    for r in gallery:
        cameras.setdefault(r.pid, set()).add(r.camid)
    return sum(1 for q in query if cameras.get(q.pid, set()) - {q.camid})


def model_input(shape: tuple[int, ...] | None, image_size: list[int] | None, model_uri: str) -> tuple[tuple, bool]:
    """((H, W), dual) from the model's signature input shape and ``--image-size``; ValueError when they do not fit a
    re-ID feature model: (N, 3, H, W) images or (N, 6, S, S) person + face crop."""
    expected = "a re-ID feature model takes images (N, 3, H, W) or, Dual-Stream, (N, 6, S, S)"
    if shape is None:
        if image_size is None:
            raise ValueError(f"{model_uri} has no tensor signature to read its input size from: pass --image-size H W")
        log.warning("%s has no tensor signature: assuming (N, 3, %d, %d) images", model_uri, *image_size)
        return tuple(image_size), False
    if len(shape) != 4 or shape[1] not in (3, 6):
        raise ValueError(f"{model_uri} takes input of shape {tuple(shape)} (-1: any size), but {expected}")
    h, w = shape[2], shape[3]
    if image_size is not None:
        if (h != -1 and h != image_size[0]) or (w != -1 and w != image_size[1]):
            raise ValueError(f"--image-size {image_size[0]} {image_size[1]} does not fit {model_uri}, whose input is "
                             f"{tuple(shape)}")  # fmt: skip
        h, w = image_size
    if h < 1 or w < 1:
        raise ValueError(f"{model_uri} takes input of shape {tuple(shape)}: pass --image-size H W for its free sides")
    dual = shape[1] == 6
    if dual and h != w:
        raise ValueError(f"{model_uri} is a Dual-Stream model (6 channels) with non-square input {h}×{w}: {expected}")
    return (h, w), dual


# ------------------------------------------------------------------------------------------------ preflight
def resolve_model(mlflow_uri: str, model_uri: str) -> tuple[str, tracking.ModelVersionRef | None, str | None]:
    """(the URI to load, pinned; the registered version or None; the producing run id or None)."""
    if model_uri.startswith("runs:/"):
        run_id, ref = tracking.resolve_run_model(mlflow_uri, model_uri)
        if ref is None:
            log.warning("%s was never registered: the results are logged, but no model version gets tags", model_uri)
        return model_uri, ref, run_id
    ref = tracking.resolve_model_version(mlflow_uri, model_uri)
    return ref.uri, ref, ref.run_id


def load_and_probe(mlflow_uri: str, pinned_uri: str, image_size: tuple[int, int], dual: bool) -> int:
    """Load the model on the driver once and run two zero images through it: returns the feature size D.
    ValueError (one line) when it does not load or does not give (2, D) finite features."""
    import torch

    try:
        model = tracking.load_pytorch_model(mlflow_uri, pinned_uri, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported in one line, naming the model
        raise ValueError(f"cannot load {pinned_uri}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{pinned_uri} is not a PyTorch module (got {type(model).__name__})")
    x = torch.zeros(2, 6 if dual else 3, *image_size)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the model's own error, in one line
        raise ValueError(f"{pinned_uri} fails on input {tuple(x.shape)}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None  # fmt: skip
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{pinned_uri} returns {shape} for input {tuple(x.shape)}; a feature model returns (N, D)")
    if not torch.isfinite(out).all():
        raise ValueError(f"{pinned_uri} returns non-finite features for input {tuple(x.shape)}")
    return int(out.shape[1])


@dataclass(frozen=True)
class EvaluationPlan:
    """What ``preflight`` checked and the evaluation uses."""

    mlflow_uri: str  # the MLflow server, resolved and reachable
    settings: storage.S3Settings  # S3 settings of the environment
    splits: object  # data.Splits of ``--data``: the full query and gallery
    options: dict  # the layout's options (``--layout-option``)
    query: list  # the query records evaluated (``--max-queries`` applied)
    gallery: list  # the gallery records evaluated (``--max-gallery`` applied)
    answerable: int  # queries with a gallery image of their identity from another camera
    pinned_uri: str  # the model URI to load, pinned to a version (or the ``runs:/`` URI)
    ref: tracking.ModelVersionRef | None  # the registered version, or None for a model never registered
    model_run_id: str | None  # the run that logged the model
    image_size: tuple[int, int]  # the model's input (H, W)
    dual: bool  # a Dual-Stream model (6 input channels: person + face crop)
    feature_dim: int  # D of the model's (N, D) features


def preflight(spec: EvaluationSpec) -> EvaluationPlan:
    """Check arguments, dataset, MLflow and the model before Ray starts."""
    options = check_spec(spec)  # before the imports of torch: a typo is refused at once

    from reid_core.data import read_layout

    settings = storage.resolve_settings()
    storage.check_location(spec.data, settings, must_exist=True)
    splits = read_layout(spec.data, spec.layout, **options)
    query, gallery = limit_splits(splits.query, splits.gallery, spec.max_queries, spec.max_gallery)
    answerable = count_answerable(query, gallery)
    if answerable == 0:
        raise ValueError(
            f"none of the {len(query)} queries of {spec.data} ({spec.layout}) has a gallery image of its identity from "
            "another camera: nothing to evaluate" + (" (raise --max-gallery)" if spec.max_gallery else "")
        )
    mlflow_uri = tracking.resolve_tracking_uri(spec.tracking_uri)
    tracking.check_server(mlflow_uri)
    pinned_uri, ref, run_id = resolve_model(mlflow_uri, spec.model)
    shape = tracking.model_input_shape(mlflow_uri, pinned_uri)
    image_size, dual = model_input(shape, spec.image_size, pinned_uri)
    feature_dim = load_and_probe(mlflow_uri, pinned_uri, image_size, dual)
    return EvaluationPlan(mlflow_uri=mlflow_uri, settings=settings, splits=splits, options=options, query=query,
                          gallery=gallery, answerable=answerable, pinned_uri=pinned_uri, ref=ref, model_run_id=run_id,
                          image_size=image_size, dual=dual, feature_dim=feature_dim)  # fmt: skip


# ------------------------------------------------------------------------------------------------ features on Ray
class FeatureWorker:
    """A Ray actor: loads the model once, then computes the features of chunks of records (in record order)."""

    def __init__(self, mlflow_uri: str, model_uri: str, *, image_size: tuple[int, int], dual: bool, batch_size: int,
                 flip: bool, threads: int):  # fmt: skip
        import torch

        from reid_core.evaluation.features import RegisteredFeatureModel

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        torch.set_num_threads(threads)
        model = tracking.load_pytorch_model(mlflow_uri, model_uri, map_location="cpu")
        self.model = RegisteredFeatureModel(model, dual=dual)
        self.image_size, self.dual, self.batch_size, self.flip = tuple(image_size), dual, batch_size, flip
        self.settings = storage.resolve_settings()
        self.detector = None
        if dual:
            from reid_core.guidance.faces import FaceDetector

            self.detector = FaceDetector.for_person_crops(workers=0)

    def features(self, index: int, records: list) -> tuple[int, np.ndarray, int]:
        """(index, (len(records), D) float32 L2-normalised features, faces found: Dual-Stream only, else -1)."""
        from reid_core.evaluation.features import evaluation_face_boxes, extract_features

        boxes, faces = None, -1
        if self.dual:
            boxes = evaluation_face_boxes(records, detector=self.detector, settings=self.settings)
            faces = sum(1 for r in records if boxes[r] is not None)
        feats, _, _ = extract_features(self.model, records, image_size=self.image_size, batch_size=self.batch_size,
                                       flip=self.flip, face_boxes=boxes, face_size=self.image_size[0],
                                       settings=self.settings)  # fmt: skip
        return index, feats.numpy(), faces


def extract_on_ray(records: list, *, spec: EvaluationSpec, pre: EvaluationPlan) -> tuple[np.ndarray, dict]:
    """Features of ``records`` (N, D) float32 in record order, from a pool of Ray actors; and what ran where."""
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    from reid_core.runtime import init_ray_for_job

    init_ray_for_job()
    chunks = [records[i : i + spec.chunk_size] for i in range(0, len(records), spec.chunk_size)]
    workers = spec.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // spec.cpus_per_worker)
    workers = min(workers, len(chunks))
    log.info("features of %d images: %d chunks of ≤ %d on %d Ray actors (%d CPU each)%s", len(records), len(chunks),
             spec.chunk_size, workers, spec.cpus_per_worker, ", flip-averaged" if spec.flip else "")  # fmt: skip
    actor = ray.remote(num_cpus=spec.cpus_per_worker, max_restarts=2, max_task_retries=2)(FeatureWorker)
    actors = [
        actor.remote(pre.mlflow_uri, pre.pinned_uri, image_size=pre.image_size, dual=pre.dual,
                     batch_size=spec.batch_size, flip=spec.flip, threads=spec.cpus_per_worker)
        for _ in range(workers)
    ]  # fmt: skip
    out: list[np.ndarray | None] = [None] * len(chunks)
    faces = 0
    t0 = time.perf_counter()
    done = 0
    try:
        with tqdm(total=len(records), unit="img", desc="features", disable=None) as bar:
            pool = ActorPool(actors)
            for index, feats, found in pool.map_unordered(lambda a, v: a.features.remote(*v), enumerate(chunks)):
                out[index] = feats
                faces += max(found, 0)
                done += len(feats)
                bar.update(len(feats))
                log.info("chunk %d done: %d/%d images (%.1f images/s)", index, done, len(records),
                         done / max(time.perf_counter() - t0, 1e-9))  # fmt: skip
    finally:
        for a in actors:
            ray.kill(a)
    if any(o is None for o in out):
        raise RuntimeError("internal error: a chunk of features is missing")
    feats = np.concatenate(out)
    if feats.shape != (len(records), pre.feature_dim):
        raise RuntimeError(f"features of shape {feats.shape}, expected {(len(records), pre.feature_dim)}")
    seconds = time.perf_counter() - t0
    return feats, {"workers": workers, "chunks": len(chunks), "seconds": seconds,
                   "faces": faces if pre.dual else None}  # fmt: skip


# ------------------------------------------------------------------------------------------------ metrics, pictures
def retrieval_metrics(feats: np.ndarray, query: list, gallery: list, spec: EvaluationSpec) -> tuple[dict, dict]:
    """(flat metrics for MLflow, {"plain": RankResult, "rerank": RankResult or None})."""
    from reid_core.metrics import evaluate_rank, evaluate_rank_reranked

    ids = (
        np.asarray([r.pid for r in query], dtype=np.int64),
        np.asarray([r.pid for r in gallery], dtype=np.int64),
        np.asarray([r.camid for r in query], dtype=np.int64),
        np.asarray([r.camid for r in gallery], dtype=np.int64),
    )
    qf, gf = feats[: len(query)], feats[len(query) :]
    plain = evaluate_rank(qf, gf, *ids, max_rank=spec.max_rank, metric=spec.metric)
    metrics = plain.summary(ranks=CMC_RANKS)
    reranked = None
    if spec.rerank:
        reranked = evaluate_rank_reranked(qf, gf, *ids, k1=spec.rerank_k1, k2=spec.rerank_k2,
                                          lambda_value=spec.rerank_lambda, max_rank=spec.max_rank,
                                          metric=spec.metric)  # fmt: skip
        metrics.update({f"rerank.{k}": v for k, v in reranked.summary(ranks=CMC_RANKS).items()})
    return metrics, {"plain": plain, "rerank": reranked}


def ranked_lists_picture(feats: np.ndarray, query: list, gallery: list, result, *, count: int, metric: str,
                         settings):  # fmt: skip
    """A page of ``count`` valid queries (evenly spaced) with their top-10 gallery images (original distances)."""
    from reid_core.data import ReIDDataset
    from reid_core.metrics import pairwise_distance
    from reid_core.viz import ranked_list_figure, ranked_lists_page

    valid = np.flatnonzero(result.first_match_rank > 0)
    shown = valid[np.unique(np.linspace(0, len(valid) - 1, num=min(count, len(valid))).round().astype(int))]
    qf, gf = feats[: len(query)], feats[len(query) :]
    dist = pairwise_distance(qf[shown], gf, metric=metric).numpy()
    q_images = ReIDDataset([query[i] for i in shown], settings=settings)
    g_images = ReIDDataset(gallery, settings=settings)
    g_pids = np.asarray([r.pid for r in gallery])
    g_cams = np.asarray([r.camid for r in gallery])
    figures = [
        ranked_list_figure(q_images[k]["image"], lambda gi: g_images[gi]["image"], dist[k], query_pid=query[qi].pid,
                           query_camid=query[qi].camid, gallery_pids=g_pids, gallery_camids=g_cams,
                           top_k=RANKED_LIST_TOP_K)
        for k, qi in enumerate(shown)
    ]  # fmt: skip
    return ranked_lists_page(figures)


def log_results(spec, pre: EvaluationPlan, run_id: str, metrics: dict, results: dict, feats: np.ndarray) -> dict:
    """Metrics, the CMC curve and the ranked-list page to the run; returns the artifact paths."""
    from reid_core.viz import cmc_curve_png

    uri = pre.mlflow_uri
    tracking.log_metrics(uri, run_id, metrics, step=0)
    pictures = {}
    curves = {"original": results["plain"].cmc}
    if results["rerank"] is not None:
        curves["re-ranked"] = results["rerank"].cmc
    with tempfile.TemporaryDirectory() as tmp:
        title = f"CMC: {pre.pinned_uri} on {dataset_short_name(spec.data, spec.dataset_name)}"
        path = cmc_curve_png(curves, Path(tmp) / "cmc.png", title=title)
        tracking.log_artifact_file(uri, run_id, path, "plots")
        pictures["cmc"] = "plots/cmc.png"
    if spec.ranked_lists:
        page = ranked_lists_picture(feats, pre.query, pre.gallery, results["plain"], count=spec.ranked_lists,
                                    metric=spec.metric, settings=pre.settings)  # fmt: skip
        tracking.log_png(uri, run_id, page, "plots/ranked_lists.png")
        pictures["ranked_lists"] = "plots/ranked_lists.png"
    return pictures


def version_tags(short: str, metrics: dict, *, run_id: str, spec, pre: EvaluationPlan) -> dict:
    """Tags ``eval.<short>.*`` for the model version: the headline metrics (rounded to 1e-6) and what they mean."""
    splits = pre.splits
    full = len(pre.query) == len(splits.query) and len(pre.gallery) == len(splits.gallery)
    subset = "full" if full else (f"{len(pre.query)} of {len(splits.query)} queries, {len(pre.gallery)} of "
                                  f"{len(splits.gallery)} gallery images")  # fmt: skip
    keys = [f"rank{k}" for k in CMC_RANKS] + ["mAP", "mINP"]
    keys += [f"rerank.{k}" for k in keys] if spec.rerank else []
    tags = {f"eval.{short}.{k}": round(float(metrics[k]), 6) for k in keys}
    tags.update({f"eval.{short}.data.uri": spec.data, f"eval.{short}.layout": spec.layout,
                 f"eval.{short}.run_id": run_id, f"eval.{short}.subset": subset,
                 f"eval.{short}.flip": spec.flip, f"eval.{short}.metric": spec.metric})  # fmt: skip
    return tags


# ------------------------------------------------------------------------------------------------ the run
def bad_image(exc: BaseException):
    """The ``BadImageError`` behind ``exc``: raised in this process, or in a Ray actor (Ray raises a
    ``RayTaskError`` subclass of it, whose text is the actor's traceback, and keeps the original as ``cause``)."""
    from reid_core.data import BadImageError

    cause = getattr(exc, "cause", None)
    if isinstance(cause, BadImageError):
        return cause
    return exc if isinstance(exc, BadImageError) and cause is None else None


def run_evaluation(spec: EvaluationSpec, pre: EvaluationPlan) -> EvaluationResult:
    """The MLflow run: features on Ray, metrics, pictures and the model version's tags. Returns what the summary
    prints. ``EvaluationError`` when an image cannot be read (the run is FAILED); any other failure propagates, the
    run FAILED too."""
    uri, ref, query, gallery = pre.mlflow_uri, pre.ref, pre.query, pre.gallery
    short = dataset_short_name(spec.data, spec.dataset_name)
    if spec.layout == "flima":
        log.info("FLIMA: retrieval metrics of the held-out session's query/gallery split; ID precision / recall / F1 "
                 "need the identity classifier, which a registered feature model does not have: not reported")  # fmt: skip
    name = f"{ref.name}-v{ref.version}" if ref else f"run-{pre.model_run_id[:8]}"
    run_name = spec.run_name or f"eval-{name}-{short}"
    params = {
        "model_uri": spec.model,
        "model_uri_pinned": pre.pinned_uri,
        "model_name": ref.name if ref else "",
        "model_version": ref.version if ref else "",
        "model_run_id": pre.model_run_id or "",
        "data.uri": spec.data,
        "data.layout": spec.layout,
        "data.options": pre.options,
        "dataset": short,
        "num_queries": len(query),
        "num_gallery": len(gallery),
        "image_size": "x".join(map(str, pre.image_size)),
        "dual_stream": pre.dual,
        "feature_dim": pre.feature_dim,
        "metric": spec.metric,
        "max_rank": spec.max_rank,
        "flip": spec.flip,
        "rerank": spec.rerank,
        "batch_size": spec.batch_size,
        "chunk_size": spec.chunk_size,
        "workers": spec.workers,
        "max_queries": spec.max_queries,
        "max_gallery": spec.max_gallery,
    }
    if spec.rerank:
        params.update({"rerank.k1": spec.rerank_k1, "rerank.k2": spec.rerank_k2, "rerank.lambda": spec.rerank_lambda})
    run_id = tracking.start_run(uri, spec.experiment, run_name, params, tags={"job": "evaluate", "dataset": short})
    t0 = time.perf_counter()
    try:
        if ref is not None:
            tracking.log_model_version_input(uri, run_id, ref)
        else:
            tracking.set_run_tags(uri, run_id, {"input_model.uri": spec.model, "input_model.run_id": pre.model_run_id})
        feats, extraction = extract_on_ray(query + gallery, spec=spec, pre=pre)
        if extraction["faces"] is not None:
            log.info("Dual-Stream: faces in %d of %d images", extraction["faces"], len(feats))
        metrics, results = retrieval_metrics(feats, query, gallery, spec)
        metrics.update(feature_seconds=extraction["seconds"], images_per_second=len(feats) / extraction["seconds"])
        pictures = log_results(spec, pre, run_id, metrics, results, feats)
        tagged = ref is not None and not spec.no_tags
        if tagged:
            tags = version_tags(short, metrics, run_id=run_id, spec=spec, pre=pre)
            tracking.replace_model_version_tags(uri, ref.name, ref.version, f"eval.{short}.", tags)
    except BaseException as exc:
        tracking.set_terminated(uri, run_id, "FAILED")
        bad = bad_image(exc)
        if bad is None:
            raise
        raise EvaluationError(f"{bad} (MLflow run {run_id} is FAILED)") from exc
    tracking.set_terminated(uri, run_id, "FINISHED")
    return EvaluationResult(run_id=run_id, dataset=short, metrics=metrics, num_features=len(feats),
                            extraction=extraction, pictures=pictures, tagged=tagged, started=t0)  # fmt: skip


@dataclass(frozen=True)
class EvaluationResult:
    """What ``run_evaluation`` did: its MLflow run, the metrics, and what the job's summary prints."""

    run_id: str
    dataset: str  # the short name of the ``eval.<dataset>.*`` tags
    metrics: dict  # rank1 / rank5 / rank10 / mAP / mINP (and rerank.*), query counts, feature timing
    num_features: int  # query + gallery images embedded
    extraction: dict  # workers, seconds, faces (Dual-Stream) of the feature extraction
    pictures: dict  # artifact paths of the CMC curve and the ranked lists
    tagged: bool  # whether the model version got the eval.<dataset>.* tags
    started: float  # time.perf_counter() at the run's start

    def summary(self, spec: EvaluationSpec, pre: EvaluationPlan) -> str:
        """The job's closing summary, one fact per line."""
        m, n, ext, ref = self.metrics, self.num_features, self.extraction, pre.ref
        art = tracking.artifact_uri(pre.mlflow_uri, self.run_id)
        version = f"registered as {ref.uri}" if ref else "not registered"
        produced = f", logged by run {pre.model_run_id}" if pre.model_run_id else ""
        options = f", {pre.options}" if pre.options else ""
        lines = [
            "\n=== evaluate summary ===",
            f"model:             {spec.model} ({version}{produced})",
            f"dataset:           {spec.data} ({spec.layout}{options}): {len(pre.query)} queries, "
            f"{len(pre.gallery)} gallery images",
            f"features:          {n} × {pre.feature_dim} on {ext['workers']} Ray actors in {ext['seconds']:.1f} s "
            f"({n / ext['seconds']:.1f} images/s){', flip-averaged' if spec.flip else ''}",
            f"retrieval ({spec.metric}): Rank-1 {m['rank1']:.4f}  Rank-5 {m['rank5']:.4f}  Rank-10 {m['rank10']:.4f}  "
            f"mAP {m['mAP']:.4f}  mINP {m['mINP']:.4f}  ({int(m['num_valid_queries'])} queries, "
            f"{int(m['num_skipped_queries'])} skipped)",
        ]
        if spec.rerank:
            lines.append(f"re-ranked:         Rank-1 {m['rerank.rank1']:.4f}  Rank-5 {m['rerank.rank5']:.4f}  "
                         f"Rank-10 {m['rerank.rank10']:.4f}  mAP {m['rerank.mAP']:.4f}  mINP {m['rerank.mINP']:.4f}")  # fmt: skip
        lines.append(f"MLflow run:        {self.run_id} ({pre.mlflow_uri}, experiment {spec.experiment!r})")
        lines.append("pictures:          " + "  ".join(f"{art}/{p}" for p in self.pictures.values()))
        if self.tagged:
            lines.append(f"version tags:      {ref.name} v{ref.version}: eval.{self.dataset}.* "
                         f"(e.g. eval.{self.dataset}.mAP)")  # fmt: skip
        else:
            why = "--no-tags" if spec.no_tags else "the model is not registered"
            lines.append(f"version tags:      none ({why})")
        lines.append(f"time:              {time.perf_counter() - self.started:.1f} s")
        return "\n".join(lines)
