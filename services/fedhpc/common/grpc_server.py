"""One way to run a gRPC server for every fedhpc service.

GrpcServer adds what every service needs around its servicers: TLS (mTLS optional),
bearer-token auth, Prometheus metrics (interceptor + /metrics port), gRPC health checking,
reflection, message-size limits, and a graceful SIGTERM shutdown that first turns health
NOT_SERVING so load balancers and probes stop sending new calls.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedhpc.common.auth import AuthInterceptor, Role, TokenAuthenticator
from fedhpc.common.config import ConfigError, ServerConfig, TLSConfig
from fedhpc.common.logging import configure_logging, get_logger
from fedhpc.common.metrics import MetricsHttpServer, MetricsInterceptor, serve_metrics

__all__ = ["GrpcServer", "ServiceBinding", "format_address", "server_credentials"]

log = get_logger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"


class ServiceBinding(NamedTuple):
    """A servicer and how to add it: ServiceBinding("fedhpc.v1.Registry", add_..._to_server, servicer)."""

    name: str
    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: object


def format_address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_pem(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """TLS credentials; with client_ca_file, clients must present a certificate it signed."""
    key = _read_pem(tls.key_file, "tls.key_file")
    cert = _read_pem(tls.cert_file, "tls.cert_file")
    client_ca = _read_pem(tls.client_ca_file, "tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    max_bytes = config.max_message_mb << 20
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # Without this grpc sets SO_REUSEPORT, and a second server on a taken port
        # "starts" fine while the first one keeps getting the calls.
        ("grpc.so_reuseport", 0),
        # Clients (make_channel) ping every 60 s during long calls (aggregation, big
        # streams); grpc's default minimum of 5 min would answer with GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class GrpcServer:
    """A gRPC server for `bindings` configured by `config` (not started until start())."""

    def __init__(
        self,
        config: ServerConfig,
        bindings: Sequence[ServiceBinding],
        *,
        component: str,
        method_roles: Mapping[str, Role] | None = None,
    ) -> None:
        names = [b.name for b in bindings]
        if len(set(names)) != len(names):
            raise ValueError(f"service bound twice: {names}")
        self._config = config
        self._bindings = tuple(bindings)
        self._component = component
        self._auth = AuthInterceptor(TokenAuthenticator(config.auth), method_roles or {})
        self._health = health.HealthServicer()
        self._server: grpc.Server | None = None
        self._metrics: MetricsHttpServer | None = None
        self._port: int | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"{self._component} gRPC server already started")
            server = self._build()
            address = format_address(self._config.host, self._config.port)
            try:
                if self._config.tls is not None:
                    port = server.add_secure_port(address, server_credentials(self._config.tls))
                else:
                    port = server.add_insecure_port(address)
            except RuntimeError as exc:  # grpc raises on bind failure
                raise OSError(f"cannot bind {self._component} gRPC server to {address}: {exc}") from exc
            if port == 0:  # older grpc reported bind failure this way
                raise OSError(f"cannot bind {self._component} gRPC server to {address} (port in use?)")
            server.start()
            try:
                if self._config.metrics_port is not None:
                    self._metrics = serve_metrics(self._config.host, self._config.metrics_port)
            except BaseException:
                server.stop(None)
                raise
            self._server = server
            self._port = port  # last: `started` turns true once everything is up
        if not _is_loopback(self._config.host):
            missing = [
                name
                for name, on in (("TLS", self._config.tls), ("auth", self._config.auth.enabled))
                if not on
            ]
            if missing:
                # Allowed (a trusted network, a TLS-terminating proxy) but never by accident.
                log.warning(
                    f"serving without {' and '.join(missing)} on a non-loopback address",
                    extra={"component": self._component, "address": self.address},
                )

    def _build(self) -> grpc.Server:
        pool = futures.ThreadPoolExecutor(
            max_workers=self._config.max_workers, thread_name_prefix=f"{self._component}-grpc"
        )
        server = grpc.server(
            pool,
            # First is outermost: calls the auth interceptor refuses are still counted.
            interceptors=[MetricsInterceptor(self._component), self._auth],
            options=_server_options(self._config),
        )
        for binding in self._bindings:
            binding.add_to_server(binding.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in ("", *(b.name for b in self._bindings)):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*(b.name for b in self._bindings), HEALTH_SERVICE, reflection.SERVICE_NAME], server
        )
        return server

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let calls in flight finish for `grace` seconds.

        Safe to call from several threads; a later call with a shorter grace cuts the wait.
        """
        with self._lock:
            server = self._server
            if server is None:
                return
            first = not self._stopping
            self._stopping = True
        grace = self._config.grace_seconds if grace is None else grace
        if first:
            self._health.enter_graceful_shutdown()
            log.info("stopping", extra={"component": self._component, "grace_s": grace})
        server.stop(grace).wait()
        with self._lock:
            metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()
        if first:
            log.info("stopped", extra={"component": self._component})
        self._stopped.set()

    def wait_for_termination(self) -> None:
        """Block until stop() has finished (at once when never started)."""
        if self._server is None:
            return
        # Short waits keep the main thread responsive to signals.
        while not self._stopped.wait(0.5):
            pass

    def serve_forever(self) -> None:
        """Start (if needed), serve until SIGTERM/SIGINT, then stop gracefully.

        A second signal while stopping stops at once. Signals reach only the main thread;
        from another thread this serves until someone calls stop().
        """
        if self._server is None:
            self.start()
        if not logging.getLogger().handlers:
            configure_logging()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # The handler runs in the main thread, which is blocked in
            # wait_for_termination: stop from another thread instead of here.
            name = signal.Signals(signum).name
            grace: float | None = None
            if self._stopping:
                grace = 0.0
                log.warning("second signal, stopping now", extra={"signal": name})
            else:
                log.info("signal received", extra={"signal": name})
            threading.Thread(target=self.stop, args=(grace,), name="grpc-stop", daemon=True).start()

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info(
                "serving",
                extra={
                    "component": self._component,
                    "address": self.address,
                    "metrics_port": self.metrics_port,
                    "services": [b.name for b in self._bindings],
                    "tls": self._config.tls is not None,
                    "mtls": self._config.tls is not None and self._config.tls.client_ca_file is not None,
                    "auth": self._config.auth.enabled,
                },
            )
            self.wait_for_termination()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- health ------------------------------------------------------------------------
    def set_serving(self, service: str, serving: bool) -> None:
        """Report a service (or "" for the whole server) healthy or not, e.g. storage down.

        Ignored once stopping: health stays NOT_SERVING from then on.
        """
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._health.set(service, status)

    # -- addresses ---------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._port is not None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self._component} gRPC server not started")
        return self._port

    @property
    def address(self) -> str:
        return format_address(self._config.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port if self._metrics is not None else None

    @property
    def component(self) -> str:
        return self._component

    def __enter__(self) -> GrpcServer:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
