"""Synthesise the distractor set: N images from a registered DC-GAN generator, written with a manifest to S3.

    python jobs/synthesize.py --model models:/reid-dcgan-generator@candidate --num-images 48000 \
        --out s3://reid-data/distractors/dcgan-v3
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/synthesize.py --model ... --out ...

The model URI (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) is resolved once; the pinned version is used
throughout. Everything that can be wrong with the inputs (model URI, MLflow, output location) fails here, in one line
``error: ...`` with exit code 2, before Ray starts. Design and measurements: docs/distractors.md.

The set's format, its determinism, how the work is cut into Ray tasks and its MLflow record:
``reid_core/workflows/distractors.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows.distractors import (  # noqa: E402
    IMAGE_FORMATS,
    MANIFEST_FILE,
    METADATA_FILE,
    SynthesisSpec,
    preflight,
    run_synthesis,
)

SMOKE_TEST = {"num_images": 64, "batch_size": 16, "chunk_size": 32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--num-images", type=int, default=48_000, help="N (default 48000, the paper's recipe)")
    parser.add_argument("--out", required=True, help="s3://bucket/prefix (or a local folder) for the distractor set")
    parser.add_argument("--batch-size", type=int, default=64, help="images per generator forward pass (default 64)")
    parser.add_argument("--chunk-size", type=int, default=512, help="images per Ray task; a multiple of --batch-size")
    parser.add_argument("--workers", type=int, default=0, help="Ray tasks at a time; 1 = in this process; 0 = all CPUs")
    parser.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i)")
    parser.add_argument("--format", dest="image_format", choices=sorted(IMAGE_FORMATS), default="jpeg")
    parser.add_argument("--batch-norm", choices=["standing", "running"], default="standing",
                        help="standing: recomputed statistics (default); running: the registered ones")  # fmt: skip
    parser.add_argument("--experiment", default="distractors", help="MLflow experiment (default 'distractors')")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default distractors-NAME-vVERSION-nN-sSEED)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow server (default MLFLOW_TRACKING_URI / .stack/env)")
    parser.add_argument("--overwrite", action="store_true", help="replace the distractor set already at --out")
    parser.add_argument("--smoke-test", action="store_true", help="64 images in 2 chunks: checks the whole path")
    args = parser.parse_args(argv)
    if args.smoke_test:  # the smoke test's sizes are defaults: an explicit --num-images (...) still wins
        parser.set_defaults(**SMOKE_TEST)
        args = parser.parse_args(argv)
    return args


def spec_from_args(args: argparse.Namespace) -> SynthesisSpec:
    return SynthesisSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthesisSpec)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    load_env_defaults()
    spec = spec_from_args(args)
    try:
        pre = preflight(spec)
    except (storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mlflow_uri, ref = pre.mlflow_uri, pre.ref
    done = run_synthesis(spec, pre)
    run_id, metadata = done["run_id"], done["metadata"]

    art = tracking.artifact_uri(mlflow_uri, run_id)
    print("\n=== synthesize summary ===")
    print(f"distractor set:    {args.out}  ({metadata['num_images']} {args.image_format.upper()} images "
          f"{metadata['image_size'][0]}×{metadata['image_size'][1]}, {METADATA_FILE}, {MANIFEST_FILE})")  # fmt: skip
    print(f"generator:         {ref.uri} ({args.model}; run {ref.run_id})")
    print(
        f"face rate:         {metadata['face_rate']:.4f} ({metadata['faces']} of {metadata['num_images']} with a face)"
    )
    print(f"MLflow run:        {run_id} ({mlflow_uri}, experiment {args.experiment!r})")
    print(f"sample grid:       {art}/samples/distractors.png")
    print(f"time:              {metadata['seconds']:.1f} s ({done['mode']}, "
          f"{metadata['num_images'] / metadata['seconds']:.1f} images/s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
