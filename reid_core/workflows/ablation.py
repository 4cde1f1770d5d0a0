"""What the distractors add, measured on one recipe over several seeds: conditions × recipes × seeds as a Ray Tune grid
on the re-ID stage (``jobs/ablation.py``).

Conditions (``CONDITIONS``): ``none`` (no distractors), ``distractor_class`` (the paper's N+1 class) and ``lsro``
(uniform over the N real classes). Recipes: ``weak`` is the ``reid`` section as given; ``strong`` is it with the
``strong`` overrides (dotted keys: ImageNet init, BNNeck + triplet, ...). Every trial of a run reads the one distractor
set ``reid.distractors.uri`` (``none`` ignores it), so trials of one recipe and seed differ only in the condition.

The table (``summarize``): per (recipe, condition), Rank-1 / mAP / mINP as mean ± sample sd over the seeds, and for
every distractor condition the *paired* difference against ``none`` of the same recipe and seed, mean ± sd over the
seeds (pairs where both trials completed). No Ray or MLflow in the pure parts.

The grid as ``jobs/ablation.py`` runs it: ``absolute_locations``, ``preflight`` (every input problem raises before Ray
starts), then ``run_grid`` (the parent MLflow run, ``Tuner.fit``, the table and ``report``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from reid_core.config import (
    ConfigError,
    ReidJobConfig,
    check_positive,
    flatten,
    from_dict,
    to_dict,
)

log = logging.getLogger(__name__)

CONDITIONS = ("none", "distractor_class", "lsro")
RECIPES = ("weak", "strong")
METRICS = ("rank1", "mAP", "mINP")
ABLATION_TAG = "ablation.name"
TRIAL_TAG = "ablation.trial"
PARENT_TAG = "mlflow.parentRunId"


# ------------------------------------------------------------------------------------------------ config
@dataclass
class AblationGridConfig:
    name: str = "ablation"  # Tune experiment and MLflow parent run name; --resume continues the run of this name
    storage: str = "s3://reid-data/tune-results"  # Tune's state (what --resume reads)
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs/GPUs hold
    trial_cpus: float = 0.1  # the trial's own process (it drives one re-ID training)


@dataclass
class AblationTrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None = MLFLOW_TRACKING_URI or the embedded stack's
    experiment: str = "reid-ablation"


@dataclass
class AblationJobConfig:
    """``reid``: the weak recipe (a whole re-ID job config; its ``distractors.uri`` is the run's one fixed set);
    ``strong``: ``{dotted key: value}`` overrides of ``reid`` that make the strong recipe."""

    grid: AblationGridConfig = field(default_factory=AblationGridConfig)
    reid: ReidJobConfig = field(default_factory=ReidJobConfig)
    strong: dict[str, Any] = field(default_factory=dict)
    tracking: AblationTrackingConfig = field(default_factory=AblationTrackingConfig)

    def validate(self) -> None:
        g = self.grid
        for key, values, allowed in (("conditions", g.conditions, CONDITIONS), ("recipes", g.recipes, RECIPES)):
            if not values or len(set(values)) != len(values) or any(v not in allowed for v in values):
                raise ConfigError(f"grid.{key}: {values}: expected distinct values of {', '.join(allowed)}")
        if not g.seeds or len(set(g.seeds)) != len(g.seeds) or any(s < 0 for s in g.seeds):
            raise ConfigError(f"grid.seeds: {g.seeds}: expected distinct seeds ≥ 0")
        if "none" not in g.conditions and len(g.conditions) > 0:
            log.info("grid.conditions has no 'none': no paired differences")
        check_positive("grid.trial_cpus", g.trial_cpus)
        if g.max_concurrent_trials is not None:
            check_positive("grid.max_concurrent_trials", g.max_concurrent_trials)
        if not g.name or "/" in g.name:
            raise ConfigError(f"grid.name: {g.name!r} must be a non-empty name without '/'")
        if any(c != "none" for c in g.conditions) and not self.reid.distractors.uri:
            raise ConfigError("reid.distractors.uri: the distractor conditions need the run's one distractor set")
        try:
            self.reid.validate()
        except ConfigError as exc:
            raise ConfigError(f"reid.{exc}") from None
        if "strong" in g.recipes:
            if not self.strong:
                raise ConfigError("strong: empty; give the overrides of the strong recipe, e.g. {model.bnneck: true}")
            try:
                recipe_config(self.reid, self.strong)
            except ConfigError as exc:
                raise ConfigError(f"strong: {exc}") from None


def recipe_config(reid: ReidJobConfig, overrides: dict[str, Any]) -> ReidJobConfig:
    """``reid`` with ``{dotted key: value}`` overrides applied, validated."""
    raw = to_dict(reid)
    for key, value in overrides.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key!r} names no section of the re-ID config")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{key!r} is no key of the re-ID config")
        node[parts[-1]] = value
    cfg = from_dict(ReidJobConfig, raw, where="strong")
    cfg.validate()
    return cfg


def trial_config(job: AblationJobConfig, *, condition: str, recipe: str, seed: int, trial_id: str,
                 mlflow_uri: str) -> ReidJobConfig:  # fmt: skip
    """The re-ID config of one cell: the recipe, the condition (loss mode; no distractors for ``none``), the seed,
    the run name of the grid, its experiment, no alias."""
    cfg = recipe_config(job.reid, job.strong) if recipe == "strong" else job.reid
    loss = dataclasses.replace(cfg.loss, mode=cfg.loss.mode if condition == "none" else condition)
    uri = None if condition == "none" else job.reid.distractors.uri
    return dataclasses.replace(
        cfg,
        loss=loss,
        distractors=dataclasses.replace(cfg.distractors, uri=uri),
        run=dataclasses.replace(cfg.run, name=f"{job.grid.name}-{trial_id}", seed=int(seed)),
        tracking=dataclasses.replace(cfg.tracking, uri=mlflow_uri, experiment=job.tracking.experiment, alias=None),
    )


# ------------------------------------------------------------------------------------------------ the table
def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    if not n:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd, n


def summarize(rows: list[dict]) -> list[dict]:
    """Per (recipe, condition) of the complete rows ({"recipe", "condition", "seed", "rank1", "mAP", "mINP", "status"}):
    {"recipe", "condition", "n", "<m>_mean", "<m>_sd"} and, for distractor conditions, "d_<m>_mean", "d_<m>_sd",
    "pairs": the paired difference against ``none`` of the same recipe and seed."""
    done = [r for r in rows if r.get("status") == "complete"]
    out = []
    for recipe in RECIPES:
        for condition in CONDITIONS:
            cell = [r for r in done if r["recipe"] == recipe and r["condition"] == condition]
            if not cell and not any(r["recipe"] == recipe and r["condition"] == condition for r in rows):
                continue
            entry: dict[str, Any] = {"recipe": recipe, "condition": condition}
            for m in METRICS:
                entry[f"{m}_mean"], entry[f"{m}_sd"], entry["n"] = _mean_sd([float(r[m]) for r in cell])
            if condition != "none":
                base = {r["seed"]: r for r in done if r["recipe"] == recipe and r["condition"] == "none"}
                pairs = [(r, base[r["seed"]]) for r in cell if r["seed"] in base]
                entry["pairs"] = len(pairs)
                for m in METRICS:
                    entry[f"d_{m}_mean"], entry[f"d_{m}_sd"], _ = _mean_sd(
                        [float(a[m]) - float(b[m]) for a, b in pairs]
                    )
            out.append(entry)
    return out


def _pm(mean: float, sd: float, *, signed: bool = False) -> str:
    if mean != mean:
        return "–"
    text = f"{100 * mean:+.2f}" if signed else f"{100 * mean:.2f}"
    return text + (f" ± {100 * sd:.2f}" if sd == sd else "")


def markdown_table(summary: list[dict]) -> str:
    """The ablation table in percent: mean ± sd over seeds, and Δ vs no distractors (paired, same seeds)."""
    head = ["recipe", "condition", "seeds"] + [f"{m} (%)" for m in ("Rank-1", "mAP", "mINP")]
    head += [f"Δ {m} vs none" for m in ("Rank-1", "mAP", "mINP")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["recipe"], e["condition"], str(e["n"])]
        cells += [_pm(e[f"{m}_mean"], e[f"{m}_sd"]) for m in METRICS]
        if e["condition"] == "none":
            cells += ["(reference)"] * 3
        else:
            cells += [_pm(e[f"d_{m}_mean"], e[f"d_{m}_sd"], signed=True) + f" (n={e['pairs']})" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the trial
def ablation_trial(config: dict, *, job: dict, mlflow_uri: str, parent_run_id: str) -> None:
    """Tune trial: one re-ID training + evaluation for ``config`` {"condition", "recipe", "seed"}; reports
    {"rank1", "mAP", "mINP", "run_id", "reid_version", "stage": "done"}. A restarted trial finds its MLflow child run
    (tags) and skips a training it finished; one cut short resumes from its Ray Train checkpoint (same run name)."""
    from ray import tune

    from reid_core import tracking
    from reid_core.workflows import pipeline

    cfg = from_dict(AblationJobConfig, job)
    trial_id = tune.get_context().get_trial_id()
    condition, recipe, seed = str(config["condition"]), str(config["recipe"]), int(config["seed"])
    reid_cfg = trial_config(cfg, condition=condition, recipe=recipe, seed=seed, trial_id=trial_id,
                            mlflow_uri=mlflow_uri)  # fmt: skip
    experiment = cfg.tracking.experiment
    tags = {ABLATION_TAG: cfg.grid.name, TRIAL_TAG: f"{recipe}/{condition}/{seed}"}
    found = [r for r in tracking.find_runs(mlflow_uri, experiment, tags) if r["tags"].get("ablation.role") == "trial"]
    if found:
        run_id, done = found[0]["run_id"], found[0]["tags"]
        tracking.reopen_run(mlflow_uri, run_id)
    else:
        run_id = tracking.start_run(mlflow_uri, experiment, f"{recipe}-{condition}-seed{seed}",
                                    {"condition": condition, "recipe": recipe, "seed": seed},
                                    tags={**tags, PARENT_TAG: parent_run_id, "ablation.role": "trial"})  # fmt: skip
        done = {}
    try:
        if "reid.version" not in done:
            pre = pipeline.preflight_reid(reid_cfg)
            out = pipeline.run_reid(reid_cfg, pre, tags={**tags, PARENT_TAG: run_id, "ablation.role": "reid"})
            m = out.final.metrics
            tracking.log_metrics(mlflow_uri, run_id, {k: float(m[k]) for k in METRICS}, step=reid_cfg.optim.epochs)
            tracking.set_run_tags(mlflow_uri, run_id, {"reid.version": out.final.version,
                                                       "reid.run_id": out.run_id})  # fmt: skip
            done = {"reid.version": out.final.version}
    except BaseException:
        tracking.set_terminated(mlflow_uri, run_id, "FAILED")
        raise
    metrics = tracking.run_metrics(mlflow_uri, run_id)
    tracking.set_terminated(mlflow_uri, run_id, "FINISHED")
    tune.report({**{k: metrics[k] for k in METRICS}, "stage": "done", "run_id": run_id,
                 "reid_version": str(done["reid.version"])})  # fmt: skip


def build_tuner(cfg: AblationJobConfig, *, mlflow_uri: str, parent_run_id: str, max_concurrent: int, settings,
                restore: bool = False, resume_errored: bool = False):  # fmt: skip
    """The grid's ``Tuner`` (every condition × recipe × seed once), or the interrupted one restored from storage."""
    from ray import tune

    from reid_core.workflows import tune_state

    path, fs, experiment_path = tune_storage(cfg, settings)
    trainable = tune.with_resources(
        tune.with_parameters(ablation_trial, job=to_dict(cfg), mlflow_uri=mlflow_uri, parent_run_id=parent_run_id),
        {"CPU": cfg.grid.trial_cpus},
    )
    return tune_state.new_or_restored_tuner(
        experiment_path, fs, trainable, restore=restore, resume_errored=resume_errored,
        new=lambda: new_tuner(cfg, trainable, path=path, fs=fs, max_concurrent=max_concurrent),
    )  # fmt: skip


def new_tuner(cfg: AblationJobConfig, trainable, *, path: str, fs, max_concurrent: int):
    """A fresh ``Tuner`` over every recipe × condition × seed."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    g = cfg.grid
    space = {"recipe": tune.grid_search(list(g.recipes)), "condition": tune.grid_search(list(g.conditions)),
             "seed": tune.grid_search(list(g.seeds))}  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(
            name=g.name, storage_path=path, storage_filesystem=fs, failure_config=tune.FailureConfig(max_failures=0)
        ),  # fmt: skip
    )


def tune_storage(cfg: AblationJobConfig, settings) -> tuple[str, object | None, str]:
    """The grid's Tune state (``tune_state.tune_storage``)."""
    from reid_core.workflows import tune_state

    return tune_state.tune_storage(cfg.grid.storage, cfg.grid.name, settings,
                                   outage_seconds=cfg.reid.storage.outage_seconds)  # fmt: skip


def result_rows(results) -> list[dict]:
    """One row per trial: recipe, condition, seed, status (complete | error), Rank-1, mAP, mINP, run id."""
    rows = []
    for r in results:
        m, c = dict(r.metrics or {}), dict(r.config or {})
        row = {"recipe": c.get("recipe"), "condition": c.get("condition"), "seed": c.get("seed"),
               "status": "complete" if m.get("stage") == "done" else "error"}  # fmt: skip
        row.update({k: m.get(k) for k in (*METRICS, "run_id", "reid_version")})
        rows.append(row)
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return sorted(rows, key=lambda r: (RECIPES.index(r["recipe"]), order[r["condition"]], r["seed"]))


# ------------------------------------------------------------------------------------------------ the job's driver
def absolute_locations(cfg: AblationJobConfig) -> AblationJobConfig:
    """Local folders made absolute: Tune runs each trial in its own working directory."""
    import os

    from reid_core import storage

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


@dataclass(frozen=True)
class GridPlan:
    """What ``preflight`` checked and ``run_grid`` uses."""

    mlflow_uri: str  # the MLflow server of the grid's parent run, resolved and reachable
    settings: object  # storage.S3Settings of the grid's storage


def preflight(cfg: AblationJobConfig, *, resume: bool = False, resume_errored: bool = False) -> GridPlan:
    """The grid's state first (with ``resume`` the grid ``grid.name`` must exist, else it must not; ``resume_errored``
    only with ``resume``), then each recipe's re-ID stage (data, the distractor set, a pretrained checkpoint, storage,
    MLflow, room on the Ray cluster) before any trial starts."""
    from reid_core import storage, tracking
    from reid_core.workflows import pipeline, tune_state

    tune_state.check_resume_flags("grid", resume=resume, resume_errored=resume_errored)  # before any I/O
    # Whether the grid may start (or resume) first: a refused name costs one read of its state, no data read and no
    # connection to Ray.
    settings = storage.resolve_settings(cfg.reid.storage.endpoint_url, cfg.reid.storage.region)
    storage.check_location(cfg.grid.storage, settings)
    _, fs, experiment_path = tune_storage(cfg, settings)
    tune_state.check_resume("grid", cfg.grid.name, storage.join(cfg.grid.storage, cfg.grid.name), experiment_path, fs,
                            resume=resume)  # fmt: skip
    pres = {}
    for recipe in cfg.grid.recipes:
        reid = recipe_config(cfg.reid, cfg.strong) if recipe == "strong" else cfg.reid
        if "none" in cfg.grid.conditions and len(cfg.grid.conditions) == 1:
            reid = dataclasses.replace(reid, distractors=dataclasses.replace(reid.distractors, uri=None))
        pres[recipe] = pipeline.preflight_reid(reid)
    mlflow_uri = tracking.resolve_tracking_uri(cfg.tracking.uri or pres[cfg.grid.recipes[0]].mlflow_uri)
    tracking.check_server(mlflow_uri)
    return GridPlan(mlflow_uri=mlflow_uri, settings=settings)


def run_grid(cfg: AblationJobConfig, pre: GridPlan, *, resume: bool = False, resume_errored: bool = False) -> dict:
    """The grid checked by ``preflight``: its parent MLflow run (reopened with ``resume``), the Tune run, the table and
    ``report``; the parent run is FINISHED only when every trial completed. Returns {"parent_id", "rows", "complete",
    "table", "concurrent"}."""
    import ray

    from reid_core import tracking
    from reid_core.runtime import init_ray_for_job
    from reid_core.workflows import tune_state
    from reid_core.workflows.search import concurrent_trials

    mlflow_uri, settings = pre.mlflow_uri, pre.settings

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

    parent_id = tune_state.open_parent_run(
        mlflow_uri, experiment, g.name, identity={ABLATION_TAG: g.name, "ablation.role": "grid"},
        tags={"job": "ablation"}, params=lambda: {**flatten(to_dict(cfg)), "max_concurrent_trials_used": concurrent},
        resume=resume,
    )  # fmt: skip
    tuner = build_tuner(cfg, mlflow_uri=mlflow_uri, parent_run_id=parent_id, max_concurrent=concurrent,
                        settings=settings, restore=resume, resume_errored=resume_errored)  # fmt: skip
    try:
        rows = result_rows(tuner.fit())
        summary = summarize(rows)
        table = markdown_table(summary)
        report(cfg, mlflow_uri, parent_id, rows, summary, table)
    except BaseException:
        tracking.set_terminated(mlflow_uri, parent_id, "FAILED")
        raise
    complete = sum(r["status"] == "complete" for r in rows)
    tracking.set_terminated(mlflow_uri, parent_id, "FINISHED" if complete == len(rows) else "FAILED")
    return {"parent_id": parent_id, "rows": rows, "complete": complete, "table": table, "concurrent": concurrent}


def report(
    cfg: AblationJobConfig, mlflow_uri: str, parent_id: str, rows: list[dict], summary: list[dict], table: str
) -> None:
    """The table (Markdown, CSV of the trials, the picture) and the summary's numbers on the parent run."""
    import csv
    import io
    import tempfile
    from pathlib import Path

    from reid_core import tracking, viz

    columns = ("recipe", "condition", "seed", "status", *METRICS, "run_id", "reid_version")
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
