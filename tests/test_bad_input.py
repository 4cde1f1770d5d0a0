"""Bad input across the jobs (issue #9 item 7): each mistake ends in exactly one ``error:`` line naming what to fix,
exit code 2, no traceback, before Ray starts. Inputs are real dataset trees on disk, written as jobs/make_dataset.py writes them;
MLflow points at a closed port, so a job that got past its data checks would say so in its one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import job_runner
from tests.synthetic_data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """A small MSMT17 V1 tree, the same tree in the V2 layout, and an empty folder."""
    base = tmp_path_factory.mktemp("bad-input")
    v1 = base / "msmt17"
    make_synthetic(str(v1), ids=8, images_per_id=6, cameras=2)
    v2 = base / "msmt17_v2"
    shutil.copytree(v1, v2)
    (v2 / "train").rename(v2 / "mask_train_v2")
    (v2 / "test").rename(v2 / "mask_test_v2")
    empty = base / "empty"
    empty.mkdir()
    return {"v1": v1, "v2": v2, "empty": empty, "runs": base / "runs"}


def run_job(job: str, args: list[str]) -> subprocess.CompletedProcess:
    # No S3, MLflow or Ray settings from the caller, and a working directory without a .stack/env to fall back on.
    env = job_runner.job_env()
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT / "tests", env=env)  # fmt: skip


def run_here(job: str, args: list[str]) -> subprocess.CompletedProcess:
    """``run_job`` in this process (``tests/job_runner.py``): the same checks and error line, no interpreter start."""
    return job_runner.here(job, args, cwd=ROOT / "tests")


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "ray" not in proc.stdout.lower()  # Ray never started
    return lines[0]


def gan_args(trees, data, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/demo.yaml"), "--set", f"data.uri={data}",
            "--set", f"run.storage={trees['runs']}", "--set", f"tracking.uri={CLOSED}", *extra]  # fmt: skip


def reid_args(trees, data, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs/reid_demo.yaml"), "--set", f"data.uri={data}",
            "--set", f"run.storage={trees['runs']}", "--set", f"tracking.uri={CLOSED}", *extra]  # fmt: skip


def test_unknown_model_name_lists_the_valid_ones(trees):
    line = one_error_line(run_job("train_reid.py", reid_args(trees, trees["v1"], "--model", "resnet9000")))
    assert "resnet9000" in line and "condensenet74" in line and "dual_stream" in line


def test_wrong_layout_names_the_folders_it_expected(trees):
    line = one_error_line(run_job("train_gan.py", gan_args(trees, trees["v1"], "--set", "data.layout=market1501")))
    assert str(trees["v1"]) in line and "bounding_box_train" in line


def test_an_empty_dataset_is_refused(trees):
    line = one_error_line(run_here("train_gan.py", gan_args(trees, trees["empty"])))
    assert str(trees["empty"]) in line


def test_unknown_layout_lists_the_layouts(trees):
    line = one_error_line(run_here("train_gan.py", gan_args(trees, trees["v1"], "--set", "data.layout=cuhk03")))
    assert "cuhk03" in line and "msmt17" in line and "market1501" in line and "flima" in line


def test_msmt17_v2_warns_that_faces_are_blurred_and_the_checks_go_on(trees):
    proc = run_job("train_gan.py", gan_args(trees, trees["v2"], "--set", "optim.batch_size=4"))
    assert "faces are blurred" in proc.stderr
    # the data passed; the next check (MLflow) is the one that stops this run
    assert CLOSED in one_error_line(proc)


def test_invalid_lambda_in_the_reid_chain_search(trees):
    line = one_error_line(run_job("tune_lambdas.py", ["--config", str(ROOT / "configs/tune_demo.yaml"),
                                                     "--set", "search.lambda1=[0.0, 1.5]"]))  # fmt: skip
    assert "1.5" in line and "[0, 1]" in line
