"""Prometheus metrics shared by every service: gRPC request counts and latency, /metrics server.

Service-specific metrics (rounds, aggregation bytes, task phases) live with their services
but register on the same default registry, so one /metrics port per process serves them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import grpc
import prometheus_client
from prometheus_client import Counter, Histogram

from fedhpc.common.auth import handler_behavior, rebuild_handler

__all__ = [
    "GRPC_HANDLED",
    "GRPC_SECONDS",
    "MetricsHttpServer",
    "MetricsInterceptor",
    "serve_metrics",
    "split_method",
    "start_metrics_server",
    "stop_metrics_servers",
]

GRPC_HANDLED = Counter(
    "fedhpc_grpc_server_handled_total",
    "gRPC calls completed on the server, by final status code.",
    ["component", "service", "method", "code"],
)
GRPC_SECONDS = Histogram(
    "fedhpc_grpc_server_handling_seconds",
    "Time from the handler being called until its response (or response stream) ended.",
    ["component", "service", "method"],
    # Reaches minutes: aggregation and whole-model streams are long RPCs.
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)

# Unknown methods share one label value: their names come from clients, and per-name
# series would let any caller grow the metric without bound.
UNKNOWN_METHOD = ("unknown", "unknown")

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN


def split_method(full_method: str) -> tuple[str, str]:
    """Split "/fedhpc.v1.Registry/GetModel" into ("fedhpc.v1.Registry", "GetModel")."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service, method) if service and method else UNKNOWN_METHOD


def _set_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code a handler set (set_code or abort), None while it has set none."""
    # ServicerContext.code() exists at runtime since grpc 1.38 but not in the stubs.
    code = getattr(context, "code", None)
    return cast(grpc.StatusCode | None, code()) if callable(code) else None


def _ended_early(context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code for an RPC the client abandoned (the server sees both as a cancellation)."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED


class _Observation:
    """Times one call and records it exactly once, whichever path ends it first."""

    __slots__ = ("_done", "_labels", "_start")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._start = time.perf_counter()
        self._done = threading.Lock()

    def finish(self, code: grpc.StatusCode) -> None:
        if not self._done.acquire(blocking=False):
            return
        GRPC_SECONDS.labels(*self._labels).observe(time.perf_counter() - self._start)
        GRPC_HANDLED.labels(*self._labels, code.name).inc()


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every call by its final status code.

    Put it outermost, so calls refused by later interceptors (auth) are counted too.
    """

    def __init__(self, component: str) -> None:
        self._component = component

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            GRPC_HANDLED.labels(self._component, *UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            return None
        labels = (self._component, *split_method(handler_call_details.method))
        behavior = handler_behavior(handler)
        if getattr(behavior, "experimental_non_blocking", False):
            return rebuild_handler(handler, _observe_non_blocking(behavior, labels))
        if handler.response_streaming:
            return rebuild_handler(handler, _observe_streaming(behavior, labels))
        return rebuild_handler(handler, _observe_unary(behavior, labels))


def _observe_unary(behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
    def observed(request: Any, context: grpc.ServicerContext) -> Any:
        observation = _Observation(labels)
        try:
            response = behavior(request, context)
        except BaseException:
            observation.finish(_set_code(context) or _UNKNOWN)
            raise
        code = _set_code(context) or _OK
        if code == _OK:
            if response is None:  # grpc cannot serialize it and answers INTERNAL
                code = grpc.StatusCode.INTERNAL
            elif not context.is_active():
                code = _ended_early(context)
        observation.finish(code)
        return response

    return observed


def _observe_streaming(behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
    def observed(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        observation = _Observation(labels)
        try:
            responses = behavior(request, context)
        except BaseException:
            observation.finish(_set_code(context) or _UNKNOWN)
            raise
        return _observe_stream(responses, context, observation)

    return observed


def _observe_stream(
    responses: Iterable[Any], context: grpc.ServicerContext, observation: _Observation
) -> Iterator[Any]:
    # The call lasts until the stream ends, not until the handler returns its generator.
    try:
        yield from responses
    except GeneratorExit:  # grpc stopped iterating: the client went away or the server is stopping
        observation.finish(_set_code(context) or _ended_early(context))
        raise
    except BaseException:
        observation.finish(_set_code(context) or _UNKNOWN)
        raise
    observation.finish(_set_code(context) or _OK)


def _observe_non_blocking(behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
    # Non-blocking streaming handlers (health Watch) return at once and send responses
    # later through a callback; None through that callback ends the stream.
    def observed(request: Any, context: grpc.ServicerContext, send_response: Callable[[Any], None]) -> Any:
        observation = _Observation(labels)

        def send(response: Any) -> None:
            if response is None:
                observation.finish(_set_code(context) or _OK)
            send_response(response)

        def terminated() -> None:
            observation.finish(_set_code(context) or _ended_early(context))

        if not context.add_callback(terminated):
            terminated()
        try:
            return behavior(request, context, send)
        except BaseException:
            observation.finish(_set_code(context) or _UNKNOWN)
            raise

    return observed


class MetricsHttpServer:
    """A running /metrics HTTP endpoint (default registry) that can be shut down."""

    def __init__(self, host: str, port: int) -> None:
        try:
            self._server, self._thread = prometheus_client.start_http_server(port, addr=host)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self.host = host

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int) -> MetricsHttpServer:
    """Serve /metrics on host:port (0 picks a free port) until close()."""
    return MetricsHttpServer(host, port)


_process_servers: list[MetricsHttpServer] = []
_process_servers_lock = threading.Lock()


def start_metrics_server(host: str, port: int) -> int:
    """Serve /metrics on host:port for the rest of the process; returns the bound port."""
    server = serve_metrics(host, port)
    with _process_servers_lock:
        _process_servers.append(server)
    return server.port


def stop_metrics_servers() -> None:
    """Close every server start_metrics_server started (tests, embedded runs)."""
    with _process_servers_lock:
        servers = list(_process_servers)
        _process_servers.clear()
    for server in servers:
        server.close()
