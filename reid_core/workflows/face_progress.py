"""How close a GAN run's samples came to detectable faces, epoch by epoch, from the sample grids it logged.

The face rate of a run's fixed-noise samples (``face_rate``) is the share that Δ calls a face: while the generator's
faces are not yet sharp enough for dlib's HOG detector it stays at 0 and says nothing about progress. The face score
(``FaceDetector.best_scores``: the score of each image's most face-like window under the one person-crop setting) is
continuous: noise and faceless persons score about -1, detected faces 0.15 and more. Training logs its median and
maximum per epoch (``face_score_median``, ``face_score_max``) since this module was added; for runs logged before,
``face_score_curves`` recomputes them from the ``samples/epoch_NNN.png`` grids (``sample_grid``'s layout: 16 per
row, 2 px padding). The grids are 8-bit PNGs, so scores can differ from the training-time ones in the last digits.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reid_core import tracking
from reid_core.guidance.faces import FaceDetector

GRID_ROW = 16  # sample_grid's nrow
GRID_PADDING = 2  # and its padding (torchvision's make_grid)
_EPOCH_GRID = re.compile(r"^samples/epoch_(\d+)\.png$")


@dataclass(frozen=True)
class FaceScoreCurve:
    """One run's face scores per logged epoch: medians and maxima over its fixed-noise samples."""

    run_name: str
    run_id: str
    epochs: list[int]
    median: list[float]
    maximum: list[float]
    detected: list[int]  # samples at or above the detection threshold (a face that Δ sees)


def grid_tiles(grid: Image.Image, *, count: int, height: int, width: int) -> list[np.ndarray]:
    """The first ``count`` (height, width, 3) uint8 images of a ``sample_grid`` picture.

    Raises:
        ValueError: the picture is too small for ``count`` tiles of that size (a different image size or layout).
    """
    rows = -(-count // GRID_ROW)
    cols = min(count, GRID_ROW)
    need = (GRID_PADDING + cols * (width + GRID_PADDING), GRID_PADDING + rows * (height + GRID_PADDING))
    if grid.size[0] < need[0] or grid.size[1] < need[1]:
        raise ValueError(
            f"a grid of {grid.size[0]}×{grid.size[1]} px cannot hold {count} samples of {height}×{width} "
            f"({GRID_ROW} per row, {GRID_PADDING} px padding): give the run's image size and sample count"
        )
    pixels = np.asarray(grid.convert("RGB"))
    tiles = []
    for k in range(count):
        r, c = divmod(k, GRID_ROW)
        top, left = GRID_PADDING + r * (height + GRID_PADDING), GRID_PADDING + c * (width + GRID_PADDING)
        tiles.append(pixels[top : top + height, left : left + width])
    return tiles


def face_score_curves(
    uri: str,
    experiment: str,
    run_names: list[str],
    *,
    image_size: tuple[int, int],
    count: int,
    ends_only: bool = False,
) -> list[FaceScoreCurve]:
    """The face-score curve of each named run of ``experiment``, from its logged sample grids (``ends_only``: the
    first and last grid only, a quick check).

    Raises:
        tracking.TrackingError: a run name not in the experiment, or a run without sample grids.
        ValueError: grids that do not hold ``count`` samples of ``image_size``.
    """
    detector = FaceDetector.for_person_crops(workers=0)
    ids = {name: tracking.run_id_by_name(uri, experiment, name) for name in run_names}  # every name first
    curves = []
    for name, run_id in ids.items():
        grids = [(int(m.group(1)), p) for p in tracking.run_artifact_paths(uri, run_id, "samples")
                 if (m := _EPOCH_GRID.match(p))]  # fmt: skip
        if not grids:
            raise tracking.TrackingError(f"run {name!r} ({run_id}) logged no samples/epoch_NNN.png grids")
        grids = sorted(grids)
        if ends_only:
            grids = sorted({grids[0], grids[-1]})
        curve = FaceScoreCurve(name, run_id, [], [], [], [])
        with tempfile.TemporaryDirectory() as tmp:
            for epoch, path in grids:
                with Image.open(tracking.download_run_artifact(uri, run_id, path, tmp)) as grid:
                    tiles = grid_tiles(grid, count=count, height=image_size[0], width=image_size[1])
                scores = detector.best_scores(tiles)
                curve.epochs.append(epoch)
                curve.median.append(float(np.median(scores)))
                curve.maximum.append(float(scores.max()))
                curve.detected.append(int((scores >= detector.score_threshold).sum()))
        curves.append(curve)
    return curves


def log_face_score_curves(uri: str, experiment: str, curves: list[FaceScoreCurve], *, run_name: str) -> str:
    """One MLflow run in ``experiment`` holding the curves: metrics ``<run>.face_score_median`` / ``_max`` /
    ``.face_detected`` at step = epoch, and a plot ``face_scores.png``. Returns its run id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_id = tracking.start_run(uri, experiment, run_name, {"runs": ",".join(c.run_name for c in curves)},
                                tags={"analysis": "face-scores"})  # fmt: skip
    for c in curves:
        for epoch, med, mx, n in zip(c.epochs, c.median, c.maximum, c.detected, strict=True):
            tracking.log_metrics(uri, run_id, {f"{c.run_name}.face_score_median": med,
                                               f"{c.run_name}.face_score_max": mx,
                                               f"{c.run_name}.face_detected": n}, step=epoch)  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for c in curves:
        line = ax.plot(c.epochs, c.median, label=f"{c.run_name} median")[0]
        ax.plot(c.epochs, c.maximum, linestyle=":", color=line.get_color(), label=f"{c.run_name} max")
    ax.axhline(FaceDetector.for_person_crops(workers=0).score_threshold, color="k", lw=0.8, label="detection")
    ax.set_xlabel("epoch")
    ax.set_ylabel("best window score of the fixed-noise samples")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.canvas.draw()
    picture = Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB")
    plt.close(fig)
    tracking.log_png(uri, run_id, picture, "face_scores.png")
    tracking.set_terminated(uri, run_id)
    return run_id
