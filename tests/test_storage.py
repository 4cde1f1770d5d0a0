"""reid_core.storage against the real loopback S3 endpoint (moto's server) and local paths."""

from __future__ import annotations

import pytest

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


def test_read_many_names_the_missing_object(s3_url):
    storage.write_bytes(f"{s3_url}/ok.bin", b"1")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        storage.read_many([f"{s3_url}/ok.bin", f"{s3_url}/missing.bin"])


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
