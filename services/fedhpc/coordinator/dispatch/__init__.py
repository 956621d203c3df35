"""Dispatch backends: how the coordinator runs tasks at sites (DESIGN.md, "Dispatch backends").

``make_dispatcher(site, run_dir)`` builds the backend a :class:`SiteSpec` names; every backend
implements :class:`Dispatcher`. See docs/dispatch.md.
"""

from __future__ import annotations

from fedhpc.coordinator.dispatch.base import (
    PHASES,
    Dispatcher,
    DispatchError,
    DispatchEvent,
    Phase,
    SiteSpec,
    known_backends,
    make_dispatcher,
    register_backend,
)

__all__ = [
    "PHASES",
    "DispatchError",
    "DispatchEvent",
    "Dispatcher",
    "Phase",
    "SiteSpec",
    "known_backends",
    "make_dispatcher",
    "register_backend",
]
