"""End to end: the re-ID job submitted with `ray job submit` to a real Ray head, reading a synthetic dataset and a
distractor set from the loopback S3, checkpointing into it, and registering the converted CondenseNet in a real MLflow
server; plus the job's one-line refusal of an incomplete distractor set, before Ray starts."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import job_runner
from tests.synthetic_data import make_synthetic, stack_settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict, timeout: int, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=job_runner.job_env(env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, (
        f"{cmd[:3]} exited {proc.returncode}, expected {expect}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def write_distractor_set(out: str, n: int, *, complete: bool = True) -> None:
    """A conforming set (jobs/synthesize.py's format) of noisy 64×32 JPEGs, ``distractors.json`` written last."""
    from reid_core import storage

    rng = np.random.default_rng(0)
    files, rows = {}, []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        files[f"{out}/images/{i:06d}.jpg"] = buf.getvalue()
        rows.append((f"images/{i:06d}.jpg", i, 0, 1))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("path", "index", "seed", "face_absent"))
    writer.writerows(rows)
    files[f"{out}/manifest.csv"] = text.getvalue().encode()
    storage.write_many(files)
    if complete:
        meta = {"format": "reid-distractors/1", "num_images": n, "image_size": [64, 32], "manifest": "manifest.csv",
                "images": "images/", "generator": {"pinned_uri": "models:/test-gen/1"}}  # fmt: skip
        storage.write_bytes(f"{out}/distractors.json", json.dumps(meta).encode())


def dataset_and_distractors(s3_server, monkeypatch, *, ids: int, num_distractors: int):
    """A synthetic MSMT17 set (8 images per id, 3 cameras) and a distractor set under a fresh prefix of the loopback
    S3 server; the test's own process gets the S3 variables. Returns (tag, dataset URL, distractor set URL)."""
    tag = uuid.uuid4().hex[:6]
    data = f"s3://{s3_server.bucket}/reid-{tag}/msmt17"
    distractors = f"s3://{s3_server.bucket}/reid-{tag}/distractors"
    make_synthetic(data, ids=ids, images_per_id=8, cameras=3, settings=stack_settings(s3_server))
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    write_distractor_set(distractors, num_distractors)
    return tag, data, distractors


def test_an_incomplete_distractor_set_fails_in_one_line_before_ray(s3_env, s3_url):
    from reid_core import storage

    data = f"{s3_url}/msmt17"
    make_synthetic(data, ids=8, images_per_id=4, cameras=4)  # s3_env: the standard variables point at the server
    write_distractor_set(f"{s3_url}/distractors", 4, complete=False)
    # in this process (tests/job_runner.py); tests/test_bad_input.py runs the job's refusal as a subprocess
    proc = job_runner.here(
        "train_reid.py",
        ["--config", "configs/reid_demo.yaml", "--set", f"data.uri={data}",
         "--set", f"distractors.uri={s3_url}/distractors", "--set", f"run.storage={s3_url}/ray-results",
         "--set", "tracking.uri=http://127.0.0.1:9"],
        env=s3_env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert proc.stderr.startswith(f"error: distractor set {s3_url}/distractors is incomplete: no distractors.json")
    assert not storage.exists(f"{s3_url}/ray-results")  # nothing started


@pytest.mark.slow
def test_train_reid_smoke_test_through_ray_job_submit(s3_server, services_stack, monkeypatch):
    from mlflow.tracking import MlflowClient

    env = services_stack.full_env
    tag, data, distractors = dataset_and_distractors(s3_server, monkeypatch, ids=20, num_distractors=24)
    runtime_env = {
        "env_vars": {**{k: v for k, v in env.items() if not k.startswith("RAY_")}, "DS_ACCELERATOR": "cpu"},
        "excludes": services_stack.runtime_env()["excludes"],
    }
    model_name = f"reid-{tag}"
    proc = run(
        [
            str(BIN / "ray"), "job", "submit", "--address", services_stack.dashboard_url, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "jobs/train_reid.py", "--config", "configs/reid_demo.yaml", "--smoke-test",
            "--set", f"data.uri={data}", "--set", f"distractors.uri={distractors}",
            "--set", f"run.storage=s3://{s3_server.bucket}/ray-results", "--set", f"run.name=e2e-reid-{tag}",
            "--set", f"tracking.registered_model={model_name}", "--set", "tracking.experiment=e2e-reid",
        ],
        env,
        timeout=900,
    )  # fmt: skip
    assert "=== train_reid summary ===" in proc.stdout
    assert "succeeded" in proc.stdout + proc.stderr

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri, registry_uri=services_stack.mlflow_uri)
    version = client.get_model_version_by_alias(model_name, "candidate")
    assert version.tags["converted"] == "True" and version.tags["model"] == "condensenet_tiny"
    assert version.tags["distractors.uri"] == distractors and version.tags["num_distractors"] == "24"
    run_id = version.run_id
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED"
    metrics, params = run_info.data.metrics, run_info.data.params
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["rank1"] <= metrics["rank5"] <= metrics["rank10"]
    # The tiny model's layers are all thin, so the deploy form runs them as dense 1x1 convolutions with the pruned
    # weights at zero (faster there than index-select + grouped GEMM: CondensedGroupConv): same FLOPs, never more.
    assert 0 < metrics["flops"] <= metrics["flops_training_form"]
    assert 0 < metrics["params"] < metrics["params_training_form"]
    assert metrics["convert_max_rel_diff"] <= 1e-4
    assert params["distractors.num_images"] == "24" and params["loss.mode"] == "distractor_class"
    for key in ("loss", "accuracy", "distractor_accuracy", "condensing_stage"):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1], key  # one point per epoch
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "loss"))
    assert client.get_metric_history(run_id, "condensing_stage")[-1].value == 3  # C - 1 stages by the end
    exported = [a.path for a in client.list_artifacts(run_id, "export")]
    assert "export/model.torchscript.pt" in exported

    # The registered (converted) model loads through the alias and returns L2-normalised features; so does the
    # TorchScript export, with the same values.
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(services_stack.mlflow_uri)  # explicit: the process-wide URIs win over the environment
    mlflow.set_registry_uri(services_stack.mlflow_uri)
    model = mlflow.pytorch.load_model(f"models:/{model_name}@candidate")
    x = torch.randn(3, 3, 128, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (3, 128) and torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    scripted = torch.jit.load(client.download_artifacts(run_id, "export/model.torchscript.pt"))
    with torch.no_grad():
        assert torch.allclose(scripted(x), feats, atol=1e-5)

    # The ONNX export (when present) gives the same features under onnxruntime, for another batch size too.
    assert "export/model.onnx" in exported and run_info.data.tags["export.onnx"] == "ok"
    import onnxruntime

    session = onnxruntime.InferenceSession(client.download_artifacts(run_id, "export/model.onnx"))
    (onnx_feats,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(onnx_feats, feats.numpy(), atol=1e-5)


@pytest.mark.slow
def test_train_reid_dual_stream_smoke_test_with_faces(s3_server, services_stack, monkeypatch):
    """The Dual-Stream CNN end to end, run directly against the stack's Ray head (``RAY_ADDRESS``): dlib finds the
    faces of the synthetic images, the face stream trains on their crops, and the registered model takes the person
    image and the face crop stacked on channels (N, 6, 64, 64): zeros where there is no face."""
    from mlflow.tracking import MlflowClient

    env = services_stack.full_env
    tag, data, distractors = dataset_and_distractors(s3_server, monkeypatch, ids=16, num_distractors=16)
    model_name = f"reid-ds-{tag}"
    proc = run(
        [
            sys.executable, "jobs/train_reid.py", "--config", "configs/reid_demo.yaml", "--smoke-test",
            "--model", "dual_stream", "--set", "data.image_size=[64,64]", "--set", "data.pad=0",
            "--set", "model.feature_dim=64", "--set", "model.face_size=64", "--set", "optim.optimizer=adam",
            "--set", "optim.lr=0.001", "--set", "loss.group_lasso=0", "--set", "scaling.num_workers=1",
            "--set", f"data.uri={data}", "--set", f"distractors.uri={distractors}",
            "--set", f"run.storage=s3://{s3_server.bucket}/ray-results", "--set", f"run.name=e2e-ds-{tag}",
            "--set", f"tracking.registered_model={model_name}", "--set", "tracking.experiment=e2e-reid-ds",
            "--set", "tracking.exports=[torchscript]",  # the ONNX export is the first test's
        ],
        {**env, "DS_ACCELERATOR": "cpu"},
        timeout=900,
    )  # fmt: skip
    assert "=== train_reid summary ===" in proc.stdout

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri, registry_uri=services_stack.mlflow_uri)
    version = client.get_model_version_by_alias(model_name, "candidate")
    assert version.tags["model"] == "dual_stream" and version.tags["converted"] == "False"
    run_info = client.get_run(version.run_id)
    metrics = run_info.data.metrics
    assert run_info.info.status == "FINISHED"
    for key in ("rank1", "mAP", "mINP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # The face stream saw faces (half the synthetic images carry a real one), and the face-presence head trained on
    # them (its loss is logged each epoch).
    assert 0.2 <= metrics["train_face_share"] <= 0.8
    face_loss = client.get_metric_history(version.run_id, "face_presence_loss")
    assert [m.step for m in sorted(face_loss, key=lambda m: m.step)] == [0, 1]
    assert [a.path for a in client.list_artifacts(version.run_id, "export")] == ["export/model.torchscript.pt"]

    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(services_stack.mlflow_uri)  # explicit: the process-wide URIs win over the environment
    mlflow.set_registry_uri(services_stack.mlflow_uri)
    model = mlflow.pytorch.load_model(f"models:/{model_name}@candidate")
    x = torch.randn(2, 6, 64, 64, generator=torch.Generator().manual_seed(0))
    x[1, 3:] = 0
    with torch.no_grad():
        feats = model(x)
    assert feats.shape == (2, 64) and torch.allclose(feats.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.slow
def test_train_reid_strong_recipe_from_an_official_checkpoint_in_s3(s3_server, services_stack, monkeypatch):
    """The strong recipe of issue #17 end to end, directly against the stack's Ray head: the backbone starts from an
    official-format CondenseNet checkpoint in the loopback S3 (``module.`` keys in ``{"state_dict": ...}``, fully
    condensed), BNNeck, batch-hard triplet, label smoothing, random erasing, last stride 1, warm-up then step decay;
    the condensed model converts and registers as in the plain recipe."""
    import torch
    from mlflow.tracking import MlflowClient

    from reid_core import storage
    from tests.test_pretrained import TINY, official_condensenet_state

    env = services_stack.full_env
    tag, data, distractors = dataset_and_distractors(s3_server, monkeypatch, ids=16, num_distractors=16)
    checkpoint = f"s3://{s3_server.bucket}/reid-{tag}/pretrained/condensenet_tiny.pth.tar"
    buf = io.BytesIO()
    torch.save({"state_dict": {f"module.{k}": v for k, v in official_condensenet_state(**TINY).items()}}, buf)
    storage.write_bytes(checkpoint, buf.getvalue())
    model_name = f"reid-strong-{tag}"
    recipe = ["optim.epochs=3", f"model.pretrained={checkpoint}", "model.bnneck=true", "model.last_stride=1",
              "loss.triplet=1.0", "loss.label_smoothing=0.1", "data.random_erasing=0.5", "optim.warmup_epochs=1",
              "optim.schedule=step", "optim.step_milestones=[2]", "scaling.num_workers=1"]  # fmt: skip
    proc = run(
        [
            sys.executable, "jobs/train_reid.py", "--config", "configs/reid_demo.yaml", "--smoke-test",
            *[arg for item in recipe for arg in ("--set", item)],
            "--set", f"data.uri={data}", "--set", f"distractors.uri={distractors}",
            "--set", f"run.storage=s3://{s3_server.bucket}/ray-results", "--set", f"run.name=e2e-strong-{tag}",
            "--set", f"tracking.registered_model={model_name}", "--set", "tracking.experiment=e2e-reid-strong",
            "--set", "tracking.exports=[torchscript]",
        ],
        {**env, "DS_ACCELERATOR": "cpu"},
        timeout=900,
    )  # fmt: skip
    assert "=== train_reid summary ===" in proc.stdout
    assert "training split:    " in proc.stdout and "merge_val=false" in proc.stdout

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri, registry_uri=services_stack.mlflow_uri)
    version = client.get_model_version_by_alias(model_name, "candidate")
    assert version.tags["converted"] == "True"
    run_info = client.get_run(version.run_id)
    metrics, params = run_info.data.metrics, run_info.data.params
    assert params["model.bnneck"] == "True" and params["model.last_stride"] == "1"
    for key in ("rank1", "mAP", "mINP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["convert_max_rel_diff"] <= 1e-4
    triplet = sorted(client.get_metric_history(version.run_id, "triplet"), key=lambda m: m.step)
    assert [m.step for m in triplet] == [0, 1, 2] and all(m.value >= 0 for m in triplet)
    lr = [m.value for m in sorted(client.get_metric_history(version.run_id, "lr"), key=lambda m: m.step)]
    base = 0.1  # configs/reid_demo.yaml; the last step of the warm-up epoch is just under it, then step decay at 2
    assert lr[0] < base and lr[1] == pytest.approx(base) and lr[2] == pytest.approx(base * 0.1)
    # fully condensed from the checkpoint: no condensing stage is due during training
    assert [m.value for m in client.get_metric_history(version.run_id, "condensing_stage")] == [3.0, 3.0, 3.0]
