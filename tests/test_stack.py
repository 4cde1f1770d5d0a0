"""The embedded stack: starts, answers, is idempotent, refuses non-loopback binds, and stops exactly what it started."""

from __future__ import annotations

import json
import subprocess
import sys

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
