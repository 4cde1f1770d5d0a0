"""A small synthetic re-ID dataset in the real layouts, for the embedded default and the tests.

Person-like images: a head, a torso, arms and legs over a cluttered background. Each identity has its own clothing
colours, skin tone and build; each camera its own illumination, colour cast, scale and viewpoint (mirroring,
horizontal offset). On a configurable share of images the head is a real face — the head of scikit-image's
astronaut photo, the one real photo with a face that a PyPI package ships — so that dlib's detector finds it and Δ is
meaningful; the other heads are plain (hair from behind), in which no detector finds a face. Deterministic per seed:
identity ``i`` seen by camera ``c`` in frame ``f`` is the same image on every run.

``plan(spec, layout)`` lists every image of a dataset in one of the real layouts (MSMT17 V1, Market-1501, the FLIMA
manifest of ``docs/flima.md``) without rendering anything; ``write_layout`` renders and writes them, then the list
files or the manifest. A FLIMA box's face tag is exactly whether its image carries the real face.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter
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
    identity: Identity,
    camera: Camera,
    *,
    frame: int,
    size: tuple[int, int],
    face: bool,
    seed: int,
    head_share: float = 0.25,
) -> Image.Image:
    """One (H, W) = ``size`` RGB image of ``identity`` seen by ``camera`` in ``frame``; the head is ``head_share``
    of the body's height."""
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
    # A large head (a quarter of the body by default; a real person's is about an eighth): the pasted face is then
    # ~0.6 × 0.25 × body, about 16 px eyebrows to chin at 128×64. HOG needs ~20 px, so a set meant to carry faces that
    # survive resizing to 128×64 (the guidance experiment's) asks for head_share 0.4 (~26 px).
    head_h = body_h * head_share
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
    """What to generate: ``ids`` identities seen by ``cameras`` cameras, ``images_per_id`` images each.

    Market-1501 adds ``extra_share`` × (test ids) distractor (pid 0) and junk (pid -1) images to its gallery folder;
    FLIMA adds that share of "unknown" people and spreads every person's images over ``sessions`` sessions.
    """

    ids: int = 40
    cameras: int = 4
    images_per_id: int = 12
    face_share: float = 0.5  # share of images with a real (detectable) face
    head_share: float = 0.25  # head height / body height (0.4: faces that stay detectable at 128×64)
    sizes: tuple[tuple[int, int], ...] = ((160, 80), (192, 96), (224, 112), (256, 128))
    test_share: float = 0.5  # share of identities held out for query/gallery (MSMT17, Market-1501)
    sessions: int = 3  # FLIMA recording sessions (the last one is the default test session)
    extra_share: float = 0.25  # Market-1501 distractors/junk, FLIMA unknown people, per test/known identity
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
        if not 0.1 <= self.head_share <= 0.5:
            raise ValueError(f"head_share {self.head_share} is outside [0.1, 0.5] (head height / body height)")
        if not 0.0 < self.test_share < 1.0:
            raise ValueError(f"test_share {self.test_share} must be in (0, 1)")
        if self.sessions < 2:
            raise ValueError(f"FLIMA needs at least 2 sessions (leave-one-session-out), got {self.sessions}")
        if self.extra_share < 0:
            raise ValueError(f"extra_share {self.extra_share} must be >= 0")

    @property
    def num_test(self) -> int:
        n_test = max(1, int(round(self.ids * self.test_share)))
        if n_test >= self.ids:
            raise ValueError(f"test_share {self.test_share} leaves no training identity out of {self.ids}")
        return n_test


@dataclass(frozen=True)
class PlannedImage:
    """One image to write: where (``rel``, relative to the dataset root), who (``look``: the identity whose clothes
    are drawn), seen how (camera, frame, size, face). ``split``/``pid`` say what the layout will record."""

    rel: str
    split: str  # train | val | query | gallery | junk (Market-1501) | a FLIMA session
    pid: int | str  # the id the layout writes (Market-1501: -1 junk, 0 distractor; FLIMA: "unknown")
    look: int  # identity drawn (make_identity's pid): distinct for every person, known or not
    camid: int  # 0-based
    frame: int
    size: tuple[int, int]  # (H, W)
    face: bool


def _sightings(spec: SyntheticSpec, look: int, count: int, run: int = 1) -> list[tuple[int, tuple[int, int], bool]]:
    """(camid, size, face) of ``count`` consecutive sightings of person ``look``: the cameras in turn, ``run``
    consecutive frames each, so that every person is seen by several cameras; size and face drawn from (seed, look)."""
    rng = np.random.default_rng([spec.seed, 4, look])
    out = []
    for frame in range(count):
        size = spec.sizes[int(rng.integers(len(spec.sizes)))]
        face = bool(rng.random() < spec.face_share)
        out.append(((frame // run + look) % spec.cameras, size, face))
    return out


def _queries(camids: list[int]) -> set[int]:
    """Indices of the query images of one test person: the first image of each of its first two cameras, never all
    of its images (the gallery keeps a true match from another camera whenever one exists)."""
    chosen: dict[int, int] = {}
    for i, cam in enumerate(camids):
        if cam not in chosen and len(chosen) < min(2, len(camids) - 1):
            chosen[cam] = i
    return set(chosen.values())


def plan_msmt17(spec: SyntheticSpec) -> list[PlannedImage]:
    """MSMT17 V1: train/<pid>/<pid>_<seq>_<cam>_<date>_<frame>_<n>.jpg (val: each train id's last image), test/ for
    query (``_queries``) and gallery; test ids are numbered from 0 again, as in MSMT17."""
    n_test = spec.num_test
    n_train = spec.ids - n_test
    out = []
    for look in range(spec.ids):
        is_train = look < n_train
        pid = look if is_train else look - n_train
        seen = _sightings(spec, look, spec.images_per_id)
        queries = set() if is_train else _queries([cam for cam, _, _ in seen])
        for frame, (cam, size, face) in enumerate(seen):
            # MSMT17: PID_SEQ_CAM_DATE+TIME_FRAME_N.jpg; the camera (third token) is 1-based.
            name = f"{pid:04d}/{pid:04d}_{frame:03d}_{cam + 1:02d}_0303morning_{frame * 7 + 15:04d}_0.jpg"
            if is_train:
                split = "val" if frame == spec.images_per_id - 1 else "train"
            else:
                split = "query" if frame in queries else "gallery"
            folder = "train" if is_train else "test"
            out.append(PlannedImage(f"{folder}/{name}", split, pid, look, cam, frame, size, face))
    return out


def plan_market1501(spec: SyntheticSpec) -> list[PlannedImage]:
    """Market-1501: bounding_box_train/, query/, bounding_box_test/ of ``PPPP_cCsS_FFFFFF_BB.jpg`` (ids 1..N, train
    first); the gallery folder also gets ``extra_share`` × test ids distractors (``0000_``) and as many junk
    images (``-1_``), one image each, as the real set has."""
    n_test = spec.num_test
    n_train = spec.ids - n_test
    out = []
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for look in range(spec.ids):
        pid = look + 1
        seen = _sightings(spec, look, spec.images_per_id)
        queries = set() if look < n_train else _queries([cam for cam, _, _ in seen])
        for frame, (cam, size, face) in enumerate(seen):
            split = "train" if look < n_train else ("query" if frame in queries else "gallery")
            name = f"{pid:04d}_c{cam + 1}s1_{frame * 25 + 1:06d}_00.jpg"
            out.append(PlannedImage(f"{folders[split]}/{name}", split, pid, look, cam, frame, size, face))
    n_extra = int(round(n_test * spec.extra_share))
    for k in range(2 * n_extra):
        look = spec.ids + k
        (cam, size, face) = _sightings(spec, look, 1)[0]
        pid, split = (0, "gallery") if k < n_extra else (-1, "junk")
        name = f"{'0000' if pid == 0 else '-1'}_c{cam + 1}s1_{k * 25 + 1:06d}_00.jpg"
        out.append(PlannedImage(f"bounding_box_test/{name}", split, pid, look, cam, 0, size, face))
    return out


def plan_flima(spec: SyntheticSpec) -> list[PlannedImage]:
    """FLIMA (``docs/flima.md``): known people ``0..ids-1`` and ``extra_share`` × ids "unknown" people, each person's
    images spread over the ``sessions`` in equal blocks; within a session a person walks past the cameras in turn and
    stays two frames in each (a short track), so that every camera seen gives a query and a gallery box.
    Paths: ``sSS/camC/FFFFFF_person.jpg``."""
    per_session = spec.images_per_id // spec.sessions
    if per_session < 4:
        raise ValueError(
            f"FLIMA: images_per_id={spec.images_per_id} must be >= 4 × sessions={spec.sessions}, so that every "
            "person is seen in two frames by each of two cameras in every session (a query needs a gallery match)"
        )
    n_unknown = int(round(spec.ids * spec.extra_share))
    out = []
    for look in range(spec.ids + n_unknown):
        known = look < spec.ids
        person: int | str = look if known else "unknown"
        tag = f"{look:03d}" if known else f"u{look - spec.ids:03d}"
        seen = _sightings(spec, look, per_session * spec.sessions, run=2)
        for i, (cam, size, face) in enumerate(seen):
            session = f"s{i // per_session + 1:02d}"
            frame = 100 * i + look  # orders a session's boxes in time
            rel = f"{session}/cam{cam + 1}/{frame:06d}_{tag}.jpg"
            out.append(PlannedImage(rel, session, person, look, cam, frame, size, face))
    return out


PLANS: dict[str, Callable[[SyntheticSpec], list[PlannedImage]]] = {
    "msmt17": plan_msmt17,
    "market1501": plan_market1501,
    "flima": plan_flima,
}


def plan(spec: SyntheticSpec, layout: str) -> list[PlannedImage]:
    """Every image of a synthetic ``layout`` dataset, in writing order (cheap: nothing is rendered)."""
    planner = PLANS.get(layout)
    if planner is None:
        raise ValueError(f"no synthetic writer for layout {layout!r}: valid layouts are {', '.join(sorted(PLANS))}")
    return planner(spec)


def render(spec: SyntheticSpec, item: PlannedImage) -> Image.Image:
    """The planned image; junk (Market-1501 pid -1) is a bad detection: the lower half of a person, no head."""
    image = render_person(
        make_identity(item.look, spec.seed),
        make_camera(item.camid, spec.seed),
        frame=item.frame,
        size=item.size,
        face=item.face and item.split != "junk",
        seed=spec.seed,
        head_share=spec.head_share,
    )
    if item.split == "junk":
        h, w = item.size
        image = image.crop((0, h // 2, w, h)).resize((w, h), Image.BILINEAR)
    return image


def index_files(layout: str, items: list[PlannedImage]) -> dict[str, bytes]:
    """The layout's text files: MSMT17's four lists, FLIMA's ``manifest.csv``; Market-1501 has none."""
    if layout == "msmt17":
        lists: dict[str, list[str]] = {"train": [], "val": [], "query": [], "gallery": []}
        for item in items:
            lists[item.split].append(f"{item.rel.split('/', 1)[1]} {item.pid}")
        return {f"list_{split}.txt": ("\n".join(lines) + "\n").encode() for split, lines in lists.items()}
    if layout == "flima":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["session", "frame", "camera", "person", "path", "face"])
        for item in items:
            writer.writerow([item.split, item.frame, item.camid + 1, item.pid, item.rel, int(item.face)])
        return {"manifest.csv": buf.getvalue().encode()}
    return {}


def write_images(
    spec: SyntheticSpec,
    items: list[PlannedImage],
    write: Callable[[str, bytes], None],
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Render ``items`` (from ``plan``) and write each as a JPEG through ``write(relative_path, bytes)``."""
    for item in items:
        write(item.rel, jpeg_bytes(render(spec, item)))
        if progress is not None:
            progress(1)


def write_layout(
    spec: SyntheticSpec,
    layout: str,
    write: Callable[[str, bytes], None],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Render and write a synthetic ``layout`` tree through ``write(relative_path, bytes)``; the list files or the
    manifest are written last (a tree without them is unfinished). Returns the number of images per split."""
    items = plan(spec, layout)
    write_images(spec, items, write, progress=progress)
    for rel, data in index_files(layout, items).items():
        write(rel, data)
    counts = Counter(item.split for item in items)
    log.info("wrote %d synthetic %s images (%s)", len(items), layout, dict(counts))
    return dict(sorted(counts.items()))
