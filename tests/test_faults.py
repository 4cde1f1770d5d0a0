"""Faults injected into running training jobs, end to end: the GAN job submitted with ``ray job submit`` to the real
Ray head, reading its data from and checkpointing into the loopback S3, logging to the real MLflow server.

The job reaches S3 and MLflow through ``devstack.proxy`` (each a loopback reverse proxy in this process), which
throttles, stops and restarts them, and stalls the job at known points, keyed on what the job does (its data reads,
its checkpoint uploads), not on the clock:

- ``test_gan_job_survives_throttling_outages_mlflow_down_and_a_killed_worker``: one job, 7 epochs, five faults in
  turn: the first checkpoint upload throttled (503 SlowDown); S3 stopped for 6 s half-way through epoch 1; S3 stopped
  for 4 s at the start of epoch 1's checkpoint upload; MLflow stopped from the middle of epoch 2 to the middle of
  epoch 4; the Ray Train worker process SIGKILLed half-way through epoch 5. Each of rows 1b, 3b and 4b of
  ``docs/reliability.md``;
- ``test_stopped_job_resubmitted_with_the_same_run_name_resumes``: ``ray job stop`` half-way through epoch 2 (the
  stopped job's MLflow run ends KILLED, not RUNNING), then the same command again (row 2);
- ``test_long_s3_outage_ends_in_a_clear_error_with_the_last_checkpoint_intact`` (row 3b).

Figures (fault times, progress lost) are logged at INFO: ``pytest -o log_cli=true -o log_cli_level=INFO``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from devstack.proxy import Fail, FaultProxy, Hold, Outage
from reid_core import storage
from tests.synthetic_data import make_synthetic, stack_settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMAGES, BATCH = 48, 8  # per epoch: 6 steps of 8 images on 1 worker, 3 each on the demo's 2; one GET per image
MID_EPOCH = IMAGES // 2  # data GETs after an epoch's start that make "half-way through"

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ fixtures, helpers
@pytest.fixture(scope="module")
def dataset(s3_server, services_stack):
    tag = uuid.uuid4().hex[:6]
    uri = f"s3://{s3_server.bucket}/faults-{tag}/msmt17"
    return make_synthetic(uri, ids=20, images_per_id=6, cameras=2, settings=stack_settings(s3_server))


@pytest.fixture
def mlflow_proxy(services_stack):
    with FaultProxy(services_stack.mlflow_uri) as proxy:
        yield proxy


def _direct_settings(s3_server) -> storage.S3Settings:
    return storage.S3Settings(endpoint_url=s3_server.s3_endpoint, key="testing", secret="testing")


class Job:
    """``ray job submit`` of ``jobs/train_gan.py`` in the background, its output in a file."""

    def __init__(self, stack, s3_proxy, mlflow_uri: str, run_name: str, overrides: list[str], log_dir: Path) -> None:
        self.stack, self.run_name = stack, run_name
        self.submission_id = f"{run_name}-{uuid.uuid4().hex[:4]}"
        env = {**stack.full_env, "AWS_ENDPOINT_URL": s3_proxy.url, "MLFLOW_TRACKING_URI": mlflow_uri}
        env.pop("AWS_ENDPOINT_URL_S3", None)
        runtime_env = {
            "env_vars": {
                **{k: v for k, v in env.items() if not k.startswith("RAY_")},
                "DS_ACCELERATOR": "cpu",
                "RAY_ADDRESS": stack.ray_address,
            },  # fmt: skip
            "excludes": stack.runtime_env()["excludes"],
        }
        self.env = {**os.environ, **stack.full_env}
        cmd = [
            str(BIN / "ray"), "job", "submit", "--address", stack.dashboard_url, "--working-dir", ".",
            "--submission-id", self.submission_id, "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "jobs/train_gan.py", "--config", "configs/demo.yaml", "--smoke-test",
            "--set", f"data.max_images={IMAGES}", "--set", f"optim.batch_size={BATCH}",
            "--set", f"run.name={run_name}", "--set", "run.keep_checkpoints=100",
            "--set", "tracking.experiment=faults", "--set", f"tracking.registered_model=gen-{run_name}",
            *[a for o in overrides for a in ("--set", o)],
        ]  # fmt: skip
        self.log_path = log_dir / f"{self.submission_id}.log"
        self.started = time.monotonic()
        with self.log_path.open("w") as out:  # a file, not a pipe: nobody reads while the job runs
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"job {self.submission_id} still running after {timeout} s:\n{self.output[-6000:]}"
            ) from None

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.stack.dashboard_url, self.submission_id],
                       cwd=ROOT, env=self.env, capture_output=True, timeout=120)  # fmt: skip
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def status(self) -> str:
        out = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", self.stack.dashboard_url, self.submission_id],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return out.stdout + out.stderr

    def alive(self) -> bool:
        return self.proc.poll() is None


class Script:
    """Faults keyed on what the job does, as the S3 proxy sees it: ``checkpoints`` counts the run's checkpoint
    folders written so far (epoch e's upload makes it e + 1), ``gets`` the data reads since the last new one."""

    def __init__(self, run_name: str, data_uri: str) -> None:
        self.run_name = run_name
        self.data_key = data_uri.split("://", 1)[1].split("/", 1)[1]  # key prefix of the dataset
        self.dirs: list[str] = []
        self.gets = 0
        self.at_upload: dict[int, object] = {}  # checkpoints -> fault for the first upload request of that folder
        self.mid_epoch: dict[int, object] = {}  # checkpoints -> fault (or callable) for the mid-epoch data read
        self.fired: dict[str, float] = {}  # what -> time.monotonic() it fired

    @property
    def checkpoints(self) -> int:
        return len(self.dirs)

    def __call__(self, method: str, path: str):
        marker = f"/{self.run_name}/checkpoint_"
        if marker in path and method in ("PUT", "POST"):
            folder, inside, _ = path.split(f"/{self.run_name}/", 1)[1].split("?", 1)[0].partition("/")
            if not inside:  # a file next to the checkpoints (Ray's checkpoint_manager_snapshot.json)
                return None
            if folder not in self.dirs:
                self.dirs.append(folder)
                self.gets = 0
                return self._fire(f"upload {self.checkpoints}", self.at_upload.pop(self.checkpoints, None))
            return None
        if method == "GET" and self.data_key in path:
            self.gets += 1
            if self.gets >= MID_EPOCH and self.checkpoints in self.mid_epoch:
                return self._fire(f"mid-epoch {self.checkpoints}", self.mid_epoch.pop(self.checkpoints))
        return None

    def _fire(self, what: str, fault):
        if fault is None:
            return None
        self.fired[what] = time.monotonic()
        return fault() if callable(fault) else fault


def _dump(proxy, path: Path) -> None:
    """Every request the proxy saw, for a failing test's post-mortem (in the test's tmp_path)."""
    t0 = proxy.seen[0].time if proxy.seen else 0.0
    path.write_text("".join(f"{s.time - t0:9.3f} {s.method:6} {s.outcome:12} {s.path}\n" for s in list(proxy.seen)))


def _snapshot(s3_server, storage_uri: str, run_name: str) -> dict | None:
    """Ray Train's checkpoint-manager snapshot of the run (written when the controller registers a checkpoint)."""
    try:
        data = storage.read_bytes(
            f"{storage_uri}/{run_name}/checkpoint_manager_snapshot.json", _direct_settings(s3_server)
        )
    except (FileNotFoundError, storage.StorageError):
        return None
    return json.loads(data)


def _registered_epoch(s3_server, storage_uri: str, run_name: str) -> int | None:
    snap = _snapshot(s3_server, storage_uri, run_name)
    latest = (snap or {}).get("latest_checkpoint_result") or {}
    return (latest.get("metrics") or {}).get("epoch")


def _wait_for(predicate, timeout: float, what: str, job: Job | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None and not job.alive():
            raise AssertionError(f"the job ended while waiting for {what}:\n{job.output[-6000:]}")
        time.sleep(0.3)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}" + (f":\n{job.output[-6000:]}" if job else "")
    )


def _train_workers(stack, alive: bool = True) -> list[dict]:
    """The cluster's Ray Train worker actors: alive ones, or every one ever started (Ray keeps dead actors' records)."""
    return [a for a in stack.ray_state("actors")
            if a["class_name"] == "RayTrainWorker" and (a["state"] == "ALIVE" or not alive)]  # fmt: skip


def _checkpoint_epochs(s3_server, storage_uri: str, run_name: str) -> dict[str, int]:
    """{checkpoint folder: epoch} of every checkpoint of the run on S3, each verified against its manifests."""
    from reid_core.train.checkpoint import verify_checkpoint

    settings = _direct_settings(s3_server)
    files = storage.list_files(f"{storage_uri}/{run_name}", settings)
    inside = [f.split(f"/{run_name}/", 1)[1] for f in files]
    folders = sorted({rel.split("/", 1)[0] for rel in inside if rel.startswith("checkpoint_") and "/" in rel})
    out = {}
    for folder in folders:
        prefix = f"{storage_uri}/{run_name}/{folder}/"
        blobs = storage.read_many([f for f in files if f.startswith(prefix)], settings)
        with tempfile.TemporaryDirectory() as tmp:
            for url, data in blobs.items():
                target = Path(tmp) / url[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            out[folder] = verify_checkpoint(tmp)["epoch"]
    return out


def _history(mlflow_uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def _run_of(mlflow_uri: str, run_name: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    exp = client.get_experiment_by_name("faults")
    return client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")


# ------------------------------------------------------------------------------------------------ the tests
def test_gan_job_survives_throttling_outages_mlflow_down_and_a_killed_worker(
    dataset, s3_server, services_stack, s3_proxy, mlflow_proxy, tmp_path
):
    stack, mlflow_uri = services_stack, services_stack.mlflow_uri
    run_name, epochs = f"faults-{uuid.uuid4().hex[:6]}", 7
    storage_uri = f"s3://{s3_server.bucket}/faults-runs"
    script = Script(run_name, dataset)
    held = threading.Event()
    release = threading.Event()

    def hold_for_kill():
        held.set()
        return Hold(release, timeout=300)

    script.at_upload[1] = Fail(503, "SlowDown")  # epoch 0's checkpoint: its first upload request is throttled
    script.mid_epoch[1] = Outage(6.0)  # S3 stopped half-way through epoch 1, back after 6 s with its data
    script.at_upload[2] = Outage(4.0)  # ... and for 4 s as epoch 1's checkpoint upload starts
    script.mid_epoch[2] = lambda: mlflow_proxy.outage(None)  # MLflow stopped half-way through epoch 2 ...
    script.mid_epoch[4] = lambda: mlflow_proxy.restore()  # ... and back half-way through epoch 4
    script.mid_epoch[5] = hold_for_kill  # epoch 5 stalls on a read until the worker is killed
    s3_proxy.add_hook(script)

    workers_before = len(_train_workers(stack, alive=False))
    job = Job(stack, s3_proxy, mlflow_proxy.url, run_name,
              [f"data.uri={dataset}", f"optim.epochs={epochs}", f"run.storage={storage_uri}", "run.max_failures=2",
               "storage.outage_seconds=60"], tmp_path)  # fmt: skip
    try:
        _wait_for(held.is_set, 600, "epoch 5 to start", job)
        # The worker is stalled half-way through epoch 5. Kill it once Ray has registered epoch 4's checkpoint and
        # the epochs MLflow missed are logged (the backlog lives in the worker's memory).
        _wait_for(lambda: _registered_epoch(s3_server, storage_uri, run_name) == 4, 120, "epoch 4 registered", job)
        run_id = _run_of(mlflow_uri, run_name)[0].info.run_id
        _wait_for(lambda: len(_history(mlflow_uri, run_id, "loss_d")) >= 5, 120, "the MLflow backlog", job)
        workers = _train_workers(stack)
        assert len(workers) == 2, workers  # the demo's two workers
        pid = workers[0]["pid"]
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        release.set()
        rc = job.wait(timeout=600)
    finally:
        release.set()
        if job.alive():
            job.stop()
        _dump(s3_proxy, tmp_path / "s3-requests.log")
    out = job.output
    t_end = time.monotonic()
    assert rc == 0, out[-6000:]
    assert "=== train_gan summary ===" in out

    # --- the throttled upload and the outages were retried in place: the only restart is the kill's
    assert s3_proxy.count(outcome="failed 503") == 1
    # Two outages of 6 and 4 s: the proxy's timer brings S3 back no earlier than asked, and on a loaded machine its
    # event loop may run the restore late, so the durations are compared with a tolerance, not rounded to whole seconds.
    durations = [end - start for start, end in s3_proxy.outages]
    assert len(durations) == 2, durations
    assert all(want - 0.05 <= got <= want + 3 for got, want in zip(durations, (6, 4), strict=True)), durations
    assert s3_proxy.count(outcome="cut") >= 2  # each outage cut at least the request that began it
    assert len(_train_workers(stack, alive=False)) - workers_before == 4  # 2 workers, started twice
    resumed = [line for line in out.splitlines() if "resumed from epoch" in line]
    assert resumed and all("resumed from epoch 4" in line for line in resumed), resumed
    assert "NOT logged" not in out
    assert "is not answering" in out and mlflow_proxy.url in out  # the MLflow outage was noticed and said

    # --- one continuous MLflow history: every epoch once, in order, nothing skipped
    for key in ("loss_d", "loss_g", "face_rate", "skipped_images"):
        history = _history(mlflow_uri, run_id, key)
        assert [m.step for m in history] == list(range(epochs)), (key, [m.step for m in history])
    stamps = [m.timestamp for m in _history(mlflow_uri, run_id, "loss_d")]
    assert stamps == sorted(stamps)  # stamped when each epoch ended, also the ones logged late
    assert all(m.value == 0 for m in _history(mlflow_uri, run_id, "skipped_images"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    assert sorted(a.path for a in client.list_artifacts(run_id, "samples")) == [
        f"samples/epoch_{e:03d}.png" for e in range(epochs)
    ]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias(f"gen-{run_name}", "candidate").run_id == run_id

    # --- every checkpoint intact (manifests verified), one per epoch: the killed epoch 5 was never uploaded
    epochs_on_s3 = _checkpoint_epochs(s3_server, storage_uri, run_name)
    assert sorted(epochs_on_s3.values()) == list(range(epochs)), epochs_on_s3
    log.info(
        "faults: throttled upload 1, S3 outages %s s, MLflow down %.0f s, worker killed mid-epoch 5 and resumed from "
        "epoch 4; job end %.0f s after the kill, %.0f s in all",
        [round(e - s, 1) for s, e in s3_proxy.outages],
        mlflow_proxy.outages[0][1] - mlflow_proxy.outages[0][0],
        t_end - t_kill,
        t_end - job.started,
    )


def test_stopped_job_resubmitted_with_the_same_run_name_resumes(dataset, s3_server, services_stack, s3_proxy, tmp_path):
    stack, mlflow_uri = services_stack, services_stack.mlflow_uri
    run_name, epochs = f"resubmit-{uuid.uuid4().hex[:6]}", 4
    storage_uri = f"s3://{s3_server.bucket}/faults-runs"
    script = Script(run_name, dataset)
    held, release = threading.Event(), threading.Event()

    def hold_for_stop():
        held.set()
        return Hold(release, timeout=300)

    script.mid_epoch[2] = hold_for_stop  # epoch 2 stalls half-way until the job is stopped
    s3_proxy.add_hook(script)
    # One worker (the first test kills one of two): the job starts faster and the story is the same.
    overrides = [f"data.uri={dataset}", f"optim.epochs={epochs}", f"run.storage={storage_uri}", "scaling.num_workers=1"]
    workers_before = len(_train_workers(stack, alive=False))
    first = Job(stack, s3_proxy, mlflow_uri, run_name, overrides, tmp_path)
    try:
        _wait_for(held.is_set, 600, "epoch 2 to start", first)
        _wait_for(lambda: _registered_epoch(s3_server, storage_uri, run_name) == 1, 120, "epoch 1 registered", first)
        assert [r.info.status for r in _run_of(mlflow_uri, run_name)] == ["RUNNING"]
        t_stop = time.monotonic()
        first.stop()
    finally:
        release.set()
        if first.alive():
            first.proc.kill()
        _dump(s3_proxy, tmp_path / "s3-requests.log")
    assert "was stopped" in first.status()
    # Nothing of the stopped job keeps running: its Ray Train workers are gone.
    _wait_for(lambda: not _train_workers(stack), 120, "the stopped job's workers to exit")
    # `ray job stop` sent SIGTERM to the driver: its MLflow run ended KILLED rather than staying RUNNING (issue #15)
    [stopped_run] = _run_of(mlflow_uri, run_name)
    assert stopped_run.info.status == "KILLED"

    second = Job(stack, s3_proxy, mlflow_uri, run_name, overrides, tmp_path)
    rc = second.wait(timeout=600)
    out = second.output
    assert rc == 0, out[-6000:]
    assert f"continuing MLflow run {stopped_run.info.run_id}" in out
    resumed = [line for line in out.splitlines() if "resumed from epoch" in line]
    assert resumed and all("resumed from epoch 1" in line for line in resumed), resumed
    assert len(_train_workers(stack, alive=False)) - workers_before == 2  # one per job: no restart in either

    runs = _run_of(mlflow_uri, run_name)
    assert [r.info.run_id for r in runs] == [stopped_run.info.run_id]  # the same run, continued
    assert runs[0].info.status == "FINISHED"
    history = _history(mlflow_uri, stopped_run.info.run_id, "loss_d")
    assert [m.step for m in history] == list(range(epochs))  # epochs 0-1 from the first job, 2-3 from the second
    assert sorted(_checkpoint_epochs(s3_server, storage_uri, run_name).values()) == list(range(epochs))
    log.info("resubmission: stopped mid-epoch 2, resumed from epoch 1; second job %.0f s, %.0f s after the stop",
             time.monotonic() - second.started, time.monotonic() - t_stop)  # fmt: skip


def test_long_s3_outage_ends_in_a_clear_error_with_the_last_checkpoint_intact(
    dataset, s3_server, services_stack, s3_proxy, tmp_path
):
    stack, mlflow_uri = services_stack, services_stack.mlflow_uri
    run_name = f"outage-{uuid.uuid4().hex[:6]}"
    storage_uri = f"s3://{s3_server.bucket}/faults-runs"
    script = Script(run_name, dataset)
    script.mid_epoch[1] = Outage(None)  # S3 stops half-way through epoch 1 and stays down
    s3_proxy.add_hook(script)
    job = Job(stack, s3_proxy, mlflow_uri, run_name,
              [f"data.uri={dataset}", "optim.epochs=3", f"run.storage={storage_uri}", "run.max_failures=0",
               "storage.outage_seconds=10", "scaling.num_workers=1"], tmp_path)  # fmt: skip
    try:
        rc = job.wait(timeout=600)
    finally:
        s3_proxy.restore()
    out = job.output
    t_fail = time.monotonic() - script.fired["mid-epoch 1"]
    assert rc != 0, out[-6000:]
    # One line says what failed, where, and how to resume (``ray job submit`` repeats the job's last output once more
    # in its status message); the driver did not die on a stack trace of its own.
    errors = {line for line in out.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, out[-6000:]
    [error] = errors
    # Whichever gave up first, a worker's read (after its outage budget) or Ray Train's controller writing the run's
    # state (after as many retries), the line names the S3 endpoint.
    assert s3_proxy.url in error, error
    assert ("(rank " in error and "outage budget storage.outage_seconds = 10 s" in error) or (
        "Ray Train's controller" in error and "AWS Error" in error
    ), error

    # The last good checkpoint (epoch 0) is intact on S3, and the next run of this name resumes from it, whether or
    # not Ray's controller managed to register it before S3 went away. The MLflow run says FAILED.
    from ray.train import Checkpoint

    from reid_core.train.checkpoint import checkpoint_to_resume, verify_checkpoint

    assert sorted(_checkpoint_epochs(s3_server, storage_uri, run_name).values()) == [0]
    run_path, fs = storage.ray_storage(storage_uri, _direct_settings(s3_server))
    snapshot = (_snapshot(s3_server, storage_uri, run_name) or {}).get("latest_checkpoint_result")
    folder = f"{run_path}/{run_name}"
    registered = Checkpoint(f"{folder}/{snapshot['checkpoint_dir_name']}", filesystem=fs) if snapshot else None
    resume = checkpoint_to_resume(registered, folder, fs)
    assert resume is not None
    with resume.as_directory() as directory:
        assert verify_checkpoint(directory)["epoch"] == 0
    [run] = _run_of(mlflow_uri, run_name)
    assert run.info.status == "FAILED"
    log.info("long outage: job failed %.0f s after S3 stopped (budget 10 s); registered by Ray: %s; error: %s",
             t_fail, bool(snapshot), error)  # fmt: skip
