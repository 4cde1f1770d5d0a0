"""A small synthetic re-ID dataset in the real layouts, for the embedded default and the tests.

Person-like images: a head, a torso, arms and legs over a cluttered background. Each identity has its own clothing
colours, skin tone and build; each camera its own illumination, colour cast, scale and viewpoint (mirroring,
horizontal offset). On a configurable share of images the head is a real face — the head of scikit-image's
astronaut photo, the one real photo with a face that a PyPI package ships — so that dlib's detector finds it and Δ is
meaningful; the other heads are plain (hair from behind), in which no detector finds a face. Deterministic per seed:
identity ``i`` seen by camera ``c`` in frame ``f`` is the same image on every run.

Only the image generator lives here; ``write_msmt17`` lays images out exactly as MSMT17 V1 ships them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# The astronaut's head in skimage.data.astronaut() (512×512): dlib's face box is (179, 83)-(266, 170); the crop adds
# hair and chin around it so that the pasted head looks like a head.
_ASTRONAUT_HEAD = (163, 55, 282, 200)  # left, top, right, bottom


@lru_cache(maxsize=1)
def astronaut_head() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).crop(_ASTRONAUT_HEAD)


@dataclass(frozen=True)
class Identity:
    pid: int
    shirt: tuple[int, int, int]
    trousers: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    build: float  # relative shoulder width, 0.8-1.2
    height: float  # relative body height, 0.88-1.0
    stripes: bool  # a striped shirt: a texture cue beyond colour


@dataclass(frozen=True)
class Camera:
    camid: int  # 0-based
    gain: float  # illumination
    cast: tuple[float, float, float]  # per-channel colour cast
    scale: float  # person size in the frame
    mirror: bool  # viewpoint: seen from the other side
    background: tuple[int, int, int]


def make_identity(pid: int, seed: int) -> Identity:
    rng = np.random.default_rng([seed, 1, pid])
    palette = rng.integers(20, 235, size=(2, 3))
    skin = tuple(int(v) for v in np.array([224, 172, 140]) * rng.uniform(0.45, 1.05))
    return Identity(
        pid=pid,
        shirt=tuple(int(v) for v in palette[0]),
        trousers=tuple(int(v) for v in palette[1]),
        skin=tuple(min(255, v) for v in skin),
        hair=tuple(int(v) for v in rng.integers(10, 120, size=3)),
        build=float(rng.uniform(0.8, 1.2)),
        height=float(rng.uniform(0.88, 1.0)),
        stripes=bool(rng.random() < 0.3),
    )


def make_camera(camid: int, seed: int) -> Camera:
    rng = np.random.default_rng([seed, 2, camid])
    return Camera(
        camid=camid,
        gain=float(rng.uniform(0.65, 1.25)),
        cast=tuple(float(v) for v in rng.uniform(0.85, 1.15, size=3)),
        scale=float(rng.uniform(0.85, 1.0)),
        mirror=bool(camid % 2),
        background=tuple(int(v) for v in rng.integers(40, 200, size=3)),
    )


def render_person(
    identity: Identity, camera: Camera, *, frame: int, size: tuple[int, int], face: bool, seed: int
) -> Image.Image:
    """One (H, W) = ``size`` RGB image of ``identity`` seen by ``camera`` in ``frame``."""
    h, w = size
    rng = np.random.default_rng([seed, 3, identity.pid, camera.camid, frame])
    # Background: the camera's colour, clutter rectangles, a floor.
    bg = np.array(camera.background) * rng.uniform(0.8, 1.2, size=3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in np.clip(bg, 0, 255)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, size=3)))
    draw.rectangle((0, int(h * 0.9), w, h), fill=tuple(int(v * 0.6) for v in camera.background))

    # Body geometry (fractions of the frame), jittered per frame: pose and position change between frames.
    s = camera.scale * identity.height * rng.uniform(0.94, 1.0)
    cx = w * (0.5 + rng.uniform(-0.06, 0.06))
    top = h * (1 - s) * rng.uniform(0.2, 0.8)
    body_h = h * s
    # A large head (a quarter of the body): the face must reach dlib's ~80 px after 2× upsampling twice at 128×64.
    head_h = body_h * 0.25
    head_w = min(w * 0.6, head_h * 0.82)
    shoulder = w * 0.3 * identity.build
    torso_top, torso_bottom = top + head_h * 0.95, top + body_h * 0.58
    leg_bottom = top + body_h * 0.98
    stride = w * 0.08 * np.sin(frame * 0.9)

    draw.rectangle((cx - shoulder, torso_top, cx + shoulder, torso_bottom), fill=identity.shirt)
    if identity.stripes:
        dark = tuple(int(v * 0.55) for v in identity.shirt)
        for y in np.arange(torso_top, torso_bottom, max(2.0, body_h / 40)):
            draw.line((cx - shoulder, y, cx + shoulder, y), fill=dark, width=max(1, int(body_h / 100)))
    arm_w = shoulder * 0.35
    for side in (-1, 1):
        ax = cx + side * (shoulder + arm_w / 2)
        draw.rectangle((ax - arm_w / 2, torso_top, ax + arm_w / 2, torso_bottom * 0.98), fill=identity.shirt)
        draw.rectangle((ax - arm_w / 2, torso_bottom * 0.98, ax + arm_w / 2, torso_bottom * 1.04), fill=identity.skin)
    leg_w = shoulder * 0.8
    for side in (-1, 1):
        lx = cx + side * (leg_w / 2 + 1) + side * stride
        draw.rectangle((lx - leg_w / 2, torso_bottom, lx + leg_w / 2, leg_bottom), fill=identity.trousers)

    head_box = (int(cx - head_w / 2), int(top), int(cx + head_w / 2), int(top + head_h))
    if face:
        head = astronaut_head().resize((head_box[2] - head_box[0], head_box[3] - head_box[1]), Image.BILINEAR)
        img.paste(head, head_box[:2])
    else:
        draw.ellipse(head_box, fill=identity.hair)  # seen from behind: hair, no face

    # Camera: viewpoint (mirror), illumination and colour cast, sensor noise, a little blur.
    if camera.mirror:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) * camera.gain * np.array(camera.cast, dtype=np.float32)
    arr += rng.normal(0, 4.0, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(radius=0.4))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate: ``ids`` identities seen by ``cameras`` cameras, ``images_per_id`` images each."""

    ids: int = 40
    cameras: int = 4
    images_per_id: int = 12
    face_share: float = 0.5  # share of images with a real (detectable) face
    sizes: tuple[tuple[int, int], ...] = ((160, 80), (192, 96), (224, 112), (256, 128))
    test_share: float = 0.5  # share of identities held out for query/gallery
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ids < 2:
            raise ValueError(f"synthetic dataset needs at least 2 identities (one train, one test), got {self.ids}")
        if self.cameras < 2:
            raise ValueError(
                f"synthetic dataset needs at least 2 cameras (queries need another camera), got {self.cameras}"
            )
        if self.images_per_id < 2:
            raise ValueError(f"synthetic dataset needs at least 2 images per identity, got {self.images_per_id}")
        if not 0.0 <= self.face_share <= 1.0:
            raise ValueError(f"face_share {self.face_share} is outside [0, 1]")


@dataclass(frozen=True)
class SyntheticImage:
    pid: int
    camid: int  # 0-based
    frame: int
    face: bool
    image: Image.Image


def generate(spec: SyntheticSpec, pids: range) -> list[SyntheticImage]:
    """Images of identities ``pids``: each seen by every camera in turn, so that every id has several cameras."""
    out = []
    cameras = [make_camera(c, spec.seed) for c in range(spec.cameras)]
    for pid in pids:
        ident = make_identity(pid, spec.seed)
        rng = np.random.default_rng([spec.seed, 4, pid])
        for frame in range(spec.images_per_id):
            cam = cameras[(frame + pid) % spec.cameras]
            size = spec.sizes[int(rng.integers(len(spec.sizes)))]
            face = bool(rng.random() < spec.face_share)
            img = render_person(ident, cam, frame=frame, size=size, face=face, seed=spec.seed)
            out.append(SyntheticImage(pid, cam.camid, frame, face, img))
    return out


def write_msmt17(
    spec: SyntheticSpec, write: Callable[[str, bytes], None], *, progress: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Write an MSMT17 V1 tree through ``write(relative_path, bytes)``; returns counts per list.

    train/<pid>/<pid>_<seq>_<cam>_<date>_<frame>_<n>.jpg with list_train.txt / list_val.txt (val: each train id's
    last image), and test/ with list_query.txt (one image per test id and camera, first two cameras) and
    list_gallery.txt (the rest). Test ids are numbered from 0 again, as in MSMT17.
    """
    n_test = max(1, int(round(spec.ids * spec.test_share)))
    n_train = spec.ids - n_test
    if n_train < 1:
        raise ValueError(f"test_share {spec.test_share} leaves no training identity out of {spec.ids}")
    lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}

    def name(pid: int, im: SyntheticImage) -> str:
        # MSMT17: PID_SEQ_CAM_DATE+TIME_FRAME_N.jpg; the camera (third token) is 1-based.
        return f"{pid:04d}/{pid:04d}_{im.frame:03d}_{im.camid + 1:02d}_0303morning_{im.frame * 7 + 15:04d}_0.jpg"

    written = 0
    for split_pids, folder in ((range(n_train), "train"), (range(n_train, spec.ids), "test")):
        for pid in split_pids:
            images = generate(spec, range(pid, pid + 1))
            local_pid = pid if folder == "train" else pid - n_train
            seen_query_cams: set[int] = set()
            for i, im in enumerate(images):
                rel = name(local_pid, im)
                write(f"{folder}/{rel}", jpeg_bytes(im.image))
                if folder == "train":
                    lists["val" if i == len(images) - 1 else "train"].append(f"{rel} {local_pid}")
                elif im.camid not in seen_query_cams and len(seen_query_cams) < 2:
                    seen_query_cams.add(im.camid)
                    lists["query"].append(f"{rel} {local_pid}")
                else:
                    lists["gallery"].append(f"{rel} {local_pid}")
                written += 1
                if progress is not None:
                    progress(1)
    for split, lines in lists.items():
        write(f"list_{split}.txt", ("\n".join(lines) + "\n").encode())
    log.info("wrote %d synthetic MSMT17 images", written)
    return {split: len(lines) for split, lines in lists.items()}
