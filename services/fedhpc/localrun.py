"""A local control plane: registry, aggregator and coordinator as processes on loopback.

``fedhpc up`` and ``fedhpc demo`` use it; so do the end-to-end tests. Everything lives under
one run directory::

    RUN_DIR/fedhpc.yaml          the configuration the three services share
    RUN_DIR/control-plane.json   addresses, metrics ports and pids (what `fedhpc down` stops)
    RUN_DIR/store/               the file object store (unless an S3 store is configured)
    RUN_DIR/coordinator/         coordinator.db and the local sites' spools
    RUN_DIR/logs/<service>.log   each service's JSON log
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedhpc.testing.ports import free_ports

STATE_FILE = "control-plane.json"
SERVICES = ("registry", "aggregator", "coordinator")
_SERVICE_NAMES = {
    "registry": "fedhpc.v1.Registry",
    "aggregator": "fedhpc.v1.Aggregator",
    "coordinator": "fedhpc.v1.Coordinator",
}


class ControlPlaneError(RuntimeError):
    """The local control plane could not start or is not running; the message says why."""


@dataclass
class ControlPlane:
    run_dir: str
    addresses: dict[str, str]
    metrics_ports: dict[str, int]
    pids: dict[str, int]
    started_at: float = field(default_factory=time.time)

    @property
    def coordinator(self) -> str:
        return self.addresses["coordinator"]

    @property
    def registry(self) -> str:
        return self.addresses["registry"]

    def save(self) -> None:
        path = Path(self.run_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, run_dir: Path) -> ControlPlane:
        path = run_dir / STATE_FILE
        if not path.exists():
            raise ControlPlaneError(
                f"no control plane under {run_dir} (start one with: fedhpc up --run-dir {run_dir})"
            )
        return cls(**json.loads(path.read_text()))


def write_config(run_dir: Path, ports: dict[str, int], extra: dict[str, Any] | None = None) -> Path:
    """The shared configuration: file store under run_dir unless ``extra`` sets another store."""
    run_dir = run_dir.resolve()
    config: dict[str, Any] = {
        "store": {"kind": "file", "root": str(run_dir / "store")},
        "registry": {
            "server": {"host": "127.0.0.1", "port": ports["registry"], "metrics_port": ports["registry_m"]}
        },
        "aggregator": {
            "server": {
                "host": "127.0.0.1",
                "port": ports["aggregator"],
                "metrics_port": ports["aggregator_m"],
            },
            "registry_address": f"127.0.0.1:{ports['registry']}",
        },
        "coordinator": {
            "server": {
                "host": "127.0.0.1",
                "port": ports["coordinator"],
                "metrics_port": ports["coordinator_m"],
            },
            "registry_address": f"127.0.0.1:{ports['registry']}",
            "aggregator_address": f"127.0.0.1:{ports['aggregator']}",
            "data_dir": str(run_dir / "coordinator"),
        },
        "log": {"level": "INFO", "json": True},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict) and section != "store":
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    path = run_dir / "fedhpc.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _spawn(
    service: str, config_path: Path, log_path: Path, env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-c",
        "from fedhpc.cli import main; main()",
        service,
        "serve",
        "--config",
        str(config_path),
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: the services outlive `fedhpc up` and ignore the terminal's Ctrl-C.
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )


def wait_serving(
    address: str, service: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise ControlPlaneError(f"{service} exited with code {process.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.1)
    raise ControlPlaneError(f"{service} at {address} not serving after {timeout:.0f} s ({last})")


def start(
    run_dir: Path,
    *,
    extra_config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> ControlPlane:
    """Start the three services under run_dir and wait until each answers health checks."""
    run_dir = run_dir.resolve()
    if (run_dir / STATE_FILE).exists() and is_running(ControlPlane.load(run_dir)):
        raise ControlPlaneError(
            f"a control plane is already running under {run_dir} (fedhpc down --run-dir {run_dir})"
        )
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    names = ["registry", "registry_m", "aggregator", "aggregator_m", "coordinator", "coordinator_m"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    config_path = write_config(run_dir, ports, extra_config)
    plane = ControlPlane(
        run_dir=str(run_dir),
        addresses={s: f"127.0.0.1:{ports[s]}" for s in SERVICES},
        metrics_ports={s: ports[f"{s}_m"] for s in SERVICES},
        pids={},
    )
    try:
        for service in SERVICES:
            process = _spawn(service, config_path, run_dir / "logs" / f"{service}.log", env)
            plane.pids[service] = process.pid
            plane.save()
            wait_serving(plane.addresses[service], _SERVICE_NAMES[service], timeout, process)
    except BaseException:
        stop(plane)
        raise
    return plane


def restart_service(
    plane: ControlPlane, service: str, *, env: dict[str, str] | None = None, timeout: float = 60.0
) -> None:
    """Start one service again (after it was stopped or killed) on its old address."""
    run_dir = Path(plane.run_dir)
    process = _spawn(service, run_dir / "fedhpc.yaml", run_dir / "logs" / f"{service}.log", env)
    plane.pids[service] = process.pid
    plane.save()
    wait_serving(plane.addresses[service], _SERVICE_NAMES[service], timeout, process)


def is_running(plane: ControlPlane) -> bool:
    return any(_alive(pid) for pid in plane.pids.values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process counts as gone.
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def stop(plane: ControlPlane, *, timeout: float = 30.0) -> None:
    """Stop the local sites' workers, then the services (SIGTERM, then SIGKILL after timeout)."""
    stop_site_workers(Path(plane.run_dir) / "coordinator")
    for service in reversed(SERVICES):
        pid = plane.pids.get(service)
        if pid is None or not _alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_site_workers(data_dir: Path) -> None:
    """Stop every local site worker whose spool is under data_dir/sites, and what endpoint
    engines left under data_dir/endpoint-engine (each backend's own shutdown)."""
    from fedhpc.coordinator.dispatch import SiteSpec, make_dispatcher

    backends = (("sites", "local"), ("endpoint-engine", "endpoint-engine"))
    for folder, backend in backends:
        for spool in sorted(p for p in (data_dir / folder).glob("*") if p.is_dir()):
            # An endpoint engine killed with its coordinator leaves its interchange behind.
            dispatcher = make_dispatcher(SiteSpec(name=spool.name, backend=backend), data_dir)
            try:
                dispatcher.shutdown()
            finally:
                dispatcher.close()
