"""Issue #15 part A, as a user meets it: a run that diverges and a request the cluster can never hold. (The third, a
stopped job whose MLflow run must end KILLED, is checked where a job is stopped: tests/test_faults.py.)

The fast tests check the pure parts (which losses stop a run, how many workers fit); the slow ones run
``jobs/train_gan.py`` directly (as a user does, ``RAY_ADDRESS`` set) against the embedded stack's Ray head, loopback
S3 and MLflow server."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from reid_core.train.loops import NonFiniteLossError, non_finite_losses
from reid_core.workflows.pipeline import workers_that_fit
from tests import job_runner
from tests.synthetic_data import make_synthetic, stack_settings

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fast
def test_non_finite_losses_name_epoch_step_rank_and_value():
    assert non_finite_losses({"loss_d": 0.7, "loss_g": 1.2}, rank=0, world=1, epoch=3, step=5) is None
    line = non_finite_losses({"loss_d": float("nan"), "loss_g": 1.2}, rank=0, world=1, epoch=3, step=5)
    assert line == "non-finite loss at epoch 3, step 5: loss_d = nan (rank 0)"
    line = non_finite_losses({"loss": float("-inf"), "total_loss": float("inf")}, rank=0, world=1, epoch=0, step=0)
    assert "loss = -inf (rank 0)" in line and "total_loss = inf (rank 0)" in line


def test_non_finite_loss_error_survives_pickling_with_its_message():
    """Ray ships a worker's error to the driver by pickling it."""
    err = pickle.loads(pickle.dumps(NonFiniteLossError("non-finite loss at epoch 0, step 1: loss_g = nan (rank 1)")))
    assert str(err) == "non-finite loss at epoch 0, step 1: loss_g = nan (rank 1)"


@pytest.mark.parametrize(
    ("nodes", "bundle", "strategy", "expected"),
    [
        ([{"CPU": 2.0}], {"CPU": 1.0}, "PACK", 2),  # the embedded stack: 2 CPUs, so 3 workers can never run
        ([{"CPU": 2.0}], {"CPU": 0.5}, "PACK", 4),
        ([{"CPU": 2.0}, {"CPU": 1.0}], {"CPU": 1.0}, "SPREAD", 3),
        ([{"CPU": 2.0}, {"CPU": 1.0}], {"CPU": 1.0}, "STRICT_PACK", 2),
        ([{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 0.5}], {"CPU": 1.0}, "STRICT_SPREAD", 2),
        ([{"CPU": 8.0}], {"CPU": 1.0, "GPU": 1.0}, "PACK", 0),  # no GPU anywhere
        ([{"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0}], {"CPU": 1.0, "GPU": 1.0}, "PACK", 3),
        ([{"CPU": 1.5}], {"CPU": 1.0}, "PACK", 1),
        ([], {"CPU": 1.0}, "PACK", 0),
    ],
)
def test_workers_that_fit(nodes, bundle, strategy, expected):
    assert workers_that_fit(nodes, bundle, strategy) == expected


# ------------------------------------------------------------------------------------------------ slow
@pytest.fixture(scope="module")
def gan_dataset(s3_server):
    data = f"s3://{s3_server.bucket}/hostile-{uuid.uuid4().hex[:6]}/msmt17"
    return make_synthetic(data, ids=16, images_per_id=8, cameras=2, settings=stack_settings(s3_server))


def direct_job(services_stack, s3_server, data: str, run_name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs/train_gan.py"), "--config", str(ROOT / "configs/demo.yaml"),
            "--smoke-test", "--set", f"data.uri={data}", "--set", "data.max_images=32", "--set", "optim.batch_size=8",
            "--set", f"run.storage=s3://{s3_server.bucket}/hostile-runs", "--set", f"run.name={run_name}",
            "--set", "tracking.experiment=hostile", "--set", f"tracking.registered_model=gen-{run_name}",
            *overrides]  # fmt: skip


def job_env(services_stack) -> dict:
    return job_runner.job_env({**services_stack.full_env, "DS_ACCELERATOR": "cpu"})


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def train_workers_ever(stack) -> int:
    return sum(a["class_name"] == "RayTrainWorker" for a in stack.ray_state("actors"))


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_loss(services_stack, s3_server, gan_dataset):
    """optim.lr=inf trained with every loss NaN, registered the generator and moved @candidate; optim.lr=nan failed
    after three worker-group attempts asking to resume (issue #15 item 1). Non-finite values are now refused by the
    config (tests/test_config.py); a finite learning rate that still diverges must stop the run at its first
    non-finite loss: one line naming epoch, step and loss, nothing registered, no restart, the MLflow run FAILED."""
    from reid_core import tracking

    run_name = f"diverge-{uuid.uuid4().hex[:6]}"
    workers_before = train_workers_ever(services_stack)
    t0 = time.monotonic()
    proc = subprocess.run(direct_job(services_stack, s3_server, gan_dataset, run_name, "--set", "optim.lr=1e30",
                                     "--set", "run.max_failures=2", "--set", "optim.batch_size=4"),
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=job_env(services_stack))  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-4000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-4000:]
    line = lines[0]
    assert "training stopped: non-finite loss at epoch 0, step " in line and "(rank " in line, line
    assert "nan" in line or "inf" in line, line
    assert "resume" not in line and "same command" not in line, line
    assert "Nothing was registered" in line
    # No worker-group restart: exactly the run's 2 workers were ever started.
    assert train_workers_ever(services_stack) - workers_before == 2
    c = tracking.client(services_stack.mlflow_uri)
    run_id = tracking.find_run(services_stack.mlflow_uri, "hostile", run_name)
    assert run_id is not None
    assert c.get_run(run_id).info.status == "FAILED"
    assert not c.search_model_versions(f"name = 'gen-{run_name}'")
    print(f"diverging run: failed after {seconds:.0f} s")


@pytest.mark.slow
def test_workers_the_cluster_can_never_hold_fail_in_preflight(services_stack, s3_server, gan_dataset):
    """scaling.num_workers=3 on the 2-CPU stack passed preflight, then Ray retried every 60 s without end, and the
    killed job's MLflow run stayed RUNNING (issue #15 item 8)."""
    from reid_core import tracking

    assert services_stack.num_cpus < 3
    run_name = f"toobig-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    proc = subprocess.run(direct_job(services_stack, s3_server, gan_dataset, run_name, "--set", "scaling.num_workers=3",
                                     "--set", "optim.batch_size=4"),
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=job_env(services_stack))  # fmt: skip
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-4000:]
    assert "scaling.num_workers: 3 workers of 1 CPU each (PACK) cannot run on this Ray cluster" in lines[0]
    assert f"hold {services_stack.num_cpus:g} CPU in all, room for {services_stack.num_cpus}" in lines[0]
    assert "Traceback" not in proc.stderr
    assert seconds < 120, seconds
    # Nothing started: no MLflow run of that name.
    assert tracking.find_run(services_stack.mlflow_uri, "hostile", run_name) is None
    print(f"unsatisfiable request: refused after {seconds:.0f} s")


# ------------------------------------------------------------------------------------------------ --smoke-test
@pytest.mark.parametrize(
    ("job", "args", "message"),
    [
        # `synthesize --num-images 0 --smoke-test` wrote 64 images and exited 0 (issue #15 item 9b): the smoke test's
        # sizes are now defaults that explicit arguments override, in every job that has one.
        ("synthesize.py", ["--model", "models:/g@candidate", "--out", "{tmp}/d", "--num-images", "0", "--smoke-test",
                           "--tracking-uri", "http://127.0.0.1:9"], "--num-images must be ≥ 1; got 0"),
        # the explicit --batch-size wins, the smoke test's --chunk-size 32 still applies
        ("synthesize.py", ["--model", "models:/g@candidate", "--out", "{tmp}/d", "--batch-size", "5", "--smoke-test",
                           "--tracking-uri", "http://127.0.0.1:9"],
         "--chunk-size must be a positive multiple of --batch-size (5) so that batches start at the same indices "
         "whatever the number of workers; got 32"),
        ("evaluate.py", ["--model", "models:/r@champion", "--data", "{tmp}/d", "--smoke-test", "--max-queries", "0",
                         "--tracking-uri", "http://127.0.0.1:9"], "--max-queries must be ≥ 1; got 0"),
        ("evaluate.py", ["--model", "models:/r@champion", "--data", "{tmp}/d", "--smoke-test", "--batch-size", "0",
                         "--tracking-uri", "http://127.0.0.1:9"], "--batch-size must be ≥ 1; got 0"),
        ("make_dataset.py", ["--out", "{tmp}/m", "--smoke-test", "--ids", "0"], "at least 2 identities"),
        ("make_dataset.py", ["--out", "{tmp}/m", "--face-share", "nan"], "face_share nan is outside [0, 1]"),
        ("make_dataset.py", ["--out", "{tmp}/m", "--head-share", "nan"], "head_share nan is outside [0.1, 0.5]"),
        ("pack_dataset.py", ["--src", "{tmp}/s", "--layout", "msmt17", "--out", "{tmp}/p", "--shard-mb", "nan"],
         "--shard-mb nan: expected a positive size"),
        ("pack_dataset.py", ["--src", "{tmp}/s", "--layout", "msmt17", "--out", "{tmp}/p", "--shard-mb", "inf"],
         "--shard-mb inf: expected a positive size"),
    ],
)  # fmt: skip
def test_explicit_bad_sizes_are_refused_in_one_line(tmp_path, job, args, message):
    """In this process (``tests/job_runner.py``); each job's own refusal tests run it as a subprocess too."""
    proc = job_runner.here(job, [a.format(tmp=tmp_path) for a in args], cwd=ROOT / "tests")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.jpg")) and not list(tmp_path.rglob("*.png"))  # nothing written
