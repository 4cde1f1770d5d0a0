"""MLflow: the only module that talks to it. Runs, params, metrics, pictures, models, registry aliases.

Everything goes through ``MlflowClient`` with an explicit tracking URI and run id, so that the driver and the rank-0
worker (another process, maybe another node) log into the same run without relying on MLflow's global active run.
"""

from __future__ import annotations

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
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags or {})
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's batch limit
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def experiment_id(uri: str, experiment: str) -> str:
    """The id of ``experiment``, created if needed. Concurrent creators (Tune trials starting together) race: the
    losers get RESOURCE_ALREADY_EXISTS from the server and use the winner's experiment."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(experiment)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return c.get_experiment_by_name(experiment).experiment_id


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


def log_metrics(
    uri: str, run_id: str, metrics: dict[str, float], step: int, *, timestamp_ms: int | None = None
) -> None:
    """One batch of metrics at ``step``, stamped ``timestamp_ms`` (default: now)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    c = client(uri)
    items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):  # MLflow's batch limit
        c.log_batch(run_id, metrics=items[i : i + 1000])


def log_png(uri: str, run_id: str, image, artifact_file: str) -> None:
    """Log a PIL image as a PNG artifact at ``artifact_file`` (e.g. ``samples/epoch_003.png``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        image.save(path, format="PNG")
        parent = str(Path(artifact_file).parent)
        log_artifact_file(uri, run_id, path, artifact_path=None if parent == "." else parent)


def quick_retries() -> None:
    """Cut MLflow's per-request retries to 1 in this process (unless set explicitly): for a process whose logging goes
    through ``EpochLogger``, which retries by itself and must notice quickly that the server is gone or back."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES

    os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "1")


class EpochLogger:
    """Rank 0's per-epoch MLflow logging: off the training thread, and it outlives the tracking server going away.

    ``log(epoch, metrics, pictures)`` returns at once; a background thread sends each epoch in order (one metrics
    batch stamped with the time the epoch ended, then each picture as a PNG artifact). When MLflow does not answer,
    the unsent part stays queued in memory and is retried with back-off (up to ``retry_cap`` s between attempts)
    while training goes on. The first failure of an outage is a warning naming the server and what waits; the
    recovery an info line naming what was sent late. ``close(timeout)`` waits for the backlog; whatever is still
    queued then is logged as a warning, epoch by epoch and with the metric values, so nothing is lost silently.

    Each attempt is one MLflow client call, with MLflow's own per-request retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    7 by default: minutes of back-off); the training loops cut those to 1 in rank 0's process (``quick_retries``),
    since this logger retries by itself. What the server refuses (a 4xx: a deleted run, an invalid value) is not
    retried: a warning names it with its values. The backlog lives in the worker's memory: a worker killed during an
    MLflow outage loses it (its warnings name the epochs; those after the checkpoint it resumes from are trained and
    logged again).
    """

    def __init__(self, uri: str, run_id: str, *, retry_cap: float = 15.0) -> None:
        import collections
        import threading

        self.uri, self.run_id, self.retry_cap = uri, run_id, retry_cap
        self._tasks: collections.deque = collections.deque()  # (epoch, kind, payload, timestamp_ms)
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="mlflow-epoch-logger", daemon=True)
        self._thread.start()

    def log(self, epoch: int, metrics: dict[str, float], pictures: dict | None = None) -> None:
        """Queue the epoch's ``metrics`` and ``pictures`` ({artifact file: PIL image}); returns immediately."""
        stamp = int(time.time() * 1000)
        with self._cond:
            self._tasks.append((epoch, "metrics", dict(metrics), stamp))
            for artifact_file, image in (pictures or {}).items():
                self._tasks.append((epoch, "picture", (artifact_file, image), stamp))
            self._cond.notify_all()

    def pending_epochs(self) -> list[int]:
        with self._cond:
            return sorted({task[0] for task in self._tasks})

    def close(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` s for the backlog; returns the epochs (some of) whose data was not logged."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._tasks or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            self._closing = True
            left = list(self._tasks)
            self._tasks.clear()
            self._cond.notify_all()
        for epoch, kind, payload, _ in left:
            what = f"metrics {payload}" if kind == "metrics" else f"picture {payload[0]}"
            log.warning("MLflow at %s did not come back within %.0f s: epoch %d %s NOT logged to run %s", self.uri,
                        timeout, epoch, what, self.run_id)  # fmt: skip
        return sorted({task[0] for task in left})

    def _send(self, kind: str, epoch: int, payload, stamp: int) -> None:
        if kind == "metrics":
            log_metrics(self.uri, self.run_id, payload, step=epoch, timestamp_ms=stamp)
        else:
            artifact_file, image = payload
            log_png(self.uri, self.run_id, image, artifact_file)

    def _run(self) -> None:
        failing_since = None
        delay = 0.5
        while True:
            with self._cond:
                while not self._tasks and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                task = self._tasks[0]
                epoch, kind, payload, stamp = task
                self._busy = True
            try:
                self._send(kind, epoch, payload, stamp)
            except Exception as exc:  # noqa: BLE001 - kept and retried, or dropped with its values; reported below
                if _refused(exc):
                    what = f"metrics {payload}" if kind == "metrics" else f"picture {payload[0]}"
                    log.warning("MLflow at %s refused epoch %d %s for run %s: NOT logged (%s)", self.uri, epoch, what,
                                self.run_id, str(exc)[:300])  # fmt: skip
                    self._done(task)
                    continue
                with self._cond:
                    self._busy = False
                    waiting = sorted({t[0] for t in self._tasks})
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("MLflow at %s is not answering (%s: %s): epoch(s) %s kept in memory and retried "
                                    "while training goes on", self.uri, type(exc).__name__, str(exc)[:300], waiting)  # fmt: skip
                    self._cond.wait(timeout=delay)  # close() wakes it
                delay = min(delay * 2, self.retry_cap)
                continue
            self._done(task)
            with self._cond:
                if failing_since is not None:
                    kept = sorted({epoch} | {t[0] for t in self._tasks})
                    log.info("MLflow at %s answers again after %.0f s: logging the kept epoch(s) %s", self.uri,
                             time.monotonic() - failing_since, kept)  # fmt: skip
                    failing_since = None
            delay = 0.5

    def _done(self, task) -> None:
        """``task`` is handled: off the queue (unless ``close`` took the queue meanwhile)."""
        with self._cond:
            if self._tasks and self._tasks[0] is task:
                self._tasks.popleft()
            self._busy = False
            self._cond.notify_all()


def _refused(exc: Exception) -> bool:
    """MLflow answered, and said no (a 4xx): retrying the same request cannot help."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and 400 <= exc.get_http_status_code() < 500


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
    alias: str | None = CANDIDATE_ALIAS,
    tags: dict[str, str] | None = None,
) -> str:
    """Log ``model`` to the run as an MLflow PyTorch model with a signature (inferred from ``input_example``),
    register it as a new version of ``registered_model``, point ``alias`` at it (None: no alias); returns the version.

    The model is a ``torch.export`` archive (pt2): its graph and weights, no Python code. It carries no ``code_paths``
    (neither ``reid_core`` nor the development stack), so ``models:/NAME@alias`` loads wherever torch is installed,
    without this package (``tests/test_model_loading.py``).
    """
    import mlflow
    import mlflow.pytorch
    import torch

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            registered_model_name=registered_model,
            input_example=input_example,
            serialization_format="pt2",  # torch.export: loads without unpickling (``load_pytorch_model``)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = str(info.registered_model_version)
    c = client(uri)
    if alias:
        c.set_registered_model_alias(registered_model, alias, version)
    for key, value in (tags or {}).items():
        c.set_model_version_tag(registered_model, version, key, str(value))
    return version


def artifact_uri(uri: str, run_id: str) -> str:
    return client(uri).get_run(run_id).info.artifact_uri


# ------------------------------------------------------------------------------------------------ registry look-ups
# (added for jobs/synthesize.py: consumers of a registered model resolve it once, then use the pinned version)

from dataclasses import dataclass  # noqa: E402


class RegistryError(TrackingError):
    """A registered model, version or alias does not exist; the message names what exists instead."""


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, pinned: ``uri`` stays valid when an alias moves on later."""

    name: str
    version: str
    run_id: str | None  # the run that logged the model (None when registered from outside a run)
    source: str  # where its files are (``models:/m-...`` or a run's artifact path)
    model_id: str | None  # MLflow 3's logged-model id, for lineage links (None on older entries)
    aliases: tuple[str, ...]  # the aliases pointing at this version now

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    expected = "expected models:/NAME@ALIAS or models:/NAME/VERSION (e.g. models:/reid-dcgan-generator@candidate)"
    if not model_uri.startswith("models:/"):
        raise RegistryError(f"model URI {model_uri!r} is not a registry URI: {expected}")
    rest = model_uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise RegistryError(f"model URI {model_uri!r} names no alias or version: {expected}")


def resolve_model_version(uri: str, model_uri: str) -> ModelVersionRef:
    """Look ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` up in the registry at ``uri``.

    Raises ``RegistryError`` in one line naming the registered model and what it has (its aliases, or its versions;
    for a missing model, the registered models that exist).
    """
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(model_uri)
    c = client(uri)
    try:
        registered = c.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"MLflow registry at {uri}: looking up {name!r} failed: {exc.message}") from None
        names = sorted(m.name for m in c.search_registered_models(max_results=50))
        listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none"
        raise RegistryError(
            f"registered model {name!r} does not exist in the MLflow registry at {uri} (registered models: {listed})"
        ) from None
    aliases = dict(registered.aliases or {})

    def describe_aliases() -> str:
        return ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"

    if alias is not None:
        if alias not in aliases:
            raise RegistryError(
                f"registered model {name!r} has no alias {alias!r} (its aliases: {describe_aliases()}) in the MLflow "
                f"registry at {uri}"
            )
        version = str(aliases[alias])
    try:
        mv = c.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(
                f"MLflow registry at {uri}: looking up {name!r} v{version} failed: {exc.message}"
            ) from None
        versions = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")), reverse=True)
        listed = ", ".join(map(str, versions[:20])) + (", ..." if len(versions) > 20 else "") if versions else "none"
        raise RegistryError(
            f"registered model {name!r} has no version {version} (versions: {listed}; aliases: {describe_aliases()}) "
            f"in the MLflow registry at {uri}"
        ) from None
    return ModelVersionRef(
        name=name,
        version=str(mv.version),
        run_id=mv.run_id or None,
        source=mv.source,
        model_id=_model_id(mv),
        aliases=tuple(sorted(a for a, v in aliases.items() if str(v) == str(mv.version))),
    )


def _model_id(mv) -> str | None:
    """The version's logged-model id: the field when the store fills it, else from a ``models:/m-...`` source."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = mv.source or ""
    return source[len("models:/") :] if source.startswith("models:/m-") else None


def model_input_shape(uri: str, model_uri: str) -> tuple[int, ...] | None:
    """The shape of the model's (single tensor) input from its logged signature, -1 for variable dimensions; None
    when the model has no tensor signature."""
    import mlflow
    import mlflow.models

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    signature = mlflow.models.get_model_info(model_uri).signature
    inputs = getattr(getattr(signature, "inputs", None), "inputs", None) or []
    shape = getattr(inputs[0], "shape", None) if len(inputs) == 1 else None
    return tuple(int(d) for d in shape) if shape else None


class UnsafeModelError(TrackingError):
    """A model whose files would run code when loaded (a pickle-format PyTorch model): refused, never loaded."""


def check_model_files(local: Path, model_uri: str) -> Path:
    """The ``.pt2`` archive of the MLflow PyTorch model downloaded to ``local``, after checking that loading it
    cannot run code: ``UnsafeModelError`` (one line) for a pickle-format model (``data/model.pth``, unpickled by
    ``torch.load``) or anything else that is not a ``torch.export`` archive. Reads the MLmodel file only."""
    import yaml

    mlmodel = local / "MLmodel"
    try:
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise UnsafeModelError(f"{model_uri} has no readable MLmodel file: {type(exc).__name__}") from None
    conf = flavors.get("pytorch")
    if not isinstance(conf, dict) or not isinstance(conf.get("model_data"), str):
        raise UnsafeModelError(
            f"{model_uri} is not an MLflow PyTorch model (its flavors: {', '.join(sorted(flavors)) or 'none'})"
        )
    data = (local / conf["model_data"]).resolve()
    if not data.is_relative_to(local.resolve()):
        raise UnsafeModelError(f"{model_uri}: its model_data {conf['model_data']!r} points outside the model")
    if (data / "model.pth").exists() or not (data / "model.pt2").is_file():
        raise UnsafeModelError(
            f"{model_uri} is a pickle-format PyTorch model, and unpickling it could run any code: refused without "
            "loading it (log the model with serialization_format='pt2', as reid_core does)"
        )
    return data / "model.pt2"


def load_pytorch_model(uri: str, model_uri: str, *, map_location: str = "cpu"):
    """The PyTorch model at ``model_uri`` (``models:/...`` or ``runs:/...``) on the server at ``uri``, loaded without
    unpickling anything and without importing any code shipped with it.

    Only ``torch.export`` (``pt2``) models load: the files are downloaded to a private temporary folder, the MLmodel
    file is read (``check_model_files``: a pickle-format model is refused in one line, ``UnsafeModelError``), the
    model's ``code`` folder is removed, and ``mlflow.pytorch.load_model`` runs with
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, so MLflow checks that no record of the archive is a pickle
    payload beyond tensors. ``sys.path`` is restored afterwards. A ``pt2`` model loads as a ``GraphModule`` with the
    original ``state_dict`` keys but without the class's attributes, fixed in eval mode (``train()`` raises).
    """
    import shutil
    import sys
    import tempfile

    import mlflow
    import mlflow.artifacts
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    settings = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    saved_path, saved_env = list(sys.path), {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="reid-model-") as tmp:  # 0700, removed with everything in it
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
            check_model_files(local, model_uri)
            shutil.rmtree(local / "code", ignore_errors=True)  # our own download; the loader puts it on sys.path
            return mlflow.pytorch.load_model(str(local), map_location=map_location)
    finally:
        sys.path[:] = saved_path
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def set_model_version_tags(uri: str, name: str, version: str, tags: dict[str, Any]) -> None:
    """Set (or overwrite) tags on a registered model version; values are stored as strings."""
    c = client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, str(value))


def log_model_version_input(uri: str, run_id: str, ref: ModelVersionRef) -> None:
    """Record in ``run_id`` that it consumed the model version ``ref``: tags ``input_model.*`` (name, version, URI,
    producing run), and MLflow 3's model-input lineage when the version has a logged-model id."""
    from mlflow.entities import LoggedModelInput

    c = client(uri)
    tags = {"input_model.name": ref.name, "input_model.version": ref.version, "input_model.uri": ref.uri}
    if ref.run_id:
        tags["input_model.run_id"] = ref.run_id
    for key, value in tags.items():
        c.set_tag(run_id, key, value)
    if ref.model_id:
        c.log_inputs(run_id, models=[LoggedModelInput(model_id=ref.model_id)])


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    """Log ``text`` as an artifact at ``artifact_file`` (e.g. ``distractors.json``)."""
    client(uri).log_text(run_id, text, artifact_file)


# ------------------------------------------------------------------------------------------------ files and tags
# (added for jobs/train_reid.py: exported TorchScript / ONNX files and run tags after the run has started)


def log_artifact_file(uri: str, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a local file as an artifact of ``run_id``, under the folder ``artifact_path`` (None: the root)."""
    client(uri).log_artifact(run_id, str(local_path), artifact_path=artifact_path)


def run_artifact_paths(uri: str, run_id: str, folder: str) -> list[str]:
    """The paths of the artifacts directly under ``folder`` of ``run_id`` (e.g. ``samples/epoch_003.png``), sorted."""
    return sorted(a.path for a in client(uri).list_artifacts(run_id, folder) if not a.is_dir)


def download_run_artifact(uri: str, run_id: str, path: str, dst_dir: str | os.PathLike) -> Path:
    """Download one artifact of ``run_id`` into ``dst_dir``; returns the local file."""
    return Path(client(uri).download_artifacts(run_id, path, str(dst_dir)))


def run_id_by_name(uri: str, experiment: str, run_name: str) -> str:
    """``find_run``, as an error when there is no such run (one line, naming the experiment)."""
    run_id = find_run(uri, experiment, run_name)
    if run_id is None:
        raise TrackingError(f"no run named {run_name!r} in the MLflow experiment {experiment!r} at {uri}")
    return run_id


def set_run_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    """Set (or overwrite) tags on a run; values are stored as strings."""
    c = client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


# ------------------------------------------------------------------------------------------------ models of runs
# (added for jobs/evaluate.py: a model may be named by its run, ``runs:/RUN_ID/model``, as well as by the registry)


def parse_run_model_uri(model_uri: str) -> tuple[str, str]:
    """``runs:/RUN_ID/PATH`` -> (RUN_ID, PATH); ``RegistryError`` naming the expected forms otherwise."""
    rest = model_uri[len("runs:/") :].strip("/") if model_uri.startswith("runs:/") else ""
    run_id, _, path = rest.partition("/")
    if not run_id or not path:
        raise RegistryError(f"model URI {model_uri!r} is not a run model URI: expected runs:/RUN_ID/model")
    return run_id, path


def resolve_run_model(uri: str, model_uri: str) -> tuple[str, ModelVersionRef | None]:
    """Look ``runs:/RUN_ID/PATH`` up at ``uri``: returns (RUN_ID, the registered version made from exactly that
    logged model, or None when it was never registered).

    Raises ``RegistryError`` in one line when the run does not exist, or has no model at PATH (naming the models it
    logged).
    """
    import mlflow
    import mlflow.models
    from mlflow.exceptions import MlflowException

    run_id, path = parse_run_model_uri(model_uri)
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"MLflow at {uri}: looking up run {run_id} failed: {exc.message}") from None
        raise RegistryError(f"run {run_id} does not exist at the MLflow server {uri}") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
    except Exception:  # noqa: BLE001 - MLflow raises several types for a missing model; the message lists what exists
        logged = c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        names = sorted({m.name for m in logged}) or ["none"]
        raise RegistryError(
            f"run {run_id} has no model {path!r} (its logged models: {', '.join(names)}) at the MLflow server {uri}"
        ) from None
    for mv in c.search_model_versions(f"run_id = '{run_id}'"):
        if info.model_id and _model_id(mv) == info.model_id:
            return run_id, resolve_model_version(uri, f"models:/{mv.name}/{mv.version}")
    return run_id, None


# ------------------------------------------------------------------------------------------------ searches
# (added for jobs/tune_lambdas.py: a parent run per search, a child run per trial, found again after a restart)


def find_runs(uri: str, experiment: str, tags: dict[str, str]) -> list[dict[str, Any]]:
    """Runs of ``experiment`` carrying all ``tags`` (newest first), each as {"run_id", "status", "name", "tags",
    "metrics"}; [] when the experiment does not exist."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = c.search_runs([exp.experiment_id], filter_string=query, order_by=["start_time DESC"], max_results=1000)
    return [{"run_id": r.info.run_id, "status": r.info.status, "name": r.info.run_name, "tags": dict(r.data.tags),
             "metrics": dict(r.data.metrics)} for r in runs]  # fmt: skip


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of ``run_id``."""
    return dict(client(uri).get_run(run_id).data.metrics)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed search continues its parent run)."""
    client(uri).update_run(run_id, status="RUNNING")


def set_model_alias(uri: str, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of the registered model ``name`` at ``version`` (moving it from any other version)."""
    client(uri).set_registered_model_alias(name, alias, str(version))


def replace_model_version_tags(uri: str, name: str, version: str, prefix: str, tags: dict[str, Any]) -> list[str]:
    """Set ``tags`` (all keys start with ``prefix``) on a model version and delete its other tags under ``prefix``,
    so that the tags under ``prefix`` describe one event (e.g. the latest evaluation on a dataset); returns the keys
    deleted."""
    foreign = [k for k in tags if not k.startswith(prefix)]
    if foreign:
        raise ValueError(f"replace_model_version_tags: keys {foreign} do not start with {prefix!r}")
    c = client(uri)
    stale = sorted(
        k for k in (c.get_model_version(name, str(version)).tags or {}) if k.startswith(prefix) and k not in tags
    )
    for key in stale:
        c.delete_model_version_tag(name, str(version), key)
    set_model_version_tags(uri, name, version, tags)
    return stale


# ------------------------------------------------------------------------------------------------ registry reading
def run_or_problem(client, run_id: str):
    """``(run, None)``, or ``(None, message)`` when the run cannot be read (deleted, or its store is gone)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id), None
    except MlflowException as exc:
        return None, exc.message


def registered_model_names(client) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        names += [m.name for m in page]
        token = page.token
        if not token:
            return sorted(names)


def registered_model(uri: str, client, name: str):
    """The registered model ``name``; ``RegistryError`` listing the registered models when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"MLflow registry at {uri}: looking up {name!r} failed: {exc.message}") from None
    names = registered_model_names(client)
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "none"
    raise RegistryError(
        f"registered model {name!r} does not exist in the MLflow registry at {uri} (registered models: {listed})"
    )
