"""Config loading and validation: every error names the key and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reid_core.config import ConfigError, GanJobConfig, ReidJobConfig, load_config
from tests import job_runner

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
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs/train_gan.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT / "tests", env=job_runner.job_env(env),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--config", "missing.yaml"], {}, "error: config file not found: missing.yaml"),
        (["--config", str(ROOT / "configs/demo.yaml"), "--set", "optim.bogus=1"], {}, "unknown key 'optim.bogus'"),
        (["--config", str(ROOT / "configs/demo.yaml"), "--set", "guidance.lambda1=2"], {}, "outside [0, 1]"),
        (
            ["--config", str(ROOT / "configs/demo.yaml"), "--set", "optim.lr=inf"],
            {},
            "optim.lr: expected a finite number, got inf",
        ),
        (
            ["--config", str(ROOT / "configs/demo.yaml"), "--set", "optim.lr=nan"],
            {},
            "optim.lr: expected a finite number, got nan",
        ),
        (
            ["--config", str(ROOT / "configs/demo.yaml"), "--set", "run.name=../synthetic/msmt17-big"],
            {},
            "run.name: '../synthetic/msmt17-big' is not a single path segment",
        ),
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


# ------------------------------------------------------------------------------------ non-finite numbers, names
def _float_keys(cls, prefix: str = "") -> list[str]:
    """Every key of ``cls`` (recursively) whose type is float or a list of floats."""
    import dataclasses
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float or float in typing.get_args(tp):
            keys.append(f"{prefix}{f.name}")
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
            keys.append(f"{prefix}{f.name}")
    return keys


def _job_configs():
    from reid_core.config import ReidJobConfig, TuneJobConfig

    return [(GanJobConfig, "demo.yaml"), (ReidJobConfig, "reid_demo.yaml"), (TuneJobConfig, "tune_demo.yaml")]


def _non_finite_cases():
    cases = []
    for cls, config in _job_configs():
        for key in _float_keys(cls):
            for text in (".nan", ".inf", "-.inf", "nan", "inf"):
                cases.append(pytest.param(cls, config, key, text, id=f"{cls.__name__}-{key}={text}"))
    return cases


@pytest.mark.parametrize(("cls", "config", "key", "text"), _non_finite_cases())
def test_every_float_of_every_config_refuses_nan_and_infinity(cls, config, key, text):
    """NaN defeats every range check (any comparison with NaN is false) and infinity is positive: optim.lr=inf
    trained with NaN losses and registered the generator (issue #15 item 1)."""
    value = f"[{text}, 0.5]" if key.startswith("search.lambda") else text  # a list of floats: one element bad
    with pytest.raises(ConfigError) as err:
        load_config(cls, ROOT / "configs" / config, [f"{key}={value}"])
    message = str(err.value)
    assert key.split(".")[-1] in message and "finite" in message, message
    assert "\n" not in message


def test_the_float_listing_covers_the_known_keys():
    """The parametrisation above must not silently shrink: the keys the issue named are in it."""
    from reid_core.config import ReidJobConfig, TuneJobConfig

    gan = _float_keys(GanJobConfig)
    assert {"optim.lr", "optim.beta1", "optim.beta2", "guidance.lambda1", "scaling.cpus_per_worker",
            "storage.outage_seconds", "tracking.flush_seconds"} <= set(gan)  # fmt: skip
    assert {"optim.lr", "optim.momentum", "optim.weight_decay", "data.flip", "model.dropout_rate",
            "loss.group_lasso"} <= set(_float_keys(ReidJobConfig))  # fmt: skip
    assert {"search.lambda1", "search.trial_cpus", "gan.optim.lr", "reid.optim.lr"} <= set(_float_keys(TuneJobConfig))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.beta1=1.0", "optim.beta1: expected a value in [0, 1), got 1.0"),
        ("optim.beta2=-0.1", "optim.beta2: expected a value in [0, 1), got -0.1"),
        ("run.max_failures=-1", "run.max_failures: expected ≥ 0, got -1"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints: expected a positive value, got 0"),
        ("tracking.num_samples=0", "tracking.num_samples: expected a positive value, got 0"),
        ("run.storage=''", "run.storage: missing location"),
    ],
)
def test_unchecked_ranges_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(GanJobConfig, ROOT / "configs/demo.yaml", [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking.exports=[onnx,pickle]", "tracking.exports[1]: 'pickle' is not one of torchscript, onnx"),
        ("tracking.exports=onnx", "tracking.exports: expected a list, got 'onnx'"),
        ("tracking.exports=[onnx,onnx]", "tracking.exports: ['onnx', 'onnx'] names an export twice"),
    ],
)
def test_reid_exports_are_checked(override, message):
    assert load_config(ReidJobConfig, ROOT / "configs/reid_demo.yaml").tracking.exports == ["torchscript", "onnx"]
    assert load_config(ReidJobConfig, ROOT / "configs/reid_demo.yaml", ["tracking.exports=[]"]).tracking.exports == []
    with pytest.raises(ConfigError) as err:
        load_config(ReidJobConfig, ROOT / "configs/reid_demo.yaml", [override])
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="unknown key 'tracking.exports'"):  # the GAN job exports no files
        load_config(GanJobConfig, ROOT / "configs/demo.yaml", ["tracking.exports=[]"])


BAD_NAMES = ["../synthetic/msmt17-big", "a/b", "..", ".", "", ".hidden", "a\\b", "s3://x", "a b", "x" * 129, "naïve"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_run_names_are_single_path_segments(name):
    """run.name=../synthetic/msmt17-big wrote checkpoints and Ray's run state inside the dataset's prefix (item 6)."""
    from reid_core.config import ReidJobConfig

    for cls, config in ((GanJobConfig, "demo.yaml"), (ReidJobConfig, "reid_demo.yaml")):
        with pytest.raises(ConfigError) as err:
            load_config(cls, ROOT / "configs" / config, [f"run.name='{name}'"])
        assert "run.name" in str(err.value) and "single path segment" in str(err.value)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_search_and_stage_run_names_are_single_path_segments(name):
    from reid_core.config import TuneJobConfig

    for key in ("search.name", "gan.run.name", "reid.run.name"):
        with pytest.raises(ConfigError) as err:
            load_config(TuneJobConfig, ROOT / "configs/tune_demo.yaml", [f"{key}='{name}'"])
        assert key.split(".")[-2] in str(err.value) and "single path segment" in str(err.value)


@pytest.mark.parametrize("name", ["gan-demo", "gan_demo.v2", "e2e-1a2b3c", "GAN-20240101-120000", "x" * 128])
def test_ordinary_run_names_pass(name):
    assert load_config(GanJobConfig, ROOT / "configs/demo.yaml", [f"run.name={name}"]).run.name == name
