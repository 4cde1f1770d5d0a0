"""What the distractors add: conditions × recipes × seeds of the re-ID stage as one Ray Tune grid, and the table.

    python jobs/ablation.py --config configs/ablation_demo.yaml          # local Ray, or RAY_ADDRESS
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/ablation.py --config configs/ablation.yaml
    python jobs/ablation.py --config configs/ablation_demo.yaml --resume  # after an interrupted run

Every trial trains and evaluates one re-ID model (``pipeline.run_reid``): condition ``none`` (no distractors),
``distractor_class`` (N+1 classes) or ``lsro``; recipe ``weak`` (the ``reid`` section) or ``strong`` (with the
``strong`` overrides); one seed (``run.seed``). All trials read the one distractor set ``reid.distractors.uri``.

Output (``reid_core/workflows/ablation.py``), printed and in MLflow (experiment ``tracking.experiment``, one parent run named
``grid.name``, a child run per trial with the re-ID run nested under it): Rank-1, mAP and mINP as mean ± sd over the
seeds per recipe and condition, and every distractor condition's paired difference against ``none`` on the same seeds,
mean ± sd; the parent run gets ``results/ablation.md``, ``results/trials.csv`` and ``results/ablation.png``.

The grid's state lives in ``grid.storage``/``grid.name``; ``--resume`` restores it (finished trials are kept, the
others start again and a training cut short resumes from its last checkpoint). Every input problem fails in one line
``error: ...`` with exit code 2 before Ray starts.
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

from reid_core import storage, tracking, viz  # noqa: E402
from reid_core.config import ConfigError, flatten, load_config, to_dict  # noqa: E402
from reid_core.runtime import load_env_defaults  # noqa: E402
from reid_core.workflows import ablation, pipeline  # noqa: E402

log = logging.getLogger("ablation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/ablation_demo.yaml", help="YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. grid.seeds=[0,1,2,3] or reid.optim.epochs=20")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the interrupted grid grid.name")
    parser.add_argument("--resume-errored", action="store_true", help="with --resume: also retry trials that failed")
    return parser.parse_args(argv)


def absolute_locations(cfg: ablation.AblationJobConfig) -> ablation.AblationJobConfig:
    """Local folders made absolute: Tune runs each trial in its own working directory."""

    def fix(url):
        return url if url is None or storage.is_s3(url) or "://" in url else os.path.abspath(url)

    r = cfg.reid
    reid = dataclasses.replace(
        r, data=dataclasses.replace(r.data, uri=fix(r.data.uri)), run=dataclasses.replace(r.run, storage=fix(r.run.storage)),
        distractors=dataclasses.replace(r.distractors, uri=fix(r.distractors.uri)),
        model=dataclasses.replace(r.model, pretrained=fix(r.model.pretrained)),
    )  # fmt: skip
    strong = {k: (fix(v) if k == "model.pretrained" and isinstance(v, str) else v) for k, v in cfg.strong.items()}
    return dataclasses.replace(cfg, reid=reid, strong=strong,
                               grid=dataclasses.replace(cfg.grid, storage=fix(cfg.grid.storage)))  # fmt: skip


def preflight(cfg: ablation.AblationJobConfig, args: argparse.Namespace) -> dict:
    """Each recipe's re-ID stage (data, the distractor set, a pretrained checkpoint, storage, MLflow) and the grid's
    state, before Ray starts."""
    from ray.tune import Tuner

    if args.resume_errored and not args.resume:
        raise ConfigError("--resume-errored: only with --resume (it retries the failed trials of an earlier grid)")
    pres = {}
    for recipe in cfg.grid.recipes:
        reid = ablation.recipe_config(cfg.reid, cfg.strong) if recipe == "strong" else cfg.reid
        if "none" in cfg.grid.conditions and len(cfg.grid.conditions) == 1:
            reid = dataclasses.replace(reid, distractors=dataclasses.replace(reid.distractors, uri=None))
        pres[recipe] = pipeline.preflight_reid(reid)
    mlflow_uri = tracking.resolve_tracking_uri(cfg.tracking.uri or pres[cfg.grid.recipes[0]]["mlflow_uri"])
    tracking.check_server(mlflow_uri)
    settings = pres[cfg.grid.recipes[0]]["settings"]
    storage.check_location(cfg.grid.storage, settings)
    _, fs, experiment_path = ablation.tune_storage(cfg, settings)
    exists = Tuner.can_restore(experiment_path, storage_filesystem=fs)
    where = storage.join(cfg.grid.storage, cfg.grid.name)
    if args.resume and not exists:
        raise ConfigError(f"--resume: no grid {cfg.grid.name!r} to resume at {where} (grid.name / grid.storage)")
    if not args.resume and exists:
        raise ConfigError(f"grid.name: a grid {cfg.grid.name!r} already exists at {where}: pass --resume to continue "
                          "it, or choose another grid.name")  # fmt: skip
    return {"mlflow_uri": mlflow_uri, "settings": settings}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_env_defaults()
    try:
        cfg = absolute_locations(load_config(ablation.AblationJobConfig, args.config, args.set))
        pre = preflight(cfg, args)
    except (ConfigError, storage.StorageError, tracking.TrackingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line that says what to fix; nothing has started yet
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    mlflow_uri, settings = pre["mlflow_uri"], pre["settings"]

    import ray

    from reid_core.runtime import init_ray_for_job
    from reid_core.workflows.search import concurrent_trials

    init_ray_for_job(use_gpu=cfg.reid.scaling.use_gpu)
    s = cfg.reid.scaling
    needs = {"CPU": cfg.grid.trial_cpus + s.num_workers * s.cpus_per_worker,
             **({"GPU": float(s.num_workers)} if s.use_gpu else {})}  # fmt: skip
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    concurrent = cfg.grid.max_concurrent_trials or concurrent_trials(cluster, needs)
    g, experiment = cfg.grid, cfg.tracking.experiment
    trials = len(g.conditions) * len(g.recipes) * len(g.seeds)
    log.info("%d trials (%d conditions × %d recipes × %d seeds), %d at a time", trials, len(g.conditions),
             len(g.recipes), len(g.seeds), concurrent)  # fmt: skip

    parent = tracking.find_runs(mlflow_uri, experiment, {ablation.ABLATION_TAG: g.name, "ablation.role": "grid"})
    if args.resume and parent:
        parent_id = parent[0]["run_id"]
        tracking.reopen_run(mlflow_uri, parent_id)
    else:
        parent_id = tracking.start_run(mlflow_uri, experiment, g.name, {**flatten(to_dict(cfg)),
                                                                        "max_concurrent_trials_used": concurrent},
                                       tags={"job": "ablation", ablation.ABLATION_TAG: g.name,
                                             "ablation.role": "grid"})  # fmt: skip
    tuner = ablation.build_tuner(cfg, mlflow_uri=mlflow_uri, parent_run_id=parent_id, max_concurrent=concurrent,
                                 settings=settings, restore=args.resume, resume_errored=args.resume_errored)  # fmt: skip
    try:
        rows = ablation.result_rows(tuner.fit())
        summary = ablation.summarize(rows)
        table = ablation.markdown_table(summary)
        report(cfg, mlflow_uri, parent_id, rows, summary, table)
    except BaseException:
        tracking.set_terminated(mlflow_uri, parent_id, "FAILED")
        raise
    complete = sum(r["status"] == "complete" for r in rows)
    tracking.set_terminated(mlflow_uri, parent_id, "FINISHED" if complete == len(rows) else "FAILED")
    print("\n=== ablation summary ===")
    print(f"grid:              {g.name!r}: {len(rows)} trials, {complete} complete; {concurrent} at a time")
    print(f"MLflow run:        {parent_id} ({mlflow_uri}, experiment {experiment!r}); a child run per trial")
    print(f"results:           {tracking.artifact_uri(mlflow_uri, parent_id)}/results/ (ablation.md, trials.csv, "
          "ablation.png)")  # fmt: skip
    print(f"distractor set:    {cfg.reid.distractors.uri} (every distractor condition)")
    print(table)
    print(f"grid state:        {storage.join(g.storage, g.name)} (--resume continues it)")
    return 0 if complete == len(rows) else 1


def report(cfg, mlflow_uri: str, parent_id: str, rows: list[dict], summary: list[dict], table: str) -> None:
    """The table (Markdown, CSV of the trials, the picture) and the summary's numbers on the parent run."""
    columns = ("recipe", "condition", "seed", "status", *ablation.METRICS, "run_id", "reid_version")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    tracking.log_text(mlflow_uri, parent_id, text.getvalue(), "results/trials.csv")
    tracking.log_text(mlflow_uri, parent_id, table + "\n", "results/ablation.md")
    if any(e["n"] for e in summary):
        with tempfile.TemporaryDirectory() as tmp:
            path = viz.ablation_png(summary, Path(tmp) / "ablation.png",
                                         title=f"{cfg.grid.name}: {cfg.reid.data.uri}, mean ± sd over seeds")  # fmt: skip
            tracking.log_artifact_file(mlflow_uri, parent_id, path, "results")
    metrics = {}
    for e in summary:
        for key, value in e.items():
            if key not in ("recipe", "condition") and isinstance(value, (int, float)) and value == value:
                metrics[f"{e['recipe']}.{e['condition']}.{key}"] = float(value)
    tracking.log_metrics(mlflow_uri, parent_id, metrics, step=0)


if __name__ == "__main__":
    sys.exit(main())
