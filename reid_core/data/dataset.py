"""Images -> tensors: decoding that fails loudly, a torch Dataset over records, transforms and the P×K sampler.

- ``load_image`` decodes bytes with PIL and raises ``BadImageError`` (naming the path) for missing, unreadable,
  truncated or non-image data; no retry loop (retries of the *transport* live in ``reid_core.storage``).
- ``ReIDDataset`` maps an index to a dict sample (see ``ReIDDataset``). Fetching a whole batch through the
  DataLoader (PyTorch calls ``__getitems__`` with the batch's indices) reads all its bytes at once with
  ``storage.read_many`` (up to ``read_batch_size`` requests in flight), which is what makes S3 fast; single-index
  access reads one object.
- ``on_bad_image="skip"`` replaces a bad image by a deterministically chosen good one (the next image of the same
  identity, so a P×K batch keeps its shape), logs the path and the reason, counts it in the dataset (``stats()``)
  and marks the sample (``sample["skipped"] == 1``). With DataLoader workers every worker holds its own copy of the
  dataset, so the main process's ``stats()`` stays at zero: sum ``batch["skipped"]`` instead (the training loop does),
  which counts the same events whatever the number of workers.
- ``RandomIdentitySampler`` yields P identities × K images per batch, the same sequence on every rank for a given
  (seed, epoch), each rank taking every ``world_size``-th batch.

s3fs is not fork-safe: use DataLoader ``multiprocessing_context="forkserver"`` (or ``"spawn"``) with S3 data;
``reid_core.storage`` opens one filesystem per process.
"""

from __future__ import annotations

import io
import logging
import os
import re
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from reid_core import storage
from reid_core.data.layouts import Record
from reid_core.data.shards import read_record_bytes

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_IMAGE_POLICIES = ("raise", "skip")
_JPEG_SOS = b"\xff\xda"  # start of scan
_JPEG_EOI = b"\xff\xd9"  # end of image


class BadImageError(ValueError):
    """An image that cannot be decoded (missing, unreadable, truncated, not an image); ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"bad image {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # Raised in Ray workers and actors, and pickled back to the driver: rebuilt from (path, reason), not from
        # ``args`` (the message), which ``__init__`` would not accept.
        return (type(self), (self.path, self.reason), self.__dict__)


def load_image(
    path_or_bytes: str | os.PathLike | bytes,
    *,
    path: str | None = None,
    settings: storage.S3Settings | None = None,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode one image to an RGB ``PIL.Image``.

    Args:
        path_or_bytes: a URL or local path (read through ``reid_core.storage``), or the file's bytes.
        path: the name used in error messages when bytes are given.
        settings: S3 endpoint and credentials (default: from the environment).
        draft_size: (height, width): a JPEG may be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, as long as
            the result stays at least this size (PIL's ``draft``; 2-3× faster than a full decode). The image is then
            smaller than the file: only for callers that resize to about this size anyway and index no pixels.

    Raises:
        BadImageError: the object does not exist, or its bytes are empty, truncated or not an image. Transport
            failures against S3 (endpoint down, access denied) raise ``storage.StorageError`` instead: they are not
            a property of the image and must not be skipped.
    """
    if isinstance(path_or_bytes, str | os.PathLike):
        path = os.fspath(path_or_bytes)
        try:
            data = storage.read_bytes(path, settings)
        except FileNotFoundError:
            raise BadImageError(path, "file not found") from None
        except storage.StorageError as exc:
            if storage.is_s3(path):
                raise
            raise BadImageError(path, f"unreadable ({exc})") from exc
    else:
        data = bytes(path_or_bytes)
    name = path or "<bytes>"
    if not data:
        raise BadImageError(name, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if draft_size is not None:
                image.draft(None, (draft_size[1], draft_size[0]))
            # With PIL's default LOAD_TRUNCATED_IMAGES=False, load() raises on a file cut inside its pixel data.
            image.load()
            fmt = image.format
            rgb = image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        said = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))  # PIL names its buffer, not the file
        raise BadImageError(name, f"cannot decode ({type(exc).__name__}: {said})") from exc
    if fmt == "JPEG" and data.rfind(_JPEG_EOI) < data.rfind(_JPEG_SOS):
        # libjpeg decodes a file cut inside its end-of-image marker without complaint, and PIL decodes any cut when
        # someone set its global LOAD_TRUNCATED_IMAGES. Inside entropy-coded data 0xFF is always followed by 0x00
        # or a restart marker, so the last start-of-scan must be followed by an end-of-image marker.
        raise BadImageError(name, "truncated JPEG (no end-of-image marker after the last scan)")
    return rgb


def build_transforms(
    height: int = 256,
    width: int = 128,
    *,
    train: bool,
    flip_p: float = 0.5,
    pad: int = 0,
    erase_p: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL RGB image -> (3, height, width) float32 tensor, normalised by ``mean``/``std``.

    Training adds a random horizontal flip (probability ``flip_p``) and, with ``pad > 0``, zero padding by ``pad``
    pixels followed by a random (height, width) crop; with ``erase_p > 0``, random erasing (Zhong et al., 2020;
    torchvision's ``RandomErasing`` with its default area and aspect ranges) of one rectangle per image with that
    probability, filled with 0 after normalisation (the dataset mean). Evaluation only resizes and normalises.
    """
    # Geometry first, on the PIL image (PIL's C resize of a small image costs less than a tensor resize), then one
    # conversion to a float tensor: ~20% faster per image than converting first, which matters to a 1-CPU worker.
    steps: list = [v2.Resize((height, width), antialias=True)]
    if train:
        if flip_p > 0:
            steps.append(v2.RandomHorizontalFlip(p=flip_p))
        if pad > 0:
            steps.append(v2.RandomCrop((height, width), padding=pad))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if train and erase_p > 0:
        steps.append(v2.RandomErasing(p=erase_p, value=0.0))
    return v2.Compose(steps)


def crop_to_box(image: Image.Image, box: tuple[int, int, int, int] | None, path: str) -> Image.Image:
    if box is None:
        return image
    x, y, w, h = box
    left, top = max(0, x), max(0, y)
    right, bottom = min(image.width, x + w), min(image.height, y + h)
    if right <= left or bottom <= top:
        raise BadImageError(path, f"box (x, y, w, h)={box} lies outside the {image.width}×{image.height} image")
    return image.crop((left, top, right, bottom))


class ReIDDataset(Dataset):
    """A map-style dataset over ``Record`` s.

    ``dataset[i]`` is a dict:
        ``image``: the transform's output, e.g. (3, H, W) float32;
        ``pid``, ``camid``: ints (of the record actually returned);
        ``face``: 1 (face tagged), 0 (no face), -1 (not tagged);
        ``index``: index of the record returned (differs from ``i`` when a bad image was replaced);
        ``skipped``: 1 if record ``i`` was bad and replaced, else 0;
        ``path``: the returned record's path.
    The default collate turns a list of these into a dict of batched tensors (and a list of paths).

    Args:
        records: the split to serve.
        transform: PIL RGB image -> tensor (``build_transforms``); ``None`` gives a uint8 (3, h, w) tensor.
        on_bad_image: ``"raise"`` (``BadImageError``) or ``"skip"`` (replace, count, log; see the module docstring).
        max_replacements: how many candidates a skip tries before giving up with ``BadImageError``.
        read_batch_size: requests in flight when a batch is fetched through ``__getitems__``.
        settings: S3 endpoint and credentials (default: from the environment of the reading process).
        decode_size: (height, width) the transform resizes to: JPEGs are decoded at a reduced scale no smaller than
            that (``load_image``'s ``draft_size``; not for records with a box). None: full-size decode.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        *,
        on_bad_image: str = "raise",
        max_replacements: int = 16,
        read_batch_size: int = 64,
        settings: storage.S3Settings | None = None,
        decode_size: tuple[int, int] | None = None,
    ) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image={on_bad_image!r} must be one of {', '.join(BAD_IMAGE_POLICIES)}")
        if max_replacements < 1:
            raise ValueError(f"max_replacements={max_replacements} must be >= 1")
        self.records = list(records)
        self.transform = transform if transform is not None else v2.ToImage()
        self.on_bad_image = on_bad_image
        self.max_replacements = max_replacements
        self.read_batch_size = read_batch_size
        self.settings = settings
        self.decode_size = None if decode_size is None else (int(decode_size[0]), int(decode_size[1]))
        self.skipped = 0
        self.bad: dict[str, str] = {}  # path -> reason, for every bad image met in this process
        self._pool: ThreadPoolExecutor | None = None  # read-ahead thread (``read_ahead``), started on first use
        self._ahead: dict[tuple[int, ...], Future] = {}  # batch indices -> Future of their bytes
        self._by_pid: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            self._by_pid[r.pid].append(i)

    def __len__(self) -> int:
        return len(self.records)

    def stats(self) -> dict[str, int]:
        """``skipped``: samples replaced because their image was bad (each time it was drawn); ``bad_images``:
        distinct bad images met. Counts of this process only (see the module docstring for DataLoader workers)."""
        return {"skipped": self.skipped, "bad_images": len(self.bad)}

    def __getitem__(self, index: int) -> dict:
        return self._sample(index, None)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """A batch: all its images are read at once (many requests in flight; ranged reads of the shards when the
        dataset is packed), see ``shards.read_record_bytes``; or were read ahead (``read_ahead``)."""
        pending = self._ahead.pop(tuple(indices), None) if self._ahead else None
        try:
            prefetched = pending.result() if pending is not None else self._read_batch(indices)
        except FileNotFoundError:
            prefetched = None  # a missing object: read one by one so the bad-image policy sees which
        except storage.StorageError:
            if any(storage.is_s3(self.records[i].path) or self.records[i].shard is not None for i in indices):
                raise  # the transport failed or a shard changed: not a property of one image
            prefetched = None  # an unreadable local file: same as above
        return [self._sample(i, prefetched) for i in indices]

    def _read_batch(self, indices: Sequence[int]) -> dict[str, bytes]:
        wanted = {self.records[i].path: self.records[i] for i in indices if self.records[i].path not in self.bad}
        return read_record_bytes(wanted.values(), self.settings, batch_size=self.read_batch_size)

    def read_ahead(self, batch_sampler: Iterable[Sequence[int]], depth: int = 2) -> ReadAheadBatches:
        """``batch_sampler`` (yielding lists of indices), with the bytes of the next ``depth`` batches read in a
        background thread while the current one is decoded and trained on: pass it as a DataLoader's
        ``batch_sampler`` when ``num_workers=0`` (with workers, each worker process reads its own batches ahead
        through ``prefetch_factor``). Reading waits on S3 latency, decoding on the CPU: the two overlap."""
        return ReadAheadBatches(self, batch_sampler, depth)

    def _submit_read(self, indices: Sequence[int]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._ahead[tuple(indices)] = self._pool.submit(self._read_batch, list(indices))

    def __getstate__(self) -> dict:  # DataLoader workers get the settings, not the read-ahead thread
        state = self.__dict__.copy()
        state.update(_pool=None, _ahead={})
        return state

    def _load(self, index: int, prefetched: dict[str, bytes] | None) -> Image.Image:
        record = self.records[index]
        if record.path in self.bad:
            raise BadImageError(record.path, self.bad[record.path])
        try:
            draft = self.decode_size if record.box is None else None  # a box indexes the full-size image
            if prefetched is not None and record.path in prefetched:
                image = load_image(prefetched[record.path], path=record.path, draft_size=draft)
            elif record.shard is not None:
                data = read_record_bytes([record], self.settings)[record.path]
                image = load_image(data, path=record.path, draft_size=draft)
            else:
                image = load_image(record.path, settings=self.settings, draft_size=draft)
            return crop_to_box(image, record.box, record.path)
        except BadImageError as err:
            if self.on_bad_image == "skip":
                self.bad[record.path] = err.reason
            raise

    def _sample(self, index: int, prefetched: dict[str, bytes] | None) -> dict:
        try:
            image, chosen, skipped = self._load(index, prefetched), index, 0
        except BadImageError as err:
            if self.on_bad_image == "raise":
                raise
            image, chosen = self._replacement(index, err)
            skipped = 1
        record = self.records[chosen]
        return {
            "image": self.transform(image),
            "pid": record.pid,
            "camid": record.camid,
            "face": -1 if record.face is None else int(record.face),
            "index": chosen,
            "skipped": skipped,
            "path": record.path,
        }

    def _candidates(self, index: int) -> Iterator[int]:
        """Replacement order: the following images of the same identity (cyclically), then following images."""
        same = self._by_pid[self.records[index].pid]
        pos = same.index(index)
        yield from same[pos + 1 :] + same[:pos]
        n = len(self.records)
        yield from ((index + k) % n for k in range(1, n))

    def _replacement(self, index: int, err: BadImageError) -> tuple[Image.Image, int]:
        self.skipped += 1
        tried = 0
        seen = {index}
        for candidate in self._candidates(index):
            if candidate in seen or self.records[candidate].path in self.bad:
                continue
            seen.add(candidate)
            try:
                image = self._load(candidate, None)
            except BadImageError:
                tried += 1
                if tried >= self.max_replacements:
                    break
                continue
            log.warning(
                "skipped bad image %s (%s): served %s instead (%d skipped so far in this process)",
                err.path,
                err.reason,
                self.records[candidate].path,
                self.skipped,
            )
            return image, candidate
        raise BadImageError(
            err.path,
            f"{err.reason}; and no good replacement among {len(seen) - 1} candidates "
            f"({len(self.bad)} bad images found so far: the data looks broken)",
        )


class ReadAheadBatches:
    """A batch sampler whose next ``depth`` batches' bytes are being read while the current one is used
    (``ReIDDataset.read_ahead``). ``set_epoch`` and ``len`` are those of the wrapped sampler."""

    def __init__(self, dataset: ReIDDataset, batch_sampler: Iterable[Sequence[int]], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"read_ahead depth={depth} must be >= 1")
        self.dataset, self.batch_sampler, self.depth = dataset, batch_sampler, depth

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        self.dataset._ahead.clear()  # reads left over from an epoch that was stopped early
        window: deque[list[int]] = deque()
        batches = iter(self.batch_sampler)
        for batch in batches:
            window.append(list(batch))
            self.dataset._submit_read(window[-1])
            if len(window) > self.depth:
                yield window.popleft()
        while window:
            yield window.popleft()


class RandomIdentitySampler(Sampler[int]):
    """P identities × K images per batch (``P = batch_size // num_instances``, ``K = num_instances``).

    Per epoch, each identity's images are shuffled and cut into groups of K (an identity with fewer than K images
    is drawn K times with replacement; a remainder smaller than K is dropped), then batches take P distinct
    identities at random among those with groups left, until fewer than P remain. The sequence of batches depends
    only on (seed, epoch): every rank computes the same one and takes batches ``rank, rank + world_size, ...``,
    truncated so that all ranks get the same number (unequal lengths would hang collective ops).

    Yields record indices, batch after batch: use it with ``DataLoader(..., batch_size=batch_size, sampler=...)``
    (and ``ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)`` under Ray Train).

    Args:
        records: the training split (anything with a ``pid`` attribute).
        batch_size: images per batch on one rank (a multiple of ``num_instances``).
        num_instances: K, images per identity in a batch.
        seed: base seed; call ``set_epoch(epoch)`` before each epoch.
        rank, world_size: this rank's shard of the batches.
    """

    def __init__(
        self,
        records: Sequence,
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"batch_size={batch_size} must be a positive multiple of num_instances={num_instances} (>= 1)"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        by_pid: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_pid[r.pid].append(i)
        self.num_pids_per_batch = batch_size // num_instances
        if len(by_pid) < self.num_pids_per_batch:
            raise ValueError(
                f"batch_size={batch_size} with num_instances={num_instances} needs "
                f"{self.num_pids_per_batch} identities per batch, but the records have only {len(by_pid)}"
            )
        self.pids = sorted(by_pid)
        self.indices = [np.asarray(by_pid[p]) for p in self.pids]
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[np.ndarray]:
        """Every rank's batches of the current epoch, each (batch_size,) int64 record indices."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        k = self.num_instances
        groups: list[list[np.ndarray]] = []
        for idx in self.indices:
            drawn = rng.choice(idx, size=k, replace=True) if len(idx) < k else rng.permutation(idx)
            groups.append([drawn[j * k : (j + 1) * k] for j in range(len(drawn) // k)])
        left = np.array([len(g) for g in groups])
        batches = []
        while np.count_nonzero(left) >= self.num_pids_per_batch:
            chosen = rng.choice(np.flatnonzero(left), size=self.num_pids_per_batch, replace=False)
            batches.append(np.concatenate([groups[p][left[p] - 1] for p in chosen]))
            left[chosen] -= 1
        self._cache = (self.epoch, batches)
        return batches

    def _my_batches(self) -> list[np.ndarray]:
        batches = self._all_batches()
        usable = len(batches) // self.world_size * self.world_size
        return batches[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[int]:
        for batch in self._my_batches():
            yield from (int(i) for i in batch)

    def __len__(self) -> int:
        return len(self._my_batches()) * self.batch_size
