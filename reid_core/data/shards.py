"""Packed datasets: a dataset tree stored as a few large tar shards plus an index, read back as the same records.

Per-object reads of small JPEGs are latency-bound on S3 (tens of ms per GET, 126k objects for MSMT17). A *pack* holds
every file of a dataset tree (images *and* the list files / manifest) in tar shards of ``shard_bytes`` each:

    <out>/shards/shard-00000.tar, shard-00001.tar, ...    plain tar (readable with ``tar -x``), members in path order
    <out>/pack.json                                         the index, written last (a folder without it is unfinished)

``pack.json``: ``{"format": "reid-pack/1", "source": URL, "layout": name, "shard_bytes": int,
"shards": [{"name": "shards/shard-00000.tar", "size": bytes, "etag": S3 ETag or null, "files": count}, ...],
"files": {relative path: [shard number, data offset, size, crc32]}}``.

``read_layout(<out>, layout, **options)`` reads a pack exactly as it reads the original tree (the layout readers run on
the pack's file list and read the list files from the shards), so every option gives the same splits; each record's
``path`` is the image's path below the pack root (virtual: no object has it) and ``shard`` says where its bytes are.
``read_record_bytes`` fetches a batch of records either way: plain records one object each (``storage.read_many``),
packed ones by ranged reads of their shards, ranges closer than ``MAX_GAP`` merged into one request (members are in
path order, so the images of one identity, or a whole shard, come in one request), many requests in flight. Every
member's CRC-32 is checked: a shard overwritten after packing, even between two reads, raises ``ShardChangedError``
naming the shard, the member and the ETag then and now.

Plain Python plus ``reid_core.storage``: no Ray, no torch.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fsspec.utils import merge_offset_ranges

from reid_core import storage

log = logging.getLogger(__name__)

PACK_INDEX = "pack.json"
PACK_FORMAT = "reid-pack/1"
SHARD_DIR = "shards"
DEFAULT_SHARD_BYTES = 128 * 2**20
MAX_GAP = 256 * 2**10  # ranged reads of one shard closer than this are merged (reading the gap is cheaper than a GET)
MAX_BLOCK = 32 * 2**20  # ... into requests of at most this size (a whole small shard is one request)


class PackError(ValueError):
    """A pack that cannot be used (unfinished, unknown format, inconsistent index); the message says which file."""


class ShardChangedError(storage.StorageError):
    """A shard's bytes differ from what the index recorded: the object was overwritten after (or while) packing."""


@dataclass(frozen=True, slots=True)
class ShardLocation:
    """Where a packed file's bytes are: ``size`` bytes from ``offset`` of the shard object at ``url``.

    ``crc32`` is the bytes' zlib CRC-32; ``etag`` the shard's S3 ETag when it was packed (None on local disk).
    """

    url: str
    offset: int
    size: int
    crc32: int
    etag: str | None = None


@dataclass(frozen=True)
class Pack:
    """An opened pack: ``root`` URL, the ``index`` as stored, and ``locations`` (relative path -> ShardLocation)."""

    root: str
    index: dict
    locations: dict[str, ShardLocation]


def read_pack(root: str, settings: storage.S3Settings | None = None) -> Pack:
    """Open the pack at ``root`` (one GET of ``pack.json``).

    Raises:
        PackError: no ``pack.json`` (not a pack, or packing did not finish), another format, a malformed index.
    """
    url = storage.join(root, PACK_INDEX)
    try:
        index = json.loads(storage.read_bytes(url, settings))
    except FileNotFoundError:
        raise PackError(
            f"{root} is not a finished pack: no {PACK_INDEX} (jobs/pack_dataset.py writes it last)"
        ) from None
    except json.JSONDecodeError as exc:
        raise PackError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != PACK_FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise PackError(f"{url}: format {got!r}, expected {PACK_FORMAT!r}")
    try:
        shards = [(storage.join(root, s["name"]), s.get("etag"), int(s["size"])) for s in index["shards"]]
        locations = {}
        for rel, (number, offset, size, crc) in index["files"].items():
            shard_url, etag, shard_size = shards[number]
            if offset < 0 or size < 0 or offset + size > shard_size:
                raise PackError(f"{url}: {rel!r} lies outside shard {shard_url} ({shard_size} bytes)")
            locations[rel] = ShardLocation(shard_url, int(offset), int(size), int(crc), etag)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, PackError):
            raise
        raise PackError(f"{url}: malformed index ({type(exc).__name__}: {exc})") from None
    return Pack(root=root.rstrip("/"), index=index, locations=locations)


SHARD_NAME = re.compile(rf"{SHARD_DIR}/shard-[0-9]{{5}}\.tar")  # what ``_ShardWriter`` names its shards


def pack_files(root: str, settings: storage.S3Settings | None = None) -> list[str]:
    """The URLs of the files that make the pack at ``root``, as its index lists them: ``pack.json`` first, then its
    shards. What ``jobs/pack_dataset.py --overwrite`` deletes, and nothing else: no prefix, no listing.

    Raises:
        PackError: ``root`` holds no finished pack (``read_pack``), or its index names a shard that a pack job does
            not write (``shards/shard-NNNNN.tar``): such an index could point the deletion anywhere.
    """
    pack = read_pack(root, settings)
    urls = [storage.join(root, PACK_INDEX)]
    for shard in pack.index["shards"]:
        name = shard.get("name") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise PackError(
                f"{urls[0]}: shard name {name!r} is not one that jobs/pack_dataset.py writes ({SHARD_DIR}/shard-NNNNN.tar)"
            )
        urls.append(storage.join(root, name))
    return urls


# ------------------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """Appends files to an in-memory tar and uploads it as the next shard once it would exceed ``shard_bytes``."""

    def __init__(self, out: str, shard_bytes: int, settings: storage.S3Settings | None) -> None:
        self.out, self.shard_bytes, self.settings = out, shard_bytes, settings
        self.shards: list[dict] = []
        self.files: dict[str, list[int]] = {}
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, rel: str, data: bytes) -> None:
        if self._tar is not None and self._count and self._tar.offset + 1024 + len(data) > self.shard_bytes:
            self.finish_shard()
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)
        info = tarfile.TarInfo(rel)
        info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: the same input gives the same shard
        self._tar.addfile(info, io.BytesIO(data))
        # addfile leaves ``offset`` after the data and its padding to the 512-byte block: the data starts before that.
        data_offset = self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        self.files[rel] = [len(self.shards), data_offset, len(data), zlib.crc32(data)]
        self._count += 1

    def finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"{SHARD_DIR}/shard-{len(self.shards):05d}.tar"
        url = storage.join(self.out, name)
        storage.write_bytes(url, self._buf.getvalue(), self.settings)
        info = storage.object_info(url, self.settings)
        self.shards.append({"name": name, "size": info["size"], "etag": info["etag"], "files": self._count})
        log.info("wrote %s: %d files, %.1f MB", url, self._count, info["size"] / 1e6)
        self._buf, self._tar, self._count = None, None, 0


def pack_tree(
    source: str,
    out: str,
    *,
    rels: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    layout: str | None = None,
    read_batch: int = 256,
    settings: storage.S3Settings | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Pack every file below ``source`` (or the relative paths ``rels``) into tar shards below ``out``.

    Files are read ``read_batch`` at a time with many requests in flight and stored in path order (so an identity's
    images sit side by side), then ``pack.json`` is written last. Returns the index.
    """
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes={shard_bytes} must be positive")
    source = source.rstrip("/")
    if rels is None:
        prefix = (source if storage.is_s3(source) else storage.filesystem(source)[1]).rstrip("/") + "/"
        rels = [f[len(prefix) :] for f in storage.list_files(source, settings) if f.startswith(prefix)]
    rels = sorted(rels)
    if not rels:
        raise PackError(f"nothing to pack below {source}")
    writer = _ShardWriter(out, shard_bytes, settings)
    for start in range(0, len(rels), read_batch):
        part = rels[start : start + read_batch]
        data = storage.read_many([storage.join(source, rel) for rel in part], settings)
        for rel in part:
            writer.add(rel, data[storage.join(source, rel)])
        if progress is not None:
            progress(len(part))
    writer.finish_shard()
    index = {
        "format": PACK_FORMAT,
        "source": source,
        "layout": layout,
        "shard_bytes": shard_bytes,
        "shards": writer.shards,
        "files": writer.files,
    }
    storage.write_bytes(storage.join(out, PACK_INDEX), json.dumps(index, separators=(",", ":")).encode(), settings)
    return index


# ------------------------------------------------------------------------------------------------------- reading
def _changed(location: ShardLocation, what: str, settings: storage.S3Settings | None) -> ShardChangedError:
    try:
        now = storage.object_info(location.url, settings)
        state = f"ETag now {now['etag']}, {now['size']} bytes"
    except storage.StorageError as exc:
        state = str(exc)
    return ShardChangedError(
        f"shard {location.url} changed after it was packed (ETag in the index {location.etag}; {state}): {what}; "
        "pack the dataset again (jobs/pack_dataset.py --overwrite)"
    )


def read_members(
    locations: Sequence[ShardLocation],
    settings: storage.S3Settings | None = None,
    *,
    batch_size: int = 64,
    max_gap: int = MAX_GAP,
    names: Sequence[str] | None = None,
) -> list[bytes]:
    """The bytes of packed files, in the order of ``locations``: ranged reads, nearby ranges merged, up to
    ``batch_size`` requests in flight; each file's CRC-32 checked (``names`` label them in errors).

    Raises:
        ShardChangedError: a shard is shorter than the index says or a file's bytes do not match its CRC-32.
        storage.StorageError: a shard is missing or S3 fails.
    """
    if not locations:
        return []
    order = sorted(range(len(locations)), key=lambda i: (locations[i].url, locations[i].offset))
    paths, starts, ends = merge_offset_ranges(
        [locations[i].url for i in order],
        [locations[i].offset for i in order],
        [locations[i].offset + locations[i].size for i in order],
        max_gap=max_gap,
        max_block=MAX_BLOCK,
        sort=False,
    )
    try:
        blocks = storage.read_ranges(list(zip(paths, starts, ends, strict=True)), settings, batch_size=batch_size)
    except storage.RangeNotSatisfiableError as exc:
        loc = next(loc for loc in locations if loc.url == exc.url)
        raise _changed(loc, "it is shorter than the index says (a range starts past its end)", settings) from None
    out: list[bytes] = [b""] * len(locations)
    b = 0
    for i in order:
        loc = locations[i]
        while not (paths[b] == loc.url and starts[b] <= loc.offset and loc.offset + loc.size <= ends[b]):
            b += 1
        block = blocks[b]
        data = block[loc.offset - starts[b] : loc.offset - starts[b] + loc.size]
        name = names[i] if names is not None else f"bytes {loc.offset}..{loc.offset + loc.size}"
        if len(data) != loc.size:
            raise _changed(loc, f"{name} should be {loc.size} bytes at offset {loc.offset}, got {len(data)}", settings)
        if zlib.crc32(data) != loc.crc32:
            raise _changed(loc, f"the bytes of {name} do not match the index's CRC-32", settings)
        out[i] = bytes(data)
    return out


def read_record_bytes(
    records: Iterable, settings: storage.S3Settings | None = None, *, batch_size: int = 64
) -> dict[str, bytes]:
    """{record.path: bytes} for records of either form: plain ones (``shard`` None) one object each through
    ``storage.read_many``, packed ones through ``read_members``. Raises as those do (a missing plain object:
    ``FileNotFoundError`` naming it)."""
    plain: list[str] = []
    packed: dict[str, ShardLocation] = {}
    for r in records:
        if r.shard is None:
            plain.append(r.path)
        else:
            packed[r.path] = r.shard
    out = storage.read_many(dict.fromkeys(plain), settings, batch_size=batch_size) if plain else {}
    if packed:
        names = list(packed)
        got = read_members(list(packed.values()), settings, batch_size=batch_size, names=names)
        out.update(zip(names, got, strict=True))
    return out


__all__ = [
    "DEFAULT_SHARD_BYTES",
    "PACK_FORMAT",
    "PACK_INDEX",
    "pack_files",
    "Pack",
    "PackError",
    "ShardChangedError",
    "ShardLocation",
    "pack_tree",
    "read_members",
    "read_pack",
    "read_record_bytes",
]
