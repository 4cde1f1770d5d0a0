"""Write a small synthetic re-ID dataset in a real layout to S3 or a local folder.

    python jobs/make_dataset.py --layout msmt17 --ids 40 --cameras 4 --out s3://reid-data/synthetic/msmt17

Person-like images with per-identity clothing and per-camera illumination; a share of them carry a real face
(see reid_core/data/synthetic.py), so that the face detector's Δ is meaningful.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage  # noqa: E402
from reid_core.data import synthetic  # noqa: E402

LAYOUT_WRITERS = {"msmt17": synthetic.write_msmt17}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="msmt17", choices=sorted(LAYOUT_WRITERS))
    parser.add_argument("--out", required=True, help="s3://bucket/prefix or a local folder")
    parser.add_argument("--ids", type=int, default=40, help="identities (train and test together)")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--images-per-id", type=int, default=12)
    parser.add_argument("--face-share", type=float, default=0.5, help="share of images with a real face")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty location")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        spec = synthetic.SyntheticSpec(
            ids=args.ids, cameras=args.cameras, images_per_id=args.images_per_id, face_share=args.face_share,
            seed=args.seed,
        )  # fmt: skip
        storage.check_location(args.out)
        if not args.overwrite and storage.exists(args.out) and storage.list_files(args.out):
            print(f"error: {args.out} is not empty; pass --overwrite to write into it", file=sys.stderr)
            return 2
    except (ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    pending: dict[str, bytes] = {}

    def write(rel: str, data: bytes) -> None:
        pending[storage.join(args.out, rel)] = data
        if len(pending) >= 256:  # bounded memory, many requests in flight per batch
            storage.write_many(pending)
            pending.clear()

    t0 = time.perf_counter()
    total = args.ids * args.images_per_id
    with tqdm(total=total, unit="img", desc=f"{args.layout} -> {args.out}", disable=None) as bar:
        counts = LAYOUT_WRITERS[args.layout](spec, write, progress=bar.update)
    storage.write_many(pending)
    print(
        f"wrote {total} images ({', '.join(f'{k} {v}' for k, v in counts.items())}) to {args.out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
