"""`make gpu-check`: its CPU dry mode end to end (real Ray Train worker, real DeepSpeed engines, real dlib, real
loader on synthesised JPEGs), and the report's handling of failed sections."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reid_core.workflows import node_check as gpu_check
from tests import job_runner

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = ("gan", "reid_train", "inference", "loader", "evaluation")


@pytest.mark.slow  # a whole Ray Train run with DeepSpeed engines, every section: end to end (CI runs it)
def test_dry_mode_reports_every_section(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "gpu_check.py"), "--dry", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["dry"] is True and r["device"] == "cpu"
    env_info = r["environment"]
    assert env_info["torch"] and env_info["cpus"] >= 1 and env_info["cuda_available"] in (True, False)
    assert set(env_info["deepspeed_ops"]) == {"fused_adam", "cpu_adam"}
    for name in SECTIONS:
        assert "error" not in r[name], (name, r[name])
    assert r["gan"]["zero_stage"] == 2
    assert r["gan"]["unguided_images_per_s"] > 0 and r["gan"]["guided_images_per_s"] > 0
    assert 0.0 <= r["gan"]["delta_share"] < 1.0
    assert r["reid_train"]["images_per_s"] > 0
    assert r["inference"]["contiguous_images_per_s"] > 0 and r["inference"]["channels_last_images_per_s"] > 0
    for size in ("256x128", "128x128"):
        assert r["loader"][f"loader_{size}_images_per_s"] > 0
        assert r["loader"][f"decode_augment_{size}_images_per_s_per_core"] > 0
    assert r["evaluation"]["seconds"] > 0 and 0.0 <= r["evaluation"]["mAP"] <= 1.0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "## evaluation" in md


def test_failed_or_missing_sections_are_reported():
    results = {name: {"images_per_s": 1.0} for name in SECTIONS}
    assert gpu_check.failures(results) == []
    results["gan"] = {"error": "RuntimeError: NCCL error"}
    del results["evaluation"]
    assert gpu_check.failures(results) == ["gan: RuntimeError: NCCL error", "evaluation: missing"]


def test_gpu_sizes_are_the_recipes():
    """The GPU mode measures what configs/gan.yaml and configs/reid_msmt17.yaml run."""
    from reid_core.config import GanJobConfig, ReidJobConfig, load_config

    gan = load_config(GanJobConfig, ROOT / "configs" / "gan.yaml")
    reid = load_config(ReidJobConfig, ROOT / "configs" / "reid_msmt17.yaml")
    s = gpu_check.GPU
    assert s.gan_size == tuple(gan.data.image_size) and s.gan_batch == gan.optim.batch_size
    assert s.gan_width == gan.model.width and gan.scaling.zero_stage == 2 and gan.scaling.precision == "bf16"
    assert s.reid_model == reid.model.name and s.reid_size == tuple(reid.data.image_size)
    assert s.reid_batch == reid.batch_size + reid.distractors.per_batch


@pytest.mark.parametrize("arg", ["--steps=0", "--steps=-3"])
def test_bad_steps_is_one_error_line(arg):
    proc = job_runner.here("gpu_check.py", [arg])  # argparse's refusal, in this process (tests/job_runner.py)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --steps")
