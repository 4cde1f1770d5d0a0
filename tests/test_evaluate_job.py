"""jobs/evaluate.py and its workflow (reid_core/workflows/evaluate.py): the pure parts (subsets, input shapes, names),
the registered-model adapter, the job's one-line preflight errors, and end to end against real S3, MLflow and Ray: the
metrics in MLflow equal ``evaluate_rank`` (and re-ranked) on features computed in this process from the same model,
the pictures exist, the version is tagged and ``review_models.py`` gates on the tags."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reid_core.data import Record, ReIDDataset, build_transforms, read_layout
from reid_core.evaluation.features import (
    DualStreamFeatureModel,
    FeatureModel,
    RegisteredFeatureModel,
    extract_features,
)
from reid_core.metrics import evaluate_rank, evaluate_rank_reranked
from reid_core.models import build_model
from reid_core.workflows import evaluate as workflow
from tests import job_runner
from tests.synthetic_data import make_synthetic, stack_settings

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (64, 32)


def run_job(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs/evaluate.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=job_runner.job_env(env),
    )  # fmt: skip


def make_dataset(out: str, settings=None, *, ids: int = 12, per_id: int = 6) -> None:
    make_synthetic(out, ids=ids, images_per_id=per_id, cameras=3, settings=settings)


def tiny_feature_model(seed: int = 0) -> FeatureModel:
    torch.manual_seed(seed)
    return FeatureModel(build_model("condensenet_tiny", num_classes=6, feature_dim=32)).eval()


@pytest.fixture(scope="module")
def local_msmt17(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval-data") / "msmt17")
    make_dataset(out)
    return out


# ------------------------------------------------------------------------------------------------ pure parts
def records(pids_cams: list[tuple[int, int]], prefix: str) -> list[Record]:
    return [Record(path=f"/{prefix}/{i}.jpg", pid=p, camid=c) for i, (p, c) in enumerate(pids_cams)]


def test_limit_splits_is_deterministic_and_keeps_the_queries_identities():
    query = records([(p, 0) for p in range(10)], "q")
    gallery = records([(p % 20, 1) for p in range(40)], "g")
    q, g = workflow.limit_splits(query, gallery, 4, 6)
    assert [r.pid for r in q] == [0, 3, 6, 9]  # evenly spaced, first and last kept
    assert [r.path for r in g] == ["/g/0.jpg", "/g/3.jpg", "/g/6.jpg", "/g/9.jpg", "/g/20.jpg", "/g/23.jpg"]
    assert workflow.limit_splits(query, gallery, 4, 6) == (q, g)
    assert workflow.limit_splits(query, gallery, None, None) == (query, gallery)  # no limit: untouched
    q2, g2 = workflow.limit_splits(query, gallery, 2, 30)
    assert len(g2) == 30 and {0, 9} <= {r.pid for r in g2}
    assert [r.path for r in g2] == sorted((r.path for r in g2), key=lambda p: int(p.split("/")[-1][:-4]))


def test_count_answerable_follows_the_protocol():
    query = records([(1, 0), (2, 0), (3, 0)], "q")
    gallery = records([(1, 0), (1, 1), (2, 0), (4, 1)], "g")
    assert workflow.count_answerable(query, gallery) == 1  # id 2: only its own camera; id 3: absent


@pytest.mark.parametrize(
    ("shape", "image_size", "expected"),
    [
        ((-1, 3, 64, 32), None, ((64, 32), False)),
        ((-1, 6, 64, 64), None, ((64, 64), True)),
        ((-1, 3, -1, -1), [128, 64], ((128, 64), False)),
        ((-1, 3, 64, 32), [64, 32], ((64, 32), False)),
        (None, [64, 32], ((64, 32), False)),
    ],
)
def test_model_input_reads_the_signature(shape, image_size, expected):
    assert workflow.model_input(shape, image_size, "models:/m/1") == expected


@pytest.mark.parametrize(
    ("shape", "image_size", "message"),
    [
        ((-1, 16), None, r"takes input of shape \(-1, 16\) .* \(N, 3, H, W\) or, Dual-Stream, \(N, 6, S, S\)"),
        ((-1, 4, 64, 32), None, "takes input of shape"),
        ((-1, 6, 64, 32), None, "non-square input 64×32"),
        ((-1, 3, 64, 32), [128, 64], "--image-size 128 64 does not fit models:/m/1"),
        ((-1, 3, -1, -1), None, "pass --image-size"),
        (None, None, "no tensor signature"),
    ],
)
def test_model_input_refuses_what_does_not_fit(shape, image_size, message):
    with pytest.raises(ValueError, match=message):
        workflow.model_input(shape, image_size, "models:/m/1")


def test_names_and_options():
    assert workflow.dataset_short_name("s3://b/x/MSMT17_V1/") == "msmt17_v1"
    assert workflow.dataset_short_name("/data/Market-1501 v15") == "market-1501_v15"
    assert workflow.dataset_short_name("s3://b/x", "flima-s13") == "flima-s13"
    assert workflow.parse_layout_options(["test_session=s13", "queries_per_camera=2"]) == {
        "test_session": "s13",
        "queries_per_camera": 2,
    }
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        workflow.parse_layout_options(["test_session"])


# ------------------------------------------------------------------------------------------------ the adapter
def test_registered_models_give_the_features_of_the_models_they_deploy(local_msmt17):
    """An exported (torch.export, as MLflow registers) feature model, through RegisteredFeatureModel, gives the
    eager model's features; flip-averaging averages the normalised features."""
    splits = read_layout(local_msmt17, "msmt17")
    recs = splits.query[:10]
    fm = tiny_feature_model()
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(fm, (torch.randn(2, 3, *IMAGE_SIZE),), dynamic_shapes=({0: batch},)).module()
    with pytest.raises(NotImplementedError):
        exported.eval()  # what the adapter protects extract_features from
    adapter = RegisteredFeatureModel(exported)
    common = dict(image_size=IMAGE_SIZE, batch_size=4)
    eager, pids, camids = extract_features(fm.model, recs, **common)
    deployed, pids2, _ = extract_features(adapter, recs, **common)
    assert torch.allclose(deployed, eager, atol=1e-5) and np.array_equal(pids, pids2)
    assert [r.pid for r in recs] == pids.tolist() and [r.camid for r in recs] == camids.tolist()
    flipped, _, _ = extract_features(adapter, recs, flip=True, **common)
    images = torch.stack([s["image"] for s in ReIDDataset(recs, build_transforms(*IMAGE_SIZE, train=False))])
    with torch.no_grad():
        mirrored = fm(images.flip(-1))
    assert torch.allclose(flipped, F.normalize(deployed + mirrored, dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="inference only"):
        adapter.train()


def test_registered_dual_stream_model_gives_the_dual_stream_features(local_msmt17):
    splits = read_layout(local_msmt17, "msmt17")
    recs = splits.query[:6]
    torch.manual_seed(1)
    net = build_model("dual_stream_tiny", num_classes=5, feature_dim=16).eval()
    boxes = {r: ((8, 2, 24, 18) if i % 2 else None) for i, r in enumerate(recs)}
    common = dict(image_size=(16, 16), batch_size=4, face_boxes=boxes, face_size=16)
    eager, _, _ = extract_features(net, recs, **common)
    deployed, _, _ = extract_features(RegisteredFeatureModel(DualStreamFeatureModel(net), dual=True), recs, **common)
    assert torch.allclose(deployed, eager, atol=1e-5)
    with pytest.raises(ValueError, match="needs face crops"):
        extract_features(RegisteredFeatureModel(DualStreamFeatureModel(net), dual=True), recs, image_size=(16, 16),
                         batch_size=4)  # fmt: skip


# ------------------------------------------------------------------------------------------------ one-line errors
def assert_one_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # exactly one line
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model", "reid@candidate"], "model URI 'reid@candidate' is not valid: expected models:/NAME@ALIAS, "),
        (["--model", "runs:/abc"], "expected models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/model"),
        (["--max-rank", "0"], "--max-rank must be ≥ 1"),
        (["--rerank-k2", "30"], "--rerank-k2 (30) must be ≤ --rerank-k1 + 1 (21)"),
        (["--layout-option", "test_session"], "--layout-option 'test_session': expected KEY=VALUE"),
        (["--layout-option", "colour=red"], "unknown option(s) colour for layout 'msmt17'; valid options: "),
        (["--layout", "market1501"], "msmt17 is not a market1501 tree: expected the folders bounding_box_train/"),
    ],
)
def test_bad_input_is_one_clear_line_before_any_work(local_msmt17, args, expected):
    full = ["--model", "models:/reid@candidate", "--data", local_msmt17, "--tracking-uri", "http://127.0.0.1:9", *args]
    assert_one_line(job_runner.here("evaluate.py", full), expected)  # in this process; the registry error runs the job


def test_missing_dataset_and_unreachable_mlflow_are_one_line(local_msmt17, tmp_path):
    missing = job_runner.here("evaluate.py", ["--model", "models:/reid@candidate", "--data", str(tmp_path / "nothing")])
    assert_one_line(missing, f"path does not exist: {tmp_path / 'nothing'}")
    unreachable = job_runner.here("evaluate.py", ["--model", "models:/reid@candidate", "--data", local_msmt17],
                                  env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # fmt: skip
    assert_one_line(unreachable, "MLflow tracking server http://127.0.0.1:9 is unreachable")


# ------------------------------------------------------------------------------------------------ end to end (slow)
@pytest.fixture(scope="module")
def registered(services_stack, s3_server):
    """A tiny random CondenseNet feature model registered as ``eval-<tag>@candidate`` (version 1), a tiny DC-GAN
    generator as ``eval-gen-<tag>`` (no re-ID input), and a synthetic MSMT17 set in S3."""
    from reid_core import tracking

    uri = services_stack.mlflow_uri
    tag = uuid.uuid4().hex[:6]
    fm = tiny_feature_model()
    run_id = tracking.start_run(uri, "evaluate-test", "register-tiny-reid", {})
    name = f"eval-{tag}"
    tracking.log_and_register_pytorch_model(uri, run_id, fm, name="model", registered_model=name,
                                            input_example=torch.randn(2, 3, *IMAGE_SIZE).numpy())  # fmt: skip
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=(64, 32)).eval()
    tracking.log_and_register_pytorch_model(uri, run_id, gen, name="generator", registered_model=f"eval-gen-{tag}",
                                            input_example=torch.randn(2, 16).numpy())  # fmt: skip
    tracking.set_terminated(uri, run_id)
    data = f"s3://{s3_server.bucket}/eval-{tag}/msmt17"
    make_dataset(data, stack_settings(s3_server))
    return {"name": name, "run_id": run_id, "model": fm, "data": data, "gen": f"eval-gen-{tag}"}


@pytest.mark.slow
def test_job_evaluates_on_ray_logs_and_tags(services_stack, s3_server, registered, monkeypatch):
    from mlflow.tracking import MlflowClient

    from reid_core import storage

    env = services_stack.full_env
    name, data = registered["name"], registered["data"]
    args = ["--model", f"models:/{name}@candidate", "--data", data, "--flip", "--rerank", "--rerank-k1", "6",
            "--rerank-k2", "3", "--max-queries", "6", "--max-gallery", "20", "--batch-size", "4", "--chunk-size", "8",
            "--workers", "2", "--experiment", "evaluate-test", "--ranked-lists", "3"]  # fmt: skip
    proc = run_job(args, env, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "=== evaluate summary ===" in proc.stdout and "on 2 Ray actors" in proc.stdout

    # The same evaluation in this process, from the model itself.
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    settings = storage.resolve_settings(env["AWS_ENDPOINT_URL"])
    splits = read_layout(data, "msmt17")
    query, gallery = workflow.limit_splits(splits.query, splits.gallery, 6, 20)
    assert len(query) == 6 < len(splits.query) and len(gallery) == 20 < len(splits.gallery)
    assert "done: 26/26 images" in proc.stderr  # progress: a line per chunk (4 chunks of ≤ 8)
    model = RegisteredFeatureModel(registered["model"])
    qf, qp, qc = extract_features(model, query, image_size=IMAGE_SIZE, batch_size=4, flip=True, settings=settings)
    gf, gp, gc = extract_features(model, gallery, image_size=IMAGE_SIZE, batch_size=4, flip=True, settings=settings)
    expected = evaluate_rank(qf, gf, qp, gp, qc, gc, max_rank=50).summary(ranks=(1, 5, 10))
    reranked = evaluate_rank_reranked(qf, gf, qp, gp, qc, gc, k1=6, k2=3, max_rank=50).summary(ranks=(1, 5, 10))

    client = MlflowClient(tracking_uri=services_stack.mlflow_uri, registry_uri=services_stack.mlflow_uri)
    version = client.get_model_version(name, "1")
    run_id = version.tags["eval.msmt17.run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics, params = run.data.metrics, run.data.params
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    for key, value in reranked.items():
        assert metrics[f"rerank.{key}"] == pytest.approx(value, abs=1e-6), key
    # The headline metrics are tags of the model version, plain and re-ranked: a missing tag fails (KeyError).
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert version.tags[f"eval.msmt17.{key}"] == str(round(expected[key], 6)), key
        assert version.tags[f"eval.msmt17.rerank.{key}"] == str(round(reranked[key], 6)), key
    assert metrics["num_valid_queries"] + metrics["num_skipped_queries"] == 6 and metrics["num_valid_queries"] > 0
    assert float(version.tags["eval.msmt17.mAP"]) == pytest.approx(expected["mAP"], abs=1e-6)
    assert float(version.tags["eval.msmt17.rerank.mAP"]) == pytest.approx(reranked["mAP"], abs=1e-6)
    assert version.tags["eval.msmt17.data.uri"] == data and version.tags["eval.msmt17.flip"] == "True"
    assert version.tags["eval.msmt17.subset"] == f"6 of {len(splits.query)} queries, 20 of {len(splits.gallery)} " \
                                                 "gallery images"  # fmt: skip
    assert params["model_version"] == "1" and params["model_uri"] == f"models:/{name}@candidate"
    assert params["flip"] == "True" and params["rerank"] == "True" and params["metric"] == "euclidean"
    assert params["data.uri"] == data and params["data.layout"] == "msmt17" and params["image_size"] == "64x32"
    assert run.data.tags["input_model.uri"] == f"models:/{name}/1"
    assert run.data.tags["input_model.run_id"] == registered["run_id"]
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/cmc.png", "plots/ranked_lists.png"}
    with Image.open(client.download_artifacts(run_id, "plots/ranked_lists.png")) as page:
        assert page.height > 3 * 128 and page.width > 11 * 64  # 3 queries, each with its top-10 (cells 128×64)
    with Image.open(io.BytesIO(open(client.download_artifacts(run_id, "plots/cmc.png"), "rb").read())) as cmc:
        assert cmc.format == "PNG"

    # A later evaluation on the same dataset replaces the dataset's tags (the job's last step, here on the server that
    # holds them): one without re-ranking leaves no stale rerank.* values behind, and other datasets' tags stay.
    from reid_core import tracking

    client.set_model_version_tag(name, "1", "eval.market1501.mAP", "0.5")
    plain = {k: v for k, v in version.tags.items() if k.startswith("eval.msmt17.") and ".rerank." not in k}
    deleted = tracking.replace_model_version_tags(services_stack.mlflow_uri, name, "1", "eval.msmt17.",
                                                  {**plain, "eval.msmt17.run_id": "a-later-run"})  # fmt: skip
    assert deleted == sorted(f"eval.msmt17.rerank.{k}" for k in ("mAP", "mINP", "rank1", "rank10", "rank5"))
    tags = client.get_model_version(name, "1").tags
    assert tags["eval.msmt17.run_id"] == "a-later-run" and not [k for k in tags if ".rerank." in k]
    assert tags["eval.msmt17.mAP"] == version.tags["eval.msmt17.mAP"] and tags["eval.market1501.mAP"] == "0.5"
    with pytest.raises(ValueError, match="do not start with"):
        tracking.replace_model_version_tags(services_stack.mlflow_uri, name, "1", "eval.msmt17.", {"job": "x"})
    client.delete_model_version_tag(name, "1", "eval.market1501.mAP")
    client.set_model_version_tag(name, "1", "eval.msmt17.run_id", run_id)

    # review_models gates on the evaluation's tags (the job in this process: tests/job_runner.py).
    review = job_runner.here("review_models.py", ["promote", name, "1", "--metric", "eval.msmt17.mAP"], env=env)
    assert review.returncode == 0, review.stderr
    assert f"{name} v1 is now @champion" in review.stdout and "eval.msmt17.mAP" in review.stdout


@pytest.mark.slow
def test_registry_errors_are_one_line(services_stack, registered, monkeypatch):
    """The job prints a registry error as its one line (one run of the job); the workflow's preflight, which the job
    calls first, raises each of the others with the message that line carries (in this process, against the same
    MLflow server and S3: no job start per message)."""
    from reid_core import tracking

    env = services_stack.full_env
    uri = services_stack.mlflow_uri
    name, data = registered["name"], registered["data"]
    alias = run_job(["--model", f"models:/{name}@production", "--data", data], env)
    assert_one_line(alias, f"registered model {name!r} has no alias 'production' (its aliases: @candidate -> v1")

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    expected = {
        "models:/no-such-reid/1": "registered model 'no-such-reid' does not exist",
        f"models:/{registered['gen']}/1": f"models:/{registered['gen']}/1 takes input of shape (-1, 16) (-1: any "
                                          "size), but a re-ID feature model takes images (N, 3, H, W)",
        "runs:/0123456789abcdef/model": "run 0123456789abcdef does not exist",
    }  # fmt: skip
    for model, message in expected.items():
        with pytest.raises((tracking.TrackingError, ValueError)) as err:
            workflow.preflight(workflow.EvaluationSpec(model=model, data=data))
        assert message in str(err.value) and "\n" not in str(err.value), (model, str(err.value))
    with pytest.raises(ValueError) as err:
        workflow.preflight(workflow.EvaluationSpec(model=f"models:/{name}/1", data=data, image_size=[128, 64]))
    assert f"--image-size 128 64 does not fit models:/{name}/1, whose input is (-1, 3, 64, 32)" in str(err.value)

    # runs:/RUN_ID/model resolves to the version registered from it; a path the run has no model at is named.
    run_id, ref = tracking.resolve_run_model(uri, f"runs:/{registered['run_id']}/model")
    assert run_id == registered["run_id"] and ref is not None and (ref.name, ref.version) == (name, "1")
    with pytest.raises(tracking.RegistryError, match="has no model 'nothing' .*its logged models: generator, model"):
        tracking.resolve_run_model(uri, f"runs:/{registered['run_id']}/nothing")


@pytest.mark.slow
def test_a_bad_image_met_by_a_ray_actor_is_one_line_naming_it(services_stack, registered, tmp_path):
    """An image that does not decode, met by a feature actor: the last line names it (not Ray's traceback, nor the
    ``TypeError`` of an error that could not be unpickled), the exit code is 1 and the MLflow run is FAILED."""
    from mlflow.tracking import MlflowClient

    data = str(tmp_path / "msmt17")
    make_dataset(data, ids=4, per_id=4)
    bad = read_layout(data, "msmt17").gallery[0].path
    Path(bad).write_bytes(b"not a JPEG")
    run_name = f"bad-image-{uuid.uuid4().hex[:6]}"
    args = ["--model", f"models:/{registered['name']}@candidate", "--data", data, "--workers", "1",
            "--experiment", "evaluate-test", "--run-name", run_name]  # fmt: skip
    proc = run_job(args, services_stack.full_env, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith(f"error: bad image {bad}: ") and "is FAILED" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=services_stack.mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("evaluate-test").experiment_id],
                              filter_string=f"attributes.run_name = '{run_name}'")  # fmt: skip
    assert [r.info.status for r in runs] == ["FAILED"]
