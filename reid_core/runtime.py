"""What every job needs from Ray and the environment: the embedded stack's endpoints as defaults, and joining Ray.

Jobs call ``load_env_defaults()`` first and ``init_ray_for_job()`` before they start Ray work. Both work the same on a
cluster (where ``.stack/env`` does not exist and the environment comes from the node) and on the embedded development
stack (``devstack``), which this module never imports.
"""

from __future__ import annotations

import os
from pathlib import Path


def load_env_defaults(root: str | os.PathLike = ".stack") -> dict[str, str]:
    """Put the embedded stack's endpoints (``<root>/env``) into ``os.environ`` where nothing is set yet.

    Jobs call this first: a user's own settings (or a cluster's) always win; without a stack it does nothing.
    Returns what it set.
    """
    from reid_core.storage import read_env_file

    applied = {k: v for k, v in read_env_file(Path(root) / "env").items() if k not in os.environ}
    os.environ.update(applied)
    return applied


# What Ray workers need from a job driver's environment to reach the same S3 and MLflow (names only: the values come
# from the driver's environment). Endpoints and settings only, never a credential: a runtime env is stored in Ray's
# job table (the dashboard's /api/jobs/ shows it to anyone with the token) and logged by the runtime-env agent.
# Workers take credentials from their own process environment: on a cluster the node's role or the cluster's secret
# store (cluster/), on the embedded stack the Ray head's environment, which the stack sets (``Stack._ray_env``); a
# local Ray started by ``ray.init`` inherits the driver's environment.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI",
    "TORCH_EXTENSIONS_DIR",
    # Train V2's placement-group cleaner asks the state API for the cluster: with several Ray instances on one machine
    # (tests, CI) it must be told which one, or it fails ("Found multiple active Ray instances").
    "RAY_ADDRESS",
)  # fmt: skip


# Never in a runtime env or a job's description: kept out of ``FORWARDED_ENV`` and ``Stack.runtime_env``.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "RAY_AUTH_TOKEN",
)  # fmt: skip
assert not set(SECRET_ENV) & set(FORWARDED_ENV)


def init_ray_for_job(*, use_gpu: bool = False) -> None:
    """``ray.init`` for a job driver: under ``ray job submit`` the job's runtime env already reaches the workers (and
    Ray refuses a second one); run directly, the driver forwards ``FORWARDED_ENV`` (and the CPU accelerator for
    DeepSpeed) to the workers it starts or joins. A no-op when this process has joined Ray already (a preflight's
    resource check, or an earlier stage of the same job, did it the same way)."""
    import ray

    if ray.is_initialized():
        return
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        ray.init()
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    ray.init(runtime_env={"env_vars": env})
