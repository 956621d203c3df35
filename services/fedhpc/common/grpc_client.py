"""Client channels to fedhpc services: TLS (optionally mTLS), bearer token, message limits."""

from __future__ import annotations

import ipaddress
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from fedhpc.common.logging import get_logger

__all__ = ["BearerTokenInterceptor", "channel_target", "make_channel", "wait_for_ready"]

log = get_logger(__name__)

# Kept so wait_for_ready can name the target: grpc channels do not expose it.
_targets: weakref.WeakKeyDictionary[grpc.Channel, str] = weakref.WeakKeyDictionary()


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = base.wait_for_ready
        self.compression = base.compression


class BearerTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call that does not carry its own.

    An interceptor rather than call credentials: grpc only attaches call credentials on
    TLS channels, and local mode runs insecure channels with auth on.
    """

    def __init__(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("bearer token must be non-empty and contain no whitespace")
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = tuple(details.metadata or ())
        if any(key.lower() == "authorization" for key, _ in metadata):
            return details
        return _CallDetails(details, (*metadata, self._header))

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.ClientCallDetails, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.ClientCallDetails,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _is_loopback(target: str) -> bool:
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    rest = (
        target.split("///", 1)[1] if "///" in target else target.removeprefix("ipv4:").removeprefix("ipv6:")
    )
    if rest.startswith("["):
        host = rest[1:].partition("]")[0]
    elif rest.count(":") == 1:
        host = rest.partition(":")[0]
    else:
        host = rest
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_channel(
    target: str,
    *,
    token: str | None = None,
    tls_ca_file: Path | None = None,
    client_cert_file: Path | None = None,
    client_key_file: Path | None = None,
    max_message_mb: int = 8,
    tls_server_name: str | None = None,
) -> grpc.Channel:
    """A channel to `target` ("host:port").

    Insecure unless tls_ca_file is given (the CA that signed the server's certificate);
    client_cert_file + client_key_file add a client certificate for mTLS. tls_server_name
    overrides the name checked against the server certificate (when dialing by IP).
    """
    if (client_cert_file is None) != (client_key_file is None):
        raise ValueError("give both client_cert_file and client_key_file for mTLS, or neither")
    if client_cert_file is not None and tls_ca_file is None:
        raise ValueError("a client certificate needs TLS: give tls_ca_file too")
    if tls_server_name is not None and tls_ca_file is None:
        raise ValueError("tls_server_name needs TLS: give tls_ca_file too")
    max_bytes = max_message_mb << 20
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # Keeps long calls alive through NATs and idle-timeout proxies; the server
        # (grpc_server.py) allows pings this often.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]
    if tls_ca_file is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca_file, "TLS CA file"),
            private_key=_read(client_key_file, "client key file") if client_key_file else None,
            certificate_chain=_read(client_cert_file, "client certificate file")
            if client_cert_file
            else None,
        )
        if tls_server_name is not None:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        if token is not None and not _is_loopback(target):
            log.warning(
                "sending a bearer token over an insecure channel; use TLS outside local mode",
                extra={"target": target},
            )
        channel = grpc.insecure_channel(target, options=options)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerTokenInterceptor(token))
    _targets[channel] = target
    return channel


def channel_target(channel: grpc.Channel) -> str:
    """The target a make_channel channel dials ("<unknown target>" for other channels)."""
    return _targets.get(channel, "<unknown target>")


def wait_for_ready(channel: grpc.Channel, timeout: float) -> None:
    """Block until the channel is connected; TimeoutError naming the target after `timeout` s."""
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        future.cancel()
        raise TimeoutError(
            f"gRPC server at {channel_target(channel)} not reachable within {timeout:g} s"
        ) from None
