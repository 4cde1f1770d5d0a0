"""Pack a dataset tree into large tar shards with an index, for fast reading from S3 (``reid_core/data/shards.py``).

    python jobs/pack_dataset.py --src s3://reid-data/MSMT17_V1 --layout msmt17 --out s3://reid-data/packed/msmt17
    python jobs/pack_dataset.py --src s3://reid-data/synthetic/msmt17 --layout msmt17 --out /tmp/p --smoke-test

The source must read as ``--layout`` (checked first, as training would read it). Every file of the layout's folder
(images, list files, manifest) goes into ``<out>/shards/shard-NNNNN.tar`` in path order, ``--shard-mb`` each, then
``<out>/pack.json`` last. Train from the pack by pointing ``data.uri`` at ``<out>``: ``read_layout`` reads it as it
reads the source, with the same options and splits (docs/data.md). The job ends by reading the pack back and
comparing its splits with the source's; ``--verify`` (implied by ``--smoke-test``) also compares every image's bytes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage  # noqa: E402
from reid_core.config import LAYOUTS  # noqa: E402
from reid_core.data.layouts import LayoutError, read_layout  # noqa: E402
from reid_core.data.shards import PACK_INDEX, PackError, pack_files, pack_tree, read_record_bytes  # noqa: E402

SMOKE_SHARD_MB = 0.05  # several shards even for the tiny smoke dataset: the multi-shard path is what it checks


def _relative(splits, root: str) -> dict[str, list[tuple]]:
    """Each split's records with paths relative to ``root`` and without shard locations (comparable across forms)."""
    cut = len(root.rstrip("/")) + 1
    named = {"train": splits.train, "query": splits.query, "gallery": splits.gallery, "val": splits.val or []}
    return {
        name: [(r.path[cut:], r.pid, r.camid, r.face, r.orig_pid, r.session, r.frame, r.box) for r in records]
        for name, records in named.items()
    }


def check_inputs(args) -> tuple:
    """One-line errors before any work: locations, the source's layout, where the pack goes."""
    if not (args.shard_mb > 0 and math.isfinite(args.shard_mb)):  # NaN is not <= 0
        raise ValueError(f"--shard-mb {args.shard_mb}: expected a positive size in MB")
    src, out = args.src.rstrip("/"), args.out.rstrip("/")
    if storage.is_within(out, src):  # normalised first: X/./packed and X/a/../packed lie inside X too
        raise ValueError(f"--out {out} lies inside --src {src}: the pack would pack itself; choose another location")
    if storage.is_within(src, out):
        raise ValueError(f"--src {src} lies inside --out {out}: the pack would be written over its source")
    storage.check_location(src, must_exist=True)
    if storage.exists(storage.join(src, PACK_INDEX)):
        raise ValueError(f"--src {src} is already a pack ({PACK_INDEX}); train from it directly")
    splits = read_layout(src, args.layout)
    storage.check_location(out)
    existing = storage.list_files(out) if storage.exists(out) else []
    if not existing:
        return splits, []
    if not args.overwrite:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="the dataset: s3://bucket/prefix or a local folder")
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--out", required=True, help="where the pack goes: s3://bucket/prefix or a local folder")
    parser.add_argument("--shard-mb", type=float, default=None, help="shard size in MB (default 128)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the pack at --out: deletes only its own files, as its pack.json lists them",
    )
    parser.add_argument("--verify", action="store_true", help="compare every packed image's bytes with the source")
    parser.add_argument("--smoke-test", action="store_true", help=f"{SMOKE_SHARD_MB} MB shards, verified")
    args = parser.parse_args(argv)
    if args.shard_mb is None:
        args.shard_mb = SMOKE_SHARD_MB if args.smoke_test else 128.0
    args.verify = args.verify or args.smoke_test

    try:
        splits, stale = check_inputs(args)
    except (ValueError, storage.StorageError) as exc:  # LayoutError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # after the checks
    from tqdm import tqdm

    out = args.out.rstrip("/")
    if stale:  # the old pack's pack.json first (a half-deleted pack never reads as finished), then its shards
        logging.getLogger("pack_dataset").info("--overwrite: deleting the old pack at %s (%d objects)", out, len(stale))
        storage.delete_files(stale)

    t0 = time.perf_counter()
    with tqdm(unit="file", desc=f"pack {splits.root} -> {out}", disable=None) as bar:
        index = pack_tree(splits.root, out, shard_bytes=int(args.shard_mb * 2**20), layout=args.layout,
                          progress=bar.update)  # fmt: skip
    seconds = time.perf_counter() - t0

    try:
        packed = read_layout(out, args.layout)
        if _relative(packed, packed.root) != _relative(splits, splits.root):
            raise PackError(f"{out} does not read back as the same splits as {splits.root}")
        if args.verify:
            records = packed.train + packed.query + packed.gallery + (packed.val or [])
            for start in range(0, len(records), 256):
                part = records[start : start + 256]
                got = read_record_bytes(part)
                source = {r.path: storage.join(splits.root, r.path[len(packed.root) + 1 :]) for r in part}
                want = storage.read_many(source.values())
                differ = [p for p, url in source.items() if got[p] != want[url]]
                if differ:
                    raise PackError(f"{out}: the packed bytes of {differ[0]} differ from {source[differ[0]]}")
    except (LayoutError, PackError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    total = sum(s["size"] for s in index["shards"])
    print(
        f"packed {len(index['files'])} files of {splits.root} ({args.layout}) into {len(index['shards'])} shards "
        f"({total / 1e6:.1f} MB) at {out} in {seconds:.1f} s; read back as the same splits"
        + (", every image's bytes verified" if args.verify else "")
        + f"\ntrain from it with --set data.uri={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
