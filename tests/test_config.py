"""Config loading and validation: every error names the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reid_core.config import ConfigError, GanJobConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_overrides():
    cfg = load_config(GanJobConfig, ROOT / "configs/demo.yaml", ["optim.lr=1e-3", "data.image_size=[128,64]"])
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.image_size == (128, 64)
    assert cfg.scaling.num_workers == 2


@pytest.mark.parametrize("name", ["demo.yaml", "gan.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(GanJobConfig, ROOT / "configs" / name)
    assert cfg.optim.epochs >= 1


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("optim:\n  lrr: 0.1\n", [], "unknown key 'optim.lrr' (did you mean optim.lr?)"),
        ("optim:\n  epochs: many\n", [], "optim.epochs: expected int, got 'many'"),
        ("optim:\n  epochs: true\n", [], "optim.epochs: expected int"),
        ("guidance:\n  lambda1: 1.5\n", [], "guidance.lambda1: 1.5 is outside [0, 1]"),
        ("", ["guidance.lambda2=-0.1"], "guidance.lambda2: -0.1 is outside [0, 1]"),
        ("", ["guidance.mode=magic"], "guidance.mode: 'magic' is not one of paper, weighted, critic, smoothing"),
        ("", ["data.layout=cuhk"], "data.layout: 'cuhk' is not one of msmt17, market1501, flima"),
        ("", ["data.image_size=[100,50]"], "data.image_size"),
        ("", ["data.uri=''"], "data.uri: missing dataset location"),
        ("", ["data.uri="], "data.uri: expected str, got None"),
        ("", ["scaling.zero_stage=3"], "scaling.zero_stage"),
        ("", ["storage.outage_seconds=-1"], "storage.outage_seconds: expected ≥ 0, got -1"),
        ("", ["tracking.flush_seconds=-5"], "tracking.flush_seconds: expected ≥ 0, got -5"),
        ("", ["nosection.x=1"], "unknown key 'nosection'"),
        ("", ["optim.lr"], "expected key.sub=value"),
        ("- a\n- b\n", [], "expected a mapping"),
        ("optim: [1, 2\n", [], "not valid YAML"),
    ],
)
def test_invalid_configs_fail_with_clear_messages(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(GanJobConfig, write(tmp_path, text), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config(GanJobConfig, "nowhere.yaml")


def run_job(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs/train_gan.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT / "tests", env={**base, **(env or {})},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--config", "missing.yaml"], {}, "error: config file not found: missing.yaml"),
        (["--config", str(ROOT / "configs/demo.yaml"), "--set", "optim.bogus=1"], {}, "unknown key 'optim.bogus'"),
        (["--config", str(ROOT / "configs/demo.yaml"), "--set", "guidance.lambda1=2"], {}, "outside [0, 1]"),
        (
            ["--config", str(ROOT / "configs/demo.yaml")],
            {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
            "S3 endpoint http://127.0.0.1:9 is unreachable for bucket 'reid-data'",
        ),
    ],
)
def test_job_bad_input_is_one_clear_line_before_any_worker(args, env, expected):
    proc = run_job(args, env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ray" not in proc.stdout.lower()  # Ray never started
