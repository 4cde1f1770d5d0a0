"""Face presence Δ with dlib's HOG detector (reid_core/guidance/faces.py), on scikit-image's astronaut photo."""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter

from reid_core.guidance.faces import (
    FaceDetections,
    FaceDetector,
    face_crop,
    face_crops,
    images_to_uint8,
    upsample_for_height,
)

# dlib's detection on the full 512×512 astronaut (left, top, right, bottom)
ASTRONAUT_FACE = (179, 83, 267, 171)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def head(astronaut) -> np.ndarray:
    """A square head crop of the astronaut; the face is about half of its height."""
    return astronaut[40:210, 140:310]


def person_image(height: int, width: int, head: np.ndarray | None, head_px: int) -> tuple[np.ndarray, tuple]:
    """A plain person-like figure (torso, legs) on a graded background, ``head`` pasted as its head.

    Without a head crop the head is a skin-coloured block (a person without a face). Returns the (H, W, 3) uint8
    image and the head box (left, top, right, bottom).
    """
    img = np.empty((height, width, 3), np.uint8)
    img[:] = np.linspace(150, 90, height, dtype=np.uint8)[:, None, None]
    top, left = max(1, int(height * 0.3) - head_px), (width - head_px) // 2
    neck = top + head_px
    img[neck : int(height * 0.65), int(width * 0.2) : int(width * 0.8)] = (40, 60, 150)
    img[int(height * 0.65) :, int(width * 0.28) : int(width * 0.72)] = (35, 35, 40)
    if head is None:
        img[top:neck, left : left + head_px] = (200, 160, 130)
    else:
        img[top:neck, left : left + head_px] = np.asarray(
            Image.fromarray(head).resize((head_px, head_px), Image.LANCZOS)
        )
    return img, (left, top, left + head_px, neck)


def to_gan_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (N, 3, H, W) float in [-1, 1], the generator's output convention."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def centre_inside(box, region) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


# --- detection ------------------------------------------------------------------------------------------------------


def test_face_found_on_the_astronaut(astronaut):
    result = FaceDetector(workers=0).detect([astronaut])
    assert result.face_absent.tolist() == [0.0]
    assert result.scale == [1.0]
    assert len(result.boxes[0]) == 1
    assert centre_inside(result.boxes[0][0], ASTRONAUT_FACE)
    assert result.scores[0][0] > 1.0


def test_face_found_when_the_head_is_pasted_small_into_a_person_image(head):
    # 128×64 person, 40 px head (face ≈ 20 px): needs the automatic ×4 upsampling
    image, head_box = person_image(128, 64, head, 40)
    detector = FaceDetector(workers=0)
    result = detector.detect(to_gan_tensor([image]))
    assert result.scale == [4.0]
    assert result.face_absent.tolist() == [0.0]
    assert centre_inside(result.boxes[0][0], head_box)
    # the face is too small for the detector without upsampling
    assert FaceDetector(upsample=0, workers=0).detect([image]).face_absent.tolist() == [1.0]


def test_face_found_in_larger_person_images_with_the_automatic_upsampling(head):
    image, head_box = person_image(256, 128, head, 80)
    result = FaceDetector(workers=0).detect([Image.fromarray(image)])  # PIL input
    assert result.scale == [2.0]
    assert result.face_absent.tolist() == [0.0]
    assert centre_inside(result.boxes[0][0], head_box)


def test_no_face_on_faceless_images(head):
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (128, 64, 3), dtype=np.uint8) for _ in range(3)]
    plain_people = [person_image(128, 64, None, px)[0] for px in (32, 40)]
    natural = [np.asarray(Image.fromarray(skimage.data.coffee()[:, :200]).resize((64, 128)))]
    result = FaceDetector(workers=0).detect(noise + plain_people + natural)
    assert result.face_absent.tolist() == [1.0] * 6
    assert result.boxes == [[]] * 6
    assert result.face_rate == 0.0


def test_blurred_faces_are_not_found(astronaut, head):
    sharp = [person_image(128, 64, head, px)[0] for px in (36, 40, 48)]
    assert FaceDetector(workers=0).detect(sharp).face_absent.tolist() == [0.0, 0.0, 0.0]
    # a Gaussian blur of σ ≈ 1/10 of the face height, as in face-blurred datasets (MSMT17 V2)
    blurred = [blur(im, 2.0) for im in sharp]
    assert FaceDetector(workers=0).detect(blurred).face_absent.tolist() == [1.0, 1.0, 1.0]
    full_blurred = blur(astronaut, 8.0)
    assert FaceDetector(workers=0).detect([full_blurred]).face_absent.tolist() == [1.0]


def test_resize_to_restores_stretched_square_persons(astronaut):
    """128×128 images of 2:1 persons stretch faces sideways, and the detector misses them unless reshaped."""
    crop = astronaut[0:512, 96:352]
    square = np.asarray(Image.fromarray(crop).resize((128, 128), Image.LANCZOS))
    assert FaceDetector(workers=0).detect([square]).face_absent.tolist() == [1.0]
    result = FaceDetector(workers=0, resize_to=(128, 64)).detect([square])
    assert result.face_absent.tolist() == [0.0]
    # boxes come back in the 128×128 input's coordinates: the face of the crop spans x ∈ [41.5, 85.5] there
    face_in_square = ((179 - 96) / 2, 83 / 4, (267 - 96) / 2, 171 / 4)
    assert centre_inside(result.boxes[0][0], face_in_square)


def test_score_threshold_filters_detections(astronaut):
    loose = FaceDetector(upsample=0, score_threshold=0.0, workers=0).detect([astronaut])
    strict = FaceDetector(upsample=0, score_threshold=2.0, workers=0).detect([astronaut])
    assert loose.face_absent.tolist() == [0.0] and strict.face_absent.tolist() == [1.0]
    assert all(s >= 0.0 for s in loose.scores[0])


# --- the thread pool -------------------------------------------------------------------------------------------------------


def test_thread_pool_gives_the_same_detections_as_in_process(head):
    rng = np.random.default_rng(1)
    images = [person_image(128, 64, head, 40)[0], rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)] * 3
    batch = to_gan_tensor(images)
    in_process = FaceDetector(workers=0).detect(batch)
    with FaceDetector(workers=2) as detector:
        future = detector.submit(batch)
        batch.zero_()  # submit copied the images: changing the tensor afterwards must not matter
        pooled = future.result(timeout=120)
        again = detector.detect(to_gan_tensor(images[:1]))  # the pool is reused
    assert pooled.face_absent.tolist() == in_process.face_absent.tolist() == [0.0, 1.0] * 3
    assert pooled.boxes == in_process.boxes and pooled.scores == in_process.scores
    assert again.face_absent.tolist() == [0.0]
    assert detector._executor is None  # closed by the with-block


def test_every_thread_has_its_own_dlib_detector(head):
    """Concurrent calls on one dlib detector corrupt memory (segfaults): callers and workers must never share one."""
    detector = FaceDetector(workers=0)
    barrier = threading.Barrier(3)  # holds three tasks at once, so that they run on three different threads

    def detector_of_this_thread(_):
        barrier.wait(timeout=30)
        return detector._thread_detector()

    with ThreadPoolExecutor(3) as callers:
        detectors = list(callers.map(detector_of_this_thread, range(3)))  # kept alive: their ids stay unique
        # several caller threads using one FaceDetector at once get correct, identical answers
        image = person_image(128, 64, head, 40)[0]
        results = list(callers.map(lambda _: detector.detect([image]).scores, range(6)))
    ids = {id(d) for d in detectors}
    assert len(ids) == 3 and id(detector._thread_detector()) not in ids
    assert all(r == results[0] for r in results) and results[0][0]


def test_detector_pickles_without_its_threads(head):
    detector = FaceDetector(workers=1, upsample=2, score_threshold=0.3)
    try:
        detector.detect([person_image(128, 64, head, 40)[0]])
        copy = pickle.loads(pickle.dumps(detector))
    finally:
        detector.close()
    assert (copy.workers, copy.upsample, copy.score_threshold, copy._executor) == (1, 2, 0.3, None)
    assert copy.detect([person_image(128, 64, head, 40)[0]]).face_absent.tolist() == [0.0]
    copy.close()


def test_empty_batch_and_mixed_sizes(head):
    empty = FaceDetector(workers=0).detect(torch.zeros(0, 3, 128, 64))
    assert len(empty) == 0 and empty.face_absent.shape == (0,)
    mixed = [person_image(128, 64, head, 40)[0], person_image(256, 128, head, 80)[0], np.zeros((64, 64), np.uint8)]
    result = FaceDetector(workers=0).detect(mixed)
    assert result.scale == [4.0, 2.0, 8.0]
    assert result.face_absent.tolist() == [0.0, 0.0, 1.0]


# --- settings and inputs --------------------------------------------------------------------------------------------


def test_upsample_for_height_follows_the_measured_table():
    assert [upsample_for_height(h) for h in (32, 64, 128, 256, 384, 512, 1024)] == [3, 3, 2, 1, 1, 0, 0]
    assert upsample_for_height(64, min_face_fraction=0.5) == 1  # 64×64 head crops
    assert upsample_for_height(128, min_face_fraction=1 / 12) == 3  # full-body faces
    with pytest.raises(ValueError, match="positive"):
        upsample_for_height(0)
    with pytest.raises(ValueError, match="min_face_fraction"):
        upsample_for_height(128, min_face_fraction=0.0)


def test_tensor_conversion_uses_the_value_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    (image,) = images_to_uint8(x)
    assert image.dtype == np.uint8 and image.shape == (2, 2, 3)
    assert image[..., 0].tolist() == [[0, 128], [255, 255]]  # 0.0 -> 127.5 rounds to even; 2.0 clamps
    (unit,) = images_to_uint8(torch.full((1, 1, 2, 2), 0.5), value_range=(0.0, 1.0))
    assert unit.shape == (2, 2) and unit.tolist() == [[128, 128], [128, 128]]


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 64, 32),
        torch.zeros(1, 2, 64, 32),
        [np.zeros((64, 32, 3), np.float32)],
        [np.zeros((64, 32, 4), np.uint8)],
    ],
)
def test_unsupported_images_raise(bad):
    with pytest.raises(ValueError, match="expect"):
        FaceDetector(workers=0).detect(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"upsample": -1},
        {"upsample": 1.5},
        {"workers": -1},
        {"score_threshold": float("nan")},
        {"resize_to": (128,)},
        {"min_face_fraction": 2.0},
    ],
)
def test_invalid_settings_raise(kwargs):
    with pytest.raises(ValueError):
        FaceDetector(**kwargs)


def test_detections_helpers():
    result = FaceDetections(
        face_absent=torch.tensor([0.0, 1.0, 0.0, 0.0]),
        boxes=[[(1, 2, 3, 4), (5, 6, 7, 8)], [], [(0, 0, 1, 1)], [(2, 2, 4, 4)]],
        scores=[[0.9, 0.2], [], [0.5], [0.4]],
        scale=[4.0, 4.0, 4.0, 4.0],
    )
    assert result.face_rate == 0.75
    assert result.best_boxes() == [(1, 2, 3, 4), None, (0, 0, 1, 1), (2, 2, 4, 4)]


# --- face crops -----------------------------------------------------------------------------------------------------


def test_face_crop_at_native_size_equals_slicing():
    image = torch.rand(3, 128, 64)
    crop = face_crop(image, (10, 20, 42, 52), size=32)
    torch.testing.assert_close(crop, image[:, 20:52, 10:42])


def test_face_crop_resizes_and_widens():
    image = torch.zeros(3, 128, 64)
    image[:, 20:40, 20:40] = 1.0  # a 20×20 "face"
    crop = face_crop(image, (20, 20, 40, 40), size=64)
    assert crop.shape == (3, 64, 64)
    # all face, but for the outermost samples, which interpolate with the pixels just outside the box
    assert crop[:, 2:-2, 2:-2].min() > 0.99 and crop.mean() > 0.9
    wide = face_crop(image, (20, 20, 40, 40), size=(64, 64), margin=0.5)  # the box doubles: face in the middle half
    assert wide[:, 24:40, 24:40].min() > 0.99
    assert wide[:, :8].max() < 0.01 and wide[:, :, :8].max() < 0.01


def test_face_crops_zero_for_missing_faces_and_pass_gradients():
    images = torch.rand(3, 3, 128, 64, requires_grad=True)
    crops, present = face_crops(images, [(10, 10, 40, 40), None, (0, 0, 64, 64)], size=16)
    assert crops.shape == (3, 3, 16, 16)
    assert present.tolist() == [True, False, True]
    assert crops[1].abs().max() == 0
    crops.sum().backward()
    assert images.grad[0, :, 10:40, 10:40].abs().sum() > 0
    assert images.grad[0, :, 60:].abs().sum() == 0  # outside the box
    assert images.grad[1].abs().sum() == 0


def test_face_crop_from_a_detection(head):
    image, head_box = person_image(128, 64, head, 40)
    batch = to_gan_tensor([image])
    result = FaceDetector(workers=0).detect(batch)
    crops, present = face_crops(batch, result.best_boxes(), size=64, margin=0.25)
    assert present.tolist() == [True]
    # the crop shows the detected face: the detector finds it again in the 64×64 crop (as a head crop)
    assert FaceDetector(workers=0, min_face_fraction=0.5).detect(crops).face_absent.tolist() == [0.0]


def test_face_crop_errors():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        face_crop(torch.zeros(1, 3, 8, 8), (0, 0, 4, 4))
    with pytest.raises(ValueError, match="None"):
        face_crop(torch.zeros(3, 8, 8), None)
    with pytest.raises(ValueError, match="empty"):
        face_crop(torch.zeros(3, 8, 8), (4, 4, 4, 6))
    with pytest.raises(ValueError, match="one \\(or None\\) per image"):
        face_crops(torch.zeros(2, 3, 8, 8), [(0, 0, 4, 4)])


def test_best_scores_agree_with_detection_and_show_how_close_a_faceless_image_comes(head):
    """The face score: at or above the threshold exactly where ``detect`` finds a face; below it for face-free
    photos and faceless persons, but above the floor (their best window is scored); the floor is validated."""
    detector = FaceDetector.for_person_crops(workers=0)
    with_face = [person_image(128, 64, head, 44)[0], person_image(256, 128, head, 80)[0]]
    without = [
        person_image(128, 64, None, 44)[0],
        np.asarray(Image.fromarray(skimage.data.chelsea()).resize((64, 128))),
    ]
    images = with_face + without
    scores = detector.best_scores(images)
    found = detector.detect(images).face_absent.numpy() == 0
    np.testing.assert_array_equal(scores >= detector.score_threshold, found)
    assert found.tolist() == [True, True, False, False]
    assert np.all(scores[2:] > -3.0) and np.all(scores[2:] < 0.0)
    low = detector.best_scores(images, floor=-0.5)
    np.testing.assert_array_equal(low, np.maximum(scores, -0.5))
    for floor in (0.15, 1.0, float("nan")):
        with pytest.raises(ValueError, match="floor must be a finite score below 0.15"):
            detector.best_scores(images, floor=floor)


def test_grid_tiles_give_back_the_samples_of_a_logged_grid(head):
    """The post-hoc face scores read the samples back from the PNG grid that training logs (``sample_grid``)."""
    from reid_core.train.loops import sample_grid
    from reid_core.workflows.face_progress import grid_tiles

    images = [person_image(128, 64, head if k % 3 == 0 else None, 44)[0] for k in range(20)]
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    tiles = grid_tiles(sample_grid(batch), count=20, height=128, width=64)
    assert len(tiles) == 20
    assert max(int(np.abs(t.astype(int) - im.astype(int)).max()) for t, im in zip(tiles, images, strict=True)) <= 1
    detector = FaceDetector.for_person_crops(workers=0)
    np.testing.assert_array_equal(detector.best_scores(tiles) >= 0.15, [k % 3 == 0 for k in range(20)])
    with pytest.raises(ValueError, match="cannot hold 20 samples of 256×128"):
        grid_tiles(sample_grid(batch), count=20, height=256, width=128)
