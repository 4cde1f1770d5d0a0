"""Pack a dataset tree into large tar shards with an index, for fast reading from S3 (``reid_core/data/shards.py``).

    python jobs/pack_dataset.py --src s3://reid-data/MSMT17_V1 --layout msmt17 --out s3://reid-data/packed/msmt17
    python jobs/pack_dataset.py --src s3://reid-data/synthetic/msmt17 --layout msmt17 --out /tmp/p --smoke-test

The source must read as ``--layout`` (checked first, as training would read it). Every file of the layout's folder
(images, list files, manifest) goes into ``<out>/shards/shard-NNNNN.tar`` in path order, ``--shard-mb`` each, then
``<out>/pack.json`` last. Train from the pack by pointing ``data.uri`` at ``<out>``: ``read_layout`` reads it as it
reads the source, with the same options and splits (docs/data.md). The job ends by reading the pack back and
comparing its splits with the source's; ``--verify`` (implied by ``--smoke-test``) also compares every image's bytes.
The checks, the packing and the read-back: ``reid_core/workflows/packing.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage  # noqa: E402
from reid_core.config import LAYOUTS  # noqa: E402
from reid_core.data.layouts import LayoutError  # noqa: E402
from reid_core.data.shards import PackError  # noqa: E402
from reid_core.workflows.packing import PackSpec, check_inputs, check_pack, write_pack  # noqa: E402

SMOKE_SHARD_MB = 0.05  # several shards even for the tiny smoke dataset: the multi-shard path is what it checks


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

    spec = PackSpec(src=args.src, layout=args.layout, out=args.out, shard_mb=args.shard_mb, overwrite=args.overwrite,
                    verify=args.verify)  # fmt: skip
    try:
        splits, stale = check_inputs(spec)
    except (ValueError, storage.StorageError) as exc:  # LayoutError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # after the checks
    index, seconds = write_pack(spec, splits, stale)
    try:
        check_pack(spec, splits)
    except (LayoutError, PackError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    total, out = sum(s["size"] for s in index["shards"]), spec.out.rstrip("/")
    print(
        f"packed {len(index['files'])} files of {splits.root} ({args.layout}) into {len(index['shards'])} shards "
        f"({total / 1e6:.1f} MB) at {out} in {seconds:.1f} s; read back as the same splits"
        + (", every image's bytes verified" if args.verify else "")
        + f"\ntrain from it with --set data.uri={out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
