"""Face presence Δ(x) with dlib's built-in HOG frontal face detector (docs/method.md §1).

Δ(x) = 1 when no face is found in x, 0 otherwise. The detector ships with dlib (no model file to download) and only
finds faces about 64 px tall or more, so the small person images of re-ID and of the DC-GAN must be upsampled first.
Measured on scikit-image's astronaut photo (``docs/face_detector.md``): the automatic rule ``upsample_for_height``
upsamples until the smallest face expected (a fraction of the image height, 1/8 by default) is 64 px tall: 256×128 →
×2, 128×64 → ×4, 64×32 → ×8 (capped there); 64×64 head crops with ``min_face_fraction=1/2`` → ×2.

Upsampling is a bicubic resize (Pillow) by 2^u followed by dlib at ``upsample_num_times=0``: at the same cost it
gives higher scores than dlib's own pyramid-up and finds the face in 64×32 images where dlib's does not.

dlib releases the GIL while it detects (two threads: 1.9× one thread on 2 free cores), so batches are spread over a
thread pool. A dlib detector must never be shared between threads: concurrent calls on one detector corrupt the heap
(measured: segmentation faults within a few thousand calls), so every thread builds its own on first use.

Conventions: boxes are ``(left, top, right, bottom)`` floats in the input image's pixel coordinates, right/bottom
exclusive (a Pillow crop box), clipped to the image.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import dlib
import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

# Smallest face height (px, after upsampling) found reliably: 66 px faces were found, 50 px faces were not (measured).
MIN_FACE_PX = 64
# Default smallest face to look for, as a fraction of the image height: faces of H/8 are found, H/10 need one more
# step (4× the cost). Head-and-shoulders crops have faces of ~H/6, full-body re-ID crops ~H/10 to H/12.
DEFAULT_MIN_FACE_FRACTION = 1 / 8
# The automatic rule never upsamples more: ×16 costs 4× more than ×8 (~60 ms per image) and, at 64×32, found only
# the largest face (H/5) of the six sizes tried; faces that small are better looked for at the source resolution.
MAX_AUTO_UPSAMPLE = 3
# dlib reports detections with score > 0 by default; the full astronaut photo at upsample 1 has a false positive at
# 0.12-0.13, while true faces at 128×64 and larger score ≥ 0.26 (64×32 faces score −0.3-0.5: some are lost).
DEFAULT_SCORE_THRESHOLD = 0.15
# Lowest window score ``FaceDetector.best_scores`` looks at. The best window of noise or of a faceless person scores
# about -1.1 to -0.8 at 128×64 (the best of the hundreds of windows dlib scans); the detected faces of the face-rich
# synthetic set score 0.72 (median). Images whose best window is below the floor are given the floor.
FACE_SCORE_FLOOR = -3.0

# --- the one setting for person crops (real images, GAN samples, distractors, Dual-Stream, evaluation) --------------
# Smallest face looked for in a person crop, eyebrows to chin, in pixels of the image as given. HOG finds nothing
# below ~16 px at any zoom (docs/face_detector.md §2).
PERSON_MIN_FACE_PX = 20
# Zoom of the head region: a 20 px face becomes 66 px, above what dlib finds (64 px; 58 px faces are found at times).
PERSON_SCALE = 3.3
# Share of the crop, from its top, where a head can be: full-body faces sit in the top fifth; 0.4 leaves room for
# shifted crops and for the 80×80 HOG window's context. Zooming only this part by 3.3 costs 0.4·3.3²/4 ≈ 1.1× a
# whole-image pass at 2×.
PERSON_TOP_FRACTION = 0.4
# Persons drawn into a square (the paper's 128×128) are stretched sideways; HOG misses stretched faces. Images with
# H/W below this are given a 2:1 shape back before detection.
STRETCHED_BELOW = 1.5


def upsample_for_height(height: int, *, min_face_fraction: float = DEFAULT_MIN_FACE_FRACTION) -> int:
    """Upsampling steps u (each doubles the image) to find faces of ``min_face_fraction · height`` px or taller.

    The smallest u ≥ 0 with ``min_face_fraction · height · 2^u ≥ 64`` (MIN_FACE_PX), capped at 3. With the default
    1/8: 512+ → 0, 256 → 1, 128 → 2, 64 → 3. Full-body person crops: 1/12 (one step more, 4× the time); head or face
    crops: 1/2 (a 64×64 head crop → 1).
    """
    if height < 1:
        raise ValueError(f"upsample_for_height: image height must be a positive number of pixels, got {height}")
    if not 0 < min_face_fraction <= 1:
        raise ValueError(
            f"upsample_for_height: min_face_fraction is the smallest face height as a fraction of the image height, "
            f"in (0, 1]; got {min_face_fraction!r}"
        )
    # the 1e-9 keeps exact powers of two (128 · 1/8 · 4 = 64) from rounding up a step
    steps = math.ceil(math.log2(MIN_FACE_PX / (min_face_fraction * height)) - 1e-9)
    return min(MAX_AUTO_UPSAMPLE, max(0, steps))


@dataclass(frozen=True)
class FaceDetections:
    """Detections for a batch of N images.

    face_absent: (N,) float32 on the CPU, Δ(x): 1.0 when no face was found in image i, else 0.0.
    boxes: per image, the faces found, ``(left, top, right, bottom)`` in input pixels, highest score first.
    scores: per image, the detector scores of ``boxes`` (dlib's SVM margin; all ≥ the score threshold).
    scale: per image, the zoom used (the image, or its scanned top part, was resized by this factor; 2^u for
        ``upsample=u``).
    """

    face_absent: torch.Tensor
    boxes: list[list[Box]]
    scores: list[list[float]]
    scale: list[float]

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def face_rate(self) -> float:
        """Share of images with a face (Δ = 0), in [0, 1]; NaN for an empty batch."""
        if len(self) == 0:
            return math.nan
        return 1.0 - float(self.face_absent.mean())

    def best_boxes(self) -> list[Box | None]:
        """Per image, the highest-scoring face box, or None when no face was found."""
        return [b[0] if b else None for b in self.boxes]


def person_crop_settings() -> dict:
    """``FaceDetector`` keyword arguments for person crops: THE setting wherever Δ(x) or face boxes are computed
    (real images and fakes in the GAN loop, distractor synthesis, the Dual-Stream streams, evaluation).

    Per image, from its size: an image with H/W < 1.5 (a person stretched into a square) is given a 2:1 shape back;
    then the top 40 % of the crop (where a head can be) is zoomed 3.3× (bicubic) and scanned. Faces of about 20 px
    (eyebrows to chin) and larger are found at every crop size; the cost is about that of one whole-image pass at 2×.
    """
    return {"scale": PERSON_SCALE, "top_fraction": PERSON_TOP_FRACTION, "restore_aspect": True}


def _detect_image(
    detector: dlib.fhog_object_detector,
    image: np.ndarray,
    zoom: float,
    resize_to: tuple[int, int] | None,
    threshold: float,
    top_fraction: float = 1.0,
) -> tuple[list[Box], list[float]]:
    """Faces in one uint8 (H, W, 3) or (H, W) image -> (boxes, scores), best first.

    The image is resized to ``resize_to`` (H, W) (or kept), its top ``top_fraction`` is kept, and that part is zoomed
    by ``zoom``; boxes come back in the input's pixels.
    """
    h, w = image.shape[:2]
    dh, dw = resize_to if resize_to is not None else (h, w)
    rows = max(1, round(h * top_fraction))  # input rows scanned
    th, tw = max(1, round(dh * top_fraction * zoom)), max(1, round(dw * zoom))
    if rows != h:
        image = image[:rows]
    if (th, tw) != image.shape[:2]:
        image = np.asarray(Image.fromarray(image).resize((tw, th), Image.BICUBIC))
    rects, scores, _ = detector.run(np.ascontiguousarray(image), 0, threshold)
    sx, sy = w / tw, rows / th
    found = []
    for r, s in zip(rects, scores, strict=True):
        if s < threshold:
            continue
        # dlib rectangles are inclusive of right()/bottom(); +1 makes them exclusive before scaling back
        box = (
            min(max(r.left() * sx, 0.0), w),
            min(max(r.top() * sy, 0.0), h),
            min(max((r.right() + 1) * sx, 0.0), w),
            min(max((r.bottom() + 1) * sy, 0.0), rows),
        )
        found.append((float(s), box))
    found.sort(key=lambda f: -f[0])
    return [b for _, b in found], [s for s, _ in found]


def images_to_uint8(
    images: torch.Tensor | Sequence[np.ndarray | Image.Image], *, value_range: tuple[float, float] = (-1.0, 1.0)
) -> list[np.ndarray]:
    """The detector's input format: a list of C-contiguous uint8 (H, W, 3) RGB or (H, W) grey arrays.

    images: a float tensor (N, 3, H, W) or (N, 1, H, W) with values in ``value_range`` (the GAN's tanh output is
        (-1, 1); values outside are clamped), or a sequence of uint8 arrays (H, W, 3) / (H, W) or PIL images.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"face detection expects an image tensor of shape (N, 3, H, W) or (N, 1, H, W); got {tuple(images.shape)}"
            )
        lo, hi = value_range
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low; got {value_range}")
        x = images.detach().to(device="cpu", dtype=torch.float32)
        x = ((x - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
        x = x.permute(0, 2, 3, 1)
        if x.shape[-1] == 1:
            x = x[..., 0]
        return [np.ascontiguousarray(a) for a in x.numpy()]
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            im = np.asarray(im if im.mode in ("RGB", "L") else im.convert("RGB"))
        if (
            not isinstance(im, np.ndarray)
            or im.dtype != np.uint8
            or not (im.ndim == 2 or (im.ndim == 3 and im.shape[2] == 3))
        ):
            desc = f"{type(im).__name__} {getattr(im, 'dtype', '')} {getattr(im, 'shape', '')}".strip()
            raise ValueError(
                f"face detection: image {i} is {desc}; expected a uint8 array (H, W, 3) or (H, W), a PIL image, or a "
                "float tensor (N, 3, H, W) for the whole batch"
            )
        out.append(np.ascontiguousarray(im))
    return out


class FaceDetector:
    """Δ(x) for batches of images with dlib's HOG frontal face detector, spread over a pool of threads.

    upsample: upsampling steps (each doubles the image; bicubic) before detection; None chooses per image from its
        height with ``upsample_for_height(height, min_face_fraction=...)``.
    min_face_fraction: for upsample=None, the smallest face to find as a fraction of the image height (default 1/8;
        1/12 finds full-body faces at 4× the cost; 1/2 for head crops).
    score_threshold: minimum detector score for a face (dlib's own default is 0.0; see DEFAULT_SCORE_THRESHOLD).
    workers: detection threads; 0 detects in the calling thread; None uses every CPU this process may run on.
        dlib releases the GIL, so the threads run in parallel with each other and with the training step.
    resize_to: (H, W) to resize every image to before upsampling (bicubic), e.g. (128, 64) to give 128×128 GAN
        images of 2:1 persons their shape back: the detector misses horizontally stretched faces. Boxes are still
        reported in the input's coordinates.
    scale: a zoom factor (bicubic) used instead of ``upsample``/``min_face_fraction`` for every image.
    top_fraction: scan only this top share of each image (after ``resize_to``), e.g. the head region of a person crop.
    restore_aspect: give every image with H/W < 1.5 (a 2:1 person stretched into a square) a 2:1 shape before
        detection (per image; ``resize_to`` does it for a fixed size).

    For person crops use ``FaceDetector.for_person_crops()``: the one setting used wherever Δ or face boxes are
    computed (``person_crop_settings``).

    The threads start on first use and live until ``close()`` (or the end of a ``with`` block, or garbage collection).
    ``submit`` returns a Future, so that detection on generated images overlaps with the discriminator's work.
    Safe to call from several threads at once; every thread (caller or worker) uses its own dlib detector.
    """

    def __init__(
        self,
        *,
        upsample: int | None = None,
        min_face_fraction: float = DEFAULT_MIN_FACE_FRACTION,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        workers: int | None = None,
        resize_to: tuple[int, int] | None = None,
        scale: float | None = None,
        top_fraction: float = 1.0,
        restore_aspect: bool = False,
    ):
        if upsample is not None and (isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 0):
            raise ValueError(f"FaceDetector: upsample must be None (automatic) or an integer ≥ 0; got {upsample!r}")
        upsample_for_height(64, min_face_fraction=min_face_fraction)  # validates min_face_fraction
        if not math.isfinite(score_threshold):
            raise ValueError(f"FaceDetector: score_threshold must be a finite number; got {score_threshold!r}")
        if workers is None:
            workers = len(os.sched_getaffinity(0))
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"FaceDetector: workers must be None or an integer ≥ 0 (0 = no threads); got {workers!r}")
        if resize_to is not None:
            resize_to = tuple(resize_to)
            if len(resize_to) != 2 or any(not isinstance(s, int) or s < 1 for s in resize_to):
                raise ValueError(
                    f"FaceDetector: resize_to must be None or (height, width) in pixels; got {resize_to!r}"
                )
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= 16):
            raise ValueError(f"FaceDetector: scale must be None or a zoom factor in (0, 16]; got {scale!r}")
        if scale is not None and upsample is not None:
            raise ValueError("FaceDetector: give either upsample (steps of 2×) or scale (a zoom factor), not both")
        if isinstance(top_fraction, bool) or not isinstance(top_fraction, int | float) or not 0 < top_fraction <= 1:
            raise ValueError(
                f"FaceDetector: top_fraction is the top share of each image to scan, in (0, 1]; got {top_fraction!r}"
            )
        if restore_aspect and resize_to is not None:
            raise ValueError("FaceDetector: give either resize_to (a fixed size) or restore_aspect, not both")
        self.upsample = upsample
        self.scale = None if scale is None else float(scale)
        self.top_fraction = float(top_fraction)
        self.restore_aspect = bool(restore_aspect)
        self.min_face_fraction = float(min_face_fraction)
        self.score_threshold = float(score_threshold)
        self.workers = workers
        self.resize_to = resize_to
        self._init_runtime()

    @classmethod
    def for_person_crops(cls, *, workers: int | None = None, **overrides) -> FaceDetector:
        """The detector for person crops of any size (``person_crop_settings``); ``overrides`` for experiments."""
        return cls(workers=workers, **{**person_crop_settings(), **overrides})

    def settings(self) -> dict:
        """The detection settings, as logged with results (JSON-friendly)."""
        return {
            "upsample": self.upsample,
            "min_face_fraction": self.min_face_fraction,
            "scale": self.scale,
            "top_fraction": self.top_fraction,
            "restore_aspect": self.restore_aspect,
            "resize_to": list(self.resize_to) if self.resize_to else None,
            "score_threshold": self.score_threshold,
        }

    def best_scores(
        self,
        images: torch.Tensor | Sequence[np.ndarray | Image.Image],
        *,
        floor: float = FACE_SCORE_FLOOR,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> np.ndarray:
        """(N,) float64: per image, the score of its most face-like window under these settings, or ``floor``.

        A score at or above ``score_threshold`` is a face (Δ = 0, the same decision as ``detect``: dlib's
        non-maximum suppression always keeps the best window); below it, how close the image came. Δ is 0/1, so a
        generator whose faces are not yet detectable shows no progress in the face rate; this shows it.
        """
        if not math.isfinite(floor) or floor >= self.score_threshold:
            raise ValueError(f"best_scores: floor must be a finite score below {self.score_threshold}; got {floor!r}")
        settings = {k: v for k, v in self.settings().items() if k != "score_threshold"}
        probe = FaceDetector(**settings, score_threshold=floor, workers=0)
        found = probe.detect(images, value_range=value_range)
        return np.array([s[0] if s else floor for s in found.scores], dtype=np.float64)

    def _init_runtime(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._executor_finalizer: weakref.finalize | None = None  # stops the threads if dropped unclosed
        self._lock = threading.Lock()
        self._per_thread = threading.local()  # each thread's own dlib detector

    # Pickling (e.g. into a Ray task) carries the settings only; threads and dlib detectors are rebuilt on first use.
    _RUNTIME = ("_executor", "_executor_finalizer", "_lock", "_per_thread")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads (pending detections are cancelled). The detector can be used again after."""
        with self._lock:
            executor, self._executor = self._executor, None
            if self._executor_finalizer is not None:
                self._executor_finalizer.detach()
                self._executor_finalizer = None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _get_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="face-detector")
                self._executor_finalizer = weakref.finalize(
                    self, self._executor.shutdown, wait=False, cancel_futures=True
                )
            return self._executor

    def _thread_detector(self) -> dlib.fhog_object_detector:
        """The calling thread's dlib detector (never shared: concurrent calls on one detector corrupt memory)."""
        detector = getattr(self._per_thread, "detector", None)
        if detector is None:
            detector = self._per_thread.detector = dlib.get_frontal_face_detector()
        return detector

    def _detect_one(self, image: np.ndarray, zoom: float) -> tuple[list[Box], list[float]]:
        return _detect_image(
            self._thread_detector(), image, zoom, self.detect_size(*image.shape[:2]), self.score_threshold,
            self.top_fraction,
        )  # fmt: skip

    def detect_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The (H, W) an image of this size is resized to before zooming, or None to keep it."""
        if self.resize_to is not None:
            return self.resize_to
        if self.restore_aspect and height < STRETCHED_BELOW * width:
            return (height, max(1, round(height / 2)))
        return None

    def upsample_for(self, height: int) -> int:
        """The upsampling steps (2^u) this detector uses for an image of ``height`` px (after ``resize_to``); with
        ``scale`` set, the nearest whole number of steps (see ``scale_for``)."""
        if self.scale is not None:
            return max(0, round(math.log2(self.scale)))
        if self.upsample is not None:
            return self.upsample
        height = self.resize_to[0] if self.resize_to is not None else height
        return upsample_for_height(height, min_face_fraction=self.min_face_fraction)

    def scale_for(self, height: int) -> float:
        """The zoom this detector applies to an image of ``height`` px (after ``resize_to``)."""
        return self.scale if self.scale is not None else float(2 ** self.upsample_for(height))

    def detect(
        self,
        images: torch.Tensor | Sequence[np.ndarray | Image.Image],
        *,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> FaceDetections:
        """Detect faces in a batch; see ``submit`` for the arguments. Blocks until done."""
        return self.submit(images, value_range=value_range).result()

    def submit(
        self,
        images: torch.Tensor | Sequence[np.ndarray | Image.Image],
        *,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> Future[FaceDetections]:
        """Start detecting faces in a batch and return at once; ``.result()`` gives the ``FaceDetections``.

        images: float tensor (N, 3, H, W) in ``value_range`` (GAN output convention: (-1, 1)), or a sequence of N uint8
            (H, W, 3) / (H, W) arrays or PIL images (sizes may differ). The images are copied (to uint8 on the CPU)
            before this returns, so the caller may change or free them at once.
        """
        arrays = images_to_uint8(images, value_range=value_range)
        zooms = [self.scale_for(a.shape[0]) for a in arrays]
        out: Future[FaceDetections] = Future()
        if self.workers == 0 or not arrays:
            try:
                found = [self._detect_one(a, u) for a, u in zip(arrays, zooms, strict=True)]
                out.set_result(self._assemble(found, zooms))
            except Exception as e:  # delivered through the Future, as from the threads
                out.set_exception(e)
            return out

        # One task per image: the threads balance images of different sizes, and a task costs ~10 µs against ~16 ms
        # of detection.
        executor = self._get_executor()
        tasks = [executor.submit(self._detect_one, a, u) for a, u in zip(arrays, zooms, strict=True)]
        remaining = [len(tasks)]
        lock = threading.Lock()

        def task_done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            try:
                out.set_result(self._assemble([t.result() for t in tasks], zooms))
            except BaseException as e:  # a failed or cancelled image fails the batch
                out.set_exception(e)

        for t in tasks:
            t.add_done_callback(task_done)
        return out

    @staticmethod
    def _assemble(found: list[tuple[list[Box], list[float]]], zooms: list[float]) -> FaceDetections:
        absent = torch.tensor([0.0 if boxes else 1.0 for boxes, _ in found], dtype=torch.float32)
        return FaceDetections(
            face_absent=absent,
            boxes=[boxes for boxes, _ in found],
            scores=[scores for _, scores in found],
            scale=list(zooms),
        )


def face_crops(
    images: torch.Tensor,
    boxes: Sequence[Box | None],
    *,
    size: int | tuple[int, int] = 64,
    margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop and resize the face region of every image for the Dual-Stream face stream.

    images: (N, C, H, W) float tensor (any value range; the crops keep it).
    boxes: N boxes ``(left, top, right, bottom)`` in pixels (as in ``FaceDetections.best_boxes()``), or None for an
        image without a face: its crop is all zeros (the face stream's "no face" input, docs/method.md §4).
    size: output size, an int for square crops or (height, width).
    margin: widen each box by this fraction of its width/height on every side (0.25 adds the hair and chin); parts
        more than a pixel beyond the image border read as zeros.
    Returns crops (N, C, size_h, size_w), bilinear (``torchvision.ops.roi_align``, differentiable w.r.t. images), and
    present (N,) bool: which images had a box.
    """
    if images.ndim != 4:
        raise ValueError(f"face_crops expects images of shape (N, C, H, W); got {tuple(images.shape)}")
    if len(boxes) != images.shape[0]:
        raise ValueError(
            f"face_crops: got {len(boxes)} boxes for {images.shape[0]} images; give one (or None) per image"
        )
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"face_crops: margin must be a fraction ≥ 0 of the box size; got {margin!r}")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    present = torch.tensor([b is not None for b in boxes], dtype=torch.bool)
    # A unit box stands in for missing faces so that roi_align sees one row per image; those crops are zeroed below.
    rows = []
    for i, b in enumerate(boxes):
        left, top, right, bottom = (0.0, 0.0, 1.0, 1.0) if b is None else (float(v) for v in b)
        if not (right > left and bottom > top):
            raise ValueError(f"face_crops: box {i} {b} is empty; expected (left, top, right, bottom) with right > left")
        dx, dy = margin * (right - left), margin * (bottom - top)
        rows.append((i, left - dx, top - dy, right + dx, bottom + dy))
    rois = torch.tensor(rows, dtype=images.dtype, device=images.device).reshape(-1, 5)
    crops = roi_align(images, rois, output_size=out_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return crops * present.to(device=crops.device, dtype=crops.dtype).view(-1, 1, 1, 1), present


def face_crop(image: torch.Tensor, box: Box, *, size: int | tuple[int, int] = 64, margin: float = 0.0) -> torch.Tensor:
    """One image's face crop: image (C, H, W) float, box ``(left, top, right, bottom)`` px -> (C, size_h, size_w).

    See ``face_crops`` for ``size`` and ``margin``; differentiable w.r.t. image.
    """
    if image.ndim != 3:
        raise ValueError(f"face_crop expects one image of shape (C, H, W); got {tuple(image.shape)}")
    if box is None:
        raise ValueError("face_crop: box is None (no face found); use face_crops, which gives zeros for missing faces")
    crops, _ = face_crops(image.unsqueeze(0), [box], size=size, margin=margin)
    return crops[0]
