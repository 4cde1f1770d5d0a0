"""jobs/review_models.py and its workflow (reid_core/workflows/registry_review.py) against a real MLflow server
(sqlite registry): list, compare, the promotion gate, errors (the job as a subprocess: exit 2 and one line) and the
report."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from reid_core import tracking
from reid_core.workflows import registry_review
from tests import job_runner

ROOT = Path(__file__).resolve().parents[1]


DATA_A = "s3://reid-test/synthetic/msmt17"
DATA_B = "s3://reid-test/synthetic/market1501"


@pytest.fixture(scope="session")
def mlflow_server(mlflow_stack):
    """The MLflow server of ``mlflow_stack`` (no Ray head): its URI."""
    return mlflow_stack.mlflow_uri


def register(uri: str, model: str, *, metrics: dict[str, float], data_uri: str, picture: bool = False) -> str:
    """A run with ``metrics`` and param ``data.uri`` and a version of ``model`` pointing at it, tagged like
    jobs/train_gan.py tags its versions (without logging real weights: the review reads the registry only)."""
    run_id = tracking.start_run(uri, "review-test", f"train-{uuid.uuid4().hex[:6]}",
                                {"data.uri": data_uri, "guidance.lambda1": 0.025, "optim.lr": 1e-3})  # fmt: skip
    tracking.log_metrics(uri, run_id, metrics, step=1)
    if picture:
        from PIL import Image

        tracking.log_png(uri, run_id, Image.new("RGB", (8, 16), (200, 30, 30)), "samples/epoch_000.png")
    c = tracking.client(uri)
    if not c.search_registered_models(filter_string=f"name = '{model}'"):
        c.create_registered_model(model)
    mv = c.create_model_version(model, source=f"{tracking.artifact_uri(uri, run_id)}/model", run_id=run_id)
    tracking.set_model_version_tags(uri, model, mv.version, {"lambda1": 0.025, "lambda2": 0.05,
                                                             "guidance.mode": "weighted", "data.uri": data_uri})  # fmt: skip
    tracking.set_terminated(uri, run_id)
    return str(mv.version)


@pytest.fixture(scope="session")
def reid_model(mlflow_server):
    """A re-ID model with versions 1 (mAP 0.5), 2 (0.6, with a picture), 3 (0.4) on DATA_A and 4 (0.9) on DATA_B."""
    name = f"reid-{uuid.uuid4().hex[:6]}"
    for m_ap, data, picture in ((0.5, DATA_A, False), (0.6, DATA_A, True), (0.4, DATA_A, False), (0.9, DATA_B, False)):
        register(mlflow_server, name, metrics={"rank1": m_ap + 0.2, "mAP": m_ap, "mINP": m_ap / 2}, data_uri=data,
                 picture=picture)  # fmt: skip
    return name


@pytest.fixture(scope="session")
def gan_model(mlflow_server):
    """A GAN generator registered through the real path (a tiny nn.Linear logged as an MLflow PyTorch model)."""
    import torch

    uri = mlflow_server
    name = f"gen-{uuid.uuid4().hex[:6]}"
    run_id = tracking.start_run(uri, "review-test", "gan", {"data.uri": DATA_A})
    tracking.log_metrics(uri, run_id, {"face_rate": 0.25, "loss_g": 1.5, "loss_d": 0.7}, step=0)
    version = tracking.log_and_register_pytorch_model(
        uri, run_id, torch.nn.Linear(4, 2), name="generator", registered_model=name,
        input_example=torch.zeros(2, 4).numpy(),
        tags={"lambda1": 0.05, "lambda2": 0.0, "guidance.mode": "paper", "data.uri": DATA_A, "epochs": 1},
    )  # fmt: skip
    assert version == "1"
    return name


def job(uri: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "jobs/review_models.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def job_here(uri: str, *args: str) -> subprocess.CompletedProcess:
    """``job`` in this process (``tests/job_runner.py``): the same argparse, workflow call and error line."""
    return job_runner.here("review_models.py", list(args), env={"MLFLOW_TRACKING_URI": uri})


def review(uri: str, command: str, **options):
    """The workflow call ``jobs/review_models.py COMMAND`` makes (the job itself runs as a subprocess: ``job``)."""
    return getattr(registry_review, f"command_{command}")(uri, tracking.client(uri), **options)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_list_shows_versions_metrics_lambdas_dataset_and_aliases(mlflow_server, reid_model, gan_model):
    out = review(mlflow_server, "list")
    assert f"== {reid_model} (4 versions)" in out and f"== {gan_model} (1 versions)" in out
    reid_block = out.split(f"== {reid_model}")[1].split("==")[0]
    header, rule, *rows = reid_block.strip().splitlines()[1:]
    assert header.split()[:7] == ["version", "aliases", "created", "dataset", "λ1", "λ2", "mode"]
    assert header.split()[7:] == ["rank1", "mAP", "mINP"]
    assert [r.split()[0] for r in rows] == ["4", "3", "2", "1"]  # newest first
    v4 = rows[0].split()
    assert v4[1] == "-"  # no alias on it
    assert DATA_B in v4 and "0.025" in v4 and "0.05" in v4 and "weighted" in v4
    assert v4[-3:] == ["1.1000", "0.9000", "0.4500"]
    gan_block = out.split(f"== {gan_model}")[1]
    assert "face_rate" in gan_block and "loss_g" in gan_block and "0.2500" in gan_block and "@candidate" in gan_block

    out = review(mlflow_server, "list", name=gan_model)
    assert gan_model in out and reid_model not in out and "paper" in out


def test_compare_puts_metrics_side_by_side_with_picture_links(mlflow_server, reid_model):
    out = review(mlflow_server, "compare", name=reid_model, first="1", second="2")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["mAP"] == ["0.5000", "0.6000", "0.1000"]
    assert rows["rank1"] == ["0.7000", "0.8000", "0.1000"]
    assert "dataset" in out and DATA_A in out
    link = out.split("samples/epoch_000.png: ")[1].split()[0]
    assert link.startswith(f"{mlflow_server}/get-artifact?path=samples%2Fepoch_000.png&run_uuid=")
    with urllib.request.urlopen(link, timeout=10) as response:  # the link serves the picture itself
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{mlflow_server}/#/models/{reid_model}/versions/2" in out
    assert "pictures of v1" in out and "(none logged)" in out


def test_promotion_gate(mlflow_server, reid_model, gan_model):
    c = tracking.client(mlflow_server)
    # No champion yet: the first promotion sets the bar.
    assert "v2 is now @champion" in review(mlflow_server, "promote", name=reid_model, version="2", reason="best so far")
    assert c.get_model_version_by_alias(reid_model, "champion").version == "2"
    tags = c.get_model_version(reid_model, "2").tags
    assert tags["champion.reason"] == "best so far" and tags["champion.previous"] == "none"
    assert tags["champion.promoted_by"] and tags["champion.promoted_at"].startswith("20")

    # Worse on the same dataset: refused, as a subprocess, in one line; the alias does not move.
    line = one_error_line(job(mlflow_server, "promote", reid_model, "3"))
    assert "refused" in line and "0.4000 < 0.6000" in line and "--force" in line
    assert c.get_model_version_by_alias(reid_model, "champion").version == "2"
    # Better on another dataset: not comparable, refused.
    with pytest.raises(registry_review.ReviewError, match="not comparable"):
        review(mlflow_server, "promote", name=reid_model, version="4")
    # A model whose versions lack the gate's metric: refused with a pointer to what it has, unless another metric.
    with pytest.raises(registry_review.ReviewError) as refused:
        review(mlflow_server, "promote", name=gan_model, version="1")
    assert "no metric 'mAP'" in str(refused.value) and "face_rate" in str(refused.value)
    review(mlflow_server, "promote", name=gan_model, version="candidate", metric="face_rate")
    assert c.get_model_version_by_alias(gan_model, "champion").version == "1"

    # Better on the same dataset: accepted (subprocess happy path).
    version_5 = register(mlflow_server, reid_model, metrics={"rank1": 0.9, "mAP": 0.7, "mINP": 0.3}, data_uri=DATA_A)
    proc = job(mlflow_server, "promote", reid_model, version_5, "--reason", "higher mAP")
    assert proc.returncode == 0, proc.stderr
    assert f"v{version_5} is now @champion" in proc.stdout and "0.7000 > 0.6000" in proc.stdout
    assert c.get_model_version_by_alias(reid_model, "champion").version == version_5
    assert c.get_model_version(reid_model, "2").tags["champion.replaced_by"] == f"v{version_5}"
    assert c.get_model_version(reid_model, version_5).tags["champion.previous"] == "v2"

    # --force overrides the gate and says so in the tags.
    assert "FORCED" in review(
        mlflow_server, "promote", name=reid_model, version="3", force=True, reason="rollback test"
    )
    assert c.get_model_version_by_alias(reid_model, "champion").version == "3"
    tags = c.get_model_version(reid_model, "3").tags
    assert tags["champion.forced"] == "true" and tags["champion.reason"] == "rollback test"
    assert "0.4000 < 0.7000" in tags["champion.gate"]


def test_unknown_model_version_and_alias_fail_in_one_line_naming_what_exists(mlflow_server, reid_model):
    line = one_error_line(job(mlflow_server, "promote", "no-such-model", "1"))
    assert "'no-such-model' does not exist" in line and reid_model in line
    line = one_error_line(job_here(mlflow_server, "compare", reid_model, "1", "99"))
    assert "no version 99" in line and "versions: " in line and " 4, 3, 2, 1" in line
    line = one_error_line(job_here(mlflow_server, "compare", reid_model, "1", "@nope"))
    assert "no alias 'nope'" in line and "its aliases: " in line
    line = one_error_line(job_here(mlflow_server, "list", "--name", "no-such-model"))
    assert "registered models:" in line


def test_report_markdown_and_html_are_logged_to_mlflow(mlflow_server, reid_model, gan_model, tmp_path):
    md = tmp_path / "review.md"
    written, run_id = review(mlflow_server, "report", out=str(md))
    assert written == str(md)
    text = md.read_text()
    assert f"## {reid_model}" in text and f"## {gan_model}" in text
    assert "| version | aliases | created | dataset | λ1 | λ2 | mode |" in text
    assert "samples/epoch_000.png](" in text and "get-artifact?path=samples%2Fepoch_000.png" in text
    c = tracking.client(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.run_name == "registry-review" and run.info.status == "FINISHED"
    assert [a.path for a in c.list_artifacts(run_id)] == ["review.md"]
    assert Path(c.download_artifacts(run_id, "review.md", str(tmp_path / "dl"))).read_text() == text

    page = tmp_path / "review.html"
    review(mlflow_server, "report", name=reid_model, out=str(page))
    html = page.read_text()
    assert html.startswith("<!doctype html>") and reid_model in html and gan_model not in html
    assert html.count("src='data:image/png;base64,") == 1  # the one picture, inlined: the page stands alone


def test_promotion_gate_refuses_non_finite_values_on_either_side(mlflow_server):
    """A NaN version became @champion, printing "loss_g nan = 0.7301": any comparison with NaN is false, so NaN was
    never "worse" (issue #15 item 2)."""
    c = tracking.client(mlflow_server)
    name = f"gen-nan-{uuid.uuid4().hex[:6]}"
    good = register(mlflow_server, name, metrics={"loss_g": 0.7301}, data_uri=DATA_A)
    nan = register(mlflow_server, name, metrics={"loss_g": float("nan")}, data_uri=DATA_A)
    inf = register(mlflow_server, name, metrics={"loss_g": float("inf")}, data_uri=DATA_A)
    # No champion yet: a NaN does not become the bar.
    line = one_error_line(job_here(mlflow_server, "promote", name, nan, "--metric", "loss_g"))
    assert f"v{nan} has loss_g = nan, not a finite number" in line
    assert not c.get_registered_model(name).aliases
    review(mlflow_server, "promote", name=name, version=good, metric="loss_g")
    for version, shown in ((nan, "nan"), (inf, "inf")):
        line = one_error_line(job_here(mlflow_server, "promote", name, version, "--metric", "loss_g"))
        assert f"loss_g = {shown}, not a finite number" in line, line
        assert c.get_model_version_by_alias(name, "champion").version == good
    # A NaN champion (forced in) blocks the gate instead of letting anything pass on a false comparison.
    review(mlflow_server, "promote", name=name, version=nan, metric="loss_g", force=True)
    line = one_error_line(job_here(mlflow_server, "promote", name, good, "--metric", "loss_g"))
    assert f"@champion v{nan} has loss_g = nan, not a finite number: the gate cannot compare" in line
    assert c.get_model_version_by_alias(name, "champion").version == nan


def test_promotion_gate_compares_where_each_metric_was_measured(mlflow_server):
    """The gate said "evaluated on" but compared the training data.uri (item 9c): an eval.<dataset>.* metric is
    compared by the dataset it was evaluated on, a training-run metric by the run's data.uri, and the message says
    which."""
    c = tracking.client(mlflow_server)
    name = f"reid-eval-{uuid.uuid4().hex[:6]}"
    # Trained on different datasets, both evaluated on the same third one: comparable on the eval metric.
    first = register(mlflow_server, name, metrics={"mAP": 0.5}, data_uri=DATA_A)
    second = register(mlflow_server, name, metrics={"mAP": 0.4}, data_uri=DATA_B)
    evaluated = "s3://reid-test/synthetic/flima"
    for version, value in ((first, 0.3), (second, 0.35)):
        tracking.set_model_version_tags(mlflow_server, name, version, {"eval.flima.mAP": value,
                                                                       "eval.flima.data.uri": evaluated})  # fmt: skip
    review(mlflow_server, "promote", name=name, version=first, metric="eval.flima.mAP")
    proc = job_here(mlflow_server, "promote", name, second, "--metric", "eval.flima.mAP")
    assert proc.returncode == 0, proc.stderr
    assert f"0.3500 > 0.3000 of @champion v{first}, both evaluated on {evaluated}" in proc.stdout
    assert c.get_model_version_by_alias(name, "champion").version == second
    # The training-run metric of the same versions is not comparable (different training datasets), and says so.
    line = one_error_line(job_here(mlflow_server, "promote", name, first, "--metric", "mAP"))
    assert f"mAP is from its training run on {DATA_A}" in line and DATA_B in line and "not comparable" in line
    # The same evaluation name on another data.uri is not the same dataset.
    third = register(mlflow_server, name, metrics={"mAP": 0.9}, data_uri=DATA_A)
    tracking.set_model_version_tags(mlflow_server, name, third, {"eval.flima.mAP": 0.9,
                                                                 "eval.flima.data.uri": evaluated + "-v2"})  # fmt: skip
    line = one_error_line(job(mlflow_server, "promote", name, third, "--metric", "eval.flima.mAP"))
    assert f"evaluated on {evaluated}-v2" in line and "not comparable" in line
