"""Outages of S3 and MLflow, one piece at a time: ``storage``'s outage budget and ``tracking.EpochLogger`` against the
real loopback S3 and MLflow servers, made to disappear by ``devstack.proxy`` (the end-to-end versions, through a
training job, are in ``test_faults.py``)."""

from __future__ import annotations

import logging
import re
import time

import pytest

from devstack.proxy import Fail, FaultProxy
from reid_core import storage, tracking


@pytest.fixture
def budget(monkeypatch):
    """Set this process's outage budget for one test (the variable is restored afterwards)."""

    def set_budget(seconds: float) -> None:
        monkeypatch.setenv(storage.OUTAGE_ENV, "0")
        storage.set_outage_budget(seconds)

    return set_budget


def _objects(s3_url, n=12):
    files = {f"{s3_url}/img/{i:03d}.jpg": bytes([i]) * 100 for i in range(n)}
    storage.write_many(files)
    return files


def _via(proxy, max_attempts=1):
    # max_attempts=1: each call fails within a second against a dead endpoint, so the budget is what is measured.
    return storage.S3Settings(endpoint_url=proxy.url, key="testing", secret="testing", max_attempts=max_attempts)


def test_reads_ride_out_an_outage_shorter_than_the_budget(s3_url, s3_proxy, budget, caplog):
    files = _objects(s3_url)
    budget(30)
    s3_proxy.outage(3.0)  # stopped now, back in 3 s with everything it held
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="reid_core.storage"):
        got = storage.read_many(list(files), _via(s3_proxy))
    assert got == files  # every object, none skipped
    assert time.monotonic() - t0 >= 2.5
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and all(s3_proxy.url in m and "outage budget" in m for m in retries)
    assert any("S3 answers again" in r.getMessage() for r in caplog.records)


def _warm(files, proxy) -> None:
    """One read through the proxy before the outage: the client (imports, session, connection pool) is made, so that a
    time measured afterwards is the outage handling's, not a cold client's start on a loaded machine."""
    url = next(iter(files))
    assert storage.read_many([url], _via(proxy)) == {url: files[url]}


def test_an_outage_longer_than_the_budget_fails_naming_the_endpoint(s3_url, s3_proxy, budget):
    files = _objects(s3_url, 3)
    _warm(files, s3_proxy)
    budget(2)
    s3_proxy.outage(None)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.read_many(list(files), _via(s3_proxy))
    message = str(err.value)
    assert f"endpoint {s3_proxy.url}" in message and "unreachable" in message
    assert "outage budget storage.outage_seconds = 2 s" in message
    assert 2 <= time.monotonic() - t0 < 30
    s3_proxy.restore()
    assert storage.read_many(list(files), _via(s3_proxy)) == files  # the data survived the outage


def test_without_a_budget_an_outage_fails_at_once(s3_url, s3_proxy, budget):
    """Before a job starts (no budget) a dead endpoint is named after botocore's own few attempts, not waited for."""
    files = _objects(s3_url, 2)
    _warm(files, s3_proxy)
    budget(0)
    s3_proxy.outage(None)
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="unreachable"):
        storage.read_many(list(files), _via(s3_proxy))
    assert time.monotonic() - t0 < 15


def test_errors_that_are_not_outages_are_not_retried(s3_env, s3_proxy, budget):
    budget(60)
    with pytest.raises(storage.StorageError, match="bucket does not exist") as err:
        storage.read_many(["s3://no-such-bucket/a.jpg"], _via(s3_proxy, max_attempts=3))
    assert not err.value.transient
    # Counted, not timed: botocore may make 3 attempts, the outage budget (60 s) adds none for a missing bucket.
    assert 1 <= s3_proxy.count(contains="no-such-bucket") <= 3, s3_proxy.count(contains="no-such-bucket")


def test_a_throttled_read_is_retried(s3_url, s3_proxy):
    files = _objects(s3_url, 4)
    target = next(iter(files)).split("/", 3)[3]  # the key
    # The first request for that object, whatever it is (s3fs sends a HEAD before the GET), is throttled.
    s3_proxy.add_hook(lambda method, path: Fail(503, "SlowDown") if path.endswith(target) and
                      s3_proxy.count(contains=target) == 0 else None)  # fmt: skip
    got = storage.read_many(list(files), _via(s3_proxy, max_attempts=3))
    assert got == files
    assert s3_proxy.count(contains=target, outcome="failed 503") == 1
    assert s3_proxy.count("GET", target, outcome="forwarded") == 1


@pytest.mark.parametrize(
    ("status", "code", "reason", "transient"),
    [
        (503, "SlowDown", r"request failed \(HTTP 503 Service Unavailable, SlowDown\)", True),
        (500, "InternalError", r"request failed \(HTTP 500 Internal Server Error, InternalError\)", True),
        (403, "AccessDenied", r"access denied \(check AWS_ACCESS_KEY_ID", False),
        (400, "InvalidRequest", r"request failed \(HTTP 400 Bad Request, InvalidRequest\)", False),
    ],
)
def test_failed_reads_are_one_line_that_says_whether_to_retry(s3_url, s3_proxy, status, code, reason, transient):
    """Every request answered with an error: the message keeps the status and S3's code, names the object, endpoint
    and bucket, and is one line (obstore's own message carries its retry state and a debug dump)."""
    files = _objects(s3_url, 2)
    s3_proxy.add_hook(lambda method, path: Fail(status, code))
    with pytest.raises(
        storage.StorageError, match=rf"^S3 {reason}.*: s3://.*\(endpoint {s3_proxy.url}, bucket "
    ) as err:
        storage.read_many(list(files), _via(s3_proxy, max_attempts=2))
    assert "\n" not in str(err.value) and "Debug" not in str(err.value)
    assert err.value.transient is transient
    # 5xx answers are retried (2 attempts per object here), the others are not.
    assert s3_proxy.count(outcome=f"failed {status}") == (2 if transient else 1) * len(files)


NAMES_THAT_SPELL_ERRORS = ["img/503-timeout.jpg", "connection refused/500.jpg", "nosuchbucket/slowdown.jpg",
                           "the specified bucket does not exist/x.jpg"]  # fmt: skip


def test_a_missing_object_whose_name_spells_an_error_is_a_missing_object(s3_url, s3_proxy):
    """Errors are classified by their words, and the messages quote the object's path: its name must not count."""
    for url in (f"{s3_url}/{name}" for name in NAMES_THAT_SPELL_ERRORS):
        for read in (
            lambda u=url: storage.read_many([u], _via(s3_proxy)),
            lambda u=url: storage.read_bytes(u, _via(s3_proxy)),
        ):
            with pytest.raises(FileNotFoundError, match=f"object not found: {re.escape(url)}"):
                read()


@pytest.mark.parametrize("fault", [Fail(403, "AccessDenied"), Fail(400, "InvalidRequest")])
def test_a_refused_read_whose_name_spells_an_error_is_not_retried(s3_url, s3_proxy, fault):
    """Keys that spell a server error, a timeout or a missing bucket: still a refused request, never retried for the
    whole outage budget."""
    files = {f"{s3_url}/{name}": b"x" for name in NAMES_THAT_SPELL_ERRORS}
    storage.write_many(files)
    s3_proxy.add_hook(lambda method, path: fault)
    for url in files:
        for read in (
            lambda u=url: storage.read_many([u], _via(s3_proxy)),
            lambda u=url: storage.read_bytes(u, _via(s3_proxy)),
        ):
            with pytest.raises(storage.StorageError) as err:
                read()
            assert not err.value.transient, str(err.value)
            assert str(err.value).startswith(("S3 access denied", "S3 request failed")), str(err.value)


# ------------------------------------------------------------------------------------------------ MLflow
@pytest.fixture(autouse=True)
def quick_mlflow_retries(monkeypatch):
    """As in a training worker (``tracking.quick_retries``), for this test only."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")


def _run(uri: str) -> str:
    return tracking.start_run(uri, "outages", f"logger-{time.time_ns()}", {"p": 1})


def test_epoch_logger_keeps_epochs_while_mlflow_is_down_and_logs_them_after(mlflow_stack, caplog):
    from PIL import Image

    uri = mlflow_stack.mlflow_uri
    with FaultProxy(uri) as proxy:
        run_id = _run(uri)
        with caplog.at_level(logging.INFO, logger="reid_core.tracking"):
            logger = tracking.EpochLogger(proxy.url, run_id, retry_cap=1.0)
            logger.log(0, {"loss": 1.0})
            deadline = time.monotonic() + 30
            while logger.pending_epochs() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not logger.pending_epochs(), "epoch 0 was not logged within 30 s"
            proxy.outage(None)  # MLflow stops
            stamps = []
            for epoch in (1, 2, 3):
                stamps.append(time.time())
                logger.log(epoch, {"loss": 1.0 / (epoch + 1)}, pictures={f"s/e{epoch}.png": Image.new("RGB", (4, 4))})
            # the logger has tried and said MLflow is not answering: wait for that, not for a fixed time
            deadline = time.monotonic() + 60
            while not any("not answering" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the logger did not report MLflow down within 60 s"
                time.sleep(0.05)
            assert logger.pending_epochs() == [1, 2, 3]  # kept, training went on (log() returned at once)
            proxy.restore()  # MLflow is back
            assert logger.close(timeout=60) == []
    client = tracking.client(uri)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]  # every epoch once
    assert [m.value for m in history] == [1.0, 0.5, 1 / 3, 0.25]
    # Stamped when the epoch ended, not when MLflow came back.
    for m, t in zip(history[1:], stamps, strict=True):
        assert abs(m.timestamp / 1000 - t) < 1.0
    assert sorted(a.path for a in client.list_artifacts(run_id, "s")) == ["s/e1.png", "s/e2.png", "s/e3.png"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(proxy.url in m and "not answering" in m and "epoch(s) [1" in m for m in messages), messages
    assert any("answers again" in m and "[1, 2, 3]" in m for m in messages), messages


def test_epoch_logger_says_what_was_not_logged_when_mlflow_stays_down(mlflow_stack, caplog):
    uri = mlflow_stack.mlflow_uri
    with FaultProxy(uri) as proxy:
        run_id = _run(uri)
        proxy.outage(None)
        logger = tracking.EpochLogger(proxy.url, run_id, retry_cap=0.5)
        logger.log(4, {"loss": 0.125, "accuracy": 0.5})
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="reid_core.tracking"):
            assert logger.close(timeout=3) == [4]
        assert time.monotonic() - t0 < 20
    lost = [r.getMessage() for r in caplog.records if "NOT logged" in r.getMessage()]
    assert len(lost) == 1 and "epoch 4" in lost[0] and "'loss': 0.125" in lost[0] and run_id in lost[0]
    assert tracking.client(uri).get_metric_history(run_id, "loss") == []


def test_checkpoint_storage_keeps_its_retries_wherever_ray_sends_it(s3_url, s3_proxy):
    """Ray pickles the run's filesystem to its controller and workers; pyarrow's own pickling drops the retry
    strategy (3 attempts, about 2 s), ours rebuilds it: an upload through a 4-s outage succeeds after the trip."""
    import pickle

    bucket, key = storage.split_s3(s3_url)
    _, fs = storage.ray_storage(s3_url, _via(s3_proxy), outage_seconds=10)
    shipped = pickle.loads(pickle.dumps(fs))
    assert shipped._rebuild_args[0] == storage.upload_attempts(10) > 3
    s3_proxy.outage(4.0)
    t0 = time.monotonic()
    with shipped.open_output_stream(f"{bucket}/{key}/checkpoint_x/meta.json") as f:
        f.write(b"{}")
    assert time.monotonic() - t0 >= 3.5
    assert storage.read_bytes(f"{s3_url}/checkpoint_x/meta.json") == b"{}"


def test_upload_attempts_cover_the_budget():
    assert storage.upload_attempts(0) == 3  # pyarrow's default: no budget
    assert [storage.upload_attempts(t) for t in (10, 60, 120, 300)] == [6, 9, 12, 21]


def test_epoch_logger_does_not_retry_what_mlflow_refuses(mlflow_stack, caplog):
    """A 4xx (here: the run was deleted meanwhile) is an answer, not an outage: named with its values, not retried,
    and the epochs after it are still logged in order."""
    uri = mlflow_stack.mlflow_uri
    deleted, alive = _run(uri), _run(uri)
    tracking.client(uri).delete_run(deleted)
    with caplog.at_level(logging.WARNING, logger="reid_core.tracking"):
        logger = tracking.EpochLogger(uri, deleted, retry_cap=0.5)
        logger.log(0, {"loss": 2.0})
        assert logger.close(timeout=30) == []
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "epoch 0" in refused[0] and "'loss': 2.0" in refused[0] and "NOT logged" in refused[0]
    logger = tracking.EpochLogger(uri, alive)
    logger.log(0, {"loss": 2.0})
    logger.log(1, {"loss": 1.0})
    assert logger.close(timeout=30) == []
    assert [m.step for m in tracking.client(uri).get_metric_history(alive, "loss")] == [0, 1]


def test_a_training_failure_is_one_line_naming_the_failing_side_and_how_to_resume():
    from ray.train import ControllerError, WorkerGroupError

    from reid_core.config import RunConfig
    from reid_core.workflows.pipeline import training_failure

    run = RunConfig(name="gan-7", storage="s3://bkt/ray-results/", max_failures=2)
    settings = storage.S3Settings(endpoint_url="http://s3.internal:9000")
    read = storage.StorageError("S3 endpoint is unreachable: s3://bkt/x.jpg (endpoint http://s3.internal:9000)")
    line = training_failure(WorkerGroupError("2 workers failed", {1: ValueError("other"), 0: read}), run, settings)
    assert line == (
        "training failed (rank 0, after run.max_failures = 2 restarts): StorageError: S3 endpoint is unreachable: "
        "s3://bkt/x.jpg (endpoint http://s3.internal:9000). The checkpoints are kept in s3://bkt/ray-results/gan-7: "
        "run the same command (same run.name) to resume"
    )
    write = OSError("When uploading 'snapshot.json':\nAWS Error NETWORK_CONNECTION during PutObject: curlCode: 7")
    line = training_failure(ControllerError(write), run, settings)
    assert "\n" not in line and "Ray Train's controller, which Ray does not restart" in line
    assert "OSError: AWS Error NETWORK_CONNECTION" in line and "(S3 endpoint http://s3.internal:9000)" in line


def test_throttling_that_outlasts_botocore_is_waited_out_within_the_budget(s3_url, s3_proxy, budget):
    """s3fs turns a 503 SlowDown that botocore gave up on into "OSError: Service Unavailable": still an outage."""
    files = _objects(s3_url, 2)
    target = next(iter(files)).split("/", 3)[3]
    s3_proxy.add_hook(lambda method, path: Fail(503, "SlowDown") if path.endswith(target) and
                      s3_proxy.count(contains=target, outcome="failed 503") < 3 else None)  # fmt: skip
    budget(30)
    assert storage.read_many(list(files), _via(s3_proxy)) == files
    assert s3_proxy.count(contains=target, outcome="failed 503") == 3
