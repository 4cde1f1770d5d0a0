"""What a λ search (``search.py``) and an ablation grid (``ablation.py``) share about their Tune state: where it
lives, whether a run of that name may be started or resumed, and the parent MLflow run that collects the trials."""

from __future__ import annotations

import logging
from collections.abc import Callable

from reid_core import storage, tracking
from reid_core.config import ConfigError

log = logging.getLogger(__name__)


def tune_storage(uri: str, name: str, settings, *, outage_seconds: float) -> tuple[str, object | None, str]:
    """(storage_path, storage_filesystem, the experiment's path for ``Tuner.restore`` / ``can_restore``) of the Tune
    run ``name`` under ``uri``; its state rides out S3 trouble for ``outage_seconds``, as the trainings' do."""
    path, fs = storage.ray_storage(uri, settings, outage_seconds=outage_seconds)
    return path, fs, f"{path.rstrip('/')}/{name}"


def check_resume_flags(kind: str, *, resume: bool, resume_errored: bool) -> None:
    """``--resume-errored`` retries the failed trials of an earlier ``kind`` ("search" or "grid"): only with
    ``--resume``."""
    if resume_errored and not resume:
        raise ConfigError(f"--resume-errored: only with --resume (it retries the failed trials of an earlier {kind})")


def check_resume(kind: str, name: str, where: str, experiment_path: str, fs, *, resume: bool) -> None:
    """Before Ray starts: with ``resume`` the ``kind`` called ``name`` must exist at ``where``, else it must not (a
    second start under the same name would mix two runs' trials)."""
    from ray.tune import Tuner

    exists = Tuner.can_restore(experiment_path, storage_filesystem=fs)
    if resume and not exists:
        raise ConfigError(f"--resume: no {kind} {name!r} to resume at {where} ({kind}.name / {kind}.storage)")
    if not resume and exists:
        raise ConfigError(f"{kind}.name: a {kind} {name!r} already exists at {where}: pass --resume to continue it, "
                          f"or choose another {kind}.name")  # fmt: skip


def open_parent_run(mlflow_uri: str, experiment: str, name: str, *, identity: dict, tags: dict,
                    params: Callable[[], dict], resume: bool) -> str:  # fmt: skip
    """The parent MLflow run of a Tune run, found by its ``identity`` tags and reopened when ``resume`` finds one;
    otherwise a new run ``name`` with ``params()`` and ``identity`` plus ``tags``."""
    found = tracking.find_runs(mlflow_uri, experiment, identity) if resume else []
    if found:
        parent_id = found[0]["run_id"]
        tracking.reopen_run(mlflow_uri, parent_id)
        log.info("resuming %r: MLflow run %s", name, parent_id)
        return parent_id
    return tracking.start_run(mlflow_uri, experiment, name, params(), tags={**identity, **tags})


def new_or_restored_tuner(experiment_path: str, fs, trainable, *, restore: bool, resume_errored: bool,
                          new: Callable[[], object]):  # fmt: skip
    """``new()`` (a fresh ``Tuner``), or with ``restore`` the interrupted one from its storage: finished trials are
    kept, unfinished ones start again, errored ones only with ``resume_errored``."""
    if not restore:
        return new()
    from ray import tune

    return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=resume_errored,
                              storage_filesystem=fs)  # fmt: skip
