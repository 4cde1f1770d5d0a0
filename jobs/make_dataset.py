"""Write a small synthetic re-ID dataset in a real layout (MSMT17 V1, Market-1501, FLIMA) to S3 or a local folder.

    python jobs/make_dataset.py --layout msmt17 --ids 40 --cameras 4 --out s3://reid-data/synthetic/msmt17
    python jobs/make_dataset.py --layout flima --ids 6 --sessions 4 --images-per-id 40 --out s3://reid-data/flima
    python jobs/make_dataset.py --layout market1501 --out /tmp/market --smoke-test   # tiny, then read back

Person-like images with per-identity clothing and per-camera illumination; a share of them carry a real face
(see reid_core/data/synthetic.py), so that the face detector's Δ is meaningful; FLIMA's face tag says which.
The same arguments and seed give the same bytes. The list files / manifest are written last, and the job ends by
reading the tree back with ``read_layout`` and printing its summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage  # noqa: E402
from reid_core.data import synthetic  # noqa: E402

# --smoke-test: about the smallest dataset every layout accepts (FLIMA needs 4 images per person and session).
SMOKE_TEST = {"ids": 4, "cameras": 2, "images_per_id": 8, "sessions": 2}
WRITE_BATCH = 256  # objects buffered before one concurrent upload: bounded memory, many requests in flight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="msmt17", choices=sorted(synthetic.PLANS))
    parser.add_argument("--out", required=True, help="s3://bucket/prefix or a local folder")
    parser.add_argument("--ids", type=int, default=40, help="identities (train and test together; FLIMA: known)")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--images-per-id", type=int, default=12)
    parser.add_argument("--sessions", type=int, default=3, help="FLIMA recording sessions")
    parser.add_argument("--face-share", type=float, default=0.5, help="share of images with a real face")
    parser.add_argument("--head-share", type=float, default=0.25,
                        help="head height / body height (0.4 keeps faces detectable at 128x64)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty location")
    parser.add_argument("--smoke-test", action="store_true", help="a tiny dataset (4 ids, 2 cameras), read back")
    args = parser.parse_args(argv)
    if args.smoke_test:  # the smoke test's sizes are defaults: an explicit --ids (...) still wins
        parser.set_defaults(**SMOKE_TEST)
        args = parser.parse_args(argv)

    try:
        spec = synthetic.SyntheticSpec(
            ids=args.ids, cameras=args.cameras, images_per_id=args.images_per_id, face_share=args.face_share,
            head_share=args.head_share, sessions=args.sessions, seed=args.seed,
        )  # fmt: skip
        items = synthetic.plan(spec, args.layout)
        storage.check_location(args.out)
        if not args.overwrite and storage.exists(args.out) and storage.list_files(args.out):
            print(f"error: {args.out} is not empty; pass --overwrite to write into it", file=sys.stderr)
            return 2
    except (ValueError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # after the checks
    from tqdm import tqdm

    from reid_core.data import read_layout

    pending: dict[str, bytes] = {}

    def write(rel: str, data: bytes) -> None:
        pending[storage.join(args.out, rel)] = data
        if len(pending) >= WRITE_BATCH:
            storage.write_many(pending)
            pending.clear()

    t0 = time.perf_counter()
    with tqdm(total=len(items), unit="img", desc=f"{args.layout} -> {args.out}", disable=None) as bar:
        synthetic.write_images(spec, items, write, progress=bar.update)
        storage.write_many(pending)
    # The lists / manifest last, once every image is stored: a tree without them is an unfinished one.
    storage.write_many(
        {storage.join(args.out, rel): data for rel, data in synthetic.index_files(args.layout, items).items()}
    )
    counts = Counter(item.split for item in items)
    seconds = time.perf_counter() - t0
    splits = read_layout(args.out, args.layout)
    print(
        f"wrote {len(items)} images ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}) to {args.out} "
        f"in {seconds:.1f} s; read back:\n{splits.summary()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
