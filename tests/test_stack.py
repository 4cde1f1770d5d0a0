"""The embedded stack: starts, answers, is idempotent, refuses non-loopback binds, and stops exactly what it started."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from devstack.stack import Ports, Stack, StackError


def group_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and __import__("os").getpgid(p.pid) == pgid:
                out.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return out


def test_non_loopback_bind_is_refused(tmp_path):
    with pytest.raises(StackError, match="refusing to bind the embedded stack to '0.0.0.0'"):
        Stack(root=tmp_path, host="0.0.0.0")


def test_unknown_service_is_refused(tmp_path):
    with pytest.raises(StackError, match="unknown stack services"):
        Stack(root=tmp_path, services=("s3", "redis"))


@pytest.mark.slow
def test_stack_up_twice_then_down_leaves_nothing_behind(tmp_path):
    stack = Stack(root=tmp_path / "st", ports=Ports.free(), services=("s3", "mlflow", "ray"))
    stack.up()
    try:
        status = stack.status()
        assert set(status) == {"s3", "mlflow", "ray"}
        assert all(s["answers"] and s["alive"] for s in status.values()), status
        pids = {name: rec.pid for name, rec in stack.processes.items()}
        members = {p.pid for pid in pids.values() for p in group_members(pid)}
        assert len(members) > 3  # the services' own children (Ray's raylet, GCS, dashboard...) are in the groups

        env = (tmp_path / "st/env").read_text()
        assert f"AWS_ENDPOINT_URL={stack.s3_endpoint}" in env and "RAY_AUTH_MODE=token" in env
        assert all("127.0.0.1" in line for line in env.splitlines() if "URL" in line or "URI" in line)

        again = Stack(root=tmp_path / "st")  # a second `up` finds the running stack and starts nothing
        again.up()
        assert {n: r.pid for n, r in again.processes.items()} == pids

        # The CLI reads the same state.
        cli = subprocess.run([sys.executable, "-m", "devstack.stack", "status", "--root", str(tmp_path / "st")],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cli.returncode == 0 and cli.stdout.count("answers") == 3, cli.stdout
        rt = subprocess.run([sys.executable, "-m", "devstack.stack", "runtime-env", "--root", str(tmp_path / "st")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
        assert json.loads(rt.stdout)["env_vars"]["DS_ACCELERATOR"] == "cpu"
    finally:
        stack.down()
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert group_members(pid) == []
    assert not (tmp_path / "st/state.json").exists() and not (tmp_path / "st/env").exists()


@pytest.mark.slow
def test_seaweedfs_serves_the_same_storage_calls_and_stops_with_the_stack(tmp_path):
    """The benchmarks' S3 server: every read path of ``storage`` against it, and nothing left running after ``down``."""
    from devstack.stack import seaweedfs_sockets
    from reid_core import storage

    stack = Stack(root=tmp_path / "st", ports=Ports.free(), services=("s3",), bucket="sw-test", s3_server="seaweedfs")
    stack.up()
    try:
        pid = stack.processes["s3"].pid
        sockets = seaweedfs_sockets(stack.processes["s3"].cmd)
        assert len(sockets) == 6 and any(path.is_socket() for path in sockets)
        assert json.loads((tmp_path / "st/state.json").read_text())["s3_server"] == "seaweedfs"
        settings = storage.S3Settings(endpoint_url=stack.s3_endpoint, key="testing", secret="testing")
        files = {f"s3://sw-test/d/{i}.bin": bytes([i]) * (100 + i) for i in range(5)}
        storage.write_many(files, settings)
        assert storage.read_many(list(files), settings) == files
        assert storage.read_bytes("s3://sw-test/d/1.bin", settings) == files["s3://sw-test/d/1.bin"]
        assert storage.read_ranges([("s3://sw-test/d/2.bin", 1, 4)], settings) == [bytes([2]) * 3]
        assert storage.list_files("s3://sw-test/d", settings) == sorted(files)
        with pytest.raises(FileNotFoundError, match="object not found: s3://sw-test/d/missing.bin"):
            storage.read_many(["s3://sw-test/d/0.bin", "s3://sw-test/d/missing.bin"], settings)
        with pytest.raises(storage.StorageError, match="bucket does not exist"):
            storage.read_many(["s3://no-such-bucket/x"], settings)
    finally:
        stack.down(kill=True)
    assert group_members(pid) == []
    assert not any(path.exists() for path in sockets)  # nothing left in the temp folder


def test_an_unknown_s3_server_is_refused(tmp_path):
    with pytest.raises(StackError, match="unknown S3 server 'minio'; valid: moto, seaweedfs"):
        Stack(root=tmp_path, s3_server="minio")


def test_a_service_that_fails_to_start_is_named_with_its_log(tmp_path):
    busy = Ports.free()
    import socket

    with socket.socket() as s:  # occupy the S3 port: moto cannot bind it
        s.bind(("127.0.0.1", busy.s3))
        s.listen()
        stack = Stack(root=tmp_path / "st", ports=busy, services=("s3",), start_timeout=20)
        with pytest.raises(StackError, match=r"s3 \(moto\) (exited during start-up|did not answer)"):
            stack.up()
    assert not (tmp_path / "st/state.json").exists()


def test_free_ports_are_distinct():
    """Each stack's ports are chosen together: a Ray head once got one port for two of its components and refused
    to start."""
    from devstack.stack import free_ports

    for _ in range(50):
        ports = list(vars(Ports.free()).values())
        assert len(set(ports)) == len(ports)
    assert len(set(free_ports(20))) == 20


def test_a_process_is_recognised_after_the_wall_clock_was_stepped():
    """psutil's start times move with the wall clock (they are counted from the boot time Linux reports): a stack's
    process is still its own when its start time is off but its command line is the recorded one; a stranger on the
    same PID (another command line) is not; an exited process is not."""
    from devstack.stack import ProcessRecord

    cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 30
        while psutil.Process(proc.pid).cmdline() != cmd:  # until the child has exec'd (before: the parent's line)
            assert time.monotonic() < deadline, psutil.Process(proc.pid).cmdline()
            time.sleep(0.05)
        started = psutil.Process(proc.pid).create_time()
        assert ProcessRecord(proc.pid, started, cmd, "log").alive()
        assert ProcessRecord(proc.pid, started - 21.0, cmd, "log").alive()  # the clock was stepped by 21 s
        assert not ProcessRecord(proc.pid, started - 21.0, [sys.executable, "-c", "other"], "log").alive()
    finally:
        proc.kill()
        proc.wait()
    assert not ProcessRecord(proc.pid, started, cmd, "log").alive()


def test_free_ports_avoid_the_ephemeral_range_and_each_other():
    """A port found free inside the kernel's ephemeral range can become an outgoing connection's local port before the
    service binds it (a test Ray head's dashboard agent failed so): ports come from outside it and outside Ray's
    worker ports, and a port one stack chose is not handed to another starting at the same time."""
    import socket

    from devstack.stack import RAY_WORKER_PORTS, _bindable, _ephemeral_range, free_ports, port_candidates

    low, high = _ephemeral_range()
    first, second = free_ports(30), free_ports(30)
    for port in first + second:
        assert port in port_candidates() and not low <= port <= high
        assert not RAY_WORKER_PORTS[0] <= port <= RAY_WORKER_PORTS[1] and port >= 20000
    assert not set(first) & set(second)  # claimed by the first call
    for host in ("127.0.0.1", "0.0.0.0"):  # a port in use, on the loopback or on every interface, is not free
        (port,) = free_ports(1)
        assert _bindable(port)
        with socket.socket() as s:
            s.bind((host, port))
            assert not _bindable(port)


def test_the_latency_pipe_delays_each_request_and_passes_bytes_through(s3_server, s3_env, tmp_path):
    """``devstack.proxy --tcp`` (the benchmarks' latency): every request waits the latency, requests in flight wait
    it together, and the bytes arrive unchanged."""
    import time

    from devstack.stack import free_port
    from reid_core import storage

    files = {f"s3://{s3_server.bucket}/pipe/{i}.bin": bytes(range(256)) * (i + 1) for i in range(32)}
    storage.write_many(files)
    port = free_port()
    pipe = subprocess.Popen([sys.executable, "-m", "devstack.proxy", "--upstream", s3_server.s3_endpoint, "--port",
                             str(port), "--latency-ms", "200", "--tcp"])  # fmt: skip
    try:
        via = storage.S3Settings(endpoint_url=f"http://127.0.0.1:{port}", key="testing", secret="testing")
        deadline = time.monotonic() + 30
        while True:  # the pipe is listening once a read through it succeeds
            try:
                storage.read_many([next(iter(files))], via)
                break
            except storage.StorageError:
                assert time.monotonic() < deadline and pipe.poll() is None, "the latency pipe did not start"
                time.sleep(0.2)
        t0 = time.monotonic()
        assert storage.read_many([next(iter(files))], via) == {next(iter(files)): next(iter(files.values()))}
        one = time.monotonic() - t0
        t0 = time.monotonic()
        assert storage.read_many(list(files), via, batch_size=32) == files
        many = time.monotonic() - t0
    finally:
        pipe.terminate()
        pipe.wait(timeout=30)
    assert one >= 0.2
    assert many < 0.2 * len(files) / 4  # 32 requests in flight share the wait (one after another: 6.4 s)


@pytest.mark.parametrize("latency", ["nan", "inf", "-5"])
def test_a_latency_that_is_not_a_finite_non_negative_number_is_refused(latency):
    """The pipe (and the bench that starts it) refuse a NaN, infinite or negative latency in one line, starting
    nothing."""
    from pathlib import Path

    proxy = subprocess.run([sys.executable, "-m", "devstack.proxy", "--upstream", "http://127.0.0.1:9", "--port", "9",
                            f"--latency-ms={latency}", "--tcp"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proxy.returncode == 2 and "expected a finite number of milliseconds >= 0" in proxy.stderr, proxy.stderr
    bench = Path(__file__).resolve().parents[1] / "bench" / "data_throughput.py"
    run = subprocess.run([sys.executable, str(bench), f"--latency-ms={latency}"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 2 and "must be a finite number >= 0" in run.stderr, run.stderr
