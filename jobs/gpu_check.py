"""`make gpu-check`: is this GPU node ready for a long job? One command, at most 8 minutes on one GPU.

It runs one Ray Train worker (1 GPU, every CPU of the node) with DeepSpeed engines built exactly as the jobs build
them (``reid_core.train.deepspeed.deepspeed_config``, ``reid_core.train.steps.gan_step``, the re-ID step of
``train_reid_loop``), on data it synthesises itself (no S3, no MLflow), and reports:

- the environment: torch, CUDA, NCCL, bf16 support, the GPU, DeepSpeed and which of its ops are compatible;
- images/s of the DC-GAN step at 128×128 (the recipe of configs/gan.yaml: width 64, batch 64, bf16, ZeRO-2);
- images/s of the CondenseNet-74 training step at 256×128 (configs/reid_msmt17.yaml: 16×4 + 32, bf16, ZeRO-1);
- images/s of the training loader (decode + augment of synthetic JPEGs) with the node's CPUs;
- Δ's share of a guided GAN step (the face detector on every generated batch, its threads on the node's CPUs);
- images/s of the converted (deploy) CondenseNet-74, contiguous and channels_last;
- the evaluation (``evaluate_rank``) at MSMT17 scale, 11,659 × 82,161 × 512-d, on the GPU.

It writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``gpu-check/``). Without a GPU (or with
``--dry``) it runs the same code paths at tiny sizes on the CPU, in fp32 over gloo: a smoke test of the script
(tests/test_gpu_check.py), whose figures say nothing about a GPU.

    python jobs/gpu_check.py [--out DIR] [--dry] [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from reid_core.workflows.node_check import failures, run_check  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for gpu_check.json / .md")
    parser.add_argument("--dry", action="store_true", help="the CPU dry mode even where a GPU is present")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per training section")
    parser.add_argument("--loader-workers", type=int, default=None, help="loader processes (default: CPUs − 2)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 1:
        print(f"error: --steps {args.steps} must be >= 1", file=sys.stderr)
        return 2
    if not args.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch: running the CPU dry mode", file=sys.stderr)
    results = run_check(out_dir=args.out, dry=args.dry, steps=args.steps, loader_workers=args.loader_workers)
    print((args.out / "gpu_check.md").read_text())
    bad = failures(results)
    for line in bad:
        print(f"error: gpu-check section {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
