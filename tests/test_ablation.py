"""The ablation grid (jobs/ablation.py): the table's statistics over seeds (pure rows), the trials' configs, and (slow)
a 2-condition grid end to end on the embedded stack, resumable: one seed, since the statistics over seeds are the pure
functions tested here, and each trial is a whole Ray Train run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from reid_core.config import ConfigError, load_config
from reid_core.viz import ablation_png
from reid_core.workflows.ablation import (
    AblationJobConfig,
    markdown_table,
    recipe_config,
    summarize,
    trial_config,
)
from tests import job_runner

ROOT = Path(__file__).resolve().parents[1]


def row(recipe, condition, seed, rank1, mAP, mINP=0.1, status="complete"):  # noqa: N803
    return {"recipe": recipe, "condition": condition, "seed": seed, "rank1": rank1, "mAP": mAP, "mINP": mINP,
            "status": status}  # fmt: skip


def test_summary_gives_mean_sd_over_seeds_and_paired_differences_against_none():
    rows = [row("weak", "none", 0, 0.20, 0.30), row("weak", "none", 1, 0.40, 0.50), row("weak", "none", 2, 0.30, 0.40),
            row("weak", "lsro", 0, 0.25, 0.30), row("weak", "lsro", 1, 0.44, 0.50),
            row("weak", "lsro", 2, 0.0, 0.0, status="error")]  # fmt: skip
    summary = summarize(rows)
    none, lsro = summary
    assert (none["condition"], none["n"]) == ("none", 3)
    assert none["rank1_mean"] == pytest.approx(0.30) and none["rank1_sd"] == pytest.approx(0.10)
    assert (lsro["n"], lsro["pairs"]) == (2, 2)  # the failed seed is left out of both
    # paired: +0.05 and +0.04 -> mean 0.045, sd of the two differences; the unpaired means differ by 0.045 too, but
    # their sds (0.134) would hide it
    assert lsro["d_rank1_mean"] == pytest.approx(0.045) and lsro["d_rank1_sd"] == pytest.approx(math.sqrt(0.00005))
    assert lsro["d_mAP_mean"] == pytest.approx(0.0) and lsro["d_mAP_sd"] == pytest.approx(0.0)
    table = markdown_table(summary)
    lines = table.splitlines()
    assert lines[0].startswith("| recipe | condition | seeds | Rank-1 (%) | mAP (%) | mINP (%) | Δ Rank-1 vs none")
    assert (
        lines[2]
        == "| weak | none | 3 | 30.00 ± 10.00 | 40.00 ± 10.00 | 10.00 ± 0.00 | (reference) | (reference) | (reference) |"
    )
    assert (
        lines[3].startswith("| weak | lsro | 2 | 34.50 ± 13.44 | 40.00 ± 14.14 |") and "+4.50 ± 0.71 (n=2)" in lines[3]
    )


def test_the_picture_is_written(tmp_path):
    summary = summarize([row("weak", "none", 0, 0.2, 0.3), row("weak", "distractor_class", 0, 0.25, 0.3)])
    path = ablation_png(summary, tmp_path / "a.png", title="t")
    with Image.open(path) as image:
        assert image.size == (1000, 340)


def demo_config(overrides=()):
    return load_config(AblationJobConfig, ROOT / "configs" / "ablation_demo.yaml", list(overrides))


def test_trials_differ_only_in_their_cell_and_share_one_distractor_set():
    cfg = demo_config()
    configs = {(c, r, s): trial_config(cfg, condition=c, recipe=r, seed=s, trial_id=f"t{i}", mlflow_uri="http://x")
               for i, (c, r, s) in enumerate((c, r, s) for c in cfg.grid.conditions for r in cfg.grid.recipes
                                             for s in cfg.grid.seeds)}  # fmt: skip
    assert len(configs) == 18
    for (condition, recipe, seed), t in configs.items():
        assert t.run.seed == seed and t.tracking.experiment == "reid-ablation-demo" and t.tracking.alias is None
        assert t.distractors.uri == (None if condition == "none" else "s3://reid-data/distractors/ablation-demo")
        if condition != "none":
            assert t.loss.mode == condition
        assert t.model.bnneck == (recipe == "strong") and t.loss.triplet == (1.0 if recipe == "strong" else 0.0)
    a, b = configs[("lsro", "strong", 0)], configs[("lsro", "strong", 1)]
    assert {k for k in vars(a) if getattr(a, k) != getattr(b, k)} == {"run"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["grid.conditions=[none,soft]"], "grid.conditions: ['none', 'soft']: expected distinct values of"),
        (["grid.seeds=[0,0]"], "grid.seeds: [0, 0]: expected distinct seeds"),
        (["reid.distractors.uri=null"], "reid.distractors.uri: the distractor conditions need"),
        (["strong={model.bnnek: true}"], "strong: 'model.bnnek' is no key of the re-ID config"),
        (["strong={loss.triplet: -1}"], "strong: loss.triplet: expected ≥ 0"),
        (["reid.optim.lr=0"], "reid.optim.lr: expected a positive value"),
    ],
)
def test_invalid_grids_fail_with_the_key_to_fix(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        demo_config(overrides)


def test_recipe_config_validates_the_strong_recipe():
    cfg = demo_config()
    with pytest.raises(ConfigError, match="model.last_stride: expected 1 or 2"):
        recipe_config(cfg.reid, {"model.last_stride": 4})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume"], "error: --resume: no grid 'abl-new' to resume at "),
        (["--resume-errored"], "error: --resume-errored: only with --resume"),
    ],
)
def test_resume_flags_are_checked_first(tmp_path, flags, message):
    """The grid's own state is checked before its data, MLflow or Ray (none of which is set here): one line, exit 2,
    and nothing is written to the grid's storage."""
    state = tmp_path / "state"
    proc = job_runner.here("ablation.py", ["--config", "configs/ablation_demo.yaml", "--set", "grid.name=abl-new",
                                           "--set", f"grid.storage={state}", *flags])  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not proc.stdout and not state.exists()


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_ablation_grid_end_to_end_and_resumable(s3_server, services_stack, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tests.test_train_reid_job import dataset_and_distractors, run

    env = {**services_stack.full_env, "DS_ACCELERATOR": "cpu"}
    tag, data, distractors = dataset_and_distractors(s3_server, monkeypatch, ids=16, num_distractors=16)
    name = f"abl-{tag}"
    args = [sys.executable, "jobs/ablation.py", "--config", "configs/ablation_demo.yaml"]
    sets = [f"grid.name={name}", "grid.conditions=[none,distractor_class]", "grid.recipes=[weak]", "grid.seeds=[0]",
            f"grid.storage=s3://{s3_server.bucket}/tune-results", "tracking.experiment=e2e-ablation",
            f"reid.data.uri={data}", f"reid.distractors.uri={distractors}", "reid.distractors.per_batch=4",
            f"reid.run.storage=s3://{s3_server.bucket}/ray-results", "reid.optim.epochs=1",
            "reid.optim.identities_per_batch=4", "reid.data.max_images=64", "reid.eval.batch_size=64",
            f"reid.tracking.registered_model=abl-{tag}"]  # fmt: skip
    argv = args + [a for s in sets for a in ("--set", s)]
    proc = run(argv, env, timeout=1200)
    out = proc.stdout
    assert "=== ablation summary ===" in out and "2 trials, 2 complete" in out, out[-3000:]
    assert "| weak | none | 1 |" in out and "| weak | distractor_class | 1 |" in out and "(n=1)" in out

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri)
    exp = client.get_experiment_by_name("e2e-ablation")
    parents = client.search_runs(
        [exp.experiment_id], f"tags.`ablation.name` = '{name}' and tags.`ablation.role` = 'grid'"
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} == {
        "results/ablation.md", "results/trials.csv", "results/ablation.png"}  # fmt: skip
    assert 0.0 <= parent.data.metrics["weak.none.rank1_mean"] <= 1.0
    assert "weak.distractor_class.d_mAP_mean" in parent.data.metrics
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.data.params["condition"], c.data.params["seed"]) for c in children) == [
        ("distractor_class", "0"), ("none", "0")]  # fmt: skip
    assert all(c.info.status == "FINISHED" and 0 <= c.data.metrics["mAP"] <= 1 for c in children)

    # the same name again is refused; --resume continues it (here: everything is done, nothing trains again)
    again = job_runner.here("ablation.py", argv[2:], env=env)  # refused before any data read or Ray: in this process
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    assert again.stderr.count("\n") == 1 and not again.stdout
    resumed = run(argv + ["--resume"], env, timeout=600)
    assert "2 trials, 2 complete" in resumed.stdout
    assert (
        len(
            client.search_runs(
                [exp.experiment_id], f"tags.`ablation.role` = 'reid' and tags.`ablation.name` = '{name}'"
            )
        )
        == 2
    )
