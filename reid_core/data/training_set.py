"""Training data of the re-ID job: real identities plus the synthesised distractor class (docs/method.md §2).

- ``read_distractor_set(uri)`` reads a set written by ``jobs/synthesize.py`` (``distractors.json``, ``manifest.csv``,
  ``images/``; the format is in that job's docstring). ``distractors.json`` is written last, so a folder without it is
  an unfinished or failed set and is refused; so is one whose manifest disagrees with its metadata.
- ``training_records(real, distractors)`` puts the real training records (labels 0..N-1) first and the generated ones
  after them, all with label N, the distractor class; ``TrainingSet.is_generated`` flags them (LSRO needs the flag).
- ``MixedBatchSampler`` yields batches of P identities × K images of the real data (``RandomIdentitySampler``: the
  same batches on every rank for a (seed, epoch), each rank taking its share) plus D generated images, chosen from a
  per-epoch permutation of the set so that ranks and batches get different ones until the set is used up.
- Dual-Stream CNN: ``face_boxes`` finds one face box per record (dlib, on the stored image), ``FaceStreamDataset``
  serves (person image, face crop, has_face).

Plain PyTorch/NumPy plus ``reid_core.storage``: no Ray, DeepSpeed or MLflow here.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from reid_core import storage
from reid_core.data import RandomIdentitySampler, Record, ReIDDataset
from reid_core.data.dataset import IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

DISTRACTOR_FORMAT = "reid-distractors/1"
DISTRACTOR_METADATA = "distractors.json"
DISTRACTOR_COLUMNS = ("path", "index", "seed", "face_absent")
DISTRACTOR_PID = "distractor"
"""``orig_pid`` of a generated record: no real identity has it, so it can never match a query."""
DISTRACTOR_CAMID = -1
"""``camid`` of a generated record (no camera took it)."""

# Where the face is assumed to be in a person box that the dataset tags as showing a face but in which the detector
# finds none: the top quarter, middle half (left, top, right, bottom as fractions of the box).
HEAD_REGION = (0.25, 0.0, 0.75, 0.25)

Box = tuple[float, float, float, float]


class DistractorSetError(ValueError):
    """A distractor set that must not be used (incomplete, or manifest and metadata disagree); says which and why."""


# ------------------------------------------------------------------------------------------------ distractor set
@dataclass(frozen=True)
class DistractorSet:
    """A complete distractor set.

    Attributes:
        uri: the set's folder.
        metadata: ``distractors.json`` as written by ``jobs/synthesize.py``.
        paths: full URLs of the images used, in index order (the first ``max_images`` of the set).
        face_absent: Δ of each image (1 = no face found), same order.
    """

    uri: str
    metadata: dict
    paths: list[str]
    face_absent: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def read_distractor_set(
    uri: str, *, max_images: int | None = None, settings: storage.S3Settings | None = None
) -> DistractorSet:
    """Read a distractor set's metadata and manifest (two objects; the images are not listed).

    Raises:
        DistractorSetError: no ``distractors.json`` (incomplete: ``jobs/synthesize.py`` writes it last), an unknown
            format, a manifest whose header, rows or count disagree with the metadata, or ``max_images`` < 1.
    """
    if max_images is not None and max_images < 1:
        raise DistractorSetError(f"max_images={max_images}: expected a positive number of distractor images or None")
    meta_url = storage.join(uri, DISTRACTOR_METADATA)
    try:
        metadata = json.loads(storage.read_bytes(meta_url, settings))
    except FileNotFoundError:
        raise DistractorSetError(
            f"distractor set {uri} is incomplete: no {DISTRACTOR_METADATA} (jobs/synthesize.py writes it last, so the "
            "set was never finished); synthesize it again with --overwrite"
        ) from None
    except json.JSONDecodeError as exc:
        raise DistractorSetError(f"{meta_url}: not valid JSON ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != DISTRACTOR_FORMAT:
        got = metadata.get("format") if isinstance(metadata, dict) else type(metadata).__name__
        raise DistractorSetError(f"{meta_url}: format {got!r}, expected {DISTRACTOR_FORMAT!r}")
    manifest_url = storage.join(uri, str(metadata.get("manifest", "manifest.csv")))
    try:
        text = storage.read_bytes(manifest_url, settings).decode("utf-8")
    except FileNotFoundError:
        raise DistractorSetError(
            f"distractor set {uri}: {DISTRACTOR_METADATA} names {manifest_url}, which is missing"
        ) from None
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != DISTRACTOR_COLUMNS:
        raise DistractorSetError(f"{manifest_url}: header {reader.fieldnames}, expected {','.join(DISTRACTOR_COLUMNS)}")
    paths, face_absent = [], []
    for lineno, row in enumerate(reader, start=2):
        try:
            index, absent = int(row["index"]), int(row["face_absent"])
        except (TypeError, ValueError):
            raise DistractorSetError(f"{manifest_url} line {lineno}: index and face_absent must be integers") from None
        rel = row["path"] or ""
        if index != len(paths) or absent not in (0, 1) or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise DistractorSetError(
                f"{manifest_url} line {lineno}: expected index {len(paths)}, face_absent 0/1 and a relative path; "
                f"got {row}"
            )
        paths.append(storage.join(uri, rel))
        face_absent.append(absent)
    expected = metadata.get("num_images")
    if expected != len(paths):
        raise DistractorSetError(
            f"distractor set {uri}: {DISTRACTOR_METADATA} says {expected} images, {manifest_url} lists {len(paths)}"
        )
    if not paths:
        raise DistractorSetError(f"distractor set {uri} has no images")
    if max_images is not None and max_images < len(paths):
        paths, face_absent = paths[:max_images], face_absent[:max_images]
    return DistractorSet(uri=uri, metadata=metadata, paths=paths, face_absent=face_absent)


# ------------------------------------------------------------------------------------------------ training records
@dataclass(frozen=True)
class TrainingSet:
    """What the re-ID network trains on.

    Attributes:
        records: real records (labels 0..N-1) first, then generated ones (label N, ``orig_pid`` "distractor",
            ``camid`` -1, ``face`` from the set's Δ).
        num_classes: N, the real identities; the model has N + 1 outputs.
        num_real, num_generated: how many of each (``num_real + num_generated == len(records)``).
        is_generated: (len(records),) bool, True for the synthesised images.
        distractors_uri: the set used, or None.
    """

    records: list[Record]
    num_classes: int
    num_real: int
    num_generated: int
    is_generated: torch.Tensor = field(repr=False, compare=False)
    distractors_uri: str | None = None

    @property
    def distractor_class(self) -> int:
        return self.num_classes

    @property
    def real(self) -> list[Record]:
        return self.records[: self.num_real]


# MSMT17 V1's training lists (Wei et al., 2018): list_train 30,248 images of 1,041 identities, list_val 2,373 more of
# the same identities. The paper's statistics count 32,621 training images: train + val (data.options.merge_val).
MSMT17_PAPER_TRAIN_IMAGES = 32_621


def describe_training_split(splits) -> str:
    """One line with the training split's counts (printed by ``train_reid`` before Ray starts): images, identities and,
    for MSMT17, which lists make it up and whether that is the paper's train + val (``merge_val``)."""
    line = f"training split: {len(splits.train):,} images of {splits.num_train_pids:,} identities ({splits.layout}"
    counts = splits.details.get("list_counts") if splits.layout == "msmt17" else None
    if counts:
        merged = bool(splits.details.get("merge_val"))
        parts = " + ".join(f"{name} {n:,}" for name, n in counts.items())
        line += f": {parts}; merge_val={str(merged).lower()}"
        line += (
            f", the paper's train + val ({MSMT17_PAPER_TRAIN_IMAGES:,} on MSMT17 V1)"
            if merged
            else f"; the paper trains on train + val ({MSMT17_PAPER_TRAIN_IMAGES:,} on MSMT17 V1): "
            "set data.options.merge_val=true"
        )
    return line + ")"


def limit_training(records: Sequence[Record], max_images: int | None) -> tuple[list[Record], dict[int | str, int]]:
    """The first ``max_images`` training records (all when None), relabelled 0..N'-1 in order of first appearance of
    their current label, and the matching ``pid_map`` (``orig_pid`` -> new label)."""
    chosen = list(records[:max_images] if max_images else records)
    new_label: dict[int, int] = {}
    for r in chosen:
        new_label.setdefault(r.pid, len(new_label))
    out = [r if new_label[r.pid] == r.pid else dataclasses.replace(r, pid=new_label[r.pid]) for r in chosen]
    return out, {r.orig_pid: r.pid for r in out}


def training_records(real: Sequence[Record], distractors: DistractorSet | None = None) -> TrainingSet:
    """Real training records + the distractor set as class N.

    Args:
        real: the training split; labels must be exactly 0..N-1 (every label used), as ``read_layout`` gives them.
        distractors: a set from ``read_distractor_set``, or None.

    Raises:
        ValueError: no real records, or labels that are not 0..N-1.
    """
    real = list(real)
    if not real:
        raise ValueError("training_records: the training split is empty")
    labels = sorted({r.pid for r in real})
    if labels[0] != 0 or labels[-1] != len(labels) - 1:
        missing = sorted(set(range(labels[-1] + 1)) - set(labels))[:5]
        raise ValueError(
            f"training_records: training labels must be 0..N-1 with every label used (relabelled by read_layout); "
            f"got {len(labels)} labels in [{labels[0]}, {labels[-1]}]"
            + (f", missing e.g. {missing}" if missing else "")
        )
    n = len(labels)
    generated = [] if distractors is None else [
        Record(path=p, pid=n, camid=DISTRACTOR_CAMID, face=not absent, orig_pid=DISTRACTOR_PID)
        for p, absent in zip(distractors.paths, distractors.face_absent, strict=True)
    ]  # fmt: skip
    flags = torch.zeros(len(real) + len(generated), dtype=torch.bool)
    flags[len(real) :] = True
    return TrainingSet(
        records=real + generated,
        num_classes=n,
        num_real=len(real),
        num_generated=len(generated),
        is_generated=flags,
        distractors_uri=None if distractors is None else distractors.uri,
    )


def distractors_per_batch(*, batch_size: int, num_real: int, num_generated: int, per_batch: int | None) -> int:
    """D, generated images per batch: ``per_batch`` when given, else the share a shuffle of the union would give,
    ``round(batch_size · num_generated / num_real)`` (at least 1 when there is a set); 0 without a set."""
    if num_generated == 0:
        return 0
    if per_batch is not None:
        return per_batch
    return max(1, round(batch_size * num_generated / num_real))


# ------------------------------------------------------------------------------------------------ batches
class MixedBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``TrainingSet.records``: P×K real images, then D generated ones.

    The real part is ``RandomIdentitySampler``'s (same sequence on every rank for (seed, epoch), rank r taking batches
    r, r + W, ...); its length defines the epoch. Generated images come from a permutation of the set drawn from
    (seed, epoch): global batch g = b·W + r takes positions g·D .. g·D + D - 1 of it (cyclically), so no image repeats
    within an epoch before the set is used up. Call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        training: TrainingSet,
        *,
        identities_per_batch: int,
        images_per_identity: int,
        distractors_per_batch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if distractors_per_batch < 0:
            raise ValueError(f"distractors_per_batch must be ≥ 0, got {distractors_per_batch}")
        if distractors_per_batch and not training.num_generated:
            raise ValueError(f"distractors_per_batch={distractors_per_batch} but the training set has no distractors")
        self.real = RandomIdentitySampler(
            training.real, batch_size=identities_per_batch * images_per_identity, num_instances=images_per_identity,
            seed=seed, rank=rank, world_size=world_size,
        )  # fmt: skip
        self.real_batch = identities_per_batch * images_per_identity
        self.num_real = training.num_real
        self.num_generated = training.num_generated
        self.per_batch = distractors_per_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    @property
    def batch_size(self) -> int:
        return self.real_batch + self.per_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.real.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.real) // self.real_batch

    def __iter__(self) -> Iterator[list[int]]:
        flat = list(self.real)
        order = None
        if self.per_batch:
            order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(self.num_generated)
        for b in range(len(flat) // self.real_batch):
            batch = flat[b * self.real_batch : (b + 1) * self.real_batch]
            if order is not None:
                g = b * self.world_size + self.rank
                pos = (g * self.per_batch + np.arange(self.per_batch)) % self.num_generated
                batch += [self.num_real + int(i) for i in order[pos]]
            yield batch


# ------------------------------------------------------------------------------------------------ Dual-Stream faces
def head_region(width: int, height: int) -> Box:
    """The assumed face box (left, top, right, bottom) px of a face-tagged person image without a detection."""
    left, top, right, bottom = HEAD_REGION
    return (left * width, top * height, right * width, bottom * height)


def face_boxes(
    records: Sequence[Record],
    detector,
    *,
    indices: Sequence[int] | None = None,
    chunk: int = 64,
    settings: storage.S3Settings | None = None,
    oracle_face_tags: bool = False,
) -> dict[int, Box | None]:
    """One face box per record, in the pixels of the record's person image (after its ``box`` crop).

    The detector's best box when it finds one, else None (no face: the face stream gets zeros). This detector-only
    definition is what every evaluation uses (validation, ``finalize``, ``jobs/evaluate.py``): test-time face presence
    never comes from the dataset's tags. ``oracle_face_tags=True`` (training, where the tags are labels, and
    analysis only) also gives ``head_region`` to a record the dataset tags as showing a face (``face`` True) that
    the detector misses.

    Args:
        records: the records; indices: which of them (default all).
        detector: a ``reid_core.guidance.faces.FaceDetector``.
    Returns {record index: box or None}.
    """
    dataset = ReIDDataset(records, transform=None, settings=settings)
    wanted = list(range(len(records))) if indices is None else list(indices)
    out: dict[int, Box | None] = {}
    for start in range(0, len(wanted), chunk):
        part = wanted[start : start + chunk]
        samples = dataset.__getitems__(part)
        arrays = [s["image"].permute(1, 2, 0).numpy() for s in samples]
        found = detector.detect(arrays).best_boxes()
        for i, array, box in zip(part, arrays, found, strict=True):
            if box is None and oracle_face_tags and records[i].face:
                box = head_region(array.shape[1], array.shape[0])
            out[i] = box
    return out


class FaceStreamDataset(Dataset):
    """Samples for the Dual-Stream CNN: ``ReIDDataset``'s dict plus ``face`` crops and ``has_face``.

    ``dataset[i]``: ``image`` (3, S, S) float32 normalised person image, ``face_crop`` (3, F, F) float32 (zeros when
    there is no face), ``has_face`` 0/1, and ``pid``, ``camid``, ``index``, ``skipped``, ``path`` as ``ReIDDataset``.
    With ``train``, the person image and its crop are flipped together with probability ``flip_p``.

    Args:
        records: the records; boxes: {record index: face box or None} from ``face_boxes`` (every index served).
        image_size: S; face_size: F; mean/std: normalisation of both.
    """

    def __init__(
        self,
        records: Sequence[Record],
        boxes: Mapping[int, Box | None],
        *,
        image_size: int,
        face_size: int,
        train: bool,
        flip_p: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        on_bad_image: str = "raise",
        settings: storage.S3Settings | None = None,
    ) -> None:
        self.base = ReIDDataset(records, transform=None, on_bad_image=on_bad_image, settings=settings)
        self.boxes = boxes
        self.image_size, self.face_size = image_size, face_size
        self.train, self.flip_p = train, flip_p
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))

    def __len__(self) -> int:
        return len(self.base)

    def stats(self) -> dict[str, int]:
        return self.base.stats()

    def __getitem__(self, index: int) -> dict:
        return self._finish(self.base[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._finish(s) for s in self.base.__getitems__(indices)]

    def _finish(self, sample: dict) -> dict:
        from reid_core.guidance.faces import face_crops

        image = self.normalize(sample["image"].float() / 255.0)
        box = self.boxes[sample["index"]]
        crop, present = face_crops(image[None], [box], size=self.face_size)
        person = v2.functional.resize(image, [self.image_size, self.image_size], antialias=True)
        crop = crop[0]
        if self.train and self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            person, crop = person.flip(-1), crop.flip(-1)
        return {**sample, "image": person, "face_crop": crop, "has_face": int(present[0])}


def all_face_boxes(
    records: Sequence[Record], detector, *, rank: int, world: int, settings=None
) -> dict[int, Box | None]:
    """``face_boxes`` of every training record (with the face tags: ``oracle_face_tags``), each rank detecting records rank, rank + world, ... and all ranks exchanging
    their shares (``torch.distributed.all_gather_object``), so every rank holds the whole table."""
    mine = face_boxes(records, detector, indices=range(rank, len(records), world), settings=settings,
                      oracle_face_tags=True)  # training: the tags are labels  # fmt: skip
    if world == 1:
        return mine
    import torch.distributed as dist

    gathered: list[dict | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    out: dict[int, Box | None] = {}
    for part in gathered:
        out.update(part or {})
    if len(out) != len(records):
        raise RuntimeError(f"face boxes: {len(out)} of {len(records)} records after exchanging ranks' shares")
    return out


__all__ = [
    "DISTRACTOR_CAMID",
    "DISTRACTOR_FORMAT",
    "DISTRACTOR_PID",
    "DistractorSet",
    "DistractorSetError",
    "FaceStreamDataset",
    "MixedBatchSampler",
    "TrainingSet",
    "all_face_boxes",
    "describe_training_split",
    "distractors_per_batch",
    "face_boxes",
    "head_region",
    "limit_training",
    "read_distractor_set",
    "training_records",
]
