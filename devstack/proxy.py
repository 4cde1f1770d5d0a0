"""A loopback HTTP reverse proxy that adds latency and injects faults in front of a service of the embedded stack.

The fault-injection tests (``tests/test_faults.py``) put one in front of the S3 server and one in front of MLflow and
hand the proxies' addresses to the job. ``bench/data_throughput.py`` runs the latency-only TCP pipe of this module as
its own process (``python -m devstack.proxy --upstream URL --port N --latency-ms 20 --tcp``, ``serve_latency_pipe``)
to give the loopback S3 a network's latency at little CPU.

To the client the proxy *is* the service:

- ``outage(seconds)`` makes it disappear: the port refuses connections and every open connection is cut, as when the
  server process stops; it comes back after ``seconds`` (or at ``restore()``) with everything the server held. This is
  what a restarted S3 or MLflow with persistent storage looks like to a client (moto keeps its objects in memory, so
  the real server cannot itself be stopped and restarted with its data);
- a hook (``add_hook``) sees every request (method, path with query) before it is forwarded and may answer it with an
  error instead (``Fail(503, "SlowDown")``: S3 throttling), cut its connection (``Cut()``) or start an outage
  (``Outage(seconds)``) or hold it (``Hold(event)``), so a test can fail "the first checkpoint upload" or stop S3
  "half-way through an epoch" deterministically, by what the client does rather than by the clock;
- ``seen`` records every request and what happened to it, for the test's assertions.

It binds 127.0.0.1 only and runs its event loop on a daemon thread of the process that starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length",
              "proxy-authorization", "proxy-authenticate"}  # fmt: skip


@dataclass(frozen=True)
class Fail:
    """Answer the request with this HTTP status and an S3-style error body (botocore and pyarrow read the code)."""

    status: int = 503
    code: str = "SlowDown"


@dataclass(frozen=True)
class Cut:
    """Close the request's connection without an answer (a server that died mid-request)."""


@dataclass(frozen=True)
class Outage:
    """Start an outage of ``seconds`` (None: until ``restore()``); the request that triggered it is cut too."""

    seconds: float | None


@dataclass(frozen=True)
class Hold:
    """Hold the request until ``release`` is set (at most ``timeout`` s), then forward it: a client stalled
    mid-epoch, so that a test can act (kill a worker, stop a job) at a known point of the run."""

    release: threading.Event
    timeout: float = 600.0


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it: ``outcome`` is ``forwarded``, ``failed <status>`` or ``cut``."""

    time: float  # time.monotonic()
    method: str
    path: str  # path and query, as sent
    outcome: str


Hook = Callable[[str, str], "Fail | Cut | Outage | Hold | None"]


class FaultProxy:
    """Forwards every HTTP request to ``upstream`` (``http://127.0.0.1:PORT``), after ``latency_ms``; see the module
    docstring for the faults. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, upstream: str, *, port: int | None = None, latency_ms: float = 0.0) -> None:
        from devstack.stack import free_port

        self.upstream = upstream.rstrip("/")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.latency_ms = latency_ms
        self.seen: list[Seen] = []
        self.outages: list[tuple[float, float | None]] = []  # (start, end) in time.monotonic(); end None while down
        self._hooks: list[Hook] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner = None
        self._site = None
        self._restore_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------------------------ control
    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._setup())
            except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError(f"fault proxy on port {self.port} did not start within 30 s")
        if failure:
            raise RuntimeError(f"fault proxy on port {self.port} could not start: {failure[0]}") from failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_hook(self, hook: Hook) -> None:
        """``hook(method, path)`` runs on the proxy's thread for every request; it returns a fault or None."""
        with self._lock:
            self._hooks.append(hook)

    def outage(self, seconds: float | None = None) -> None:
        """Go down now, for ``seconds`` (None: until ``restore()``)."""
        self._call(self._go_down, seconds)

    def restore(self) -> None:
        """Come back now (no-op when up)."""
        self._call(self._come_back)

    @property
    def is_down(self) -> bool:
        return bool(self.outages) and self.outages[-1][1] is None

    def count(self, method: str | None = None, contains: str = "", outcome: str | None = None) -> int:
        """Requests seen with this method (None: any), a path containing ``contains``, and this outcome (None: any)."""
        with self._lock:
            return sum(
                1
                for s in self.seen
                if (method is None or s.method == method)
                and contains in s.path
                and (outcome is None or s.outcome == outcome)
            )

    def _call(self, fn, *args) -> None:
        if self._loop is None:
            raise RuntimeError("fault proxy is not started")
        future = asyncio.run_coroutine_threadsafe(fn(*args), self._loop)
        future.result(timeout=30)

    # ------------------------------------------------------------------------------------------------ server
    async def _setup(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, timeout=aiohttp.ClientTimeout(total=600)
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        # Connections cut on purpose make aiohttp log "Error handling request" tracebacks: not news here.
        quiet = logging.getLogger(f"{__name__}.server")
        quiet.setLevel(logging.CRITICAL)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=quiet)
        await self._runner.setup()
        await self._listen()

    async def _cleanup(self) -> None:
        await self._session.close()
        await self._runner.cleanup()

    async def _listen(self) -> None:
        from aiohttp import web

        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _go_down(self, seconds: float | None) -> None:
        if self._restore_handle is not None:
            self._restore_handle.cancel()
            self._restore_handle = None
        if not self.is_down:
            await self._site.stop()  # the port refuses new connections
            for handler in list(self._runner.server.connections):  # and the open ones are cut
                if handler.transport is not None:
                    handler.transport.abort()
            with self._lock:
                self.outages.append((time.monotonic(), None))
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self._restore_handle = loop.call_later(seconds, lambda: loop.create_task(self._come_back()))

    async def _come_back(self) -> None:
        if self._restore_handle is not None:
            self._restore_handle.cancel()
            self._restore_handle = None
        if self.is_down:
            await self._listen()
            with self._lock:
                self.outages[-1] = (self.outages[-1][0], time.monotonic())

    def _record(self, method: str, path: str, outcome: str) -> int:
        """Append what was seen; returns its index in ``seen`` (only ever appended to)."""
        with self._lock:
            self.seen.append(Seen(time.monotonic(), method, path, outcome))
            return len(self.seen) - 1

    async def _forward(self, request):
        from aiohttp import web
        from yarl import URL

        method, path = request.method, request.raw_path
        with self._lock:
            hooks = list(self._hooks)
        fault = None
        for hook in hooks:
            fault = hook(method, path)
            if fault is not None:
                break
        if self.is_down or isinstance(fault, Cut | Outage):
            self._record(method, path, "cut")
            if isinstance(fault, Outage):
                await self._go_down(fault.seconds)
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError  # aiohttp drops the (already aborted) connection
        if isinstance(fault, Fail):
            self._record(method, path, f"failed {fault.status}")
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{fault.code}</Code><Message>injected by devstack.proxy</Message>"
                "<RequestId>fault-proxy</RequestId></Error>"
            )
            return web.Response(status=fault.status, body=body.encode(), content_type="application/xml")

        if isinstance(fault, Hold):
            await asyncio.get_running_loop().run_in_executor(None, fault.release.wait, fault.timeout)
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        seen = None
        try:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
            url = URL(self.upstream + path, encoded=True)
            async with self._session.request(method, url, headers=headers, data=body, allow_redirects=False) as up:
                data = await up.read()
                # Recorded before the client can have the answer: a count taken after a response includes its request.
                seen = self._record(method, path, "forwarded")
                response = web.StreamResponse(status=up.status)
                for key, value in up.headers.items():
                    if key.lower() not in HOP_BY_HOP - {"content-length"}:
                        response.headers[key] = value
                await response.prepare(request)
                if data and method != "HEAD":
                    await response.write(data)
                await response.write_eof()
        except ConnectionResetError:  # the client's connection was cut (an outage began) while this was forwarded
            if seen is None:
                self._record(method, path, "cut")
            else:  # the answer did not get through: the request counts as cut, once
                with self._lock:
                    self.seen[seen] = dataclasses.replace(self.seen[seen], outcome="cut")
            raise
        return response


class _DelayedClient(asyncio.Protocol):
    """One client connection of ``serve_latency_pipe``: its bytes reach the upstream ``latency`` s after they
    arrived, in order; the upstream's answer goes back at once."""

    def __init__(self, upstream: tuple[str, int], latency: float) -> None:
        self.upstream, self.latency = upstream, latency
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.client: asyncio.Transport | None = None
        self.server: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False

    def connection_made(self, transport) -> None:
        self.client = transport
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(self._connect(loop))  # held: the loop keeps only a weak reference

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self.server, _ = await loop.create_connection(lambda: _Answer(self.client), *self.upstream)
        except OSError:
            self.client.abort()
            return
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.pending.append((asyncio.get_running_loop().time() + self.latency, data))
        if self.timer is None and self.server is not None:
            self._flush()

    def _flush(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self.pending and self.pending[0][0] <= now:
            self.server.write(self.pending.popleft()[1])
        if self.pending:
            self.timer = loop.call_at(self.pending[0][0], self._flush)
        elif self.closing:
            self.server.close()

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.server is not None and not self.pending:
            self.server.close()


class _Answer(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def connection_lost(self, exc) -> None:
        self.client.close()


async def serve_latency_pipe(upstream: str, port: int, latency_ms: float) -> None:
    """A TCP pipe on 127.0.0.1:``port`` to ``upstream`` (``http://HOST:PORT``) that delays every byte the client sends
    by ``latency_ms``: each HTTP request arrives that much later, as over a network with that one-way delay. It does
    not parse HTTP, so it costs a small share of ``FaultProxy``'s CPU per request; benchmarks that only need latency
    use it (``--tcp``), so that the proxy's own CPU does not compete with what they measure. Runs until cancelled."""
    parsed = urllib.parse.urlsplit(upstream)
    target = (parsed.hostname or "127.0.0.1", parsed.port or 80)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _DelayedClient(target, latency_ms / 1000), "127.0.0.1", port,
                                      reuse_address=True)  # fmt: skip
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Loopback HTTP reverse proxy with added latency (benchmarks).")
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the service")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--tcp", action="store_true",
                        help="delay bytes at the TCP level instead of proxying HTTP (no faults; little CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    if not math.isfinite(args.latency_ms) or args.latency_ms < 0:
        parser.error(f"--latency-ms {args.latency_ms}: expected a finite number of milliseconds >= 0")
    if args.tcp:
        try:
            asyncio.run(serve_latency_pipe(args.upstream, args.port, args.latency_ms))
        except KeyboardInterrupt:
            pass
        return 0
    proxy = FaultProxy(args.upstream, port=args.port, latency_ms=args.latency_ms).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
