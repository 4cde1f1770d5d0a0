"""Packing a dataset tree into large tar shards with an index, for fast reading from S3 (``reid_core/data/shards.py``).

``jobs/pack_dataset.py`` turns its options into a ``PackSpec`` and calls ``check_inputs`` (one-line ``ValueError`` /
``StorageError`` before any work: locations, the source's layout, where the pack goes), ``write_pack`` (deletes the
old pack that ``--overwrite`` replaces, only the files its index lists, then writes the shards and ``pack.json`` last)
and ``check_pack`` (reads the pack back as the same splits as the source; with ``verify`` compares every image's bytes).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from reid_core import storage
from reid_core.data.layouts import read_layout
from reid_core.data.shards import PACK_INDEX, PackError, pack_files, pack_tree, read_record_bytes

log = logging.getLogger(__name__)


@dataclass
class PackSpec:
    """What to pack and where (the job's options; ``jobs/pack_dataset.py --help`` explains each)."""

    src: str  # the dataset: s3://bucket/prefix or a local folder
    layout: str
    out: str  # where the pack goes
    shard_mb: float = 128.0
    overwrite: bool = False  # replace the pack at out: deletes only its own files, as its pack.json lists them
    verify: bool = False  # compare every packed image's bytes with the source


def relative_splits(splits, root: str) -> dict[str, list[tuple]]:
    """Each split's records with paths relative to ``root`` and without shard locations (comparable across forms)."""
    cut = len(root.rstrip("/")) + 1
    named = {"train": splits.train, "query": splits.query, "gallery": splits.gallery, "val": splits.val or []}
    return {
        name: [(r.path[cut:], r.pid, r.camid, r.face, r.orig_pid, r.session, r.frame, r.box) for r in records]
        for name, records in named.items()
    }


def check_inputs(spec: PackSpec) -> tuple:
    """One-line errors before any work: locations, the source's layout, where the pack goes. Returns (the source's
    splits, the old pack's files to delete first)."""
    if not (spec.shard_mb > 0 and math.isfinite(spec.shard_mb)):  # NaN is not <= 0
        raise ValueError(f"--shard-mb {spec.shard_mb}: expected a positive size in MB")
    src, out = spec.src.rstrip("/"), spec.out.rstrip("/")
    if storage.is_within(out, src):  # normalised first: X/./packed and X/a/../packed lie inside X too
        raise ValueError(f"--out {out} lies inside --src {src}: the pack would pack itself; choose another location")
    if storage.is_within(src, out):
        raise ValueError(f"--src {src} lies inside --out {out}: the pack would be written over its source")
    storage.check_location(src, must_exist=True)
    if storage.exists(storage.join(src, PACK_INDEX)):
        raise ValueError(f"--src {src} is already a pack ({PACK_INDEX}); train from it directly")
    splits = read_layout(src, spec.layout)
    storage.check_location(out)
    existing = storage.list_files(out) if storage.exists(out) else []
    if not existing:
        return splits, []
    if not spec.overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to replace a pack there")
    try:
        owned = pack_files(out)
    except PackError as exc:
        raise ValueError(
            f"refusing to overwrite {out}: {exc}; --overwrite replaces only a pack's own files, as its index lists "
            "them: choose another --out"
        ) from None
    present = {storage.normalise(u) for u in existing}  # local listings are absolute paths
    return splits, [u for u in owned if storage.normalise(u) in present]


def write_pack(spec: PackSpec, splits, stale: list[str]) -> tuple[dict, float]:
    """Delete ``stale`` (the old pack's files, as ``check_inputs`` found them), then pack ``splits.root`` into
    ``spec.out``. Returns (the pack's index, seconds)."""
    from tqdm import tqdm

    out = spec.out.rstrip("/")
    if stale:  # the old pack's pack.json first (a half-deleted pack never reads as finished), then its shards
        log.info("--overwrite: deleting the old pack at %s (%d objects)", out, len(stale))
        storage.delete_files(stale)

    t0 = time.perf_counter()
    with tqdm(unit="file", desc=f"pack {splits.root} -> {out}", disable=None) as bar:
        index = pack_tree(splits.root, out, shard_bytes=int(spec.shard_mb * 2**20), layout=spec.layout,
                          progress=bar.update)  # fmt: skip
    return index, time.perf_counter() - t0


def check_pack(spec: PackSpec, splits) -> None:
    """The pack at ``spec.out`` reads back as the same splits as the source (and, with ``spec.verify``, holds the same
    bytes for every image); ``PackError`` / ``LayoutError`` / ``StorageError`` otherwise."""
    out = spec.out.rstrip("/")
    packed = read_layout(out, spec.layout)
    if relative_splits(packed, packed.root) != relative_splits(splits, splits.root):
        raise PackError(f"{out} does not read back as the same splits as {splits.root}")
    if spec.verify:
        records = packed.train + packed.query + packed.gallery + (packed.val or [])
        for start in range(0, len(records), 256):
            part = records[start : start + 256]
            got = read_record_bytes(part)
            source = {r.path: storage.join(splits.root, r.path[len(packed.root) + 1 :]) for r in part}
            want = storage.read_many(source.values())
            differ = [p for p, url in source.items() if got[p] != want[url]]
            if differ:
                raise PackError(f"{out}: the packed bytes of {differ[0]} differ from {source[differ[0]]}")
