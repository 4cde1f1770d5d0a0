"""Search the face-guidance weights λ1, λ2 with Ray Tune; every trial runs GAN -> distractors -> re-ID -> Rank-1/mAP.

    python jobs/tune_lambdas.py --config configs/tune.yaml                  # local Ray, or RAY_ADDRESS
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune_lambdas.py --config configs/tune.yaml
    python jobs/tune_lambdas.py --config configs/tune.yaml --resume         # after an interrupted search

``search.mode: grid`` runs every (λ1, λ2, mode) of the lists (the paper's 3×3 grid {0, 0.025, 0.05}²); ``asha`` samples
``search.num_samples`` trials with λ uniform in [low, high] and stops the weak ones early (ASHA) on the re-ID
validation metric reported every ``reid.eval.every_epochs`` epochs. The objective (``search.objective``: mAP or rank1)
is the converted re-ID model's on query/gallery. Trials run ``search.max_concurrent_trials`` at a time (default: as
many as the cluster's CPUs/GPUs hold, a trial needing its own ``search.trial_cpus`` plus its biggest stage's workers).

MLflow (experiment ``tracking.experiment``): one parent run per search (named ``search.name``), a child run per trial
(params λ1, λ2, mode; metrics face_rate, rank1, mAP, mINP; tags linking its generator and re-ID model versions) with
the stages' runs nested under it; at the end the parent gets ``results/trials.csv``, ``results/trials.md`` and
``results/heatmap_<mode>.png`` (λ1 × λ2 heat maps of mAP and Rank-1, grid mode), and the best trial's re-ID model
version gets alias ``tracking.alias`` (``candidate``); review and promote it with ``jobs/review_models.py``.

The search's state lives in ``search.storage``/``search.name`` (S3 or a folder). ``--resume`` restores it
(``Tuner.restore``): finished trials are kept, unfinished ones start again and skip the stages they finished (a stage
cut short resumes from its last checkpoint); ``--resume-errored`` also retries trials that failed. Every input problem
(config key, λ outside [0, 1], unknown mode, missing dataset, unreachable S3 or MLflow, a search that exists or does
not) fails in one line ``error: ...`` with exit code 2 before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, TuneJobConfig, load_config  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402

# A 2×2 grid of the whole chain, 1 worker per stage, 1 GAN epoch and 2 re-ID epochs (validated after each): minutes.
SMOKE_TEST = [
    "search.mode=grid",
    "search.lambda1=[0.0,0.05]",
    "search.lambda2=[0.0,0.05]",
    "search.guidance_modes=[weighted]",
    "search.num_samples=1",
    "gan.optim.epochs=1",
    "gan.optim.batch_size=16",
    "gan.model.width=16",
    "gan.data.image_size=[64,32]",
    "gan.data.max_images=64",
    "gan.tracking.num_samples=16",
    "gan.scaling.num_workers=1",
    "gan.scaling.cpus_per_worker=0.9",
    "synthesis.num_images=32",
    "synthesis.batch_size=16",
    "synthesis.chunk_size=32",
    "synthesis.workers=1",
    "reid.optim.epochs=2",
    "reid.optim.identities_per_batch=4",
    "reid.optim.images_per_identity=4",
    "reid.data.max_images=128",
    "reid.distractors.max_images=32",
    "reid.distractors.per_batch=4",
    "reid.eval.batch_size=64",
    "reid.eval.every_epochs=1",
    "reid.scaling.num_workers=1",
    "reid.scaling.cpus_per_worker=0.9",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tune.yaml", help="YAML file (default configs/tune.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. search.objective=rank1 or gan.optim.epochs=50")  # fmt: skip
    parser.add_argument(
        "--smoke-test", action="store_true", help="a 2×2 grid of tiny chains: the whole path in minutes"
    )
    parser.add_argument("--resume", action="store_true", help="continue the interrupted search search.name")
    parser.add_argument("--resume-errored", action="store_true", help="with --resume: also retry trials that failed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    try:
        cfg = load_config(TuneJobConfig, args.config, (SMOKE_TEST if args.smoke_test else []) + args.set)
        from reid_core.workflows import search  # Ray Tune's imports: once the config is known to be good

        cfg = search.absolute_locations(cfg)
        pre = search.preflight(cfg, resume=args.resume, resume_errored=args.resume_errored)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Logging starts after the checks, so that a refused input is exactly one line on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    out = search.run_search(cfg, pre, resume=args.resume, resume_errored=args.resume_errored)
    mlflow_uri, parent_id, rows, best, concurrent = (pre.mlflow_uri, out["parent_id"], out["rows"], out["best"],
                                                     out["concurrent"])  # fmt: skip
    s, experiment = cfg.search, cfg.tracking.experiment

    art = tracking.artifact_uri(mlflow_uri, parent_id)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("complete", "stopped early", "error")}
    print("\n=== tune_lambdas summary ===")
    print(f"search:            {s.name!r} ({s.mode}, objective {s.objective}, {len(rows)} trials: "
          + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + f"; {concurrent} at a time)")  # fmt: skip
    print(f"MLflow run:        {parent_id} ({mlflow_uri}, experiment {experiment!r}); a child run per trial")
    print(f"results:           {art}/results/ (trials.csv, trials.md, heat maps)")
    print(search.markdown_table(rows))
    if best is None:
        print("best trial:        none completed the chain: nothing aliased")
        return 1
    print(f"best trial:        {best['trial_id']}: λ1 {best['lambda1']:g}, λ2 {best['lambda2']:g}, mode "
          f"{best['guidance_mode']}: Rank-1 {best['rank1']:.4f}, mAP {best['mAP']:.4f}, mINP {best['mINP']:.4f}")  # fmt: skip
    print(f"registered model:  {cfg.reid.tracking.registered_model} version {best['reid_version']} "
          f"(alias @{cfg.tracking.alias}); review: python jobs/review_models.py list")  # fmt: skip
    print(f"search state:      {storage.join(s.storage, s.name)} (--resume continues it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
