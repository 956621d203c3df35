"""Free TCP ports on the loopback interface, for servers started by tests and benchmarks.

A port found free here can still be taken by another process before the server
binds it; callers that start servers should retry with fresh ports when a bind fails.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack

LOOPBACK = "127.0.0.1"


def _bound_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        raise
    return sock


def free_port() -> int:
    """One currently unused loopback TCP port."""
    with _bound_socket() as sock:
        port: int = sock.getsockname()[1]
        return port


def free_ports(n: int) -> list[int]:
    """n distinct currently unused loopback TCP ports."""
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    with ExitStack() as stack:
        # Every socket stays bound until all n are chosen, so the kernel cannot hand out one twice.
        socks = [stack.enter_context(_bound_socket()) for _ in range(n)]
        return [int(s.getsockname()[1]) for s in socks]


def port_is_free(port: int) -> bool:
    """Whether port can be bound on loopback right now."""
    try:
        with _bound_socket(port):
            return True
    except OSError:
        return False
