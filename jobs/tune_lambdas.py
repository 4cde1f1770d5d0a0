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
import csv
import dataclasses
import io
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from reid_core import storage, tracking  # noqa: E402
from reid_core.config import ConfigError, TuneJobConfig, flatten, load_config, to_dict  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import pipeline  # noqa: E402

log = logging.getLogger("tune_lambdas")

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


def absolute_locations(cfg: TuneJobConfig) -> TuneJobConfig:
    """Local folders made absolute: Tune runs each trial in its own working directory."""

    def fix(url):
        return url if url is None or storage.is_s3(url) else os.path.abspath(url)

    gan, reid, search, synth = cfg.gan, cfg.reid, cfg.search, cfg.synthesis
    return dataclasses.replace(
        cfg,
        search=dataclasses.replace(search, storage=fix(search.storage)),
        synthesis=dataclasses.replace(synth, out=fix(synth.out)),
        gan=dataclasses.replace(gan, data=dataclasses.replace(gan.data, uri=fix(gan.data.uri)),
                                run=dataclasses.replace(gan.run, storage=fix(gan.run.storage))),
        reid=dataclasses.replace(reid, data=dataclasses.replace(reid.data, uri=fix(reid.data.uri)),
                                 run=dataclasses.replace(reid.run, storage=fix(reid.run.storage))),
    )  # fmt: skip


def preflight(cfg: TuneJobConfig, args: argparse.Namespace) -> dict:
    """Check both training stages' data, storage and MLflow, the synthesis output and the search's state before Ray
    starts. The re-ID stage is checked without distractors (each trial makes its own set)."""
    from ray.tune import Tuner

    from reid_core.workflows.search import tune_storage

    if args.resume_errored and not args.resume:
        raise ConfigError("--resume-errored: only with --resume (it retries the failed trials of an earlier search)")
    s = cfg.search
    first = dataclasses.replace(cfg.gan.guidance, lambda1=s.lambda1[0], lambda2=s.lambda2[0], mode=s.guidance_modes[0])
    mlflow_uri, _ = pipeline.preflight_gan(dataclasses.replace(cfg.gan, guidance=first))
    reid = dataclasses.replace(cfg.reid, distractors=dataclasses.replace(cfg.reid.distractors, uri=None))
    pipeline.preflight_reid(reid)
    settings = storage.resolve_settings(cfg.gan.storage.endpoint_url, cfg.gan.storage.region)
    storage.check_location(cfg.synthesis.out, settings)
    storage.check_location(s.storage, settings)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri or mlflow_uri)
    tracking.check_server(uri)
    _, fs, experiment_path = tune_storage(cfg, settings)
    exists = Tuner.can_restore(experiment_path, storage_filesystem=fs)
    where = storage.join(s.storage, s.name)
    if args.resume and not exists:
        raise ConfigError(f"--resume: no search {s.name!r} to resume at {where} (search.name / search.storage)")
    if not args.resume and exists:
        raise ConfigError(f"search.name: a search {s.name!r} already exists at {where}: pass --resume to continue it, "
                          "or choose another search.name")  # fmt: skip
    return {"mlflow_uri": uri, "settings": settings}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    try:
        cfg = load_config(TuneJobConfig, args.config, (SMOKE_TEST if args.smoke_test else []) + args.set)
        cfg = absolute_locations(cfg)
        pre = preflight(cfg, args)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        # One line that says what to fix; nothing has started yet.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Logging starts after the checks, so that a refused input is exactly one line on stderr.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    mlflow_uri, settings = pre["mlflow_uri"], pre["settings"]

    import ray

    from reid_core.runtime import init_ray_for_job
    from reid_core.workflows import search

    init_ray_for_job(use_gpu=cfg.gan.scaling.use_gpu or cfg.reid.scaling.use_gpu)
    needs = search.trial_resources(cfg)
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    concurrent = cfg.search.max_concurrent_trials or search.concurrent_trials(cluster, needs)
    log.info("each trial needs %s at its peak; the cluster has %s: %d trial(s) at a time", needs,
             {k: cluster.get(k, 0) for k in needs}, concurrent)  # fmt: skip

    s, experiment = cfg.search, cfg.tracking.experiment
    parent = tracking.find_runs(mlflow_uri, experiment, {search.SEARCH_TAG: s.name, "tune.role": "search"})
    if args.resume and parent:
        parent_id = parent[0]["run_id"]
        tracking.reopen_run(mlflow_uri, parent_id)
        log.info("resuming search %r: MLflow run %s", s.name, parent_id)
    else:
        params = {**flatten(to_dict(cfg)), "max_concurrent_trials_used": concurrent}
        parent_id = tracking.start_run(mlflow_uri, experiment, s.name, params,
                                       tags={"job": "tune_lambdas", search.SEARCH_TAG: s.name, "tune.role": "search",
                                             "search.mode": s.mode, "objective": s.objective})  # fmt: skip
    tuner = search.build_tuner(cfg, mlflow_uri=mlflow_uri, parent_run_id=parent_id, max_concurrent=concurrent,
                               settings=settings, restore=args.resume, resume_errored=args.resume_errored)  # fmt: skip
    try:
        results = tuner.fit()
        rows = search.result_rows(results)
        close_unfinished_trials(mlflow_uri, experiment, s.name, rows)
        best = report(cfg, mlflow_uri, parent_id, rows)
    except BaseException:
        tracking.set_terminated(mlflow_uri, parent_id, "FAILED")
        raise
    tracking.set_terminated(mlflow_uri, parent_id, "FINISHED")

    art = tracking.artifact_uri(mlflow_uri, parent_id)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("complete", "stopped early", "error")}
    print("\n=== tune_lambdas summary ===")
    print(f"search:            {s.name!r} ({s.mode}, objective {s.objective}, {len(rows)} trials: "
          + ", ".join(f"{n} {k}" for k, n in counts.items() if n) + f"; {concurrent} at a time)")  # fmt: skip
    print(f"MLflow run:        {parent_id} ({mlflow_uri}, experiment {experiment!r}); a child run per trial")
    print(f"results:           {art}/results/ (trials.csv, trials.md, heat maps)")
    print(markdown_table(rows))
    if best is None:
        print("best trial:        none completed the chain: nothing aliased")
        return 1
    print(f"best trial:        {best['trial_id']}: λ1 {best['lambda1']:g}, λ2 {best['lambda2']:g}, mode "
          f"{best['guidance_mode']}: Rank-1 {best['rank1']:.4f}, mAP {best['mAP']:.4f}, mINP {best['mINP']:.4f}")  # fmt: skip
    print(f"registered model:  {cfg.reid.tracking.registered_model} version {best['reid_version']} "
          f"(alias @{cfg.tracking.alias}); review: python jobs/review_models.py list")  # fmt: skip
    print(f"search state:      {storage.join(s.storage, s.name)} (--resume continues it)")
    return 0


def close_unfinished_trials(mlflow_uri: str, experiment: str, search_name: str, rows: list[dict]) -> None:
    """Trials stopped early (ASHA) or failed leave their MLflow runs (child and stages) RUNNING: close them."""
    from reid_core.workflows.search import SEARCH_TAG, TRIAL_TAG

    for row in rows:
        if row["status"] == "complete":
            continue
        status = "KILLED" if row["status"] == "stopped early" else "FAILED"
        for run in tracking.find_runs(mlflow_uri, experiment, {SEARCH_TAG: search_name, TRIAL_TAG: row["trial_id"]}):
            if run["status"] == "RUNNING":
                tracking.set_terminated(mlflow_uri, run["run_id"], status)


def markdown_table(rows: list[dict]) -> str:
    from reid_core.workflows.search import RESULT_COLUMNS

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if value == value else "–"
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(RESULT_COLUMNS) + " |", "|" + "---|" * len(RESULT_COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in RESULT_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def report(cfg: TuneJobConfig, mlflow_uri: str, parent_id: str, rows: list[dict]) -> dict | None:
    """Results table (CSV, Markdown) and heat maps on the parent run; alias the best trial's re-ID model version."""
    import numpy as np

    from reid_core.viz import lambda_heatmap_png
    from reid_core.workflows.search import RESULT_COLUMNS, best_row

    s = cfg.search
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tracking.log_text(mlflow_uri, parent_id, text.getvalue(), "results/trials.csv")
    tracking.log_text(mlflow_uri, parent_id, markdown_table(rows) + "\n", "results/trials.md")
    if s.mode == "grid":
        l1, l2 = sorted(set(s.lambda1)), sorted(set(s.lambda2))
        with tempfile.TemporaryDirectory() as tmp:
            for mode in s.guidance_modes:
                grids = {}
                for key, title in (("mAP", "mAP"), ("rank1", "Rank-1")):
                    cells = np.full((len(l1), len(l2)), np.nan)
                    for i, a in enumerate(l1):
                        for j, b in enumerate(l2):
                            values = [r[key] for r in rows if r["status"] == "complete" and r["guidance_mode"] == mode
                                      and r["lambda1"] == a and r["lambda2"] == b]  # fmt: skip
                            cells[i, j] = float(np.mean(values)) if values else np.nan  # mean over repeats
                    grids[title] = cells
                path = lambda_heatmap_png(grids, l1, l2, Path(tmp) / f"heatmap_{mode}.png",
                                          title=f"{s.name}: guidance {mode}, {cfg.reid.data.uri}")  # fmt: skip
                tracking.log_artifact_file(mlflow_uri, parent_id, path, "results")
    best = best_row(rows, s.objective)
    if best is not None:
        model = cfg.reid.tracking.registered_model
        tracking.set_model_alias(mlflow_uri, model, cfg.tracking.alias, best["reid_version"])
        tracking.set_run_tags(mlflow_uri, parent_id, {"best.trial_id": best["trial_id"], "best.run_id": best["run_id"],
                                                      "best.lambda1": best["lambda1"], "best.lambda2": best["lambda2"],
                                                      "best.guidance_mode": best["guidance_mode"],
                                                      "best.model": f"models:/{model}/{best['reid_version']}"})  # fmt: skip
        tracking.set_run_tags(mlflow_uri, best["run_id"], {"tune.best": "true"})
        tracking.log_metrics(mlflow_uri, parent_id, {f"best_{k}": best[k] for k in ("rank1", "mAP", "mINP")}, step=0)
    tracking.log_metrics(mlflow_uri, parent_id, {"trials_complete": sum(r["status"] == "complete" for r in rows),
                                                 "trials": len(rows)}, step=0)  # fmt: skip
    return best


if __name__ == "__main__":
    sys.exit(main())
