"""Train ID-CondenseNet or the Dual-Stream CNN with the distractor class on Ray Train + DeepSpeed; register it in MLflow.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train_reid.py \
        --config configs/reid_msmt17.yaml --set distractors.uri=s3://my-reid-data/distractors/dcgan-v3
    python jobs/train_reid.py --config configs/reid_demo.yaml --smoke-test      # local Ray, or RAY_ADDRESS

Everything that can be wrong with the inputs (config, dataset, distractor set, S3, MLflow) fails here, in one line
``error: ...`` with exit code 2, before Ray starts. Running again with the same ``run.name`` resumes from the run's last
checkpoint and continues its MLflow run.

After training, the driver loads the final weights; for CondenseNet it applies any condensing stage still due
(``finish_condensation``) and converts the model to its deploy form (``convert``: index-select + group convolution),
checking that the converted model's features equal the trained model's. It then evaluates the deploy model on
query/gallery (Rank-1/5/10, mAP, mINP; FLIMA also ID precision / recall / F1), counts its FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` (one image; FLOPs = 2 × multiply-adds), logs it to MLflow as a feature
model (images -> L2-normalised features) with parameters and metrics, registers it with alias ``candidate``, and
logs a TorchScript export (and an ONNX export when it exports cleanly) as artifacts under ``export/``
(``tracking.exports`` chooses them).

The registered model takes (N, 3, H, W) images normalised with the ImageNet mean/std (``build_transforms``); the
Dual-Stream model takes (N, 6, S, S): the person image and its face crop stacked on channels (zeros: no face).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, ReidJobConfig, load_config  # noqa: E402
from reid_core.data.training_set import describe_training_split  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import pipeline  # noqa: E402

log = logging.getLogger("train_reid")

SMOKE_TEST = [
    "optim.epochs=2",
    "optim.identities_per_batch=4",
    "optim.images_per_identity=4",
    "data.max_images=128",
    "distractors.max_images=64",
    "distractors.per_batch=4",
    "eval.batch_size=64",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="configs/reid_msmt17.yaml", help="YAML file (default configs/reid_msmt17.yaml)"
    )
    parser.add_argument("--model", help="shortcut for --set model.name=... (condensenet74, dual_stream, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=0.05")
    parser.add_argument("--smoke-test", action="store_true", help="2 tiny epochs: checks the whole path in minutes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    overrides = (SMOKE_TEST if args.smoke_test else []) + ([f"model.name={args.model}"] if args.model else [])
    try:
        cfg = load_config(ReidJobConfig, args.config, overrides + args.set)
        pre = pipeline.preflight_reid(cfg)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Logging starts after the checks, so that a refused input is exactly one line on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    mlflow_uri, training = pre.mlflow_uri, pre.training
    print(describe_training_split(pre.splits), flush=True)  # before any cluster time is spent

    try:
        out = pipeline.run_reid(cfg, pre)
    except pipeline.PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    run_id, final, fit_seconds = out.run_id, out.final, out.fit_seconds

    m = final.metrics
    art = tracking.artifact_uri(mlflow_uri, run_id)
    print("\n=== train_reid summary ===")
    print(f"MLflow run:        {run_id} ({mlflow_uri}, experiment {cfg.tracking.experiment!r})")
    print(f"registered model:  {cfg.tracking.registered_model} version {final.version} "
          f"(alias @{cfg.tracking.alias}; converted={final.converted})")  # fmt: skip
    print(f"training split:    {describe_training_split(pre.splits).removeprefix('training split: ')}")
    print(f"training data:     {training.num_real} images of {training.num_classes} identities + "
          f"{training.num_generated} distractors ({pre.per_batch} per batch, loss {cfg.loss.mode})")  # fmt: skip
    print(f"retrieval:         Rank-1 {m['rank1']:.4f}  Rank-5 {m['rank5']:.4f}  Rank-10 {m['rank10']:.4f}  "
          f"mAP {m['mAP']:.4f}  mINP {m['mINP']:.4f}  ({int(m['num_valid_queries'])} queries)")  # fmt: skip
    if "f1_macro" in m:
        print(f"ID classification: P {m['precision_macro']:.4f}  R {m['recall_macro']:.4f}  F1 {m['f1_macro']:.4f}")
    print(f"model:             {m['params'] / 1e6:.3f} M parameters, {m['flops'] / 1e6:.1f} MFLOPs per image "
          f"(training form {m['params_training_form'] / 1e6:.3f} M, {m['flops_training_form'] / 1e6:.1f} MFLOPs)")  # fmt: skip
    print(f"exports:           {art}/export/ ({', '.join(final.exports) or 'none'})")
    print(f"checkpoint:        {out.checkpoint.path}")
    print(f"time:              {fit_seconds:.1f} s training, {final.seconds:.1f} s conversion + evaluation")
    last = {k: round(v, 4) for k, v in out.last_metrics.items() if isinstance(v, float | int)}
    print(f"last epoch:        {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
