"""Multi-node on one machine: a Ray head and a second Ray node (separate `ray start` processes, 1 CPU each, token auth,
the head's dashboard and job server on), the GAN job submitted with `ray job submit` to the head, one Ray Train worker
per node (placement SPREAD), checkpoints on the loopback S3, and the second node killed (SIGKILL) mid-run: while
``devstack.proxy`` (between the job and S3) holds the job's data reads half-way through epoch 1, so that the kill
lands at a known point instead of racing the running job.

How it recovers: Ray Train V2 (Ray 2.60) supports elastic training, ``ScalingConfig(num_workers=(min, max))`` (our
``scaling.min_workers``). When the node dies, the worker group fails and FailureConfig restarts it; the elastic
scaling policy starts it at the size the remaining resources allow. The policy reads the nodes from Ray's
AutoscalingCoordinator actor, which refreshes its view every 20 s (Ray 2.60), not from the head's node table, so the
first restarts ask for 2 workers again and time out (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 5 s here, 60 s by
default; a controller error, retried without counting against max_failures); once the view is refreshed, the next
one starts 1 worker, on the head. It resumes from the last checkpoint reported to S3; that one was written by 2
workers with ZeRO stage 1 (partitioned optimizer state), which cannot be loaded at world size 1, so the job resumes
from its world-size independent weights with a fresh optimizer and logs so (the world-size rule of
docs/architecture.md, reid_core/train/checkpoint.py).
No node is added back (there is no autoscaler here): the job finishes on the head alone, with half the global batch.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest

from devstack.proxy import Hold
from devstack.stack import Ports, Stack
from reid_core.config import ConfigError, GanJobConfig, ScalingConfig, load_config
from tests.synthetic_data import make_synthetic, stack_settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- ScalingConfig (unit tests)
def test_ray_scaling_config_fixed_pack_by_default():
    from reid_core.train.loops import ray_scaling_config

    ray_cfg = ray_scaling_config(ScalingConfig())
    assert ray_cfg.num_workers == 2 and not ray_cfg.elasticity_enabled
    assert ray_cfg.placement_strategy == "PACK"
    assert ray_cfg.resources_per_worker == {"CPU": 1.0} and not ray_cfg.use_gpu


def test_ray_scaling_config_elastic_spread_gpu():
    from reid_core.train.loops import ray_scaling_config

    ray_cfg = ray_scaling_config(
        ScalingConfig(num_workers=8, min_workers=4, use_gpu=True, cpus_per_worker=4, placement_strategy="SPREAD")
    )
    assert ray_cfg.elasticity_enabled and (ray_cfg.min_workers, ray_cfg.max_workers) == (4, 8)
    assert ray_cfg.placement_strategy == "SPREAD"
    assert ray_cfg.resources_per_worker == {"CPU": 4, "GPU": 1} and ray_cfg.use_gpu
    # What Ray reserves for the run: sized for the maximum.
    assert ray_cfg.total_resources == {"CPU": 32, "GPU": 8}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scaling.placement_strategy=spread", "scaling.placement_strategy: 'spread' is not one of PACK, SPREAD"),
        ("scaling.min_workers=3", "scaling.min_workers: expected 1 ≤ min_workers ≤ num_workers (2)"),
        ("scaling.min_workers=0", "scaling.min_workers: expected 1 ≤ min_workers ≤ num_workers (2)"),
    ],
)
def test_bad_scaling_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(GanJobConfig, ROOT / "configs/demo.yaml", [override])


def test_scaling_overrides_reach_the_config():
    cfg = load_config(GanJobConfig, ROOT / "configs/demo.yaml",
                      ["scaling.min_workers=1", "scaling.placement_strategy=SPREAD"])  # fmt: skip
    assert cfg.scaling.min_workers == 1 and cfg.scaling.placement_strategy == "SPREAD"
    assert load_config(GanJobConfig, ROOT / "configs/demo.yaml").scaling.min_workers is None


def test_add_ray_node_needs_a_head_and_a_short_name(tmp_path):
    from devstack.stack import StackError

    stack = Stack(root=tmp_path, ports=Ports.free(), services=("s3",))
    with pytest.raises(StackError, match="1-16 characters"):
        stack.add_ray_node("Worker_1")
    with pytest.raises(StackError, match="runs no Ray head"):
        stack.add_ray_node("worker-1")
    with pytest.raises(StackError, match="started no Ray node 'worker-1'"):
        stack.remove_ray_node("worker-1")


# --------------------------------------------------------------------------------------------- two-node cluster
@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server):
    """A Ray head (1 CPU, dashboard and job server, token auth) with MLflow, plus a second Ray node `worker-1`
    (1 CPU): two "machines" on this one. Stopped (nodes first, by PID) when the module's tests are done."""
    stack = Stack(root=tmp_path_factory.mktemp("multinode"), ports=Ports.free(), services=("mlflow", "ray"),
                  bucket=s3_server.bucket, num_cpus=1)  # fmt: skip
    # The head declares a node dead after 3 missed health checks 1 s apart (Ray's defaults: 5, 3 s apart). A killed
    # node refuses the check at once, so its loss is known in ~3 s instead of ~15 s; a busy but living node has each
    # check's own timeout (10 s) to answer.
    with mock.patch.dict(os.environ, {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}):
        stack.up()
    try:
        deadline = time.monotonic() + 60
        while not (
            heads := [n["node_id"] for n in stack.ray_state("nodes") if n["is_head_node"] and n["state"] == "ALIVE"]
        ):
            assert time.monotonic() < deadline, "the Ray head did not list itself within 60 s"
            time.sleep(0.5)  # the dashboard answers a moment before the head's node table is filled
        stack.head_id = heads[0]
        stack.worker_id = stack.add_ray_node("worker-1", num_cpus=1)
        stack.full_env = {**s3_server.env(), **stack.env()}
        yield stack
    finally:
        stack.down(kill=True)


class HoldAfterFirstCheckpoint:
    """A ``devstack.proxy`` hook: once the run's first checkpoint is being uploaded, the job's data reads go on for
    ``reads`` more GETs (into the next epoch), then every data read is held until ``release`` is set. The job then
    stands still, both workers alive, at a known point, while the test checks the placement and kills a node."""

    def __init__(self, run_name: str, data_uri: str, release: threading.Event, reads: int) -> None:
        self.run_name, self.release, self.reads = run_name, release, reads
        self.data_key = data_uri.split("://", 1)[1].split("/", 1)[1]  # key prefix of the dataset
        self.uploading = False
        self.held = threading.Event()

    def __call__(self, method: str, path: str):
        if method in ("PUT", "POST") and f"/{self.run_name}/checkpoint_" in path:
            # a file inside a checkpoint folder, not Ray's checkpoint_manager_snapshot.json next to them
            self.uploading |= "/" in path.split(f"/{self.run_name}/", 1)[1].split("?", 1)[0]
        elif method == "GET" and self.data_key in path and self.uploading:
            self.reads -= 1
            if self.reads <= 0:
                self.held.set()
                return Hold(self.release, timeout=600)
        return None


def _read_s3_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_gan_job_loses_a_node_and_finishes_elastically(two_nodes, s3_server, s3_proxy, tmp_path):
    import s3fs
    from mlflow.tracking import MlflowClient

    stack = two_nodes
    env = stack.full_env
    tag = uuid.uuid4().hex[:6]
    data = f"s3://{s3_server.bucket}/multinode-{tag}/msmt17"
    storage = f"s3://{s3_server.bucket}/multinode-{tag}/ray-results"
    run_name, model_name, epochs = f"mn-{tag}", f"gen-mn-{tag}", 6
    make_synthetic(data, ids=16, images_per_id=8, cameras=2, settings=stack_settings(s3_server))

    # The job reaches S3 through the fault proxy, which holds its data reads half-way through epoch 1 (after epoch 0's
    # checkpoint): the node is killed while the job stands still there, not raced against a running job.
    release = threading.Event()
    hold = HoldAfterFirstCheckpoint(run_name, data, release, reads=24)
    s3_proxy.add_hook(hold)
    job_env = {k: v for k, v in env.items() if not k.startswith("RAY_") and k != "AWS_ENDPOINT_URL_S3"}
    job_env["AWS_ENDPOINT_URL"] = s3_proxy.url
    runtime_env = {
        "env_vars": {
            **job_env,
            "DS_ACCELERATOR": "cpu",
            # This machine may run several Ray clusters (other tests' heads): Train V2's placement-group cleaner
            # finds its own through RAY_ADDRESS, otherwise it stops with "Found multiple active Ray instances".
            "RAY_ADDRESS": stack.ray_address,
            # Right after the loss the elastic policy still counts the dead node's CPU (its view is refreshed every
            # 20 s), so it asks for 2 workers again and waits this long (default 60 s) for their placement group
            # before it tries again. The timeout covers only that wait for resources (not the workers' start), and
            # nothing else runs on this cluster: 5 s, so that the retry after the refresh comes soon.
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
        },
        "excludes": stack.runtime_env()["excludes"],
    }
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", stack.dashboard_url, "--working-dir", ".",
        "--submission-id", f"multinode-{tag}", "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/train_gan.py", "--config", "configs/demo.yaml", "--smoke-test",
        "--set", f"data.uri={data}", "--set", "data.max_images=96", "--set", "optim.batch_size=8",
        "--set", f"optim.epochs={epochs}",
        "--set", "scaling.num_workers=2", "--set", "scaling.min_workers=1", "--set", "scaling.placement_strategy=SPREAD",
        "--set", "scaling.zero_stage=1", "--set", "run.max_failures=2", "--set", "run.keep_checkpoints=100",
        "--set", f"run.storage={storage}", "--set", f"run.name={run_name}",
        "--set", f"tracking.registered_model={model_name}", "--set", "tracking.experiment=multinode",
    ]  # fmt: skip
    t0 = time.monotonic()
    job_log = tmp_path / "job.log"  # a file, not a pipe: nobody reads while the job runs
    with job_log.open("w") as log_file:
        job = subprocess.Popen(submit, cwd=ROOT, env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # --- wait until the job is held mid-epoch 1, then until its first checkpoint is registered in S3 (Ray's
        # checkpoint-manager snapshot, written by the controller whatever the workers do)
        deadline = time.monotonic() + 600
        while not hold.held.wait(1.0):
            assert job.poll() is None, f"the job ended before it was held:\n{job_log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"the job was not held within 600 s:\n{job_log.read_text()[-6000:]}"
        fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                               endpoint_url=env["AWS_ENDPOINT_URL"])  # fmt: skip
        snapshot_path = f"{storage.removeprefix('s3://')}/{run_name}/checkpoint_manager_snapshot.json"
        snapshot = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            fs.invalidate_cache()
            snapshot = _read_s3_json(fs, snapshot_path)
            if snapshot and snapshot.get("latest_checkpoint_result"):
                break
            time.sleep(0.5)
        assert job.poll() is None, f"the job ended before its first checkpoint:\n{job_log.read_text()[-6000:]}"
        assert snapshot and snapshot["latest_checkpoint_result"], "no checkpoint reported within 300 s"
        epoch_before = snapshot["latest_checkpoint_result"]["metrics"]["epoch"]
        t_checkpoint = time.monotonic() - t0

        # SPREAD: the two workers of the first group run on the two nodes (both alive: held on their reads).
        workers = [
            a for a in stack.ray_state("actors") if a["class_name"] == "RayTrainWorker" and a["state"] == "ALIVE"
        ]
        assert sorted(w["node_id"] for w in workers) == sorted([stack.head_id, stack.worker_id]), workers

        # --- lose the second node (SIGKILL to all its processes), then let the job finish
        stack.remove_ray_node("worker-1")
        t_kill = time.monotonic() - t0
        release.set()
        job.wait(timeout=600)
    finally:
        release.set()
        if job.poll() is None:
            job.kill()
            job.wait()
    out = job_log.read_text()
    log.info("first checkpoint after %.0f s, node killed at %.0f s, job done at %.0f s; the job's end:\n%s",
             t_checkpoint, t_kill, time.monotonic() - t0, out[-3000:])  # fmt: skip

    assert job.returncode == 0, f"ray job submit failed ({job.returncode}):\n{out[-8000:]}"
    assert "=== train_gan summary ===" in out
    assert epoch_before < epochs - 1, "the node was lost after the last epoch: nothing left to recover"

    # Elastic: a group of 2 before the loss, then of 1 on the remaining node.
    assert "Started training worker group of size 2" in out
    assert "Started training worker group of size 1" in out, out[-8000:]
    # The world-size rule, said: a ZeRO-1 checkpoint of 2 workers, resumed by 1 from its weights.
    assert "was written by 2 workers with ZeRO-partitioned optimizer state; this run has 1" in out, out[-8000:]
    assert "Resuming from its weights with a fresh optimizer state" in out
    # The restarted group resumed after a checkpoint, not from scratch.
    resumed = [int(line.rsplit("resumed from epoch ", 1)[1].split()[0]) for line in out.splitlines()
               if "resumed from epoch " in line]  # fmt: skip
    assert resumed and resumed[-1] >= epoch_before, out[-8000:]

    # The checkpoints in S3 say who wrote them: two workers before the loss, one after; the last is the final epoch.
    fs.invalidate_cache()
    metas = [
        json.loads(fs.cat_file(p))
        for p in fs.glob(f"{storage.removeprefix('s3://')}/{run_name}/checkpoint_*/meta.json")
    ]
    final = max(metas, key=lambda m: m["epoch"])
    assert final["epoch"] == epochs - 1 and final["world_size"] == 1 and final["zero_stages"]["generator"] == 1
    assert any(m["world_size"] == 2 for m in metas)

    # MLflow: one run, its loss history continuous over every epoch, the generator registered. The epochs logged after
    # the checkpoint the job resumed from are trained again and have a second point (Ray Train V2 registers a reported
    # checkpoint asynchronously, so that can be more than one epoch); the epochs up to it have exactly one.
    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    version = client.get_model_version_by_alias(model_name, "candidate")
    history = client.get_metric_history(version.run_id, "loss_d")
    assert sorted({m.step for m in history}) == list(range(epochs))
    points = Counter(m.step for m in history)
    retrained = sorted(step for step, n in points.items() if n > 1)
    assert max(points.values()) <= 2 and all(step > min(resumed) for step in retrained), (
        resumed,
        sorted(points.items()),
    )
    assert all(m.value > 0 for m in history)
    assert client.get_run(version.run_id).info.status == "FINISHED"
    assert version.tags["epochs"] == str(epochs)
