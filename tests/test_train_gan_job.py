"""End to end: the GAN job submitted with `ray job submit` to a real Ray head, reading a synthetic dataset packed into
tar shards (``jobs/pack_dataset.py``'s format) from the loopback S3, checkpointing into it, and registering its
generator in a real MLflow server. The job reads a pack with nothing but ``data.uri`` changed; the plain layout
through ``ray job submit`` is what tests/test_faults.py's jobs read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def run(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_train_gan_smoke_test_through_ray_job_submit(s3_server, services_stack):
    from mlflow.tracking import MlflowClient

    tag = uuid.uuid4().hex[:6]
    # Planted secrets: the loopback S3 server accepts any key, so the job runs with these values, and none of them may
    # appear in anything the job writes (checked at the end).
    secrets = {"AWS_SECRET_ACCESS_KEY": f"planted-s3-secret-{uuid.uuid4().hex}",
               "AWS_SESSION_TOKEN": f"planted-session-token-{uuid.uuid4().hex}",
               "MLFLOW_TRACKING_TOKEN": f"planted-mlflow-token-{uuid.uuid4().hex}"}  # fmt: skip
    env = {**services_stack.full_env, **secrets}
    plain = f"s3://{s3_server.bucket}/synthetic-{tag}/msmt17"
    from reid_core import storage
    from reid_core.data.shards import pack_tree
    from tests.synthetic_data import make_synthetic, stack_settings

    settings = stack_settings(s3_server)
    make_synthetic(plain, ids=20, images_per_id=8, cameras=3, settings=settings)
    data = f"s3://{s3_server.bucket}/synthetic-{tag}/packed"
    pack_tree(plain, data, shard_bytes=64 * 1024, layout="msmt17", settings=settings)  # several shards
    assert len([f for f in storage.list_files(data, settings) if f.endswith(".tar")]) > 1
    runtime_env = {
        "env_vars": {**{k: v for k, v in env.items() if not k.startswith("RAY_")}, "DS_ACCELERATOR": "cpu"},
        "excludes": services_stack.runtime_env()["excludes"],
    }
    model_name = f"gen-{tag}"
    proc = run(
        [
            str(BIN / "ray"), "job", "submit", "--address", services_stack.dashboard_url, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "jobs/train_gan.py", "--config", "configs/demo.yaml", "--smoke-test",
            "--set", f"data.uri={data}", "--set", "data.max_images=64", "--set", "optim.batch_size=8",
            "--set", f"run.storage=s3://{s3_server.bucket}/ray-results", "--set", f"run.name=e2e-{tag}",
            "--set", f"tracking.registered_model={model_name}", "--set", "tracking.experiment=e2e",
            "--set", "guidance.lambda1=0.05", "--set", "guidance.lambda2=0.05",
        ],
        env,
        timeout=900,
    )  # fmt: skip
    assert "=== train_gan summary ===" in proc.stdout
    assert "succeeded" in proc.stdout + proc.stderr

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri, registry_uri=services_stack.mlflow_uri)
    version = client.get_model_version_by_alias(model_name, "candidate")
    assert version.tags["guidance.mode"] == "weighted"
    run_id = version.run_id
    history = client.get_metric_history(run_id, "loss_d")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]  # one point per epoch
    assert all(m.value > 0 for m in history)
    # The face guidance ran: Δ of the real images (the synthetic set has faces on about half; the table was read from
    # the shards' face tags) and of the samples.
    delta_real = client.get_metric_history(run_id, "face_absent_real")
    assert len(delta_real) == 2 and 0.2 < delta_real[-1].value < 0.9
    assert len(client.get_metric_history(run_id, "face_rate")) == 2
    # The continuous view of the samples' faces: each epoch's median and best window score, floor included.
    medians = sorted(client.get_metric_history(run_id, "face_score_median"), key=lambda m: m.step)
    maxima = sorted(client.get_metric_history(run_id, "face_score_max"), key=lambda m: m.step)
    assert len(medians) == len(maxima) == 2
    assert all(-3.0 <= m.value <= x.value for m, x in zip(medians, maxima, strict=True))
    assert len(client.get_metric_history(run_id, "loss_d_penalised")) == 2
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/epoch_000.png", "samples/epoch_001.png"]
    local = client.download_artifacts(run_id, samples[-1])
    assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get_run(run_id).info.status == "FINISHED"
    params = client.get_run(run_id).data.params
    assert params["data.uri"] == data and params["guidance.lambda1"] == "0.05"

    # The registered model loads back through the registry alias and generates images of the configured size.
    import mlflow.pytorch
    import torch

    # Explicit URIs, as reid_core.tracking does: another test in this process may have set MLflow's process-wide
    # registry URI, which wins over MLFLOW_TRACKING_URI (failed that way on a pytest-xdist worker).
    mlflow.set_tracking_uri(services_stack.mlflow_uri)
    mlflow.set_registry_uri(services_stack.mlflow_uri)
    gen = mlflow.pytorch.load_model(f"models:/{model_name}@candidate")
    assert gen(torch.randn(2, 100)).shape == (2, 3, 64, 32)

    # Nothing the job wrote holds a planted secret: job output (the job's logs, streamed by `ray job submit`), the MLflow
    # run (params, tags, metric names, every artifact), the model version's tags, the checkpoints and Ray's run state.
    written = {"job output": (proc.stdout + proc.stderr).encode()}
    run_data = client.get_run(run_id).data
    written["mlflow params/tags/metrics"] = json.dumps(
        [run_data.params, run_data.tags, sorted(run_data.metrics)]
    ).encode()
    written["model version tags"] = json.dumps(version.tags).encode()
    artifacts = Path(client.download_artifacts(run_id, ""))
    for f in artifacts.rglob("*"):
        if f.is_file():
            written[f"artifact {f.relative_to(artifacts)}"] = f.read_bytes()
    run_files = storage.list_files(f"s3://{s3_server.bucket}/ray-results/e2e-{tag}", settings)
    assert any(name.endswith("meta.json") for name in run_files)  # the checkpoints are there to be scanned
    written.update({url: data for url, data in storage.read_many(run_files, settings).items()})
    leaks = [
        (where, name) for where, blob in written.items() for name, value in secrets.items() if value.encode() in blob
    ]
    assert not leaks, f"secret values found in what the job wrote: {leaks}"
    assert len(written) > 10
