"""MLflow: the only module that talks to it. Runs, params, metrics, pictures, models, registry aliases.

Everything goes through ``MlflowClient`` with an explicit tracking URI and run id, so that the driver and the rank-0
worker (another process, maybe another node) log into the same run without relying on MLflow's global active run.
"""

from __future__ import annotations

import io
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Registry entries are reviewed by people: stages are deprecated in MLflow 3, aliases are the way.
CANDIDATE_ALIAS = "candidate"


class TrackingError(RuntimeError):
    """The MLflow tracking server is not configured or does not answer; the message names the URI."""


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """Explicit value, then ``MLFLOW_TRACKING_URI``, then the embedded stack's ``.stack/env``."""
    from reid_core.storage import read_env_file

    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or read_env_file().get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError(
            "no MLflow tracking server configured: set tracking.uri in the config, MLFLOW_TRACKING_URI, "
            "or start the embedded stack with `make stack-up`"
        )
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
    raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}): start it or fix tracking.uri")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(
    uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None
) -> str:
    """Create a run (and its experiment if needed) and log ``params``; returns the run id."""
    from mlflow.entities import Param

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=tags or {})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def find_run(uri: str, experiment: str, run_name: str) -> str | None:
    """The newest run called ``run_name`` in ``experiment`` (resuming a job continues its run), else None."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs(
        [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'", order_by=["start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c = client(uri)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_png(uri: str, run_id: str, image, artifact_file: str) -> None:
    """Log a PIL image as a PNG artifact at ``artifact_file`` (e.g. ``samples/epoch_003.png``)."""
    import tempfile

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_bytes(buf.getvalue())
        parent = str(Path(artifact_file).parent)
        client(uri).log_artifact(run_id, str(path), artifact_path=None if parent == "." else parent)


def set_terminated(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def log_and_register_pytorch_model(
    uri: str,
    run_id: str,
    model,
    *,
    name: str,
    registered_model: str,
    input_example,
    alias: str = CANDIDATE_ALIAS,
    tags: dict[str, str] | None = None,
) -> str:
    """Log ``model`` to the run as an MLflow PyTorch model with a signature (inferred from ``input_example``),
    register it as a new version of ``registered_model``, point ``alias`` at it; returns the version.

    ``reid_core`` travels with the model (``code_paths``), so ``models:/NAME@alias`` loads wherever torch is installed.
    """
    import mlflow
    import mlflow.pytorch
    import torch

    import reid_core

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            registered_model_name=registered_model,
            input_example=input_example,
            code_paths=[str(Path(reid_core.__file__).parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = str(info.registered_model_version)
    c = client(uri)
    c.set_registered_model_alias(registered_model, alias, version)
    for key, value in (tags or {}).items():
        c.set_model_version_tag(registered_model, version, key, str(value))
    return version


def artifact_uri(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.artifact_uri
