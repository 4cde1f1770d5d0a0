"""reid_core.storage against the real loopback S3 endpoint (moto's server) and local paths."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request

import pytest

from devstack.stack import Ports, Stack
from reid_core import storage


def test_roundtrip_and_listing_on_s3(s3_url):
    storage.write_bytes(f"{s3_url}/a/x.bin", b"hello")
    storage.write_many({f"{s3_url}/b/{i}.bin": bytes([i]) * 10 for i in range(20)})
    assert storage.read_bytes(f"{s3_url}/a/x.bin") == b"hello"
    assert storage.exists(f"{s3_url}/a/x.bin")
    assert not storage.exists(f"{s3_url}/a/missing.bin")
    files = storage.list_files(s3_url)
    assert len(files) == 21 and all(f.startswith(s3_url) for f in files)
    got = storage.read_many([f"{s3_url}/b/{i}.bin" for i in range(20)], batch_size=8)
    assert got == {f"{s3_url}/b/{i}.bin": bytes([i]) * 10 for i in range(20)}


def test_directory_markers_are_not_listed_as_files(s3_url, s3_env):
    """pyarrow (Ray's run storage) writes empty "folder/" marker objects: they are no files, and unreadable by key."""
    import boto3

    bucket, key = storage.split_s3(s3_url)
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.put_object(Bucket=bucket, Key=f"{key}/run/", Body=b"")
    storage.write_bytes(f"{s3_url}/run/meta.json", b"{}")
    files = storage.list_files(s3_url)
    assert files == [f"{s3_url}/run/meta.json"]
    assert storage.read_many(files) == {f"{s3_url}/run/meta.json": b"{}"}


def test_read_many_names_the_missing_object(s3_url):
    storage.write_bytes(f"{s3_url}/ok.bin", b"1")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_many([f"{s3_url}/ok.bin", f"{s3_url}/missing.bin"])


def test_a_missing_object_in_a_bucket_named_bucket_is_a_missing_object(s3_env):
    """Whether the bucket or the object is missing is told by S3's answer, not by the word "bucket" in the URL."""
    import boto3

    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
        Bucket="my-bucket-data"
    )
    storage.write_bytes("s3://my-bucket-data/ok.bin", b"1")
    for read in (
        lambda: storage.read_bytes("s3://my-bucket-data/bucket/missing.bin"),
        lambda: storage.read_many(["s3://my-bucket-data/ok.bin", "s3://my-bucket-data/bucket/missing.bin"]),
    ):
        with pytest.raises(FileNotFoundError, match=r"object not found: s3://my-bucket-data/bucket/missing.bin"):
            read()


def test_read_many_is_one_get_per_object_and_works_inside_an_event_loop(s3_url, s3_proxy):
    """The loader's path: one request per object (no HEAD first), and callable from a coroutine (Ray async actors)."""
    import asyncio

    files = {f"{s3_url}/e/{i}.bin": bytes([i]) * (i + 1) for i in range(10)}
    storage.write_many(files)
    via = storage.S3Settings(endpoint_url=s3_proxy.url, key="testing", secret="testing")
    assert storage.read_many(list(files), via, batch_size=4) == files
    assert s3_proxy.count() == s3_proxy.count("GET", outcome="forwarded") == len(files)

    async def from_a_coroutine():
        return storage.read_many(list(files), via)

    assert asyncio.run(from_a_coroutine()) == files


def test_a_process_forked_after_reads_still_reads(s3_url):
    """obstore's runtime does not survive a fork (a read in the child would wait forever): the child reads through
    s3fs instead, with the same result."""
    import multiprocessing

    files = {f"{s3_url}/f/{i}.bin": bytes([i]) * 8 for i in range(3)}
    storage.write_many(files)
    assert storage.read_many(list(files)) == files  # the parent's obstore runtime is running now
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_read_into, args=(list(files), queue))
    child.start()
    try:
        assert queue.get(timeout=60) == files
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


def _read_into(urls, queue) -> None:
    queue.put(storage.read_many(urls))


def test_local_paths_behave_the_same(tmp_path):
    root = str(tmp_path / "d")
    storage.write_many({f"{root}/x/{i}.bin": b"z" for i in range(3)})
    assert storage.read_bytes(f"{root}/x/1.bin") == b"z"
    assert len(storage.list_files(root)) == 3
    storage.check_location(root, must_exist=True)
    with pytest.raises(storage.StorageError, match="path does not exist"):
        storage.check_location(str(tmp_path / "nope"), must_exist=True)


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(storage.StorageError, match="S3 bucket does not exist: 'no-such-bucket'"):
        storage.check_location("s3://no-such-bucket/data")


def test_missing_prefix_is_named(s3_url):
    with pytest.raises(storage.StorageError, match="nothing found at"):
        storage.check_location(f"{s3_url}/nothing-here", must_exist=True)


def test_unreachable_endpoint_is_named(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(storage.StorageError, match=r"S3 endpoint http://127.0.0.1:9 is unreachable for bucket 'b1'"):
        storage.check_location("s3://b1/k")


def test_settings_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / ".stack").mkdir()
    (tmp_path / ".stack/env").write_text("export AWS_ENDPOINT_URL=http://127.0.0.1:1234\nAWS_ACCESS_KEY_ID='k'\n")
    assert storage.resolve_settings().endpoint_url == "http://127.0.0.1:1234"
    assert storage.resolve_settings().key == "k"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5678")
    assert storage.resolve_settings().endpoint_url == "http://127.0.0.1:5678"
    assert storage.resolve_settings("http://explicit:1").endpoint_url == "http://explicit:1"


def test_bad_urls():
    with pytest.raises(storage.StorageError, match="unsupported URL scheme"):
        storage.filesystem("gs://bucket/key")
    with pytest.raises(storage.StorageError, match="not an S3 URL"):
        storage.split_s3("s3:///key")


# ---------------------------------------------------------------------------------------------------------------
# Bad input against real endpoints: wrong credentials, a missing bucket, an endpoint that drops or refuses connections


@pytest.fixture(scope="module")
def s3_with_auth(tmp_path_factory):
    """A loopback S3 server of its own that checks credentials (moto's IAM enforcement, switched on through its
    ``/moto-api/reset-auth`` endpoint after one IAM user with an s3:* policy and an access key was created).
    Yields (endpoint, the user's S3Settings)."""
    import boto3

    stack = Stack(root=tmp_path_factory.mktemp("s3auth"), ports=Ports.free(), services=("s3",), bucket="auth-test")
    stack.up()
    try:
        endpoint = stack.s3_endpoint
        admin = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing",
                 "aws_secret_access_key": "testing"}  # fmt: skip
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).put_object(Bucket="auth-test", Key="data/a.jpg", Body=b"x")
        enforce = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})  # fmt: skip
        urllib.request.urlopen(enforce, timeout=10).read()
        yield endpoint, storage.S3Settings(endpoint_url=endpoint, key=key["AccessKeyId"], secret=key["SecretAccessKey"])
    finally:
        stack.down(kill=True)


@pytest.mark.parametrize("which", ["wrong secret", "unknown key"])
def test_wrong_credentials_are_named_wherever_s3_is_read(s3_with_auth, monkeypatch, which):
    from reid_core.data import Record, ReIDDataset, read_layout

    endpoint, good = s3_with_auth
    assert storage.read_bytes("s3://auth-test/data/a.jpg", good) == b"x"  # the server accepts the right key
    key, secret = (good.key, "wrong") if which == "wrong secret" else ("AKIAUNKNOWNKEY000000", good.secret)
    bad = storage.S3Settings(endpoint_url=endpoint, key=key, secret=secret, max_attempts=2)
    denied = r"access denied.*check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    where = rf"{denied}.*\(endpoint {endpoint}, bucket 'auth-test'\)"
    with pytest.raises(storage.StorageError, match=rf"S3 access denied to bucket 'auth-test' at {endpoint}"):
        storage.check_location("s3://auth-test/data", bad)
    for read in (
        lambda: storage.read_bytes("s3://auth-test/data/a.jpg", bad),
        lambda: storage.read_many(["s3://auth-test/data/a.jpg"], bad),
        lambda: storage.list_files("s3://auth-test/data", bad),
        lambda: storage.read_ranges([("s3://auth-test/data/a.jpg", 0, 1)], bad),
    ):
        with pytest.raises(storage.StorageError, match=where):
            read()
    # The same through the environment, as jobs and workers get it: never mistaken for a bad image or layout.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(storage.StorageError, match=denied):
        read_layout("s3://auth-test/data", "market1501")
    with pytest.raises(storage.StorageError, match=denied):
        ReIDDataset([Record("s3://auth-test/data/a.jpg", 0, 0)], on_bad_image="skip").__getitems__([0])


def test_missing_bucket_is_named_on_reads(s3_env):
    from reid_core.data import load_image

    message = r"S3 bucket does not exist: s3://no-such-bucket/x.jpg \(endpoint http://127.0.0.1:\d+, bucket 'no-such-bucket'\)"
    for read in (
        lambda: storage.read_bytes("s3://no-such-bucket/x.jpg"),
        lambda: storage.read_many(["s3://no-such-bucket/x.jpg"]),
        lambda: storage.list_files("s3://no-such-bucket/x.jpg"),
        lambda: load_image("s3://no-such-bucket/x.jpg"),  # a StorageError, not a BadImageError that could be skipped
    ):
        with pytest.raises(storage.StorageError, match=message):
            read()


def test_dropped_connections_are_retried_then_the_endpoint_is_named():
    """An endpoint that accepts and closes every connection: botocore and s3fs retry, then one error names it."""
    server = socket.create_server(("127.0.0.1", 0))
    attempts = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            attempts.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    settings = storage.S3Settings(endpoint_url=endpoint, key="k", secret="s", max_attempts=2)
    try:
        # A closed connection reads as "closed" or, when the reset beats the request, as "could not connect".
        with pytest.raises(storage.StorageError, match=rf"S3 endpoint (closed the connection on every attempt|is "
                                                       rf"unreachable): s3://b1/k \(endpoint {endpoint}, bucket 'b1'\)"):  # fmt: skip
            storage.read_bytes("s3://b1/k", settings)
    finally:
        server.close()
    assert len(attempts) >= 2 * storage.S3FS_RETRIES


def test_refused_endpoint_is_named_on_reads():
    settings = storage.S3Settings(endpoint_url="http://127.0.0.1:9", key="k", secret="s", max_attempts=1)
    for read in (
        lambda: storage.read_many(["s3://b1/a", "s3://b1/b"], settings),
        lambda: storage.read_ranges([("s3://b1/a", 0, 10)], settings),
    ):
        with pytest.raises(storage.StorageError, match=r"S3 endpoint is unreachable: s3://b1/\w \(endpoint "
                                                       r"http://127.0.0.1:9, bucket 'b1'\)"):  # fmt: skip
            read()
