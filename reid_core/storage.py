"""Object storage: the only module that talks to s3fs / boto3 / obstore / pyarrow.fs.

Every path in the project is a URL: ``s3://bucket/key`` or a local path (``/data/msmt17``, ``file:///data``).
Endpoint and credentials come from, in order: explicit arguments (the job's config), the standard AWS environment
variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``), then the embedded stack's ``.stack/env`` file when one exists in the working directory.
Credentials are never read from files in the repository; on a cluster they come from the instance profile / IRSA
(botocore's default chain) when no variable is set.

s3fs is not fork-safe: create filesystems in the process that uses them (``filesystem()`` caches per process).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import posixpath
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlparse

import fsspec

log = logging.getLogger(__name__)

STACK_ENV_FILE = Path(".stack") / "env"


class StorageError(RuntimeError):
    """A storage location is unreachable, missing or refused; the message names the endpoint and bucket.

    ``transient``: the endpoint did not answer, cut the connection, throttled or failed with a 5xx; such errors are
    retried within the outage budget (``set_outage_budget``), the others (access denied, missing bucket) never.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class RangeNotSatisfiableError(StorageError):
    """A ranged read starts past the end of the object (``url``): it is shorter than the caller expected."""

    def __init__(self, message: str, url: str = "") -> None:  # url optional: exceptions are unpickled from args
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and how to reach it. ``endpoint_url=None`` means AWS itself (botocore's default resolution)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    key: str | None = None
    secret: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 5

    def describe(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


def read_env_file(path: str | os.PathLike = STACK_ENV_FILE) -> dict[str, str]:
    """Parse a ``KEY=VALUE`` file (``export`` prefixes, comments and quotes allowed); missing file -> {}."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[str, str] = {}
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _env(name: str, stack_env: dict[str, str]) -> str | None:
    return os.environ.get(name) or stack_env.get(name) or None


def resolve_settings(endpoint_url: str | None = None, region: str | None = None) -> S3Settings:
    """Settings from explicit values, then the AWS environment variables, then ``.stack/env``."""
    stack_env = {} if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") else read_env_file()
    endpoint = endpoint_url or _env("AWS_ENDPOINT_URL_S3", stack_env) or _env("AWS_ENDPOINT_URL", stack_env)
    return S3Settings(
        endpoint_url=endpoint,
        region=region or _env("AWS_DEFAULT_REGION", stack_env) or _env("AWS_REGION", stack_env) or "us-east-1",
        key=_env("AWS_ACCESS_KEY_ID", stack_env),
        secret=_env("AWS_SECRET_ACCESS_KEY", stack_env),
    )


def use_endpoint(endpoint_url: str | None, region: str | None = None) -> None:
    """Make a job's ``storage.endpoint_url`` / ``storage.region`` (when set) this process's S3 endpoint and region for
    every later ``resolve_settings()``, through the standard variables, which the process's children inherit."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if region:
        os.environ["AWS_DEFAULT_REGION"] = region


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with ``/``."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def normalise(url: str) -> str:
    """The canonical form of a location, for comparing locations: S3 keys with ``.``, ``..`` and empty segments
    resolved (``s3://b/x/./p`` -> ``s3://b/x/p``), local paths absolute with symlinks resolved. Never used to write."""
    if is_s3(url):
        bucket, key = split_s3(url)
        key = posixpath.normpath("/" + key).lstrip("/")
        return f"s3://{bucket}/{key}".rstrip("/")
    return os.path.realpath(os.path.expanduser(url))


def is_within(url: str, root: str) -> bool:
    """``url`` is ``root`` or lies below it, compared in normalised form (``normalise``)."""
    u, r = normalise(url), normalise(root)
    return u == r or u.startswith(r.rstrip("/") + "/")


_FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}
S3FS_RETRIES = 2  # s3fs's own attempts around botocore's (see s3_filesystem)


def s3_filesystem(settings: S3Settings | None = None):
    """An ``s3fs.S3FileSystem`` for ``settings`` (cached per process: s3fs is not fork-safe)."""
    import s3fs

    settings = settings or resolve_settings()
    cache_key = ("s3", os.getpid(), settings)
    fs = _FS_CACHE.get(cache_key)
    if fs is None:
        client_kwargs = {"region_name": settings.region}
        if settings.endpoint_url:
            client_kwargs["endpoint_url"] = settings.endpoint_url
        fs = s3fs.S3FileSystem(
            key=settings.key,
            secret=settings.secret,
            client_kwargs=client_kwargs,
            config_kwargs={
                "connect_timeout": settings.connect_timeout,
                "read_timeout": settings.read_timeout,
                "retries": {"max_attempts": settings.max_attempts, "mode": "standard"},
            },
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        # botocore retries every request (standard mode: connection errors, throttling, 5xx; ``max_attempts``); s3fs
        # wraps each call in its own retry loops, twice nested, which multiplied the attempts against a dead endpoint
        # to 60 over ~70 s. One s3fs retry stays: it also covers a body cut off mid-read, which botocore does not.
        fs.retries = S3FS_RETRIES
        _FS_CACHE[cache_key] = fs
    return fs


def filesystem(url: str, settings: S3Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for an ``s3://`` URL or a local path."""
    if is_s3(url):
        bucket, key = split_s3(url)
        return s3_filesystem(settings), f"{bucket}/{key}".rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        raise StorageError(f"unsupported URL scheme in {url!r}: use s3://bucket/key or a local path")
    return fsspec.filesystem("file"), os.path.abspath(url)


def _wrap(exc: Exception, url: str, settings: S3Settings | None) -> StorageError:
    if not is_s3(url):
        return StorageError(f"{url}: {exc}")
    bucket, _ = split_s3(url)
    settings = settings or resolve_settings()
    reason = _describe_s3_error(exc, url)
    return StorageError(
        f"S3 {reason}: {url} (endpoint {settings.describe()}, bucket {bucket!r})",
        transient=_is_transient(exc, reason, url),
    )


_TRANSIENT = ("slowdown", "serviceunavailable", "service unavailable", "internalerror", "timeout", "timed out",
              "connection reset", "connectionreset", "serverdisconnected", "clientoserror", "incompleteread",
              "responsestreamingerror", "payloaderror")  # fmt: skip
_SERVER_STATUS = re.compile(r"\b50[0234]\b")  # a 5xx status, not digits inside a port or a key


def _is_transient(exc: BaseException, reason: str, url: str = "") -> bool:
    """Worth retrying later: the endpoint was unreachable, cut the connection, throttled or failed on its side."""
    if reason in ("endpoint is unreachable", "endpoint closed the connection on every attempt"):
        return True
    if isinstance(exc, PermissionError | FileNotFoundError):
        return False
    text = _error_text(exc, url).lower()
    return any(s in text for s in _TRANSIENT) or bool(_SERVER_STATUS.search(text))


# ------------------------------------------------------------------------------------------------ outage budget
OUTAGE_ENV = "REID_S3_OUTAGE_SECONDS"


def set_outage_budget(seconds: float) -> None:
    """Let this process's S3 reads ride out an outage of up to ``seconds`` (the jobs' ``storage.outage_seconds``).

    botocore retries each request a few times within seconds (standard mode, ``S3Settings.max_attempts``), which is
    right before a job starts (fail fast, in one line) but not mid-run, where S3 restarting or throttling for a minute
    must not cost a worker restart. Within the budget a transient failure (``StorageError.transient``) is retried with
    back-off, each retry a warning naming the endpoint; past it the error says how long it waited. The value travels
    in the environment so that DataLoader worker processes started later inherit it. 0 (the default): no budget.
    """
    if seconds < 0:
        raise ValueError(f"outage budget must be >= 0 seconds, got {seconds}")
    os.environ[OUTAGE_ENV] = f"{float(seconds):g}"


def outage_budget() -> float:
    """Seconds this process's S3 reads wait out an outage (``set_outage_budget``); 0 when unset."""
    try:
        return max(0.0, float(os.environ.get(OUTAGE_ENV, "0")))
    except ValueError:
        return 0.0


def _within_outage_budget(call, what: str):
    """``call()``, retried on transient ``StorageError`` until ``outage_budget()`` seconds have passed."""
    budget = outage_budget()
    started = None
    attempt = 0
    while True:
        try:
            result = call()
        except StorageError as exc:
            if not exc.transient or budget <= 0:
                raise
            now = time.monotonic()
            started = now if started is None else started
            waited = now - started
            if waited >= budget:
                raise StorageError(
                    f"{exc}; still failing after {waited:.0f} s of retries (outage budget storage.outage_seconds = "
                    f"{budget:g} s)",
                    transient=True,
                ) from exc
            delay = min(0.5 * 2**attempt, 10.0, budget - waited)
            log.warning("%s; retrying %s in %.1f s (%.0f s of the outage budget left)", exc, what, delay,
                        budget - waited)  # fmt: skip
            time.sleep(delay)
            attempt += 1
            continue
        if started is not None:
            log.warning("S3 answers again after %.1f s: %s succeeded", time.monotonic() - started, what)
        return result


ACCESS_DENIED = "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role)"
_DENIED = (
    "invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "signature we calculated does not match",
    "access key id you provided does not exist",
)  # fmt: skip


def _not_found(exc: FileNotFoundError, url: str, settings: S3Settings | None) -> Exception:
    """A missing bucket is a storage problem (``StorageError``), a missing object a ``FileNotFoundError``."""
    # By S3's words, not by the word "bucket": the bucket may be "my-bucket", the key "bucket/x.jpg".
    if is_s3(url) and _describe_s3_error(exc, url) == "bucket does not exist":
        return _wrap(exc, url, settings)
    return FileNotFoundError(f"object not found: {url}")


def _error_text(exc: BaseException, url: str = "") -> str:
    """The error's type and message with the object's path taken out: errors are classified by their words, and a key
    such as ``img/503-timeout.jpg`` or ``nosuchbucket/x.jpg`` must not read as a server error or a missing bucket."""
    text = f"{type(exc).__name__}: {exc}"
    if is_s3(url):
        bucket, key = split_s3(url)
        path = f"{bucket}/{key}"
        for form in sorted({path, quote(path), quote(path, safe="")}, key=len, reverse=True):
            text = text.replace(form, "<object>")
    return text


def _describe_s3_error(exc: BaseException, url: str = "") -> str:
    text = _error_text(exc, url)
    lowered = text.lower()
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket does not exist" in lowered:
        return "bucket does not exist"
    if any(s in lowered for s in ("could not connect", "connect timeout", "connection refused", "endpointconnection")):
        return "endpoint is unreachable"
    if isinstance(exc, PermissionError) or any(s in lowered for s in _DENIED):
        return ACCESS_DENIED
    if "connectionclosed" in lowered:
        return "endpoint closed the connection on every attempt"
    if isinstance(exc, FileNotFoundError):
        return "object not found"
    return f"request failed ({text})"


def read_bytes(url: str, settings: S3Settings | None = None) -> bytes:
    """The bytes of one object (``FileNotFoundError`` if missing; S3 failures: ``StorageError``)."""
    return _within_outage_budget(lambda: _read_bytes(url, settings), f"reading {url}")


def _read_bytes(url: str, settings: S3Settings | None) -> bytes:
    fs, path = filesystem(url, settings)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise _not_found(exc, url, settings) from None
    except Exception as exc:
        raise _wrap(exc, url, settings) from exc


def write_bytes(url: str, data: bytes, settings: S3Settings | None = None) -> None:
    fs, path = filesystem(url, settings)
    try:
        if not is_s3(url):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)
    except Exception as exc:
        raise _wrap(exc, url, settings) from exc


def write_many(files: dict[str, bytes], settings: S3Settings | None = None, batch_size: int = 64) -> None:
    """Write many objects with up to ``batch_size`` requests in flight (s3fs's async ``pipe``); local paths too."""
    if not files:
        return
    first = next(iter(files))
    fs, _ = filesystem(first, settings)
    payload = {filesystem(u, settings)[1]: data for u, data in files.items()}
    try:
        if is_s3(first):
            fs.pipe(payload, batch_size=batch_size)
        else:
            for path, data in payload.items():
                fs.makedirs(os.path.dirname(path), exist_ok=True)
                fs.pipe_file(path, data)
    except Exception as exc:
        raise _wrap(exc, first, settings) from exc


def read_many(urls: Iterable[str], settings: S3Settings | None = None, batch_size: int = 64) -> dict[str, bytes]:
    """Read many objects with up to ``batch_size`` requests in flight: one GET per S3 object (obstore, see
    ``_get_objects``), local files one by one.

    Returns {url: bytes}. A missing object raises ``FileNotFoundError`` naming it; nothing is dropped silently.
    """
    urls = list(urls)
    what = f"reading {len(urls)} objects ({urls[0]}{', ...' if len(urls) > 1 else ''})" if urls else "reading"
    return _within_outage_budget(lambda: _read_many(urls, settings, batch_size), what)


def _read_many(urls: list[str], settings: S3Settings | None, batch_size: int) -> dict[str, bytes]:
    if not urls:
        return {}
    if all(is_s3(u) for u in urls) and _OBSTORE_PID[0] in (None, os.getpid()):
        return _get_objects(urls, settings, batch_size)
    # Local files; or a process forked after its parent used obstore, whose runtime's threads did not survive the fork
    # (a read there would wait forever): s3fs, whose event loop is rebuilt after a fork, reads for it.
    fs, _ = filesystem(urls[0], settings)
    paths = {filesystem(u, settings)[1]: u for u in urls}
    try:
        got = fs.cat(list(paths), batch_size=batch_size, on_error="return")
    except Exception as exc:
        raise _wrap(exc, urls[0], settings) from exc
    out: dict[str, bytes] = {}
    for path, value in got.items():
        url = paths[path] if path in paths else paths[path.rstrip("/")]
        if isinstance(value, FileNotFoundError):
            raise _not_found(value, url, settings) from None
        if isinstance(value, Exception):
            raise _wrap(value, url, settings) from value
        out[url] = value
    return out


_OBSTORE_PID: list[int | None] = [None]  # the process whose obstore runtime is running (see _read_many)


def object_store(bucket: str, settings: S3Settings | None = None):
    """An obstore ``S3Store`` for ``bucket``, cached per process. obstore's runtime does not survive a fork: a forked
    child of a process that used it reads through s3fs (``_read_many``); DataLoader workers use forkserver.

    Credentials, the endpoint and the region come from ``settings``; what they leave unset, obstore takes from the
    environment and the instance role, as botocore does. Retries: ``settings.max_attempts`` attempts per request on
    connection errors, dropped connections, timeouts and 5xx answers (throttling included).
    """
    from obstore.store import S3Store

    settings = settings or resolve_settings()
    _OBSTORE_PID[0] = os.getpid()
    cache_key = ("obstore", os.getpid(), settings, bucket)
    store = _FS_CACHE.get(cache_key)
    if store is None:
        config: dict[str, str] = {"region": settings.region}
        if settings.endpoint_url:
            config["endpoint"] = settings.endpoint_url
        if settings.key and settings.secret:
            config.update(access_key_id=settings.key, secret_access_key=settings.secret)
        client_options = {
            "connect_timeout": timedelta(seconds=settings.connect_timeout),
            "timeout": timedelta(seconds=settings.read_timeout),
            "allow_http": (settings.endpoint_url or "").startswith("http://"),
        }
        retry = {
            "max_retries": max(0, settings.max_attempts - 1),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=20), "base": 2},
            "retry_timeout": timedelta(seconds=300),
        }
        store = S3Store(bucket, config=config, client_options=client_options, retry_config=retry)
        _FS_CACHE[cache_key] = store
    return store


def _get_objects(urls: list[str], settings: S3Settings | None, batch_size: int) -> dict[str, bytes]:
    """GET each object once, up to ``batch_size`` at a time, through obstore (Rust's ``object_store``).

    This is the training loader's path (``ReIDDataset`` reads each batch's images with ``read_many``). s3fs costs
    2.7-3.9 ms of client CPU per small GET on the project's 2-core VM, obstore 0.4-0.7 ms, and pyarrow's S3
    filesystem 0.8-0.9 ms for a HEAD and a GET (docs/experiments.md). On a GPU node the loader's CPUs decode images
    instead.
    """
    import obstore

    settings = settings or resolve_settings()  # once per call, not per object (it may read .stack/env)
    stores = {bucket: object_store(bucket, settings) for bucket in {split_s3(u)[0] for u in urls}}

    async def get(store, key: str):
        try:
            result = await obstore.get_async(store, key)
            return bytes(await result.bytes_async())
        except Exception as exc:  # noqa: BLE001 - mapped per object below
            return exc

    async def get_all() -> list:
        gate = asyncio.Semaphore(max(1, batch_size))

        async def one(url: str):
            bucket, key = split_s3(url)
            async with gate:
                return await get(stores[bucket], key)

        return await asyncio.gather(*(one(u) for u in urls))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        got = asyncio.run(get_all())
    else:  # called from a coroutine (a Ray async actor): run the reads on a thread of their own
        with ThreadPoolExecutor(max_workers=1) as pool:
            got = pool.submit(asyncio.run, get_all()).result()
    out: dict[str, bytes] = {}
    for url, value in zip(urls, got, strict=True):
        if isinstance(value, FileNotFoundError) and _s3_code(_error_text(value, url)) != "NoSuchBucket":
            raise FileNotFoundError(f"object not found: {url}") from None
        if isinstance(value, Exception):
            raise _object_store_error(value, url, settings) from value
        out[url] = value
    return out


def _s3_code(text: str) -> str | None:
    """The ``<Code>`` of an S3 error body quoted in an error message (``NoSuchBucket``, ``SlowDown``), or None."""
    match = re.search(r"<Code>(\w+)</Code>", text)
    return match.group(1) if match else None


def _object_store_error(exc: Exception, url: str, settings: S3Settings | None) -> StorageError:
    """An obstore error as a one-line ``StorageError`` naming the endpoint and bucket, with ``transient`` set as for
    s3fs's errors. obstore's own message runs over many lines (its retry state and a debug dump): only the HTTP status
    and the S3 error code are kept."""
    bucket, _ = split_s3(url)
    settings = settings or resolve_settings()
    text = _error_text(exc, url).split("\n\nDebug source", 1)[0]
    code = _s3_code(text)
    status = re.search(r"status code: (\d{3})( [A-Za-z ]+)?", text)
    lowered = re.sub(r"retry_timeout: \S+", "", text.lower())  # obstore's retry settings, in every retried error
    if type(exc).__name__ in ("PermissionDeniedError", "UnauthenticatedError") or (code or "").lower() in _DENIED:
        reason, transient = ACCESS_DENIED, False
    elif code == "NoSuchBucket":
        reason, transient = "bucket does not exist", False
    elif status:
        what = f"HTTP {status.group(1)}{(status.group(2) or '').rstrip()}" + (f", {code}" if code else "")
        reason, transient = f"request failed ({what})", status.group(1).startswith("5")
    elif any(s in lowered for s in ("error sending request", "connection", "timed out", "timeout")):
        reason, transient = "endpoint is unreachable", True
    else:
        reason, transient = f"request failed ({text.splitlines()[0]})", False
    return StorageError(f"S3 {reason}: {url} (endpoint {settings.describe()}, bucket {bucket!r})", transient=transient)


def read_ranges(
    requests: list[tuple[str, int, int]], settings: S3Settings | None = None, batch_size: int = 64
) -> list[bytes]:
    """Byte ranges ``[start, end)`` of objects, given as (url, start, end), with up to ``batch_size`` requests in
    flight (s3fs's async ``cat_ranges``; local files too). Returns the bytes in the order of ``requests``.

    A range past the end of the object comes back short: callers that know the size must check it.
    """
    what = f"reading {len(requests)} byte ranges ({requests[0][0]}, ...)" if requests else "reading"
    return _within_outage_budget(lambda: _read_ranges(requests, settings, batch_size), what)


def _read_ranges(requests: list[tuple[str, int, int]], settings: S3Settings | None, batch_size: int) -> list[bytes]:
    if not requests:
        return []
    fs, _ = filesystem(requests[0][0], settings)
    paths = [filesystem(url, settings)[1] for url, _, _ in requests]
    starts = [start for _, start, _ in requests]
    ends = [end for _, _, end in requests]
    try:
        if is_s3(requests[0][0]):
            got = fs.cat_ranges(paths, starts, ends, batch_size=batch_size, on_error="return")
        else:
            got = fs.cat_ranges(paths, starts, ends, on_error="return")
    except Exception as exc:
        raise _wrap(exc, requests[0][0], settings) from exc
    for (url, _, _), value in zip(requests, got, strict=True):
        if isinstance(value, FileNotFoundError):
            missing = _not_found(value, url, settings)
            raise missing if isinstance(missing, StorageError) else StorageError(str(missing))
        if isinstance(value, Exception):
            text = _error_text(value, url).lower()
            if "range is not satisfiable" in text or "invalidrange" in text:
                raise RangeNotSatisfiableError(f"{url}: a requested range starts past the end of the object", url)
            raise _wrap(value, url, settings) from value
    return got


def object_info(url: str, settings: S3Settings | None = None) -> dict[str, int | str | None]:
    """``{"size": bytes, "etag": S3 ETag (None for local files)}`` of one object, fresh (no listing cache)."""
    return _within_outage_budget(lambda: _object_info(url, settings), f"reading the size of {url}")


def _object_info(url: str, settings: S3Settings | None) -> dict[str, int | str | None]:
    fs, path = filesystem(url, settings)
    try:
        info = fs.info(path, refresh=True) if is_s3(url) else fs.info(path)
    except FileNotFoundError:
        raise StorageError(f"object not found: {url}") from None
    except Exception as exc:
        raise _wrap(exc, url, settings) from exc
    return {"size": int(info["size"]), "etag": info.get("ETag") if is_s3(url) else None}


def exists(url: str, settings: S3Settings | None = None) -> bool:
    return _within_outage_budget(lambda: _exists(url, settings), f"checking {url}")


def _exists(url: str, settings: S3Settings | None) -> bool:
    fs, path = filesystem(url, settings)
    try:
        return fs.exists(path)
    except Exception as exc:
        raise _wrap(exc, url, settings) from exc


def list_files(url: str, settings: S3Settings | None = None) -> list[str]:
    """All files below ``url`` (recursive), as URLs of the same kind, sorted."""
    return _within_outage_budget(lambda: _list_files(url, settings), f"listing {url}")


def _list_files(url: str, settings: S3Settings | None) -> list[str]:
    fs, path = filesystem(url, settings)
    try:
        found = fs.find(path)
    except Exception as exc:
        raise _wrap(exc, url, settings) from exc
    if is_s3(url):
        # Keys ending in "/" are directory markers (pyarrow writes them for Ray's run folders): not files.
        return sorted(f"s3://{p}" for p in found if not p.endswith("/"))
    return sorted(found)


def check_location(url: str, settings: S3Settings | None = None, *, must_exist: bool = False) -> None:
    """Fail fast, with one clear line, when ``url``'s endpoint or bucket cannot be used.

    For S3: the endpoint answers and the bucket exists (one HEAD bucket request, few retries, short timeouts);
    with ``must_exist`` the object or prefix must exist too. For local paths: ``must_exist`` checks the path.
    """
    if not is_s3(url):
        if must_exist and not os.path.exists(filesystem(url)[1]):
            raise StorageError(f"path does not exist: {url}")
        return
    import botocore.config
    import botocore.session

    settings = settings or resolve_settings()
    bucket, key = split_s3(url)
    session = botocore.session.get_session()
    client = session.create_client(
        "s3",
        region_name=settings.region,
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.key,
        aws_secret_access_key=settings.secret,
        config=botocore.config.Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"S3 bucket does not exist: {bucket!r} (endpoint {settings.describe()})") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"S3 access denied to bucket {bucket!r} at {settings.describe()}: check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or the instance role"
            ) from None
        raise StorageError(
            f"S3 endpoint {settings.describe()} is unreachable for bucket {bucket!r}: {type(exc).__name__}: {exc}"
        ) from None
    if must_exist and key:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/"), MaxKeys=1)
        if not listing.get("KeyCount"):
            raise StorageError(f"nothing found at {url} (endpoint {settings.describe()}, bucket {bucket!r})")


def upload_attempts(outage_seconds: float) -> int:
    """Attempts of pyarrow's standard S3 retry strategy whose expected back-off adds up to ``outage_seconds``.

    AWS's standard strategy sleeps ``min(U * 2**i, 20)`` s before retry ``i`` (U uniform in [0, 1)), whose mean is
    ``2**(i-1)`` while ``2**i <= 20`` and ``20 - 200 / 2**i`` after. Measured here against a refused endpoint:
    10 attempts gave up after 62-78 s, 20 after 263 s. No budget: pyarrow's default, 3 attempts (about 2 s).
    """
    if outage_seconds <= 0:
        return 3
    total, i = 0.0, 0
    while total < outage_seconds:
        total += 2 ** (i - 1) if 2**i <= 20 else 20 - 200 / 2**i
        i += 1
    return max(3, i + 1)


@functools.lru_cache(maxsize=1)
def _s3_filesystem_class():
    from pyarrow import fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        """pyarrow's S3 filesystem with a retry strategy that survives pickling.

        pyarrow 25's ``S3FileSystem.__reduce__`` drops ``retry_strategy``: Ray ships the run's filesystem to its
        controller and workers by pickling it, so their checkpoint uploads and run-state writes fell back to 3
        attempts (about 2 s of S3 trouble failed a run, found by tests/test_faults.py). This class rebuilds itself
        with the same attempts wherever it is unpickled.
        """

        def __init__(self, *, max_attempts: int, **kwargs) -> None:
            super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
            self._rebuild_args = (max_attempts, kwargs)

        def __reduce__(self):
            return _rebuild_s3_filesystem, self._rebuild_args

    return RetryingS3FileSystem


def _rebuild_s3_filesystem(max_attempts: int, kwargs: dict):
    return _s3_filesystem_class()(max_attempts=max_attempts, **kwargs)


def local_pyarrow_filesystem():
    """The local ``pyarrow.fs`` filesystem (for Ray checkpoints on a local or shared folder)."""
    from pyarrow.fs import LocalFileSystem

    return LocalFileSystem()


def list_subfolders(filesystem, folder: str, *, prefix: str = "") -> list[str]:
    """The sub-folders of ``folder`` on a ``pyarrow.fs`` filesystem (None: the local one) whose names start with
    ``prefix``, as full paths sorted by name; [] when ``folder`` does not exist."""
    from pyarrow.fs import FileSelector, FileType

    filesystem = filesystem or local_pyarrow_filesystem()
    infos = filesystem.get_file_info(FileSelector(folder.rstrip("/"), allow_not_found=True))
    return sorted(i.path for i in infos if i.type == FileType.Directory and i.base_name.startswith(prefix))


def pyarrow_filesystem(settings: S3Settings | None = None, *, outage_seconds: float = 0.0):
    """A ``pyarrow.fs`` filesystem for Ray Train's ``RunConfig(storage_filesystem=...)``: checkpoint uploads, restores
    and Ray's run state. Its retries ride out about ``outage_seconds`` of S3 trouble (``upload_attempts``), in every
    process Ray sends it to.

    pyarrow ignores ``AWS_ENDPOINT_URL_S3``, so the endpoint is passed explicitly.
    """
    settings = settings or resolve_settings()
    kwargs: dict = {"region": settings.region}
    if settings.key and settings.secret:
        kwargs.update(access_key=settings.key, secret_key=settings.secret)
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return _s3_filesystem_class()(max_attempts=upload_attempts(outage_seconds), **kwargs)


def ray_storage(
    url: str, settings: S3Settings | None = None, *, outage_seconds: float = 0.0
) -> tuple[str, object | None]:
    """(storage_path, storage_filesystem) for Ray's ``RunConfig``: S3 URLs go through ``pyarrow_filesystem``.

    Ray Train's controller writes the run's state through it, in its control loop: while a write retries, the loop
    waits, and a write that gives up ends the whole run (the controller is not restarted, whatever
    ``run.max_failures`` says). So an S3 outage longer than ``outage_seconds`` ends the run from either side, the
    workers' reads or the controller's writes, and both errors name the endpoint.
    """
    if is_s3(url):
        bucket, key = split_s3(url)
        return f"{bucket}/{key}".rstrip("/"), pyarrow_filesystem(settings, outage_seconds=outage_seconds)
    return os.path.abspath(filesystem(url)[1]), None


def delete_files(urls: Iterable[str], settings: S3Settings | None = None) -> None:
    """Delete the given objects (S3: up to 1,000 per request) or local files. Added for ``jobs/synthesize.py
    --overwrite``; callers decide what may be deleted (this function deletes exactly the URLs it is given)."""
    urls = list(urls)
    if not urls:
        return
    fs, _ = filesystem(urls[0], settings)
    paths = [filesystem(u, settings)[1] for u in urls]
    try:
        fs.rm(paths)
    except Exception as exc:
        raise _wrap(exc, urls[0], settings) from exc
