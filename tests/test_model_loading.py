"""Loading a registered model never unpickles it (issue 15, item 3).

A PyTorch model logged to a real MLflow server with ``serialization_format="pickle"``, whose unpickling writes a
file, is given to ``tracking.load_pytorch_model``, ``jobs/evaluate.py --model runs:/ID/model`` and
``jobs/synthesize.py --model models:/NAME/1``: each refuses it in one line, and the file is never written. The last
test shows the payload is live: MLflow's own loader, with its default settings, does write the file.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from reid_core import tracking
from reid_core.models import build_model
from tests import job_runner
from tests.synthetic_data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (64, 32)


class Planted(torch.nn.Module):
    """A working feature model whose pickle, when loaded, writes ``marker`` (as a hostile upload would run code)."""

    def __init__(self, marker: str, in_shape: tuple[int, ...], out: int = 8) -> None:
        super().__init__()
        self.marker = marker
        self.linear = torch.nn.Linear(int(torch.tensor(in_shape).prod()), out)

    def forward(self, x):
        return self.linear(x.flatten(1))

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


@pytest.fixture(scope="module")
def mlflow_only(mlflow_stack):
    """A real MLflow server (sqlite, artifacts served by it) on a free loopback port: ``mlflow_stack``."""
    return mlflow_stack


@pytest.fixture(scope="module")
def planted(mlflow_only, tmp_path_factory):
    """A pickle-format feature model (registered as ``planted-<tag>`` v1, logged at ``runs:/ID/model``), a
    pickle-format generator (``planted-gen-<tag>`` v1) and a pt2 generator (``safe-gen-<tag>`` v1)."""
    import mlflow
    import mlflow.pytorch

    uri = mlflow_only.mlflow_uri
    marker = tmp_path_factory.mktemp("marker") / "unpickled.txt"
    tag = uuid.uuid4().hex[:6]
    run_id = tracking.start_run(uri, "model-loading-test", "planted", {})
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        for name, model, example in [
            ("model", Planted(str(marker), (3, *IMAGE_SIZE)), torch.randn(2, 3, *IMAGE_SIZE)),
            ("generator", Planted(str(marker), (16,)), torch.randn(2, 16)),
        ]:
            mlflow.pytorch.log_model(model, name=name, serialization_format="pickle", input_example=example.numpy(),
                                     registered_model_name=f"planted-{name}-{tag}",
                                     pip_requirements=["torch"])  # not inferred: ~5 s each  # fmt: skip
    gen = build_model("dcgan_generator", z_dim=16, width=8, image_size=IMAGE_SIZE).eval()
    tracking.log_and_register_pytorch_model(uri, run_id, gen, name="safe", registered_model=f"safe-gen-{tag}",
                                            input_example=torch.randn(2, 16).numpy())  # fmt: skip
    tracking.set_terminated(uri, run_id)
    marker.unlink(missing_ok=True)  # logging may have loaded the model back in this process; the jobs start clean
    return {"uri": uri, "run_id": run_id, "marker": marker, "tag": tag}


def job(script: str, args: list[str], uri: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=job_runner.job_env({"MLFLOW_TRACKING_URI": uri}))  # fmt: skip
    return proc, time.monotonic() - start


def assert_refused(proc: subprocess.CompletedProcess, model_uri: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # exactly one line
    assert f"{model_uri} is a pickle-format PyTorch model" in proc.stderr and "refused" in proc.stderr, proc.stderr


def test_loader_refuses_a_pickle_format_model_without_unpickling_it(planted):
    for model_uri in (f"runs:/{planted['run_id']}/model", f"models:/planted-generator-{planted['tag']}/1"):
        with pytest.raises(tracking.UnsafeModelError, match=f"{model_uri} is a pickle-format PyTorch model"):
            tracking.load_pytorch_model(planted["uri"], model_uri)
    assert not planted["marker"].exists()


def test_loader_loads_pt2_models_and_leaves_sys_path_and_environment_alone(planted):
    path, flag = list(sys.path), os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    model = tracking.load_pytorch_model(planted["uri"], f"models:/safe-gen-{planted['tag']}/1")
    assert model(torch.randn(2, 16)).shape == (2, 3, *IMAGE_SIZE)
    assert sys.path == path and os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") == flag


@pytest.mark.slow
def test_evaluate_refuses_a_pickle_format_model_in_one_line(planted, tmp_path):
    model_uri = f"runs:/{planted['run_id']}/model"
    data = tmp_path / "msmt17"
    make_synthetic(str(data), ids=4, images_per_id=4, cameras=2)
    proc, seconds = job("evaluate.py", ["--model", model_uri, "--data", str(data)], planted["uri"])
    assert_refused(proc, model_uri)
    assert not planted["marker"].exists()
    print(f"evaluate refused the pickle-format model in {seconds:.1f} s")


@pytest.mark.slow
def test_synthesize_refuses_a_pickle_format_model_in_one_line(planted, tmp_path):
    model_uri = f"models:/planted-generator-{planted['tag']}/1"
    proc, seconds = job("synthesize.py", ["--model", model_uri, "--out", str(tmp_path / "set")], planted["uri"])
    assert_refused(proc, model_uri)
    assert not planted["marker"].exists() and not (tmp_path / "set").exists()
    print(f"synthesize refused the pickle-format model in {seconds:.1f} s")


def test_the_planted_model_does_run_code_through_mlflows_default_loader(planted, monkeypatch):
    """The control: without the check, loading the same model writes the file (so the tests above prove something)."""
    import mlflow.pytorch

    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    mlflow.set_tracking_uri(planted["uri"])
    with contextlib.suppress(Exception):  # the payload gives None, which MLflow then fails to put in eval mode
        mlflow.pytorch.load_model(f"runs:/{planted['run_id']}/model")
    assert planted["marker"].read_text() == "unpickled"
    planted["marker"].unlink()


def test_a_registered_model_loads_where_neither_devstack_nor_reid_core_can_be_imported(planted):
    """A model registered by ``tracking.log_and_register_pytorch_model`` carries no code (no ``code`` folder): a
    process in which ``devstack`` and ``reid_core`` cannot be imported loads it with MLflow's own loader, its pickle
    check on, and runs it."""
    import mlflow.artifacts

    uri = f"models:/safe-gen-{planted['tag']}/1"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=planted["uri"]))
    assert (local / "MLmodel").is_file() and not (local / "code").exists()
    script = (
        "import sys\n"
        "sys.modules['devstack'] = None; sys.modules['reid_core'] = None  # any import of them raises\n"
        "import mlflow, mlflow.pytorch, torch\n"
        f"mlflow.set_tracking_uri({planted['uri']!r}); mlflow.set_registry_uri({planted['uri']!r})\n"
        f"model = mlflow.pytorch.load_model({uri!r}, map_location='cpu')\n"
        "out = model(torch.randn(3, 16))\n"
        "print('shape', tuple(out.shape))\n"
    )
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"shape (3, 3, {IMAGE_SIZE[0]}, {IMAGE_SIZE[1]})" in proc.stdout
