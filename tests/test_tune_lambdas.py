"""jobs/tune_lambdas.py: the λ1/λ2 search. Pure parts (trial resources, result rows, the heat map), the job's one-line
refusals before Ray, many concurrent Tune trials logging to the real MLflow server without losing a metric, and (slow)
a 2×1 smoke search of the whole chain against the real stack, one trial at a time, interrupted by killing its driver
after the first trial finished (the second is then under way) and resumed with ``--resume``."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from reid_core.config import TuneJobConfig, load_config
from reid_core.viz import lambda_heatmap_png
from reid_core.workflows import search
from tests import job_runner
from tests.synthetic_data import make_synthetic, stack_settings

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ pure parts
def test_trial_resources_and_concurrency_follow_the_cluster():
    cfg = load_config(TuneJobConfig, ROOT / "configs/tune.yaml")
    needs = search.trial_resources(cfg)
    assert needs == {"CPU": 1 + 8 * 6, "GPU": 8.0}  # the trial + the re-ID stage's 8 workers × 6 CPUs (the biggest)
    assert search.concurrent_trials({"CPU": 400.0, "GPU": 16.0}, needs) == 2  # GPUs are the limit
    assert search.concurrent_trials({"CPU": 60.0, "GPU": 64.0}, needs) == 1  # CPUs are
    assert search.concurrent_trials({"CPU": 4.0}, needs) == 1  # too small (or autoscaling): one at a time
    demo = load_config(TuneJobConfig, ROOT / "configs/tune_demo.yaml")
    assert search.trial_resources(demo) == {"CPU": pytest.approx(1.0)}  # 0.1 + one worker of 0.9
    assert search.concurrent_trials({"CPU": 2.0}, search.trial_resources(demo)) == 2


def test_grid_space_is_the_papers_grid_and_asha_samples_ranges():
    from ray.tune.search.variant_generator import generate_variants

    cfg = load_config(TuneJobConfig, ROOT / "configs/tune_demo.yaml")
    cells = {
        (v["lambda1"], v["lambda2"], v["guidance_mode"]) for _, v in generate_variants(search.param_space(cfg.search))
    }
    assert cells == {(a, b, "weighted") for a in (0.0, 0.025, 0.05) for b in (0.0, 0.025, 0.05)}
    asha = load_config(TuneJobConfig, ROOT / "configs/tune_demo.yaml",
                       ["search.mode=asha", "search.lambda1=[0,0.1]", "search.lambda2=[0.02,0.05]",
                        "search.guidance_modes=[weighted,paper]"])  # fmt: skip
    space = search.param_space(asha.search)
    assert (space["lambda1"].lower, space["lambda1"].upper) == (0.0, 0.1)
    assert (space["lambda2"].lower, space["lambda2"].upper) == (0.02, 0.05)
    assert set(space["guidance_mode"].categories) == {"weighted", "paper"}


def _result(lambda1, lambda2, metrics, error=None):
    return SimpleNamespace(config={"lambda1": lambda1, "lambda2": lambda2, "guidance_mode": "weighted"},
                           metrics=metrics, error=error, path=f"/x/chain_trial_ab12c_0000{int(lambda1 * 100)}_0_x")  # fmt: skip


def test_result_rows_statuses_and_the_best_complete_trial():
    done = {"stage": "done", "rank1": 0.5, "mAP": 0.30, "mINP": 0.1, "reid_version": "3", "trial_id": "t1"}
    better_rank1 = {"stage": "done", "rank1": 0.7, "mAP": 0.25, "mINP": 0.1, "reid_version": "4", "trial_id": "t2"}
    stopped = {"stage": "reid", "rank1": 0.9, "mAP": 0.9, "mINP": 0.9, "reid_epoch": 1, "trial_id": "t3"}
    rows = search.result_rows([_result(0.05, 0.0, done), _result(0.0, 0.0, better_rank1),
                               _result(0.025, 0.0, stopped), _result(0.05, 0.05, None, error=RuntimeError("x"))])  # fmt: skip
    assert [r["status"] for r in rows] == ["complete", "stopped early", "complete", "error"]  # sorted by λ1, λ2
    assert rows[3]["trial_id"] == "ab12c"  # from the folder when the trial reported nothing
    assert search.best_row(rows, "mAP")["trial_id"] == "t1"  # a stopped trial's validation never wins
    assert search.best_row(rows, "rank1")["trial_id"] == "t2"
    assert search.best_row([rows[1]], "mAP") is None


def test_heat_map_marks_missing_cells_and_checks_its_input(tmp_path):
    grids = {"mAP": np.array([[0.1, 0.2, np.nan], [0.3, 0.25, 0.2], [0.1, 0.05, 0.3]]), "Rank-1": np.full((3, 3), 0.5)}
    path = lambda_heatmap_png(grids, [0, 0.025, 0.05], [0, 0.025, 0.05], tmp_path / "h.png", title="weighted")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height > 100
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - 204).max(axis=1) <= 1).any()  # the grey of the missing cell
    with pytest.raises(ValueError, match="expected shape"):
        lambda_heatmap_png({"mAP": np.zeros((2, 3))}, [0, 1], [0, 1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="fractions"):
        lambda_heatmap_png({"mAP": np.full((1, 1), 17.5)}, [0], [0], tmp_path / "x.png")


# ------------------------------------------------------------------------------------------------ bad input
def run_job(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/tune_lambdas.py", *args], cwd=ROOT, env=job_runner.job_env(env),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["search.lambda1=[0,1.5]"], "search.lambda1[1]: 1.5 is outside [0, 1]"),
        (["search.guidance_modes=[weighted,magic]"], "search.guidance_modes[1]: 'magic' is not one of paper, weighted"),
        (["gan.guidance.lambda2=-0.1"], "gan.guidance.lambda2: -0.1 is outside [0, 1]"),
        (["search.mode=asha", "search.lambda1=[0,0.025,0.05]"], "search.lambda1: asha samples λ uniformly"),
        (
            ["search.mode=asha", "search.lambda1=[0,0.05]", "search.lambda2=[0,0.05]", "reid.eval.every_epochs=0"],
            "reid.eval.every_epochs: asha stops trials",
        ),
        (["search.objective=loss"], "search.objective: 'loss' is not one of mAP, rank1"),
    ],
)
def test_bad_input_is_one_line_before_ray(tmp_path, overrides, expected):
    args = ["--config", "configs/tune_demo.yaml", "--set", f"search.storage={tmp_path}/state"]
    proc = run_job([*args, *(a for o in overrides for a in ("--set", o))], {}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert proc.stderr.startswith("error: ") and expected in proc.stderr
    assert not (tmp_path / "state").exists()  # nothing started


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume"], "error: --resume: no search 'search-new' to resume at "),
        (["--resume-errored"], "error: --resume-errored: only with --resume"),
    ],
)
def test_resume_flags_are_checked_first(tmp_path, flags, message):
    """The search's own state is checked before its data, MLflow or Ray (none of which is set here): one line, exit
    2, and nothing is written to the search's storage."""
    state = tmp_path / "state"
    proc = job_runner.here("tune_lambdas.py", ["--config", "configs/tune_demo.yaml", "--set", "search.name=search-new",
                                               "--set", f"search.storage={state}", *flags])  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not proc.stdout and not state.exists()


# ------------------------------------------------------------------------------------------------ concurrent logging
STEPS, KEYS, TRIALS = 25, 6, 6


def log_many(config: dict) -> None:
    """A cheap Tune trial: its own MLflow run, then STEPS batches of KEYS metrics as fast as it can, through
    ``reid_core.tracking`` (the code the chain's trials use)."""
    from ray import tune

    from reid_core import tracking

    run_id = tracking.start_run(config["uri"], config["experiment"], f"trial-{config['i']}", {"i": config["i"]},
                                tags={"tune.trial_id": tune.get_context().get_trial_id()})  # fmt: skip
    for step in range(STEPS):
        tracking.log_metrics(config["uri"], run_id, {f"m{k}": config["i"] * 1000 + step * 10 + k for k in range(KEYS)},
                             step=step)  # fmt: skip
    tracking.set_terminated(config["uri"], run_id)
    tune.report({"run_id": run_id, "i": config["i"]})


def run_concurrent_trials(uri: str, experiment: str, storage_path: str) -> list[dict]:
    """Driver side: TRIALS trials of ``log_many`` at once on the Ray cluster of ``RAY_ADDRESS``."""
    import ray
    from ray import tune

    ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        tuner = tune.Tuner(
            tune.with_resources(log_many, {"CPU": 0.1}),
            param_space={"i": tune.grid_search(list(range(TRIALS))), "uri": uri, "experiment": experiment},
            tune_config=tune.TuneConfig(max_concurrent_trials=TRIALS),
            run_config=tune.RunConfig(name=experiment, storage_path=storage_path),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    return [{"i": r.metrics["i"], "run_id": r.metrics["run_id"]} if not r.error else {"error": str(r.error)}
            for r in results]  # fmt: skip


@pytest.mark.slow
def test_concurrent_trials_lose_no_metric(services_stack, tmp_path):
    """TRIALS Tune trials log STEPS × KEYS metrics at once to the MLflow server (sqlite): every point arrives, once.
    This file is the Ray driver (run as a script), so the trainable travels to the workers by value."""
    from mlflow.tracking import MlflowClient

    uri = services_stack.mlflow_uri
    experiment = f"concurrent-{uuid.uuid4().hex[:6]}"
    env = job_runner.job_env({**services_stack.full_env, "PYTHONPATH": str(ROOT)})
    proc = subprocess.run([sys.executable, __file__, uri, experiment, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [r["error"][-3000:] for r in results if "error" in r]
    assert not errors, "\n\n".join(errors)
    assert sorted(r["i"] for r in results) == list(range(TRIALS))
    client = MlflowClient(tracking_uri=uri)
    for r in results:
        assert client.get_run(r["run_id"]).info.status == "FINISHED"
        for k in range(KEYS):
            history = sorted((m.step, m.value) for m in client.get_metric_history(r["run_id"], f"m{k}"))
            assert history == [(s, float(r["i"] * 1000 + s * 10 + k)) for s in range(STEPS)], (r, k)  # all, once


# ------------------------------------------------------------------------------------------------ the whole chain
@pytest.fixture(scope="module")
def interrupted_search(services_stack, s3_server):
    """A 2×1 smoke search, one trial at a time, whose driver is killed (SIGKILL) after its first trial finished, while
    the second runs, then resumed (the slow tests below share it). Tune's concurrent trials are
    ``test_concurrent_trials_lose_no_metric``'s subject; one at a time, the kill always lands inside a trial."""
    from reid_core import tracking
    from reid_core.workflows.search import SEARCH_TAG

    env = {**services_stack.full_env, "DS_ACCELERATOR": "cpu"}
    tag = uuid.uuid4().hex[:6]
    bucket = s3_server.bucket
    data = f"s3://{bucket}/tune-{tag}/msmt17"
    make_synthetic(data, ids=20, images_per_id=8, cameras=3, settings=stack_settings(s3_server))
    name, experiment, model = f"search-{tag}", f"tune-{tag}", f"tune-reid-{tag}"
    args = ["--config", "configs/tune_demo.yaml", "--smoke-test",
            "--set", "search.lambda1=[0.0,0.05]", "--set", "search.lambda2=[0.05]",  # 2 trials,
            "--set", "search.max_concurrent_trials=1",  # one at a time
            "--set", f"search.name={name}", "--set", f"search.storage=s3://{bucket}/tune-{tag}/state",
            "--set", f"tracking.experiment={experiment}", "--set", f"synthesis.out=s3://{bucket}/tune-{tag}/distractors",
            "--set", f"gan.data.uri={data}", "--set", f"reid.data.uri={data}",
            "--set", f"gan.run.storage=s3://{bucket}/tune-{tag}/runs", "--set", f"reid.run.storage=s3://{bucket}/tune-{tag}/runs",
            "--set", f"gan.tracking.registered_model=tune-gen-{tag}", "--set", f"reid.tracking.registered_model={model}"]  # fmt: skip
    log_path = Path(services_stack.root) / f"tune-{tag}-first.log"
    with open(log_path, "w") as log_file:
        first = subprocess.Popen([sys.executable, "jobs/tune_lambdas.py", *args], cwd=ROOT, env=job_runner.job_env(env),
                                 stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        uri = services_stack.mlflow_uri
        deadline = time.monotonic() + 900
        finished: list[dict] = []
        while time.monotonic() < deadline and first.poll() is None:
            runs = tracking.find_runs(uri, experiment, {SEARCH_TAG: name, "tune.role": "trial"})
            finished = [r for r in runs if r["status"] == "FINISHED"]
            if finished:
                break
            time.sleep(2)
        assert first.poll() is None, f"the search ended before it was interrupted:\n{log_path.read_text()[-4000:]}"
        assert finished, f"no trial finished in time:\n{log_path.read_text()[-4000:]}"
        os.kill(first.pid, signal.SIGKILL)  # a killed driver: no cleanup of its own
        first.wait(timeout=60)
    killed_at = time.time()
    # Ray notices the dead driver and removes its trials' placement groups (and the actors in them): wait for that
    # state, not for a fixed time, so that the resumed search does not find the old trials' resources still taken.
    deadline = time.monotonic() + 180
    while held := [g for g in services_stack.ray_state("placement_groups") if g["state"] != "REMOVED"]:
        assert time.monotonic() < deadline, f"Ray still holds placement groups 180 s after the driver died: {held}"
        time.sleep(0.5)
    # --resume-errored too: a trial the kill (or the memory of a shared machine) turned into an error runs again
    resumed = run_job([*args, "--resume", "--resume-errored"], env, timeout=1200)
    assert resumed.returncode == 0, f"{resumed.stdout[-6000:]}\n{resumed.stderr[-6000:]}"
    # a third start without --resume: refused, the search exists (before any data read or Ray: in this process)
    again = job_runner.here("tune_lambdas.py", args, env=env)
    return SimpleNamespace(name=name, experiment=experiment, model=model, uri=uri, first_finished=finished,
                           killed_at=killed_at, resumed=resumed, again=again, generator=f"tune-gen-{tag}")  # fmt: skip


@pytest.mark.slow
def test_resume_keeps_the_finished_trial_and_completes_the_rest(interrupted_search):
    from reid_core import tracking
    from reid_core.workflows.search import SEARCH_TAG, TRIAL_TAG

    s = interrupted_search
    assert "=== tune_lambdas summary ===" in s.resumed.stdout
    assert "2 trials: 2 complete" in s.resumed.stdout
    done_before = {r["tags"][TRIAL_TAG] for r in s.first_finished}
    for trial_id in done_before:
        runs = tracking.find_runs(s.uri, s.experiment, {SEARCH_TAG: s.name, TRIAL_TAG: trial_id})
        roles = sorted(r["tags"]["tune.role"] for r in runs)
        assert roles == ["distractors", "gan", "reid", "trial"], roles  # each stage ran exactly once: not rerun
    trials = tracking.find_runs(s.uri, s.experiment, {SEARCH_TAG: s.name, "tune.role": "trial"})
    assert len(trials) == 2 and {r["status"] for r in trials} == {"FINISHED"}  # one child run per trial, reused
    for trial in trials:
        runs = tracking.find_runs(s.uri, s.experiment, {SEARCH_TAG: s.name, TRIAL_TAG: trial["tags"][TRIAL_TAG]})
        assert sorted(r["tags"]["tune.role"] for r in runs).count("gan") == 1  # an interrupted stage resumed its run
    assert s.again.returncode == 2 and "already exists" in s.again.stderr and "--resume" in s.again.stderr


@pytest.mark.slow
def test_search_lands_in_mlflow_as_parent_and_child_runs(interrupted_search):
    from mlflow.tracking import MlflowClient

    from reid_core import tracking
    from reid_core.workflows.search import SEARCH_TAG

    s = interrupted_search
    client = MlflowClient(tracking_uri=s.uri, registry_uri=s.uri)
    (parent,) = tracking.find_runs(s.uri, s.experiment, {SEARCH_TAG: s.name, "tune.role": "search"})
    assert parent["status"] == "FINISHED"
    trials = tracking.find_runs(s.uri, s.experiment, {SEARCH_TAG: s.name, "tune.role": "trial"})
    cells = set()
    for trial in trials:
        run = client.get_run(trial["run_id"])
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        assert tags["mlflow.parentRunId"] == parent["run_id"]
        cells.add((float(params["lambda1"]), float(params["lambda2"]), params["guidance.mode"]))
        for key in ("face_rate", "rank1", "mAP", "mINP"):
            assert 0.0 <= metrics[key] <= 1.0, key
        generator = client.get_model_version(s.generator, tags["generator.version"])
        assert generator.tags["lambda1"] == params["lambda1"] and generator.tags["lambda2"] == params["lambda2"]
        reid = client.get_model_version(s.model, tags["reid.version"])
        assert reid.tags["generator"] == tags["generator.uri"] and reid.tags["tune.trial_id"] == tags["tune.trial_id"]
        for stage in ("gan", "distractors", "reid"):  # the stage runs are nested under the trial's run
            assert client.get_run(tags[f"{stage}.run_id"]).data.tags["mlflow.parentRunId"] == trial["run_id"]
        assert client.list_artifacts(tags["reid.run_id"], "export") == []  # tune_demo.yaml: reid.tracking.exports=[]
        history = client.get_metric_history(tags["reid.run_id"], "val_mAP")  # the validation ASHA would compare
        assert sorted(m.step for m in history) == [0, 1]
    assert cells == {(a, 0.05, "weighted") for a in (0.0, 0.05)}

    # The results table and the heat map on the parent; the best trial's model has the alias.
    rows = list(csv.DictReader(io.StringIO(Path(client.download_artifacts(parent["run_id"], "results/trials.csv"))
                                           .read_text())))  # fmt: skip
    assert len(rows) == 2 and {r["status"] for r in rows} == {"complete"}
    best = max(rows, key=lambda r: float(r["mAP"]))
    assert client.get_model_version_by_alias(s.model, "candidate").version == best["reid_version"]
    assert client.get_run(parent["run_id"]).data.tags["best.trial_id"] == best["trial_id"]
    assert client.get_run(parent["run_id"]).data.metrics["best_mAP"] == pytest.approx(float(best["mAP"]))
    with Image.open(client.download_artifacts(parent["run_id"], "results/heatmap_weighted.png")) as im:
        assert im.format == "PNG" and im.width > 300
    markdown = Path(client.download_artifacts(parent["run_id"], "results/trials.md")).read_text()
    assert markdown.count("| complete |") == 2


if __name__ == "__main__":  # test_concurrent_trials_lose_no_metric's Ray driver
    print(json.dumps(run_concurrent_trials(*sys.argv[1:4])))
