"""jobs/face_scores.py against a real MLflow server: face-score curves recomputed from a run's logged sample grids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from mlflow.tracking import MlflowClient

from reid_core import tracking
from reid_core.train.loops import sample_grid
from tests import job_runner
from tests.test_faces import person_image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def grid(faces: int, count: int = 16):
    head = skimage.data.astronaut()[40:210, 140:310]
    images = [person_image(128, 64, head if k < faces else None, 44)[0] for k in range(count)]
    return sample_grid(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def run_job(uri: str, *args: str) -> subprocess.CompletedProcess:
    env = job_runner.job_env({"MLFLOW_TRACKING_URI": uri})
    return subprocess.run([sys.executable, "jobs/face_scores.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_face_scores_job_recomputes_the_curves_of_a_gan_run(services_stack):
    uri = services_stack.mlflow_uri
    run_id = tracking.start_run(uri, "face-scores-test", "gan-a", {})
    for epoch, faces in enumerate((0, 4)):  # no face in epoch 0's samples, 4 of 16 in epoch 1's
        tracking.log_png(uri, run_id, grid(faces), f"samples/epoch_{epoch:03d}.png")
    tracking.set_terminated(uri, run_id)

    # The job in this process (tests/job_runner.py): it starts no Ray, so only its imports would differ.
    proc = job_runner.here("face_scores.py", ["--experiment", "face-scores-test", "--runs", "gan-a", "--image-size",
                                              "128", "64", "--samples", "16", "--run-name", "scores"],
                           env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gan-a" in proc.stdout
    client = MlflowClient(uri)
    analysis = tracking.run_id_by_name(uri, "face-scores-test", "scores")
    detected = sorted(client.get_metric_history(analysis, "gan-a.face_detected"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in detected] == [(0, 0.0), (1, 4.0)]
    maxima = sorted(client.get_metric_history(analysis, "gan-a.face_score_max"), key=lambda m: m.step)
    assert maxima[0].value < 0.15 <= maxima[1].value
    assert [a.path for a in client.list_artifacts(analysis)] == ["face_scores.png"]

    # Wrong inputs: one line, exit 2, before anything is logged (the second in a process of its own: nothing else on
    # stderr).
    unknown = job_runner.here("face_scores.py", ["--experiment", "face-scores-test", "--runs", "gan-b", "--image-size",
                                                 "128", "64"], env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        f"error: no run named 'gan-b' in the MLflow experiment 'face-scores-test' at {uri}"
    ]
    wrong_size = run_job(uri, "--experiment", "face-scores-test", "--runs", "gan-a", "--image-size", "256", "128",
                         "--samples", "16")  # fmt: skip
    assert wrong_size.returncode == 2 and "cannot hold 16 samples of 256×128" in wrong_size.stderr
