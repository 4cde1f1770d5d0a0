"""Dataset layouts on disk or S3 -> lists of records (path, person id, camera, face tag).

Three layouts are read exactly as their authors ship them (``read_layout(root, layout, **options)``):

- ``msmt17``: MSMT17 V1 (``train/``, ``test/``) or V2 (``mask_train_v2/``, ``mask_test_v2/``) with
  ``list_train.txt``, ``list_val.txt``, ``list_query.txt`` and ``list_gallery.txt`` next to them. Each list line is
  ``relative/path.jpg pid`` (train and val paths relative to the train folder, query and gallery paths to the test
  folder); the camera is the third ``_``-separated token of the file name, minus 1.
- ``market1501``: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of ``PPPP_cCsS_FFFFFF_BB.jpg`` files;
  pid -1 ("junk") is excluded everywhere, pid 0 ("distractor") is kept in the gallery only.
- ``flima``: the manifest this project defines (``manifest.csv``, see ``docs/flima.md``), split by
  leave-one-session-out.

Conventions shared by all layouts:

- Only the training split is relabelled: its identities become 0..N-1 in increasing order of the original id
  (``Splits.pid_map`` maps original id -> label, and every record keeps ``orig_pid``). Query, gallery and val
  records carry their original integer id in ``pid`` (FLIMA "unknown" test boxes carry ``UNKNOWN_PID`` = -1, which
  matches no query).
- ``camid`` is 0-based.
- ``path`` is a full URL or absolute path that ``reid_core.storage.read_bytes`` reads.
- The tree is listed with one recursive listing (``storage.list_files``), and every list entry is checked against
  that listing: no per-object request. A root that holds the layout one or two folders down (``MSMT17_V1/``,
  ``Market-1501-v15.09.15/``) is found as long as there is exactly one such folder.
- Bad input raises ``LayoutError`` (a ``ValueError``) whose message names the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import inspect
import io
import logging
import posixpath
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from reid_core import storage
from reid_core.data.shards import PACK_INDEX, ShardLocation, read_members, read_pack

log = logging.getLogger(__name__)

UNKNOWN_PID = -1
"""``pid`` of FLIMA "unknown" boxes in query/gallery: a gallery distractor that no query matches."""

_MAX_NAMED = 5  # how many offending items an error message names before saying "and N others"


class LayoutError(ValueError):
    """A dataset tree does not match its declared layout; the message says where and what was expected."""


@dataclass(frozen=True, slots=True)
class Record:
    """One image of a person.

    Attributes:
        path: full URL (``s3://bucket/key``) or absolute local path of the image file.
        pid: training label 0..N-1 in the train split; the original integer id elsewhere (``UNKNOWN_PID`` for an
            unknown person in a FLIMA test split).
        camid: 0-based camera index.
        face: whether a face is visible (FLIMA's tag); ``None`` when the layout does not say.
        orig_pid: the id as the dataset writes it (int, or ``"unknown"`` in FLIMA); ``None`` at construction means
            "same as pid".
        session: recording session (FLIMA session, Market-1501 sequence ``S``), if known.
        frame: frame number, if known.
        box: ``(x, y, w, h)`` in pixels of the person box inside the image at ``path``; ``None`` means the whole
            image is the person crop.
        shard: where the bytes are when the dataset is packed (``reid_core.data.shards``): then ``path`` is the
            image's path below the pack root, which names it in messages but is no object of its own; ``None`` means
            ``path`` is the object to read.
    """

    path: str
    pid: int
    camid: int
    face: bool | None = None
    orig_pid: int | str | None = None
    session: str | None = None
    frame: int | None = None
    box: tuple[int, int, int, int] | None = None
    shard: ShardLocation | None = None

    def __post_init__(self) -> None:
        if self.orig_pid is None:
            object.__setattr__(self, "orig_pid", self.pid)


@dataclass
class Splits:
    """The splits of one dataset.

    Attributes:
        train: training records, ``pid`` relabelled to 0..num_train_pids-1.
        query, gallery: evaluation records with original ids.
        val: validation records (MSMT17's ``list_val.txt`` when not merged), original ids; ``None`` if absent.
        pid_map: original training id -> training label.
        layout: layout name; root: the folder the layout was found in (URL or absolute path).
        details: layout-specific facts (MSMT17 version, FLIMA sessions, excluded junk counts, ...).
    """

    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    val: list[Record] | None = None
    pid_map: dict[int | str, int] = field(default_factory=dict)
    layout: str = ""
    root: str = ""
    details: dict[str, object] = field(default_factory=dict)

    @property
    def num_train_pids(self) -> int:
        """Number of training classes (labels are 0..num_train_pids-1)."""
        return len({r.pid for r in self.train})

    @property
    def num_cameras(self) -> int:
        """1 + the largest camid over all splits (camids index a table of this size)."""
        camids = [r.camid for split in self._named_splits().values() for r in split]
        return max(camids) + 1 if camids else 0

    def _named_splits(self) -> dict[str, list[Record]]:
        named = {"train": self.train, "query": self.query, "gallery": self.gallery}
        if self.val is not None:
            named["val"] = self.val
        return named

    def summary(self) -> str:
        """A small table: identities, images, cameras and face-tagged images per split."""
        lines = [f"{self.layout} at {self.root}"]
        if self.details:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in self.details.items()))
        lines.append(f"  {'split':<8} {'ids':>7} {'images':>9} {'cameras':>8} {'faces':>8}")
        for name, split in self._named_splits().items():
            ids = len({r.orig_pid for r in split})
            cams = len({r.camid for r in split})
            faces = sum(1 for r in split if r.face)
            tagged = any(r.face is not None for r in split)
            lines.append(f"  {name:<8} {ids:>7} {len(split):>9} {cams:>8} {faces if tagged else '-':>8}")
        lines.append(f"  num_train_pids={self.num_train_pids} num_cameras={self.num_cameras}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class _Tree:
    """Every file below ``base`` (one recursive listing), as paths relative to ``base``; for a packed dataset the
    pack's files, with ``shards`` saying where each one's bytes are."""

    base: str
    files: frozenset[str]
    shards: dict[str, ShardLocation] | None = None

    def url(self, rel: str) -> str:
        return storage.join(self.base, rel)

    def shard(self, rel: str) -> ShardLocation | None:
        return None if self.shards is None else self.shards[rel]

    def read_text(self, rel: str) -> str:
        """A list file or manifest as text (from its shard in a pack)."""
        url = self.url(rel)
        if self.shards is None:
            raw = storage.read_bytes(url)
        else:
            (raw,) = read_members([self.shards[rel]], names=[url])
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LayoutError(f"{url} is not UTF-8 text ({exc})") from None

    def has_dir(self, rel_dir: str) -> bool:
        prefix = rel_dir.rstrip("/") + "/"
        return any(f.startswith(prefix) for f in self.files)

    def top_level(self, limit: int = 20) -> str:
        """Top-level entries (folders end with ``/``) for error messages."""
        entries = sorted({f.split("/", 1)[0] + ("/" if "/" in f else "") for f in self.files})
        if not entries:
            return "nothing"
        shown = ", ".join(entries[:limit])
        return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")

    def subtree(self, rel_dir: str) -> _Tree:
        if not rel_dir:
            return self
        prefix = rel_dir.rstrip("/") + "/"
        shards = None
        if self.shards is not None:
            shards = {f[len(prefix) :]: loc for f, loc in self.shards.items() if f.startswith(prefix)}
        return _Tree(
            base=self.url(rel_dir),
            files=frozenset(f[len(prefix) :] for f in self.files if f.startswith(prefix)),
            shards=shards,
        )


def _list_tree(root: str) -> _Tree:
    base = root.rstrip("/") if storage.is_s3(root) else storage.filesystem(root)[1]
    prefix = base.rstrip("/") + "/"
    files = frozenset(f[len(prefix) :] for f in storage.list_files(root) if f.startswith(prefix))
    log.debug("listed %d files below %s", len(files), base)
    if PACK_INDEX in files:
        pack = read_pack(base)
        log.info("%s is a pack of %s: %d files in %d shards", base, pack.index.get("source"), len(pack.locations),
                 len(pack.index["shards"]))  # fmt: skip
        return _Tree(base=base, files=frozenset(pack.locations), shards=pack.locations)
    return _Tree(base=base, files=files)


def _locate(tree: _Tree, marker: str, *, is_dir: bool, layout: str, expected: str) -> _Tree:
    """The folder (root, or at most two levels down) that holds ``marker``; exactly one must exist."""
    candidates = set()
    for f in tree.files:
        parts = f.split("/")
        stop = len(parts) - 1 if is_dir else len(parts)
        for i in range(min(stop, 3)):
            if parts[i] == marker and (is_dir or i == len(parts) - 1):
                candidates.add("/".join(parts[:i]))
    if not candidates:
        raise LayoutError(f"{tree.base} is not a {layout} tree: expected {expected}; found {tree.top_level()}")
    if "" in candidates:
        return tree
    if len(candidates) > 1:
        raise LayoutError(
            f"{tree.base} holds several {layout} trees ({', '.join(sorted(candidates))}): pass one of them as root"
        )
    (found,) = candidates
    log.info("%s layout found in %s/", layout, found)
    return tree.subtree(found)


def _name_some(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMED])
    rest = len(items) - _MAX_NAMED
    return shown + (f" and {rest} others" if rest > 0 else "")


def _natural_key(text: str) -> list:
    """``"s2" < "s10"``: digit runs compare as numbers (they alternate with text runs, so types always align)."""
    return [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"(\d+)", text))]


def _relabel(orig_pids: Iterable[int | str]) -> dict[int | str, int]:
    """Original ids -> 0..N-1 in increasing order (ints numerically; strings after ints, naturally)."""
    unique = set(orig_pids)
    ordered = sorted(unique, key=lambda p: (0, p, []) if isinstance(p, int) else (1, 0, _natural_key(p)))
    return {pid: label for label, pid in enumerate(ordered)}


def _check_nonempty(layout: str, where: str, train: list[Record], query: list[Record], gallery: list[Record]) -> None:
    if not train:
        raise LayoutError(f"{layout} at {where}: zero training identities (no usable training image)")
    if not query:
        raise LayoutError(f"{layout} at {where}: zero query identities (no usable query image)")
    if not gallery:
        raise LayoutError(f"{layout} at {where}: the gallery is empty")


# ----------------------------------------------------------------------------------------------------------------
# MSMT17

_MSMT17_VERSIONS = {"v1": ("train", "test"), "v2": ("mask_train_v2", "mask_test_v2")}
_MSMT17_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
_MSMT17_EXPECTED = (
    "list_train.txt, list_val.txt, list_query.txt, list_gallery.txt and the folders train/ + test/ (V1) or "
    "mask_train_v2/ + mask_test_v2/ (V2)"
)


@dataclass(frozen=True)
class _ListEntry:
    rel: str
    pid: int
    camid: int
    list_name: str
    lineno: int


def _parse_msmt17_list(text: str, list_url: str, list_name: str) -> list[_ListEntry]:
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{list_url} line {lineno}"
        if len(parts) != 2:
            raise LayoutError(f"{where}: expected 'relative/path.jpg pid', got {line.strip()!r}")
        rel, pid_text = parts
        try:
            pid = int(pid_text)
        except ValueError:
            raise LayoutError(f"{where}: person id {pid_text!r} is not an integer") from None
        if rel.startswith("/") or ".." in rel.split("/"):
            raise LayoutError(f"{where}: {rel!r} must be a path relative to the image folder")
        tokens = posixpath.basename(rel).split("_")
        try:
            camid = int(tokens[2]) - 1
        except (IndexError, ValueError):
            raise LayoutError(
                f"{where}: cannot read the camera from {rel!r} (expected the file name's third '_' token to be the "
                "1-based camera number, e.g. 0000_000_01_0303morning_0015_0.jpg)"
            ) from None
        if camid < 0:
            raise LayoutError(f"{where}: camera number in {rel!r} must be >= 1")
        entries.append(_ListEntry(rel=rel, pid=pid, camid=camid, list_name=list_name, lineno=lineno))
    return entries


def read_msmt17(root: str, *, merge_val: bool = False, version: str | None = None) -> Splits:
    """Read MSMT17 V1 or V2.

    Args:
        root: the folder holding the lists and image folders (or its parent, e.g. one that holds ``MSMT17_V1/``).
        merge_val: add ``list_val.txt`` to the training split (the 32,621 "train" images of the paper's statistics
            are train + val); otherwise val is its own split (original ids) and train has the list's 30,248 images.
        version: ``"v1"`` or ``"v2"``; needed only when a folder holds both versions' image folders.

    V2 blurs faces: a ``UserWarning`` says so, because the face detector will find almost none.
    """
    tree = _locate(_list_tree(root), "list_train.txt", is_dir=False, layout="msmt17", expected=_MSMT17_EXPECTED)
    present = {v for v, dirs in _MSMT17_VERSIONS.items() if all(tree.has_dir(d) for d in dirs)}
    if version is not None:
        if version not in _MSMT17_VERSIONS:
            raise LayoutError(f"msmt17 version {version!r} is not one of {sorted(_MSMT17_VERSIONS)}")
        if version not in present:
            raise LayoutError(
                f"{tree.base}: msmt17 {version} needs the folders {' + '.join(_MSMT17_VERSIONS[version])}/; "
                f"found {tree.top_level()}"
            )
    elif len(present) == 1:
        (version,) = present
    elif not present:
        raise LayoutError(
            f"{tree.base} is not a complete msmt17 tree: expected {_MSMT17_EXPECTED}; found {tree.top_level()}"
        )
    else:
        raise LayoutError(f"{tree.base} holds both MSMT17 V1 and V2 image folders: pass version='v1' or 'v2'")
    train_dir, test_dir = _MSMT17_VERSIONS[version]
    if version == "v2":
        warnings.warn(
            f"MSMT17 V2 at {tree.base}: faces are blurred in this version, so the face detector will find almost "
            "none (face guidance sees Δ=1 on nearly every real image); use V1 for face-guided training",
            UserWarning,
            stacklevel=3,
        )

    required = ["list_train.txt", "list_query.txt", "list_gallery.txt"] + (["list_val.txt"] if merge_val else [])
    missing = [name for name in required if name not in tree.files]
    if missing:
        raise LayoutError(
            f"{tree.base} is not a complete msmt17 tree: missing {', '.join(missing)} (expected {_MSMT17_EXPECTED}); "
            f"found {tree.top_level()}"
        )
    lists: dict[str, list[_ListEntry]] = {}
    for name in _MSMT17_LISTS:
        if name in tree.files:
            lists[name] = _parse_msmt17_list(tree.read_text(name), tree.url(name), name)
    if "list_val.txt" not in lists:
        log.info("%s has no list_val.txt: no val split", tree.base)

    image_dir = {"list_train.txt": train_dir, "list_val.txt": train_dir, "list_query.txt": test_dir}
    image_dir["list_gallery.txt"] = test_dir
    _check_msmt17_entries(tree, lists, image_dir)

    def records(name: str, labels: dict[int | str, int] | None) -> list[Record]:
        folder = image_dir[name]
        return [
            Record(
                path=tree.url(f"{folder}/{e.rel}"),
                shard=tree.shard(f"{folder}/{e.rel}"),
                pid=labels[e.pid] if labels is not None else e.pid,
                camid=e.camid,
                face=None,
                orig_pid=e.pid,
            )
            for e in lists.get(name, [])
        ]

    train_names = ["list_train.txt"] + (["list_val.txt"] if merge_val else [])
    pid_map = _relabel(e.pid for name in train_names for e in lists[name])
    train = [r for name in train_names for r in records(name, pid_map)]
    val = None if merge_val or "list_val.txt" not in lists else records("list_val.txt", None)
    splits = Splits(
        train=train,
        query=records("list_query.txt", None),
        gallery=records("list_gallery.txt", None),
        val=val,
        pid_map=pid_map,
        layout="msmt17",
        root=tree.base,
        details={
            "version": version,
            "merge_val": merge_val,
            "list_counts": {name: len(lists[name]) for name in train_names},
        },  # fmt: skip
    )
    _check_nonempty("msmt17", tree.base, splits.train, splits.query, splits.gallery)
    return splits


def _check_msmt17_entries(tree: _Tree, lists: dict[str, list[_ListEntry]], image_dir: dict[str, str]) -> None:
    """Every listed image exists in the listing, and no image is listed twice (in one list or across lists)."""
    seen: dict[str, _ListEntry] = {}
    missing: dict[str, list[str]] = defaultdict(list)
    for name, entries in lists.items():
        for e in entries:
            rel = f"{image_dir[name]}/{e.rel}"
            first = seen.get(rel)
            if first is not None:
                raise LayoutError(
                    f"duplicate image {rel!r}: {tree.url(first.list_name)} line {first.lineno} and "
                    f"{tree.url(name)} line {e.lineno}"
                )
            seen[rel] = e
            if rel not in tree.files:
                missing[name].append(rel)
    if missing:
        total = sum(len(v) for v in missing.values())
        parts = [f"{tree.url(name)}: {_name_some(rels)}" for name, rels in missing.items()]
        raise LayoutError(f"{total} listed images are missing below {tree.base} (listed in " + "; ".join(parts) + ")")


# ----------------------------------------------------------------------------------------------------------------
# Market-1501

_MARKET_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:s(\d+))?(?:_(\d+))?")
_MARKET_EXPECTED = "the folders bounding_box_train/, query/ and bounding_box_test/ of PPPP_cCsS_FFFFFF_BB.jpg files"


def read_market1501(root: str) -> Splits:
    """Read Market-1501 (and layouts named like it, e.g. DukeMTMC-reID's ``PPPP_cC_fFFFFFFF.jpg``).

    pid -1 (junk) is excluded from every split; pid 0 (distractors) is kept in the gallery, where it matches no
    query, and excluded (with a warning) from train and query. Non-JPEG files (``Thumbs.db``) are ignored.
    """
    tree = _locate(_list_tree(root), "bounding_box_train", is_dir=True, layout="market1501", expected=_MARKET_EXPECTED)
    missing = [d + "/" for d in _MARKET_DIRS.values() if not tree.has_dir(d)]
    if missing:
        raise LayoutError(
            f"{tree.base} is not a complete market1501 tree: missing {', '.join(missing)} (expected {_MARKET_EXPECTED}); "
            f"found {tree.top_level()}"
        )
    parsed: dict[str, list[tuple[str, int, int, str | None, int | None]]] = {}
    malformed: list[str] = []
    ignored = 0
    for split, folder in _MARKET_DIRS.items():
        rows = []
        for rel in sorted(f for f in tree.files if f.startswith(folder + "/")):
            name = rel[len(folder) + 1 :]
            if "/" in name or not name.lower().endswith(".jpg"):
                ignored += 1
                continue
            m = _MARKET_NAME.match(name)
            if m is None or int(m.group(2)) < 1 or int(m.group(1)) < -1:
                malformed.append(rel)
                continue
            session = m.group(3)
            frame = int(m.group(4)) if m.group(4) else None
            rows.append((rel, int(m.group(1)), int(m.group(2)) - 1, session, frame))
        parsed[split] = rows
    if malformed:
        raise LayoutError(
            f"{len(malformed)} file names below {tree.base} do not match PPPP_cCsS_FFFFFF_BB.jpg (C >= 1): "
            f"{_name_some(malformed)}"
        )
    if ignored:
        log.info("market1501 at %s: ignored %d files that are not .jpg images in the split folders", tree.base, ignored)

    excluded = Counter()
    kept: dict[str, list] = {}
    for split, rows in parsed.items():
        keep = []
        for row in rows:
            pid = row[1]
            if pid == -1:
                excluded[f"{split}_junk"] += 1
            elif pid == 0 and split != "gallery":
                excluded[f"{split}_distractors"] += 1
            else:
                keep.append(row)
        kept[split] = keep
    for key, n in excluded.items():
        if key.endswith("distractors"):
            log.warning(
                "market1501 at %s: excluded %d pid-0 distractor images from %s", tree.base, n, key.split("_")[0]
            )
        else:
            log.info("market1501 at %s: excluded %d junk images (pid -1) from %s", tree.base, n, key.split("_")[0])

    pid_map = _relabel(row[1] for row in kept["train"])

    def records(split: str, labels: dict | None) -> list[Record]:
        return [
            Record(
                path=tree.url(rel),
                shard=tree.shard(rel),
                pid=labels[pid] if labels is not None else pid,
                camid=camid,
                face=None,
                orig_pid=pid,
                session=session,
                frame=frame,
            )
            for rel, pid, camid, session, frame in kept[split]
        ]

    splits = Splits(
        train=records("train", pid_map),
        query=records("query", None),
        gallery=records("gallery", None),
        val=None,
        pid_map=pid_map,
        layout="market1501",
        root=tree.base,
        details={f"excluded_{k}": v for k, v in sorted(excluded.items())},
    )
    _check_nonempty("market1501", tree.base, splits.train, splits.query, splits.gallery)
    return splits


# ----------------------------------------------------------------------------------------------------------------
# FLIMA

FLIMA_MANIFEST = "manifest.csv"
FLIMA_COLUMNS = ("session", "frame", "camera", "person", "path", "face")
FLIMA_BOX_COLUMNS = ("x", "y", "w", "h")
_UNKNOWN = "unknown"


@dataclass(frozen=True)
class _FlimaRow:
    lineno: int
    session: str
    frame: int
    camera: str
    person: int | str
    rel: str
    face: bool
    box: tuple[int, int, int, int] | None


def _parse_flima_manifest(text: str, url: str) -> list[_FlimaRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in FLIMA_COLUMNS if c not in header]
    if missing:
        raise LayoutError(
            f"{url} line 1: the header must name the columns {', '.join(FLIMA_COLUMNS)} (optional: "
            f"{', '.join(FLIMA_BOX_COLUMNS)}); missing {', '.join(missing)}; found header {header}"
        )
    box_cols = [c for c in FLIMA_BOX_COLUMNS if c in header]
    if box_cols and len(box_cols) != len(FLIMA_BOX_COLUMNS):
        raise LayoutError(f"{url} line 1: box columns must be all of x, y, w, h or none; found {box_cols}")

    rows = []
    for raw in reader:
        where = f"{url} line {reader.line_num}"
        if None in raw or any(raw[c] is None for c in header):
            raise LayoutError(f"{where}: expected {len(header)} fields as in the header, got a different number")
        value = {k: v.strip() for k, v in raw.items()}
        if not any(value.values()):
            continue
        session, camera, rel = value["session"], value["camera"], value["path"]
        if not session or not camera or not rel:
            raise LayoutError(f"{where}: session, camera and path must not be empty")
        if rel.startswith("/") or ".." in rel.split("/"):
            raise LayoutError(f"{where}: path {rel!r} must be relative to the dataset root")
        try:
            frame = int(value["frame"])
        except ValueError:
            raise LayoutError(f"{where}: frame {value['frame']!r} is not an integer") from None
        person_text = value["person"]
        if person_text.lower() == _UNKNOWN:
            person: int | str = _UNKNOWN
        else:
            try:
                person = int(person_text)
            except ValueError:
                raise LayoutError(f"{where}: person {person_text!r} is neither an integer nor 'unknown'") from None
            if person < 0:
                raise LayoutError(f"{where}: person id {person} must be >= 0 (use 'unknown' for unknown people)")
        if value["face"] not in ("0", "1"):
            raise LayoutError(f"{where}: face tag {value['face']!r} must be 0 or 1")
        box = None
        if box_cols:
            coords = [value[c] for c in FLIMA_BOX_COLUMNS]
            if any(coords):
                try:
                    box = tuple(int(float(c)) for c in coords)
                except ValueError:
                    raise LayoutError(f"{where}: box x, y, w, h {coords} must all be numbers") from None
                if box[2] <= 0 or box[3] <= 0 or box[0] < 0 or box[1] < 0:
                    raise LayoutError(f"{where}: box {box} needs x, y >= 0 and w, h > 0")
        rows.append(
            _FlimaRow(
                lineno=reader.line_num,
                session=session,
                frame=frame,
                camera=camera,
                person=person,
                rel=rel,
                face=value["face"] == "1",
                box=box,
            )
        )
    return rows


def _flima_queries(rows: list[_FlimaRow], per_camera: int) -> set[int]:
    """Line numbers of the query boxes: per (known person, camera), ``per_camera`` boxes evenly spaced in time."""
    tracks: dict[tuple, list[_FlimaRow]] = defaultdict(list)
    for row in rows:
        if row.person != _UNKNOWN:
            tracks[(row.person, row.camera)].append(row)
    chosen = set()
    for track in tracks.values():
        track.sort(key=lambda r: (r.frame, r.rel, r.box or ()))
        picks = np.unique(np.linspace(0, len(track) - 1, num=min(per_camera, len(track))).round().astype(int))
        chosen.update(track[i].lineno for i in picks)
    return chosen


def read_flima(
    root: str, *, test_session: str | None = None, unknown: str = "class", queries_per_camera: int = 1
) -> Splits:
    """Read a FLIMA manifest (``docs/flima.md``) with leave-one-session-out splits.

    Args:
        root: the folder holding ``manifest.csv`` (image paths in it are relative to this folder).
        test_session: the held-out session (default: the last one in natural order, ``s2`` < ``s10``).
        unknown: ``"class"``: "unknown" training boxes form one extra training class (label N-1, the last);
            ``"drop"``: they are left out of training. In the test session, unknown boxes are gallery distractors
            (``pid = UNKNOWN_PID``) in either case, and never queries.
        queries_per_camera: per (known person, camera) of the test session, this many boxes (evenly spaced in
            frame order, the first one always included) are queries; the others are the gallery.

    The test session's boxes (query + gallery) are also the ID-classification test set: map their ``orig_pid``
    through ``Splits.pid_map`` for the class label.
    """
    if unknown not in ("class", "drop"):
        raise LayoutError(f"flima option unknown={unknown!r} must be 'class' or 'drop'")
    if queries_per_camera < 1:
        raise LayoutError(f"flima option queries_per_camera={queries_per_camera} must be >= 1")
    tree = _locate(
        _list_tree(root), FLIMA_MANIFEST, is_dir=False, layout="flima", expected=f"{FLIMA_MANIFEST} (see docs/flima.md)"
    )
    url = tree.url(FLIMA_MANIFEST)
    rows = _parse_flima_manifest(tree.read_text(FLIMA_MANIFEST), url)
    if not rows:
        raise LayoutError(f"{url}: the manifest has a header but no rows (zero identities)")

    seen: dict[tuple, int] = {}
    missing = []
    for row in rows:
        key = (row.rel, row.box)
        if key in seen:
            what = f"image {row.rel!r}" + (f" box {row.box}" if row.box else "")
            raise LayoutError(f"{url}: duplicate {what} on lines {seen[key]} and {row.lineno}")
        seen[key] = row.lineno
        if row.rel not in tree.files:
            missing.append(row.rel)
    if missing:
        missing = sorted(set(missing))
        raise LayoutError(f"{len(missing)} images named in {url} are missing below {tree.base}: {_name_some(missing)}")

    sessions = sorted({r.session for r in rows}, key=_natural_key)
    if len(sessions) < 2:
        raise LayoutError(f"{url}: leave-one-session-out needs at least two sessions, found {sessions}")
    if test_session is None:
        test_session = sessions[-1]
    elif test_session not in sessions:
        raise LayoutError(f"flima test_session {test_session!r} is not in {url}; sessions: {', '.join(sessions)}")
    camids = {cam: i for i, cam in enumerate(sorted({r.camera for r in rows}, key=_natural_key))}

    train_rows = [r for r in rows if r.session != test_session and (unknown == "class" or r.person != _UNKNOWN)]
    test_rows = [r for r in rows if r.session == test_session]
    dropped = sum(1 for r in rows if r.session != test_session and r.person == _UNKNOWN) if unknown == "drop" else 0
    if dropped:
        log.info("flima: left %d unknown-person boxes out of training (unknown='drop')", dropped)
    if not any(r.person != _UNKNOWN for r in train_rows):
        raise LayoutError(f"{url}: zero known training identities outside test session {test_session!r}")
    if not any(r.person != _UNKNOWN for r in test_rows):
        raise LayoutError(f"{url}: test session {test_session!r} has zero known identities (no query possible)")

    pid_map = _relabel(r.person for r in train_rows)
    query_lines = _flima_queries(test_rows, queries_per_camera)

    def record(row: _FlimaRow, pid: int) -> Record:
        return Record(
            path=tree.url(row.rel),
            shard=tree.shard(row.rel),
            pid=pid,
            camid=camids[row.camera],
            face=row.face,
            orig_pid=row.person,
            session=row.session,
            frame=row.frame,
            box=row.box,
        )

    def test_pid(row: _FlimaRow) -> int:
        return UNKNOWN_PID if row.person == _UNKNOWN else int(row.person)

    splits = Splits(
        train=[record(r, pid_map[r.person]) for r in train_rows],
        query=[record(r, test_pid(r)) for r in test_rows if r.lineno in query_lines],
        gallery=[record(r, test_pid(r)) for r in test_rows if r.lineno not in query_lines],
        val=None,
        pid_map=pid_map,
        layout="flima",
        root=tree.base,
        details={
            "test_session": test_session,
            "sessions": len(sessions),
            "unknown": unknown,
            "cameras": ",".join(camids),
        },
    )
    _check_nonempty("flima", tree.base, splits.train, splits.query, splits.gallery)
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Registry

LAYOUTS: dict[str, Callable[..., Splits]] = {
    "msmt17": read_msmt17,
    "market1501": read_market1501,
    "flima": read_flima,
}


def read_layout(root: str, layout: str, **options) -> Splits:
    """Read the dataset at ``root`` (local path or ``s3://`` URL) in ``layout`` (one of ``LAYOUTS``).

    ``options`` are the layout reader's keyword arguments (``merge_val``/``version`` for msmt17; ``test_session``,
    ``unknown``, ``queries_per_camera`` for flima).
    """
    reader = LAYOUTS.get(layout)
    if reader is None:
        raise LayoutError(f"unknown layout {layout!r}: valid layouts are {', '.join(sorted(LAYOUTS))}")
    valid = [name for name in inspect.signature(reader).parameters if name != "root"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise LayoutError(
            f"unknown option(s) {', '.join(unknown)} for layout {layout!r}; valid options: {', '.join(valid) or 'none'}"
        )
    splits = reader(root, **options)
    log.info("read %s", splits.summary())
    return splits
