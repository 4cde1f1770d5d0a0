"""Ray Tune over the face-guidance weights λ1, λ2 (and the guidance mode) on the whole chain.

Every trial is a function trainable (``chain_trial``) that runs the chain with the jobs' own cores, one ``TorchTrainer``
per training stage (Ray Train V2: a Trainer is not a Tuner's trainable any more):

1. GAN training with the trial's λ1, λ2, mode (``pipeline.run_gan``), the generator registered without an alias;
2. distractor synthesis from that pinned generator version (``distractors.run_synthesis``) into
   ``synthesis.out/<search>/<trial id>``;
3. re-ID training with the set as the distractor class (``pipeline.run_reid``), validated on query/gallery every
   ``reid.eval.every_epochs`` epochs: ``ValidationReport`` forwards those Rank-1 / mAP / mINP to Tune (what ASHA
   compares: the downstream retrieval metric, not a GAN loss);
4. the converted model's final evaluation, reported to Tune as the trial's result.

MLflow: the trial's child run (tag ``mlflow.parentRunId`` = the search's run) holds λ1, λ2, mode as params, the face
rate of its distractor set, Rank-1, mAP, mINP as metrics and tags linking the generator and re-ID model versions; the
stages' own runs are nested under it. A trial restarted after an interrupted search finds its child run again (tag
``tune.trial_id``) and skips the stages it already finished (their outputs are tags of the child run); a stage cut
short resumes from its last Ray Train checkpoint (same run name and storage).

The search as ``jobs/tune_lambdas.py`` runs it: ``absolute_locations``, ``preflight`` (every input problem raises a
``ConfigError`` / ``StorageError`` / ``TrackingError`` / ``ValueError`` before Ray starts), then ``run_search`` (the
parent MLflow run, ``Tuner.fit``, ``report``: results table, heat maps, the best trial's alias).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import tempfile
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback

from reid_core import storage, tracking
from reid_core.config import TuneJobConfig, flatten, from_dict, to_dict
from reid_core.workflows import distractors, pipeline, tune_state

log = logging.getLogger(__name__)

SEARCH_TAG = "tune.search"
TRIAL_TAG = "tune.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
VALIDATION_KEYS = {"val_rank1": "rank1", "val_mAP": "mAP", "val_mINP": "mINP"}
RESULT_COLUMNS = ("trial_id", "lambda1", "lambda2", "guidance_mode", "status", "reid_epoch", "face_rate", "rank1",
                  "mAP", "mINP", "generator_version", "reid_version", "run_id")  # fmt: skip


# ------------------------------------------------------------------------------------------------ search space
def param_space(search) -> dict:
    """Tune's parameter space from a ``config.SearchConfig``: grid mode crosses every listed value (the paper's 3×3
    grid); asha samples λ uniformly from [low, high] and the mode at random."""
    from ray import tune

    if search.mode == "grid":
        return {"lambda1": tune.grid_search(list(search.lambda1)), "lambda2": tune.grid_search(list(search.lambda2)),
                "guidance_mode": tune.grid_search(list(search.guidance_modes))}  # fmt: skip
    return {"lambda1": tune.uniform(min(search.lambda1), max(search.lambda1)),
            "lambda2": tune.uniform(min(search.lambda2), max(search.lambda2)),
            "guidance_mode": tune.choice(list(search.guidance_modes))}  # fmt: skip


def trial_resources(cfg: TuneJobConfig) -> dict[str, float]:
    """Peak resources of one trial: its own process plus the workers of its biggest stage (the stages run one after
    the other, each releasing its workers). Synthesis with ``workers=1`` runs in the trial's process; with more, its
    Ray tasks take free CPUs as they come and are not reserved here."""
    stages = [cfg.gan.scaling, cfg.reid.scaling]
    cpus = cfg.search.trial_cpus + max(s.num_workers * s.cpus_per_worker for s in stages)
    gpus = max(s.num_workers if s.use_gpu else 0 for s in stages)
    return {"CPU": cpus, **({"GPU": float(gpus)} if gpus else {})}


def concurrent_trials(cluster: dict[str, float], needs: dict[str, float]) -> int:
    """How many trials the cluster holds at once: the smallest ratio over the needed resources, at least 1 (a
    cluster that autoscales, or a request larger than the cluster, still runs one trial at a time)."""
    fits = [math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in needs.items() if amount > 0]
    return max(1, min(fits, default=1))


# ------------------------------------------------------------------------------------------------ the trial
class ValidationReport(TuneReportCallback):
    """Ray Train callback: forwards the re-ID loop's per-epoch validation (rank 0's ``val_rank1``, ``val_mAP``,
    ``val_mINP``) to Tune as ``rank1``, ``mAP``, ``mINP`` at ``reid_epoch`` = epoch + 1; other reports (training loss
    only) are not forwarded, so every Tune result carries the objective."""

    def __init__(self, extra: dict | None = None):
        super().__init__()
        self._extra = dict(extra or {})

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0] if metrics else {}
        if not all(key in first for key in VALIDATION_KEYS):
            return
        result = {name: float(first[key]) for key, name in VALIDATION_KEYS.items()}
        result.update(reid_epoch=int(first["epoch"]) + 1, stage="reid", **self._extra)
        super().after_report(run_context, [result], None)


def trial_configs(job: TuneJobConfig, *, lambda1: float, lambda2: float, mode: str, trial_id: str, mlflow_uri: str):
    """The trial's GAN config, synthesis spec (without the model) and re-ID config: λ and mode set, run names and
    experiment of the search, the driver's MLflow server, no aliases (the search aliases its best re-ID model)."""
    name = job.search.name
    experiment = job.tracking.experiment
    gan = dataclasses.replace(
        job.gan,
        guidance=dataclasses.replace(job.gan.guidance, lambda1=float(lambda1), lambda2=float(lambda2), mode=mode),
        run=dataclasses.replace(job.gan.run, name=f"{name}-{trial_id}-gan"),
        tracking=dataclasses.replace(job.gan.tracking, uri=mlflow_uri, experiment=experiment, alias=None),
    )
    y = job.synthesis
    spec = distractors.SynthesisSpec(
        model="", out=storage.join(y.out, name, trial_id), num_images=y.num_images, batch_size=y.batch_size,
        chunk_size=y.chunk_size, workers=y.workers, seed=y.seed, image_format=y.image_format, batch_norm=y.batch_norm,
        experiment=experiment, run_name=f"{name}-{trial_id}-distractors", tracking_uri=mlflow_uri,
        overwrite=True,  # the trial's own folder: a set cut short by an interrupted search is replaced
    )  # fmt: skip
    reid = dataclasses.replace(
        job.reid,
        distractors=dataclasses.replace(job.reid.distractors, uri=spec.out),
        run=dataclasses.replace(job.reid.run, name=f"{name}-{trial_id}-reid"),
        tracking=dataclasses.replace(job.reid.tracking, uri=mlflow_uri, experiment=experiment, alias=None),
    )
    return gan, spec, reid


def chain_trial(config: dict, *, job: dict, mlflow_uri: str, parent_run_id: str) -> None:
    """Tune trial: GAN -> distractors -> re-ID -> evaluation for ``config`` {"lambda1", "lambda2", "guidance_mode"}.

    ``job`` is the search's ``TuneJobConfig`` as a dict. Reports the re-ID validation per epoch (``ValidationReport``)
    and finally {"rank1", "mAP", "mINP", "face_rate", "reid_epoch", "generator_version", "reid_version", "run_id"}.
    """
    from ray import tune

    cfg = from_dict(TuneJobConfig, job)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    lam1, lam2, mode = float(config["lambda1"]), float(config["lambda2"]), str(config["guidance_mode"])
    gan_cfg, spec, reid_cfg = trial_configs(cfg, lambda1=lam1, lambda2=lam2, mode=mode, trial_id=trial_id,
                                              mlflow_uri=mlflow_uri)  # fmt: skip
    experiment = cfg.tracking.experiment
    base_tags = {SEARCH_TAG: cfg.search.name, TRIAL_TAG: trial_id}

    found = [r for r in tracking.find_runs(mlflow_uri, experiment, base_tags) if r["tags"].get("tune.role") == "trial"]
    if found:
        run_id, done = found[0]["run_id"], found[0]["tags"]
        log.info("trial %s continues its MLflow run %s (stages done: %s)", trial_id, run_id,
                 ", ".join(k for k in ("generator.version", "distractors.run_id", "reid.version") if k in done) or "none")  # fmt: skip
        tracking.reopen_run(mlflow_uri, run_id)
    else:
        params = {"lambda1": lam1, "lambda2": lam2, "guidance.mode": mode, "objective": cfg.search.objective}
        run_id = tracking.start_run(mlflow_uri, experiment, context.get_trial_name(), params,
                                    tags={**base_tags, PARENT_TAG: parent_run_id, "tune.role": "trial"})  # fmt: skip
        done = {}
    stage_tags = {**base_tags, PARENT_TAG: run_id}
    try:
        # 1. GAN
        if "generator.version" not in done:
            gan_uri, n_images = pipeline.preflight_gan(gan_cfg)
            gan = pipeline.run_gan(gan_cfg, gan_uri, n_images, tags={**stage_tags, "tune.role": "gan"})
            done["generator.version"], done["gan.run_id"] = gan.version, gan.run_id
            done["generator.uri"] = f"models:/{gan_cfg.tracking.registered_model}/{gan.version}"
            gan_face_rate = tracking.run_metrics(mlflow_uri, gan.run_id).get("face_rate")
            tracking.set_run_tags(mlflow_uri, run_id, {k: done[k] for k in ("generator.version", "generator.uri",
                                                                              "gan.run_id")})  # fmt: skip
            if gan_face_rate is not None:
                tracking.log_metrics(mlflow_uri, run_id, {"gan_face_rate": gan_face_rate}, step=0)
        # 2. distractors from the pinned generator version
        if "distractors.run_id" not in done:
            spec = dataclasses.replace(spec, model=done["generator.uri"])
            made = distractors.run_synthesis(spec, distractors.preflight(spec), tags={**stage_tags,
                                                                                      "tune.role": "distractors"})  # fmt: skip
            done["distractors.run_id"] = made["run_id"]
            tracking.log_metrics(mlflow_uri, run_id, {"face_rate": made["metadata"]["face_rate"]}, step=0)
            tracking.set_run_tags(mlflow_uri, run_id, {"distractors.uri": spec.out,
                                                       "distractors.run_id": made["run_id"]})  # fmt: skip
        # 3. re-ID with the distractor class, validated every k epochs (forwarded to Tune), then 4. evaluation
        if "reid.version" not in done:
            pre = pipeline.preflight_reid(reid_cfg)
            out = pipeline.run_reid(reid_cfg, pre, tags={**stage_tags, "tune.role": "reid"},
                                    callbacks=[ValidationReport({"run_id": run_id})])  # fmt: skip
            m = out.final.metrics
            final = {k: float(m[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}
            tracking.log_metrics(mlflow_uri, run_id, final, step=reid_cfg.optim.epochs)
            done["reid.version"], done["reid.run_id"] = out.final.version, out.run_id
            # The version's tags first: the trial's "reid.version" tag marks the stage as done for a restarted trial,
            # so nothing of the stage may come after it (a driver killed in between would leave the version untagged).
            tracking.set_model_version_tags(mlflow_uri, reid_cfg.tracking.registered_model, done["reid.version"],
                                            {"lambda1": lam1, "lambda2": lam2, "guidance.mode": mode,
                                             "generator": done["generator.uri"], "tune.search": cfg.search.name,
                                             "tune.trial_id": trial_id})  # fmt: skip
            tracking.set_run_tags(mlflow_uri, run_id, {"reid.version": done["reid.version"],
                                                       "reid.model": reid_cfg.tracking.registered_model,
                                                       "reid.run_id": out.run_id})  # fmt: skip
    except BaseException:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    metrics = tracking.run_metrics(mlflow_uri, run_id)
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")
    tune.report({"rank1": metrics["rank1"], "mAP": metrics["mAP"], "mINP": metrics["mINP"],
                 "face_rate": metrics.get("face_rate", float("nan")), "reid_epoch": reid_cfg.optim.epochs,
                 "stage": "done", "generator_version": str(done["generator.version"]),
                 "reid_version": str(done["reid.version"]), "run_id": run_id})  # fmt: skip


# ------------------------------------------------------------------------------------------------ the search
def tune_storage(cfg: TuneJobConfig, settings) -> tuple[str, object | None, str]:
    """The search's Tune state (``tune_state.tune_storage``); it rides out S3 trouble as its GAN stage's checkpoints
    do."""
    return tune_state.tune_storage(cfg.search.storage, cfg.search.name, settings,
                                   outage_seconds=cfg.gan.storage.outage_seconds)  # fmt: skip


def make_trainable(cfg: TuneJobConfig, *, mlflow_uri: str, parent_run_id: str):
    """``chain_trial`` with the search's fixed arguments (in the object store) and the trial's own CPU share."""
    from ray import tune

    from reid_core.config import to_dict

    trainable = tune.with_parameters(chain_trial, job=to_dict(cfg), mlflow_uri=mlflow_uri, parent_run_id=parent_run_id)
    return tune.with_resources(trainable, {"CPU": cfg.search.trial_cpus})


def build_tuner(cfg: TuneJobConfig, *, mlflow_uri: str, parent_run_id: str, max_concurrent: int, settings,
                restore: bool = False, resume_errored: bool = False):  # fmt: skip
    """A new ``Tuner`` for the search, or (``restore``) the interrupted one from its storage: finished trials are
    kept, unfinished ones start again (their stages skip what they finished), errored ones only with
    ``resume_errored``."""

    path, fs, experiment_path = tune_storage(cfg, settings)
    trainable = make_trainable(cfg, mlflow_uri=mlflow_uri, parent_run_id=parent_run_id)
    return tune_state.new_or_restored_tuner(
        experiment_path, fs, trainable, restore=restore, resume_errored=resume_errored,
        new=lambda: new_tuner(cfg, trainable, path=path, fs=fs, max_concurrent=max_concurrent),
    )  # fmt: skip


def new_tuner(cfg: TuneJobConfig, trainable, *, path: str, fs, max_concurrent: int):
    """A fresh ``Tuner`` over the search's space, with ASHA when ``search.mode`` is asha."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = cfg.search
    scheduler = None
    if s.mode == "asha":
        # max_t one past the last epoch: ASHA stops every trial that reaches max_t, and a trial that survived every
        # rung must still run its final evaluation and registration after its last validation
        scheduler = ASHAScheduler(time_attr="reid_epoch", max_t=cfg.reid.optim.epochs + 1,
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor)  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=param_space(s),
        tune_config=tune.TuneConfig(
            metric=s.objective,
            mode="max",
            scheduler=scheduler,
            num_samples=s.num_samples,
            # the limit goes to the search algorithm: Tune ignores max_concurrent_trials next to a given search_alg
            search_alg=BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent),
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=s.name, storage_path=path, storage_filesystem=fs, failure_config=tune.FailureConfig(max_failures=0)
        ),  # fmt: skip
    )


def result_rows(results) -> list[dict]:
    """One row per trial of a ``ResultGrid`` (``RESULT_COLUMNS``): status ``complete`` (whole chain evaluated),
    ``stopped early`` (ASHA) or ``error``; metrics of a stopped trial are its last validation."""
    rows = []
    for r in results:
        m, c = dict(r.metrics or {}), dict(r.config or {})
        status = "complete" if m.get("stage") == "done" else ("error" if r.error else "stopped early")
        row = {"trial_id": m.get("trial_id") or _trial_id(r), "lambda1": c.get("lambda1"), "lambda2": c.get("lambda2"),
               "guidance_mode": c.get("guidance_mode"), "status": status}  # fmt: skip
        row.update({k: m.get(k) for k in RESULT_COLUMNS if k not in row})
        rows.append(row)
    return sorted(rows, key=lambda row: (str(row["guidance_mode"]), row["lambda1"] or 0, row["lambda2"] or 0))


def _trial_id(result) -> str:
    """A trial's id from its folder name (``chain_trial_<id>_<n>_...``) when it reported nothing."""
    parts = str(getattr(result, "path", "")).rstrip("/").split("/")[-1].split("_")
    return parts[2] if len(parts) > 3 else "?"


def best_row(rows: list[dict], objective: str) -> dict | None:
    """The complete trial with the highest objective (first of equals in table order), or None."""
    complete = [r for r in rows if r["status"] == "complete" and r.get(objective) is not None]
    return max(complete, key=lambda r: r[objective]) if complete else None


# ------------------------------------------------------------------------------------------------ the job's driver
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


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """What ``preflight`` checked and ``run_search`` uses."""

    mlflow_uri: str  # the MLflow server of the search's parent run, resolved and reachable
    settings: object  # storage.S3Settings of the search's storage


def preflight(cfg: TuneJobConfig, *, resume: bool = False, resume_errored: bool = False) -> SearchPlan:
    """Check the search's state first (with ``resume`` the search ``search.name`` must exist, else it must not;
    ``resume_errored`` only with ``resume``), then both training stages' data, storage, MLflow and room on the Ray
    cluster, and the synthesis output, before any trial starts. The re-ID stage is checked without distractors (each
    trial makes its own set)."""
    tune_state.check_resume_flags("search", resume=resume, resume_errored=resume_errored)  # before any I/O
    s = cfg.search
    # Whether the search may start (or resume) first: a refused name costs one read of its state, no data read and no
    # connection to Ray.
    settings = storage.resolve_settings(cfg.gan.storage.endpoint_url, cfg.gan.storage.region)
    storage.check_location(s.storage, settings)
    _, fs, experiment_path = tune_storage(cfg, settings)
    tune_state.check_resume("search", s.name, storage.join(s.storage, s.name), experiment_path, fs, resume=resume)
    first = dataclasses.replace(cfg.gan.guidance, lambda1=s.lambda1[0], lambda2=s.lambda2[0], mode=s.guidance_modes[0])
    mlflow_uri, _ = pipeline.preflight_gan(dataclasses.replace(cfg.gan, guidance=first))
    reid = dataclasses.replace(cfg.reid, distractors=dataclasses.replace(cfg.reid.distractors, uri=None))
    pipeline.preflight_reid(reid)
    storage.check_location(cfg.synthesis.out, settings)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri or mlflow_uri)
    tracking.check_server(uri)
    return SearchPlan(mlflow_uri=uri, settings=settings)


def run_search(cfg: TuneJobConfig, pre: SearchPlan, *, resume: bool = False, resume_errored: bool = False) -> dict:
    """The search checked by ``preflight``: its parent MLflow run (reopened with ``resume``), the Tune run, the results
    table, heat maps and the best trial's alias (``report``). Returns {"parent_id", "rows", "best", "concurrent"}."""
    import ray

    from reid_core.runtime import init_ray_for_job

    mlflow_uri, settings = pre.mlflow_uri, pre.settings
    init_ray_for_job(use_gpu=cfg.gan.scaling.use_gpu or cfg.reid.scaling.use_gpu)
    needs = trial_resources(cfg)
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    concurrent = cfg.search.max_concurrent_trials or concurrent_trials(cluster, needs)
    log.info("each trial needs %s at its peak; the cluster has %s: %d trial(s) at a time", needs,
             {k: cluster.get(k, 0) for k in needs}, concurrent)  # fmt: skip

    s, experiment = cfg.search, cfg.tracking.experiment
    parent_id = tune_state.open_parent_run(
        mlflow_uri, experiment, s.name, identity={SEARCH_TAG: s.name, "tune.role": "search"},
        tags={"job": "tune_lambdas", "search.mode": s.mode, "objective": s.objective},
        params=lambda: {**flatten(to_dict(cfg)), "max_concurrent_trials_used": concurrent}, resume=resume,
    )  # fmt: skip
    tuner = build_tuner(cfg, mlflow_uri=mlflow_uri, parent_run_id=parent_id, max_concurrent=concurrent,
                        settings=settings, restore=resume, resume_errored=resume_errored)  # fmt: skip
    try:
        results = tuner.fit()
        rows = result_rows(results)
        close_unfinished_trials(mlflow_uri, experiment, s.name, rows)
        best = report(cfg, mlflow_uri, parent_id, rows)
    except BaseException:
        tracking.set_terminated(mlflow_uri, parent_id, "FAILED")
        raise
    tracking.set_terminated(mlflow_uri, parent_id, "FINISHED")
    return {"parent_id": parent_id, "rows": rows, "best": best, "concurrent": concurrent}


def close_unfinished_trials(mlflow_uri: str, experiment: str, search_name: str, rows: list[dict]) -> None:
    """Trials stopped early (ASHA) or failed leave their MLflow runs (child and stages) RUNNING: close them."""
    for row in rows:
        if row["status"] == "complete":
            continue
        status = "KILLED" if row["status"] == "stopped early" else "FAILED"
        for run in tracking.find_runs(mlflow_uri, experiment, {SEARCH_TAG: search_name, TRIAL_TAG: row["trial_id"]}):
            if run["status"] == "RUNNING":
                tracking.set_terminated(mlflow_uri, run["run_id"], status)


def markdown_table(rows: list[dict]) -> str:
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
