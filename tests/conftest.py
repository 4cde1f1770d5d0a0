"""Shared fixtures: the embedded stack's real services on free loopback ports, started with the same code as
``python -m devstack.stack up`` and stopped by the session that started them."""

from __future__ import annotations

import os
import uuid

import pytest

from devstack.stack import Ports, Stack

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# `make test` runs the modules on 2 pytest-xdist workers (``--dist loadfile``: a module, with its module-scoped stack
# fixtures, stays on one worker), each worker taking the next module when it is free, in this order
# (``--no-loadscope-reorder``; xdist would otherwise hand out the modules with the most tests first). The long
# end-to-end modules go first, longest first, so that the two workers finish together instead of one waiting on a long
# module handed out last. (Serial seconds on the 2-core VM at f017456: 188, 165, 156, 141, 124, 107, 79.) A strict
# by-duration order from a later 2-worker run took 15 min 27 s where this one took 13 min 33 s in the same hour. The
# mid-sized end-to-end modules follow (30-50 s each): left in alphabetical order, the GAN smoke run through
# `ray job submit` was handed out last and one worker finished ~50 s after the other.
LONGEST_FIRST = ("test_faults.py", "test_tune_lambdas.py", "test_ablation.py", "test_train_reid_job.py",
                 "test_multinode.py", "test_evaluate_job.py", "test_hostile_jobs.py", "test_gpu_check.py",
                 "test_train_gan_job.py", "test_synthesize.py", "test_shards.py", "test_stack.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other modules keep their order


def _start(tmp_path_factory, name: str, services: tuple[str, ...]) -> Stack:
    stack = Stack(root=tmp_path_factory.mktemp(name), ports=Ports.free(), services=services, bucket="reid-test")
    stack.up()
    return stack


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP endpoint (moto's server) on 127.0.0.1, with bucket ``reid-test``."""
    stack = _start(tmp_path_factory, "s3", ("s3",))
    yield stack
    stack.down(kill=True)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the loopback S3 server (for this test only)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server.env()


@pytest.fixture
def s3_url(s3_env, s3_server, request):
    """A fresh, empty ``s3://reid-test/<unique prefix>`` on the loopback S3 server."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("/", "_")[:60]
    return f"s3://{s3_server.bucket}/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def s3_proxy(s3_server):
    """``devstack.proxy.FaultProxy`` in front of ``s3_server``, for this test: S3 that a test can stop and throttle."""
    from devstack.proxy import FaultProxy

    with FaultProxy(s3_server.s3_endpoint) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def mlflow_stack(tmp_path_factory):
    """Only an MLflow server (sqlite, artifacts served by it) on a free loopback port, shared by the registry tests
    that need no Ray head (each names its models and experiments uniquely)."""
    stack = _start(tmp_path_factory, "mlflow", ("mlflow",))
    yield stack
    stack.down(kill=True)


@pytest.fixture(scope="session")
def services_stack(tmp_path_factory, s3_server):
    """MLflow server (sqlite) and a Ray head on free loopback ports, next to ``s3_server``.

    ``services_stack.full_env`` holds every variable a client needs (S3, MLflow, Ray with its auth token).
    """
    stack = _start(tmp_path_factory, "services", ("mlflow", "ray"))
    stack.full_env = {**s3_server.env(), **stack.env()}
    yield stack
    stack.down(kill=True)  # a throwaway stack: no graceful Ray shutdown (~25 s after jobs)


@pytest.fixture(scope="session")
def single_process_group():
    """A one-process gloo group on 127.0.0.1, as DeepSpeed engines need. One per session, destroyed at its end:
    DeepSpeed keeps its communication backend in a module global that a second ``init_distributed`` after
    ``destroy_process_group`` would reuse stale."""
    import torch.distributed as dist

    from devstack.stack import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from reid_core.train.deepspeed import init_distributed

    init_distributed(use_gpu=False)
    yield
    dist.destroy_process_group()
