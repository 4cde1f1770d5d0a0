"""Benchmark and calibration of the dlib HOG face detector behind Δ(x) (reid_core/guidance/faces.py).

Measures, on scikit-image's astronaut photo (the only real face photo that ships with our dependencies):
  1. per image size and upsampling factor: found?, best score, ms/image; cost as a ratio to the full 512×512 photo
     at upsample 0 (the detector's nominal case, measured in the same run);
  2. the smallest face found in a synthetic person image, per image size, at the automatic upsampling;
  3. false detections on faceless images and on Gaussian-blurred faces;
  4. batch throughput: does dlib release the GIL (a Python thread's progress while dlib runs)? FaceDetector with a
     thread pool vs in the calling thread, as speed-ups measured in the same run;
  5. the person-crop setting (``person_crop_settings``): recall on full-body crops against face size (eyebrows to
     chin), scanned region (top share of the crop) and zoom, with the cost per crop against a whole-image pass at 2×.

    .venv/bin/python bench/face_detector.py [--quick] [--workers N]

Other load on the machine makes absolute times noisy: times are medians of several runs; compare the ratios. The load
average at start and end, and the figures of 4., are written to bench/results.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dlib
import numpy as np
import skimage.data
import torch
from PIL import Image, ImageFilter

from reid_core.guidance.faces import DEFAULT_SCORE_THRESHOLD, FaceDetector, upsample_for_height

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import Report, median_of_rounds  # noqa: E402

# dlib's detection on the full 512×512 astronaut at upsample 0: (left, top, right, bottom), right/bottom exclusive
ASTRONAUT_FACE = (179, 83, 267, 171)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Downsample with antialiasing (Lanczos), as a dataset's resize would."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.LANCZOS))


def crop_and_resize(image, face, crop, size):
    """Crop (top, left, height, width) of ``image`` resized to ``size`` (H, W), and the face box moved along."""
    top, left, ch, cw = crop
    h, w = size
    sy, sx = h / ch, w / cw
    box = ((face[0] - left) * sx, (face[1] - top) * sy, (face[2] - left) * sx, (face[3] - top) * sy)
    return resize(image[top : top + ch, left : left + cw], h, w), box


def synthetic_person(height: int, width: int, head: np.ndarray | None, head_px: int) -> tuple[np.ndarray, tuple]:
    """A plain person-like figure (torso, legs) on a background; ``head`` (a square face crop) pasted as its head.

    Returns the image (H, W, 3) uint8 and the head box (left, top, right, bottom), or () without a head.
    """
    img = np.empty((height, width, 3), np.uint8)
    img[:] = np.linspace(150, 90, height, dtype=np.uint8)[:, None, None]
    neck = int(height * 0.3)
    img[neck : int(height * 0.65), int(width * 0.2) : int(width * 0.8)] = (40, 60, 150)
    img[int(height * 0.65) :, int(width * 0.28) : int(width * 0.72)] = (35, 35, 40)
    if head is None:
        img[max(neck - head_px, 0) : neck, (width - head_px) // 2 : (width + head_px) // 2] = (200, 160, 130)
        return img, ()
    top, left = max(neck - head_px, 0), (width - head_px) // 2
    img[top : top + head_px, left : left + head_px] = resize(head, head_px, head_px)[: height - top]
    return img, (left, top, left + head_px, top + head_px)


def found_in(boxes, target) -> bool:
    """Whether a detection's centre lies inside ``target`` (a wrong detection elsewhere does not count)."""
    for left, top, right, bottom in boxes:
        cx, cy = (left + right) / 2, (top + bottom) / 2
        if target[0] <= cx <= target[2] and target[1] <= cy <= target[3]:
            return True
    return False


def time_detect(detector: FaceDetector, image: np.ndarray, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = detector.detect([image])
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000, result


def upsample_table(astronaut: np.ndarray, repeats: int, threshold: float) -> None:
    full_face = ASTRONAUT_FACE
    person = (0, 96, 512, 256)  # a 2:1 crop around the astronaut: head and shoulders of a "person image"
    head = (40, 140, 170, 170)  # a square head crop
    person_face = crop_and_resize(astronaut, full_face, person, (128, 64))[1]
    cases = [
        ("full photo 512x512", astronaut, full_face, None),
        ("person 256x128", *crop_and_resize(astronaut, full_face, person, (256, 128)), None),
        ("person 128x64", *crop_and_resize(astronaut, full_face, person, (128, 64)), None),
        ("person 64x32", *crop_and_resize(astronaut, full_face, person, (64, 32)), None),
        ("person 128x128 (stretched)", *crop_and_resize(astronaut, full_face, person, (128, 128)), None),
        ("  same, resize_to=(128,64)", *crop_and_resize(astronaut, full_face, person, (128, 128)), (128, 64)),
        (
            "person 128x128 (padded)",
            np.pad(
                crop_and_resize(astronaut, full_face, person, (128, 64))[0], ((0, 0), (32, 32), (0, 0)), mode="edge"
            ),
            (person_face[0] + 32, person_face[1], person_face[2] + 32, person_face[3]),
            None,
        ),
        ("head crop 64x64", *crop_and_resize(astronaut, full_face, head, (64, 64)), None),
    ]
    FaceDetector(upsample=0, workers=0).detect([astronaut])  # warm-up: builds this thread's dlib detector
    baseline = None
    print(f"\n1. Upsampling needed per image size (score threshold {threshold}; * = automatic choice)")
    print("   face px: the face's height in the image; other: detections elsewhere (false positives);")
    print("   x cost: time relative to the full photo at upsample 0")
    print(
        f"{'image':28s} {'face px':>7s} {'up':>3s} {'found':>5s} {'score':>6s} {'other':>5s} {'ms/img':>7s} {'x cost':>7s}"
    )
    for name, image, face, resize_to in cases:
        frac = 0.5 if name.startswith("head") else 1 / 8
        auto = upsample_for_height(resize_to[0] if resize_to else image.shape[0], min_face_fraction=frac)
        for up in range(0, 4):
            if image.shape[0] * 2**up > 1024 and up > auto:
                continue
            det = FaceDetector(upsample=up, score_threshold=threshold, workers=0, resize_to=resize_to)
            ms, r = time_detect(det, image, repeats)
            if baseline is None:
                baseline = ms
            score = f"{r.scores[0][0]:.2f}" if r.scores[0] else "-"
            ok = "yes" if found_in(r.boxes[0], face) else "no"
            other = sum(not found_in([b], face) for b in r.boxes[0])
            mark = "*" if up == auto else " "
            face_px = f"{face[3] - face[1]:.0f}"
            print(
                f"{name:28s} {face_px:>7s} {up:>2d}{mark} {ok:>5s} {score:>6s} {other:>5d} {ms:7.1f} {ms / baseline:6.2f}x"
            )


def upsampling_methods(astronaut: np.ndarray, repeats: int) -> None:
    """Our bicubic resize + dlib at upsample 0, against dlib's own pyramid_up (``run(image, u)``)."""
    detector = dlib.get_frontal_face_detector()
    person = (0, 96, 512, 256)
    print("\n1b. Upsampling by a bicubic resize (ours) vs dlib's pyramid_up: best score on the face, detector ms/img")
    print(f"{'image':16s} {'up':>3s} {'bicubic':>16s} {'dlib pyramid_up':>18s}")
    for h, w in ((64, 32), (128, 64), (256, 128)):
        image, face = crop_and_resize(astronaut, ASTRONAUT_FACE, person, (h, w))
        up = upsample_for_height(h)
        big = np.asarray(Image.fromarray(image).resize((w * 2**up, h * 2**up), Image.BICUBIC))
        cells = []
        # boxes come back in the upsampled image's pixels from ours, in the input's pixels from dlib's pyramid_up
        for source, steps, scale in ((big, 0, 2**up), (image, up, 1)):
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                rects, scores, _ = detector.run(source, steps, -1.0)
                times.append(time.perf_counter() - t)
            on_face = [s for r, s in zip(rects, scores, strict=True) if found_in([_box(r, scale)], face)]
            best = f"{max(on_face):.2f}" if on_face else "-"
            cells.append(f"{best} {min(times) * 1000:6.1f}ms")
        print(f"person {h}x{w:<7d} {up:>3d} {cells[0]:>16s} {cells[1]:>18s}")


def _box(rect, scale: float) -> tuple:
    return (rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale, (rect.bottom() + 1) / scale)


def face_size_sweep(astronaut: np.ndarray, threshold: float) -> None:
    head = astronaut[40:210, 140:310]
    face_share = (ASTRONAUT_FACE[3] - ASTRONAUT_FACE[1]) / head.shape[0]  # the face is ~half of this crop's height
    print("\n2. Smallest face found in a synthetic person (astronaut head pasted as its head)")
    print("   cells: face height as a fraction of the image height -> found Y/n (best score)")
    fractions = (1 / 16, 1 / 12, 1 / 10, 1 / 8, 1 / 6, 1 / 5)
    print(f"{'image':9s} {'up':>4s}  " + "  ".join(f"{'H/' + str(round(1 / f)):>11s}" for f in fractions))
    for h, w in ((64, 32), (128, 64), (256, 128)):
        auto = upsample_for_height(h)
        for up in (auto, auto + 1):
            det = FaceDetector(upsample=up, score_threshold=threshold, workers=0)
            cells = []
            for f in fractions:
                img, box = synthetic_person(h, w, head, round(h * f / face_share))
                r = det.detect([img])
                s = f"{r.scores[0][0]:.2f}" if r.scores[0] else "-"
                cells.append(f"{'Y' if found_in(r.boxes[0], box) else 'n'} ({s})")
            print(f"{h}x{w:<6d} {up:>3d}{'*' if up == auto else ' '}  " + "  ".join(f"{c:>11s}" for c in cells))


def false_detections(astronaut: np.ndarray, threshold: float) -> None:
    rng = np.random.default_rng(0)
    natural = []
    for name in ("coffee", "chelsea", "rocket", "immunohistochemistry", "brick", "grass", "gravel", "coins", "camera"):
        x = getattr(skimage.data, name)()
        x = np.stack([x] * 3, -1) if x.ndim == 2 else x[..., :3]
        h, w = x.shape[:2]
        cw = min(w, h // 2)
        natural += [x[: 2 * cw, :cw], x[: 2 * cw, w - cw :]]
    head = astronaut[40:210, 140:310]
    print(f"\n3. Images with a detection at the automatic upsampling: score >= 0 (dlib's default) | >= {threshold}")
    print(
        f"{'image set':40s} " + "  ".join(f"{str(h) + 'x' + str(w):>17s}" for h, w in ((64, 32), (128, 64), (256, 128)))
    )
    sets = {
        "uniform noise (8)": lambda h, w: [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(8)],
        "skimage natural crops, no people (18)": lambda h, w: [resize(x, h, w) for x in natural],
        "synthetic person, no face (4)": lambda h, w: [
            synthetic_person(h, w, None, int(h * f))[0] for f in (0.2, 0.25, 0.3, 0.35)
        ],
    }
    for sigma_of_face in (0.0, 0.05, 0.1, 0.2):
        sets[f"face blurred, sigma = {sigma_of_face:.2f} x face (4)"] = lambda h, w, s=sigma_of_face: [
            np.asarray(
                Image.fromarray(synthetic_person(h, w, head, int(h * f))[0]).filter(
                    ImageFilter.GaussianBlur(s * h * f / 2)
                )
            )
            for f in (0.25, 0.3, 0.35, 0.4)
        ]
    for name, make in sets.items():
        cells = []
        for h, w in ((64, 32), (128, 64), (256, 128)):
            images = make(h, w)
            r = FaceDetector(score_threshold=0.0, workers=0).detect(images)
            at_zero = sum(bool(b) for b in r.boxes)
            at_threshold = sum(bool(s) and s[0] >= threshold for s in r.scores)
            best = max((s[0] for s in r.scores if s), default=None)
            cells.append(f"{at_zero} | {at_threshold} of {len(images)}" + (f" ({best:.2f})" if best else ""))
        print(f"{name:40s} " + "  ".join(f"{c:>17s}" for c in cells))


def gil_check(image: np.ndarray) -> float:
    """Progress of a pure-Python thread while dlib detects in another, relative to its idle progress.

    ~0 if dlib held the GIL; ~1 if it releases it and a core is free (other load on the machine lowers it).
    """
    detector = dlib.get_frontal_face_detector()
    stop, count = threading.Event(), [0]

    def spin():
        while not stop.is_set():
            count[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(0.2)
    c0, t0 = count[0], time.perf_counter()
    time.sleep(0.3)
    idle = (count[0] - c0) / (time.perf_counter() - t0)
    c0, t0 = count[0], time.perf_counter()
    for _ in range(20):
        detector.run(image, 0, 0.0)
    busy = (count[0] - c0) / (time.perf_counter() - t0)
    stop.set()
    spinner.join()
    return busy / idle


def pool_speedup(
    astronaut: np.ndarray, batch: int, workers: int, threshold: float, rounds: int, report: Report
) -> None:
    person = resize(astronaut[0:512, 96:352], 128, 64)
    rng = np.random.default_rng(1)
    images = np.stack([person if i % 2 else rng.integers(0, 256, person.shape, dtype=np.uint8) for i in range(batch)])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 128, 64) in [-1, 1]
    big = [np.asarray(Image.fromarray(im).resize((256, 512), Image.BICUBIC)) for im in images]  # as upsample 2
    print(
        f"\n4. Batch of {batch} images 128x64 (upsample 2), {workers} threads; medians of {rounds} interleaved rounds"
    )
    print(
        f"   a Python thread runs at {gil_check(big[1]):.2f} of its idle speed while dlib detects (~0 if dlib held the GIL)"
    )
    print("   cores used: CPU time of this process / wall time (other load on the machine lowers it)")

    local = threading.local()  # one dlib detector per thread: a shared one crashes under concurrent calls

    def dlib_run(im):
        if not hasattr(local, "detector"):
            local.detector = dlib.get_frontal_face_detector()
        return local.detector.run(im, 0, threshold)

    threads = ThreadPoolExecutor(workers)
    in_process = FaceDetector(workers=0, score_threshold=threshold)
    pooled = FaceDetector(workers=workers, score_threshold=threshold)
    runs = {
        "dlib, 1 thread": lambda: [dlib_run(im) for im in big],
        f"dlib, {workers} threads": lambda: list(threads.map(dlib_run, big)),
        "FaceDetector(workers=0)": lambda: in_process.detect(tensor),
        f"FaceDetector(workers={workers})": lambda: pooled.detect(tensor),
    }
    for fn in runs.values():
        fn()  # warm-up: threads and their detectors
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved: a load change from other processes hits every variant alike
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    differing = int((pooled.detect(tensor).face_absent != in_process.detect(tensor).face_absent).sum())
    same = differing == 0
    speedups = {}
    for name in runs:
        ref = "dlib, 1 thread" if name.startswith("dlib") else "FaceDetector(workers=0)"
        t = median_of_rounds(walls[name])
        speedups[name] = median_of_rounds([a / b for a, b in zip(walls[ref], walls[name], strict=True)])
        cores = median_of_rounds([c / w for c, w in zip(cpus[name], walls[name], strict=True)])
        print(f"{name:28s} {t / batch * 1000:6.1f} ms/img  {speedups[name]:5.2f}x vs {ref:24s} cores used {cores:.2f}")
    print(f"   the thread pool gives the same Δ as in-process: {same}")
    report.figure("Δ per 128×64 person image (upsample 2), FaceDetector in the calling thread",
                  median_of_rounds(walls["FaceDetector(workers=0)"]) / batch * 1000, "ms")  # fmt: skip
    report.figure(f"FaceDetector(workers={workers}) vs in the calling thread, batch of {batch}",
                  speedups[f"FaceDetector(workers={workers})"], "x")  # fmt: skip
    report.figure(f"images whose Δ differs between FaceDetector(workers={workers}) and the calling thread, batch of {batch}",
                  differing, "", target=("<=", 0))  # fmt: skip
    threads.shutdown()
    pooled.close()


def region_scale_sweep(astronaut: np.ndarray, threshold: float, sizes=((128, 64), (256, 128), (384, 192))) -> None:
    """Section 5: faces found of 4 full-body crops (4 placements/backgrounds) per face size, region and zoom."""
    head = astronaut[40:210, 140:310]  # the face, eyebrows to chin, is 88 of its 170 px
    settings = [(1.0, 2.0), (0.4, 3.3), (0.4, 3.6), (0.5, 3.3)]
    print("\n5. person crops: found of 4 per face size (eyebrows to chin), top share scanned R and zoom s")
    print(
        "| crop | R, s | " + " | ".join(f"{f} px" for f in (16, 20, 24, 28, "H/4")) + " | ms/crop | cost vs R=1, s=2 |"
    )
    for h, w in sizes:
        base = None
        for region, zoom in settings:
            det = FaceDetector(scale=zoom, top_fraction=region, score_threshold=threshold, workers=0)
            cells, seconds, n = [], 0.0, 0
            for face in (16, 20, 24, 28, h // 4):
                head_px = round(face * 170 / 88)
                images = []
                for k, shift in enumerate((0, 0.05, -0.05, 0.1)):
                    img, _ = synthetic_person(h, w, head, head_px)
                    img = np.roll(img, int(shift * h), axis=0) if shift else img
                    img = np.ascontiguousarray(img[:, ::-1]) if k == 1 else img
                    images.append((img.astype(int) * 7 // 10).astype(np.uint8) if k == 3 else img)
                t0 = time.perf_counter()
                found = sum(bool(b) for b in det.detect(images).boxes)
                seconds, n = seconds + time.perf_counter() - t0, n + len(images)
                cells.append(f"{found}/4")
            ms = 1000 * seconds / n
            base = base or ms
            print(f"| {h}×{w} | {region:g}, {zoom:g} | " + " | ".join(cells) + f" | {ms:.1f} | {ms / base:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller batch")
    parser.add_argument("--workers", type=int, default=2, help="threads for the pool comparison")
    parser.add_argument("--threshold", type=float, default=DEFAULT_SCORE_THRESHOLD)
    args = parser.parse_args()
    astronaut = skimage.data.astronaut()
    report = Report("bench/face_detector.py", quick=args.quick)
    upsample_table(astronaut, repeats=1 if args.quick else 5, threshold=args.threshold)
    upsampling_methods(astronaut, repeats=1 if args.quick else 5)
    face_size_sweep(astronaut, threshold=args.threshold)
    false_detections(astronaut, threshold=args.threshold)
    pool_speedup(
        astronaut,
        batch=16 if args.quick else 64,
        workers=args.workers,
        threshold=args.threshold,
        rounds=3 if args.quick else 5,
        report=report,
    )
    region_scale_sweep(astronaut, threshold=args.threshold)
    report.write()


if __name__ == "__main__":
    main()
