"""Typed job configuration: dataclasses loaded from YAML, ``--set a.b=c`` overrides, validation with clear errors.

Config stays at the edge (docs/architecture.md, conventions): jobs load it here, then pass plain values to library functions. Every error is a
``ConfigError`` whose message names the file, the key and what was expected, raised before any Ray worker starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LAYOUTS = ("msmt17", "market1501", "flima")
GUIDANCE_MODES = ("paper", "weighted", "critic", "smoothing")
PRECISIONS = ("fp32", "bf16", "bf16_autocast")  # reid_core.train.deepspeed.deepspeed_config
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies


class ConfigError(ValueError):
    """Invalid configuration: the message says what to fix, and where."""


# ----------------------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    uri: str = "s3://reid-data/synthetic/msmt17"  # dataset root: s3://bucket/prefix or a local path
    layout: str = "msmt17"  # msmt17 | market1501 | flima
    split: str = "train"  # which split the GAN learns from
    image_size: tuple[int, int] = (64, 32)  # (height, width) the images are resized to
    max_images: int | None = None  # use only the first N records (smoke tests); None = all
    on_bad_image: str = "raise"  # raise | skip (skips are counted and reported)


@dataclass
class GanModelConfig:
    z_dim: int = 100
    width: int = 64  # DC-GAN feature width (ngf = ndf)


@dataclass
class GuidanceConfig:
    """Face guidance of the discriminator losses (docs/method.md §1); λ1 = λ2 = 0 is the plain DC-GAN."""

    mode: str = "weighted"  # paper | weighted | critic | smoothing (weighted with Δ fixed at 1: the control)
    lambda1: float = 0.0  # weight of Δ on real images
    lambda2: float = 0.0  # weight of Δ on generated images
    detector_workers: int = 0  # dlib detector processes per training worker (0: in the training process)


@dataclass
class OptimConfig:
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 64  # per worker
    epochs: int = 100
    g_steps: int = 2  # generator updates per discriminator update (the authors' recipe)


@dataclass
class ScalingConfig:
    """Ray Train workers and the DeepSpeed engine settings they use."""

    num_workers: int = 2  # workers of a run (the maximum when min_workers is set)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (bf16 weights) | bf16_autocast (fp32 weights, bf16 matmuls/convs)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-2
    # PACK (Ray's default): a run's workers on as few nodes as possible, so gradients stay on NVLink / in one host.
    # SPREAD: one worker per node where possible (per-node CPUs and network for data loading; one lost node costs
    # one worker). The STRICT_ variants fail rather than fall back. docs/cluster.md §8.
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    # None: always num_workers. An int: elastic Ray Train, between min_workers and num_workers workers, as many as the
    # cluster has resources for; a restart at another world size resumes under the world-size rule of docs/architecture.md.
    min_workers: int | None = None
    # How long preflight waits for nodes that can hold the workers before it fails in one line
    # (pipeline.check_cluster_resources): 0 fails at once (a fixed cluster); an autoscaling cluster adds nodes only
    # when asked, so its configs set a bound here (configs/gan.yaml: 900 s).
    resource_wait_seconds: float = 0.0

    def validate(self) -> None:
        check_choice("scaling.placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        check_choice("scaling.precision", self.precision, PRECISIONS)
        check_positive("scaling.num_workers", self.num_workers)
        check_positive("scaling.cpus_per_worker", self.cpus_per_worker)
        check_non_negative("scaling.resource_wait_seconds", self.resource_wait_seconds)
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"scaling.zero_stage: expected 0, 1 or 2, got {self.zero_stage}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"scaling.min_workers: expected 1 ≤ min_workers ≤ num_workers ({self.num_workers}) or null for a fixed "
                f"worker count, got {self.min_workers}"
            )


@dataclass
class RunConfig:
    name: str = "gan"  # Ray Train run name: the same name resumes from its last checkpoint
    storage: str = "s3://reid-data/ray-results"  # checkpoints and Ray's run state
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the job fails
    keep_checkpoints: int = 2
    seed: int = 0

    def validate(self) -> None:
        check_name("run.name", self.name)
        if not self.storage:
            raise ConfigError("run.storage: missing location for checkpoints (s3://bucket/prefix or a local path)")
        check_non_negative("run.max_failures", self.max_failures)
        check_positive("run.keep_checkpoints", self.keep_checkpoints)


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None = MLFLOW_TRACKING_URI or the embedded stack's
    experiment: str = "dcgan"
    registered_model: str = "reid-dcgan-generator"
    alias: str | None = "candidate"  # set on the registered version; null = none (a λ search aliases its best)
    num_samples: int = 64  # fixed-noise samples in the per-epoch grid
    # Rank 0 logs each epoch in the background and keeps what MLflow did not take (server down) to retry; at the end
    # of training it waits this long for the backlog before saying, epoch by epoch, what was not logged.
    flush_seconds: float = 120.0

    def validate(self) -> None:
        check_non_negative("tracking.flush_seconds", self.flush_seconds)
        check_positive("tracking.num_samples", self.num_samples)


REID_EXPORTS = ("torchscript", "onnx")


@dataclass
class ReidTrackingConfig(TrackingConfig):
    # Deployment files logged under the run's export/ beside the registered model (which is what evaluation, review
    # and synthesis load): TorchScript must work, ONNX is logged when it exports cleanly. [] = none, for example for
    # the many trials of a search whose models nobody deploys as they are (each ONNX export costs seconds of CPU).
    exports: list[str] = field(default_factory=lambda: list(REID_EXPORTS))

    def validate(self) -> None:
        super().validate()
        for i, name in enumerate(self.exports):
            check_choice(f"tracking.exports[{i}]", name, REID_EXPORTS)
        if len(set(self.exports)) != len(self.exports):
            raise ConfigError(f"tracking.exports: {self.exports} names an export twice")


@dataclass
class StorageConfig:
    """S3 endpoint; None = the standard AWS variables (AWS_ENDPOINT_URL...), then the embedded stack's .stack/env."""

    endpoint_url: str | None = None
    region: str | None = None
    # Mid-run, S3 reads retry a transient failure (endpoint down, connection cut, throttling, 5xx) for this long
    # before the worker fails (then Ray Train restarts it from the last checkpoint, up to run.max_failures).
    outage_seconds: float = 120.0

    def validate(self) -> None:
        check_non_negative("storage.outage_seconds", self.outage_seconds)


@dataclass
class GanJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: GanModelConfig = field(default_factory=GanModelConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        check_choice("data.layout", self.data.layout, LAYOUTS)
        check_choice("data.on_bad_image", self.data.on_bad_image, ("raise", "skip"))
        check_choice("guidance.mode", self.guidance.mode, GUIDANCE_MODES)
        self.scaling.validate()
        self.storage.validate()
        self.tracking.validate()
        self.run.validate()
        for key, value in (("optim.beta1", self.optim.beta1), ("optim.beta2", self.optim.beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}: expected a value in [0, 1), got {value}")
        check_unit_interval("guidance.lambda1", self.guidance.lambda1)
        check_unit_interval("guidance.lambda2", self.guidance.lambda2)
        check_positive("optim.batch_size", self.optim.batch_size)
        check_positive("optim.epochs", self.optim.epochs)
        check_positive("optim.g_steps", self.optim.g_steps)
        check_positive("optim.lr", self.optim.lr)
        check_positive("model.z_dim", self.model.z_dim)
        check_non_negative("guidance.detector_workers", self.guidance.detector_workers)
        check_positive("model.width", self.model.width)
        if self.data.max_images is not None:
            check_positive("data.max_images", self.data.max_images)
        if not self.data.uri:
            raise ConfigError("data.uri: missing dataset location (s3://bucket/prefix or a local path)")
        from reid_core.models import check_input_size

        try:
            check_input_size("dcgan_generator", self.data.image_size)
        except ValueError as exc:
            raise ConfigError(f"data.image_size: {exc}") from None


# ----------------------------------------------------------------------------------------------------- checks
def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


def check_unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: {value} is outside [0, 1]")


def check_positive(key: str, value: float) -> None:
    # Written so that NaN fails too (NaN <= 0 is false): a value passes only when it is provably in range.
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{key}: expected a positive value, got {value}")


def check_non_negative(key: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{key}: expected ≥ 0, got {value}")


# A name that becomes one folder of a path (run.name under run.storage, search.name under search.storage and
# synthesis.out): one segment of letters, digits, '.', '_' and '-', not starting with '.', so never '..', '/', '\\',
# a hidden folder, a URI scheme or an empty string.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_name(key: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ConfigError(
            f"{key}: {value!r} is not a single path segment: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' (it names a folder under the storage location)"
        )


# ----------------------------------------------------------------------------------------------------- loading
T = typing.TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides, then validate it.

    Values of overrides are parsed as YAML (``--set optim.lr=1e-3``, ``--set data.image_size=[128,64]``).
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (expected a YAML file, e.g. configs/demo.yaml)")
        source = str(p)
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
        raw = loaded or {}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
        node[parts[-1]] = value
    cfg = from_dict(cls, raw, where=source)
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return cfg


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", prefix: str = "") -> T:
    """Recursively build dataclass ``cls`` from ``data``, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {full!r}{hint}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, full, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", where) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", where) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # Every float of every config is a rate, weight, probability, CPU count or duration: NaN defeats every range
        # check after this one (any comparison with NaN is false) and infinity passes "positive".
        raise ConfigError(f"{where}: {key}: expected a finite number, got {value}")
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (for ``train_loop_config`` and MLflow params); ``from_dict`` rebuilds the dataclass."""
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------------------------------- re-ID job
# (added for jobs/train_reid.py: ID-CondenseNet and the Dual-Stream CNN trained with distractors, docs/method.md §2-4)

REID_LOSS_MODES = ("distractor_class", "lsro")
REID_OPTIMIZERS = ("sgd", "adam")
REID_SCHEDULES = ("cosine", "step", "constant")
EVAL_METRICS = ("euclidean", "cosine")


def is_dual_stream(model_name: str) -> bool:
    return model_name.startswith("dual_stream")


@dataclass
class ReidDataConfig:
    """The real dataset: its training split is the N identities; query/gallery (or FLIMA's test session) evaluate."""

    uri: str = "s3://reid-data/synthetic/msmt17"  # dataset root: s3://bucket/prefix or a local path
    layout: str = "msmt17"  # msmt17 | market1501 | flima
    options: dict[str, Any] = field(default_factory=dict)  # the layout reader's options, e.g. {test_session: s13}
    image_size: tuple[int, int] = (256, 128)  # (height, width); the Dual-Stream CNN needs a square (64, 64)
    max_images: int | None = None  # train on the first N training records only (smoke tests); None = all
    on_bad_image: str = "raise"  # raise | skip
    pad: int = 10  # training augmentation: zero padding (px) then a random crop back to image_size; 0 = none
    flip: float = 0.5  # training augmentation: probability of a horizontal flip
    loader_workers: int = 0  # DataLoader processes per training worker (forkserver: s3fs is not fork-safe)
    random_erasing: float = 0.0  # training augmentation: probability of erasing one random rectangle; 0 = off


@dataclass
class DistractorsConfig:
    """The synthesised distractor set (``jobs/synthesize.py``): one extra class, never in query or gallery."""

    uri: str | None = None  # the set's folder (with distractors.json); None = train without distractors
    max_images: int | None = None  # use the first N images of the set (in index order); None = all
    per_batch: int | None = None  # generated images added to every P×K batch; None = in proportion to the set sizes


@dataclass
class ReidModelConfig:
    name: str = "condensenet74"  # condensenet74 | condensenet_tiny | dual_stream | dual_stream_tiny
    feature_dim: int = 512  # D, the retrieval feature
    dropout_rate: float = 0.0  # 0.4 for the Dual-Stream CNN (paper)
    face_size: int = 64  # Dual-Stream face crop side (px); ignored by CondenseNet
    # ImageNet initialisation of the backbone (reid_core/models/pretrained.py): s3://..., a local path, or https://
    # (a cluster with internet access); the official CondenseNet training-form checkpoint or torchvision's ResNet-50.
    pretrained: str | None = None
    bnneck: bool = False  # BNNeck (Luo et al., 2019): triplet before the feature BN, ID loss after it
    last_stride: int = 2  # 1: the last block keeps its predecessor's resolution (CondenseNet, ResNet-50)


@dataclass
class ReidLossConfig:
    mode: str = "distractor_class"  # distractor_class (N+1 classes) | lsro (uniform over the N real classes)
    group_lasso: float = 1e-5  # CondenseNet's group-lasso strength during condensation; 0 = off
    face_presence: float = 1.0  # Dual-Stream: weight of the face-presence head's BCE on the face labels
    label_smoothing: float = 0.0  # ε of the ID loss, in [0, 1); 0 = off (reid_core/losses.py)
    triplet: float = 0.0  # weight of the batch-hard triplet loss next to the ID loss; 0 = off
    triplet_margin: float = 0.3  # its margin (Euclidean, on the metric feature)


@dataclass
class ReidOptimConfig:
    """SGD + Nesterov 0.9, lr 0.1 cosine, weight decay 1e-4 (the authors' recipe); batch = P identities × K images."""

    optimizer: str = "sgd"  # sgd | adam (the Dual-Stream CNN's recipe: adam, lr 1e-3)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine (per step, to 0 at the end) | step (× step_gamma at each milestone) | constant
    warmup_epochs: float = 0.0  # linear warm-up from warmup_factor·lr to lr over these epochs; 0 = off
    warmup_factor: float = 0.01
    step_milestones: list[int] = field(default_factory=lambda: [40, 70])  # step: epochs where the lr drops
    step_gamma: float = 0.1
    epochs: int = 120
    identities_per_batch: int = 16  # P, per worker
    images_per_identity: int = 4  # K


@dataclass
class ReidEvalConfig:
    metric: str = "euclidean"  # euclidean | cosine, on L2-normalised features
    max_rank: int = 50  # length of the CMC curve
    flip: bool = False  # average each image's feature with its horizontal flip's
    batch_size: int = 128  # images per forward pass when extracting features
    # Validate on query/gallery every k epochs during training (rank 0; metrics val_rank1 / val_mAP / val_mINP, what a
    # λ search's early stopping compares); 0 = only the final evaluation after training.
    every_epochs: int = 0


@dataclass
class ReidJobConfig:
    data: ReidDataConfig = field(default_factory=ReidDataConfig)
    distractors: DistractorsConfig = field(default_factory=DistractorsConfig)
    model: ReidModelConfig = field(default_factory=ReidModelConfig)
    loss: ReidLossConfig = field(default_factory=ReidLossConfig)
    optim: ReidOptimConfig = field(default_factory=ReidOptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(name="reid"))
    tracking: ReidTrackingConfig = field(
        default_factory=lambda: ReidTrackingConfig(experiment="reid", registered_model="reid-condensenet")
    )
    storage: StorageConfig = field(default_factory=StorageConfig)
    eval: ReidEvalConfig = field(default_factory=ReidEvalConfig)

    @property
    def batch_size(self) -> int:
        """Real images per worker and step: P × K (the distractors come on top)."""
        return self.optim.identities_per_batch * self.optim.images_per_identity

    def validate(self) -> None:
        check_choice("data.layout", self.data.layout, LAYOUTS)
        check_choice("data.on_bad_image", self.data.on_bad_image, ("raise", "skip"))
        from reid_core.models import model_names

        check_choice("model.name", self.model.name, model_names("reid"))
        check_choice("loss.mode", self.loss.mode, REID_LOSS_MODES)
        check_choice("optim.optimizer", self.optim.optimizer, REID_OPTIMIZERS)
        check_choice("optim.schedule", self.optim.schedule, REID_SCHEDULES)
        check_choice("eval.metric", self.eval.metric, EVAL_METRICS)
        self.scaling.validate()
        self.storage.validate()
        self.tracking.validate()
        self.run.validate()
        if not self.data.uri:
            raise ConfigError("data.uri: missing dataset location (s3://bucket/prefix or a local path)")
        for key, value in (
            ("optim.lr", self.optim.lr),
            ("optim.epochs", self.optim.epochs),
            ("optim.identities_per_batch", self.optim.identities_per_batch),
            ("optim.images_per_identity", self.optim.images_per_identity),
            ("model.feature_dim", self.model.feature_dim),
            ("model.face_size", self.model.face_size),
            ("eval.max_rank", self.eval.max_rank),
            ("eval.batch_size", self.eval.batch_size),
        ):
            check_positive(key, value)
        for key, value in (
            ("optim.weight_decay", self.optim.weight_decay),
            ("loss.group_lasso", self.loss.group_lasso),
            ("loss.face_presence", self.loss.face_presence),
            ("data.pad", self.data.pad),
            ("data.loader_workers", self.data.loader_workers),
            ("eval.every_epochs", self.eval.every_epochs),
            ("loss.triplet", self.loss.triplet),
            ("loss.triplet_margin", self.loss.triplet_margin),
            ("optim.warmup_epochs", self.optim.warmup_epochs),
        ):
            check_non_negative(key, value)
        if not 0.0 <= self.optim.momentum < 1.0:
            raise ConfigError(f"optim.momentum: expected a value in [0, 1), got {self.optim.momentum}")
        if self.optim.nesterov and self.optim.optimizer == "sgd" and self.optim.momentum == 0:
            raise ConfigError("optim.nesterov: Nesterov momentum needs optim.momentum > 0")
        check_unit_interval("data.flip", self.data.flip)
        self._validate_recipe()
        if not 0.0 <= self.model.dropout_rate < 1.0:
            raise ConfigError(f"model.dropout_rate: expected a value in [0, 1), got {self.model.dropout_rate}")
        for key, value in (("data.max_images", self.data.max_images),
                           ("distractors.max_images", self.distractors.max_images)):  # fmt: skip
            if value is not None:
                check_positive(key, value)
        if self.distractors.per_batch is not None and not self.distractors.per_batch >= 0:
            raise ConfigError(
                f"distractors.per_batch: expected ≥ 0 or null (proportional), got {self.distractors.per_batch}"
            )
        if self.distractors.uri is not None and not self.distractors.uri:
            raise ConfigError("distractors.uri: empty; give the set's folder or null to train without distractors")
        from reid_core.models import check_input_size

        h, w = self.data.image_size
        try:
            check_input_size(self.model.name, (h, w))
        except ValueError as exc:
            raise ConfigError(f"data.image_size: {exc}") from None
        if is_dual_stream(self.model.name):
            if self.model.face_size != h:
                raise ConfigError(
                    f"model.face_size: {self.model.face_size} must equal the person image side {h} (the registered "
                    "Dual-Stream model stacks image and face crop into one (N, 6, S, S) input)"
                )

    def _validate_recipe(self) -> None:
        """The recipe options of issue #17 (all off by default)."""
        check_unit_interval("data.random_erasing", self.data.random_erasing)
        if not 0.0 <= self.loss.label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing: expected a value in [0, 1), got {self.loss.label_smoothing}")
        check_unit_interval("optim.warmup_factor", self.optim.warmup_factor)
        check_positive("optim.step_gamma", self.optim.step_gamma)
        if self.optim.warmup_epochs >= self.optim.epochs:
            raise ConfigError(f"optim.warmup_epochs: {self.optim.warmup_epochs} must be less than optim.epochs "
                              f"({self.optim.epochs})")  # fmt: skip
        if self.optim.schedule == "step" and (
            not self.optim.step_milestones or any(m <= 0 for m in self.optim.step_milestones)
        ):
            raise ConfigError(f"optim.step_milestones: expected positive epochs, got {self.optim.step_milestones}")
        if self.model.last_stride not in (1, 2):
            raise ConfigError(f"model.last_stride: expected 1 or 2, got {self.model.last_stride}")
        if self.model.pretrained is not None:
            scheme = self.model.pretrained.split("://", 1)[0] if "://" in self.model.pretrained else "path"
            if not self.model.pretrained or scheme not in ("s3", "https", "http", "path"):
                raise ConfigError(f"model.pretrained: {self.model.pretrained!r}: expected s3://bucket/key, a local "
                                  "path or https://...")  # fmt: skip
        if is_dual_stream(self.model.name):
            used = [key for key, on in (("model.pretrained", self.model.pretrained is not None),
                                        ("model.bnneck", self.model.bnneck), ("model.last_stride", self.model.last_stride != 2),
                                        ("loss.triplet", self.loss.triplet > 0),
                                        ("data.random_erasing", self.data.random_erasing > 0)) if on]  # fmt: skip
            if used:
                raise ConfigError(f"{used[0]}: not available for the Dual-Stream CNN ({self.model.name}); "
                                  "CondenseNet and resnet50 only")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- λ search
# (added for jobs/tune_lambdas.py: a Ray Tune search over the face-guidance weights on the whole chain, docs/method.md §1)

SEARCH_MODES = ("grid", "asha")  # grid: every listed value (the paper's 3×3); asha: sampled, early-stopped on val
SEARCH_OBJECTIVES = ("mAP", "rank1")
IMAGE_FORMATS = ("jpeg", "png")
BATCH_NORM_MODES = ("standing", "running")


@dataclass
class SynthesisStageConfig:
    """The distractor synthesis of every trial (``jobs/synthesize.py``'s options); the set goes to
    ``OUT/<search name>/<trial id>``."""

    out: str = "s3://reid-data/distractors/tune"
    num_images: int = 48_000
    batch_size: int = 64
    chunk_size: int = 512  # images per Ray task; a multiple of batch_size
    workers: int = 1  # Ray tasks at a time; 1 = in the trial's own process; 0 = all CPUs of the cluster
    seed: int = 0
    image_format: str = "jpeg"  # jpeg | png
    batch_norm: str = "standing"  # standing | running


@dataclass
class SearchConfig:
    """What Tune searches and how. The trial's chain: GAN (λ1, λ2, mode) -> distractors -> re-ID -> Rank-1 / mAP."""

    name: str = "lambdas"  # Tune experiment and MLflow parent run name; --resume continues the search of this name
    storage: str = "s3://reid-data/tune-results"  # Tune's search state (what --resume reads)
    mode: str = "grid"  # grid | asha
    lambda1: list[float] = field(default_factory=lambda: [0.0, 0.025, 0.05])  # grid: the values; asha: [low, high]
    lambda2: list[float] = field(default_factory=lambda: [0.0, 0.025, 0.05])
    guidance_modes: list[str] = field(default_factory=lambda: ["weighted"])  # grid: each; asha: a random choice
    num_samples: int = 9  # asha: trials sampled; grid: repeats of the whole grid (usually 1)
    objective: str = "mAP"  # mAP | rank1: what "best" and ASHA compare (higher is better)
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold (trial + its workers)
    trial_cpus: float = 0.1  # the trial's own process (it drives the stages; synthesis with workers=1 runs in it)
    grace_period: int = 1  # asha: re-ID epochs a trial runs before it may be stopped
    reduction_factor: int = 2  # asha: keep the best 1/reduction_factor at every rung
    seed: int = 0  # asha: sampling of λ


@dataclass
class SearchTrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None = MLFLOW_TRACKING_URI or the embedded stack's
    experiment: str = "tune-lambdas"  # the parent run, the trials' child runs and their stage runs
    alias: str = "candidate"  # set on the best trial's registered re-ID model version


@dataclass
class TuneJobConfig:
    """A λ1/λ2 search: ``gan`` and ``reid`` are whole job configs (their λ, run names, experiments and aliases are
    set per trial), ``synthesis`` the distractor set between them."""

    search: SearchConfig = field(default_factory=SearchConfig)
    gan: GanJobConfig = field(default_factory=GanJobConfig)
    synthesis: SynthesisStageConfig = field(default_factory=SynthesisStageConfig)
    reid: ReidJobConfig = field(default_factory=ReidJobConfig)
    tracking: SearchTrackingConfig = field(default_factory=SearchTrackingConfig)

    def validate(self) -> None:
        s = self.search
        check_choice("search.mode", s.mode, SEARCH_MODES)
        check_choice("search.objective", s.objective, SEARCH_OBJECTIVES)
        for key in ("lambda1", "lambda2"):
            values = getattr(s, key)
            if not values:
                raise ConfigError(f"search.{key}: empty; give the values to search, e.g. [0, 0.025, 0.05]")
            for i, value in enumerate(values):
                check_unit_interval(f"search.{key}[{i}]", value)
            if s.mode == "grid" and len(set(values)) != len(values):
                raise ConfigError(f"search.{key}: {values} repeats a value (a grid would run a trial twice)")
            if s.mode == "asha" and len(values) != 2:
                raise ConfigError(
                    f"search.{key}: asha samples λ uniformly from [low, high]; give 2 values, got {values}"
                )
        if not s.guidance_modes:
            raise ConfigError(f"search.guidance_modes: empty; give one or more of {', '.join(GUIDANCE_MODES)}")
        for i, mode in enumerate(s.guidance_modes):
            check_choice(f"search.guidance_modes[{i}]", mode, GUIDANCE_MODES)
        check_positive("search.num_samples", s.num_samples)
        check_positive("search.trial_cpus", s.trial_cpus)
        check_positive("search.grace_period", s.grace_period)
        if s.reduction_factor < 2:
            raise ConfigError(f"search.reduction_factor: expected ≥ 2, got {s.reduction_factor}")
        if s.max_concurrent_trials is not None:
            check_positive("search.max_concurrent_trials", s.max_concurrent_trials)
        check_name("search.name", s.name)
        if not s.storage:
            raise ConfigError("search.storage: missing location for the search's state")
        if s.mode == "asha":
            if not self.reid.eval.every_epochs:
                raise ConfigError(
                    "reid.eval.every_epochs: asha stops trials on the re-ID validation Rank-1/mAP during training; "
                    "set it to k ≥ 1 (validate every k epochs)"
                )
            if s.grace_period > self.reid.optim.epochs:
                raise ConfigError(
                    f"search.grace_period: {s.grace_period} re-ID epochs, more than reid.optim.epochs "
                    f"({self.reid.optim.epochs}): no trial could ever be stopped"
                )
        y = self.synthesis
        check_choice("synthesis.image_format", y.image_format, IMAGE_FORMATS)
        check_choice("synthesis.batch_norm", y.batch_norm, BATCH_NORM_MODES)
        for key in ("num_images", "batch_size", "chunk_size"):
            check_positive(f"synthesis.{key}", getattr(y, key))
        if y.chunk_size % y.batch_size:
            raise ConfigError(
                f"synthesis.chunk_size: {y.chunk_size} must be a multiple of synthesis.batch_size ({y.batch_size})"
            )
        if not (y.workers >= 0 and y.seed >= 0):
            raise ConfigError(f"synthesis.workers and synthesis.seed: expected ≥ 0, got {y.workers}, {y.seed}")
        if not y.out:
            raise ConfigError("synthesis.out: missing location for the trials' distractor sets")
        for prefix, job in (("gan", self.gan), ("reid", self.reid)):
            try:
                job.validate()
            except ConfigError as exc:
                raise ConfigError(f"{prefix}.{exc}") from None
