"""The ``Dispatcher`` interface: how the coordinator hands tasks to a site and learns how they end.

A dispatcher serves one site. The coordinator ``submit``s task documents, persists the
handle each submit returns, and ``poll``s for :class:`DispatchEvent` s. After a coordinator
restart it builds a new dispatcher and ``reattach``es every task it had not seen finish.
Every submitted or reattached task eventually yields exactly one ``finished`` event whose
``result`` is the trainer's result or a failure result with a stable error code
(``TRAINER_CRASHED``, ``DEADLINE_EXCEEDED``, ``CANCELLED``, ...).

Backends register by name; :func:`make_dispatcher` builds one from a :class:`SiteSpec`.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedhpc.common.contracts import TaskResultDoc, TaskSpec

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

Phase = Literal["queued", "running", "downloading", "evaluating", "training", "uploading", "finished"]
#: Every phase, in the order a task goes through them (an evaluate task skips training/uploading,
#: a task that fails early skips to finished).
PHASES: tuple[Phase, ...] = (
    "queued",
    "running",
    "downloading",
    "evaluating",
    "training",
    "uploading",
    "finished",
)

# Site names become directory names (spools, logs) and metric labels.
_SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class DispatchError(Exception):
    """A dispatcher refused a request: an unknown backend, bad backend config, a task for another
    site, a handle from another site or backend. The message says which and why."""


@dataclass(frozen=True)
class DispatchEvent:
    """Something that happened to a task. ``at`` is epoch seconds when it happened (or, where a
    backend cannot know, when it was observed). ``result`` is set exactly when ``phase`` is
    ``"finished"``."""

    task_id: str
    phase: Phase
    at: float
    result: TaskResultDoc | None = None


class SiteSpec(BaseModel):
    """A site as the coordinator knows it. ``config`` is backend-specific and validated by the
    backend (the local backend: ``data_dir``, ``python``, ``env``, ``runner``, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_SITE_NAME, description="Site name: letters, digits, '_', '.', '-'.")
    backend: str = Field(min_length=1, description="Dispatch backend: local, globus-compute, ...")
    config: dict[str, Any] = Field(default_factory=dict)
    max_concurrent_tasks: int = Field(default=1, ge=1, le=4096)
    transport: str = Field(default="presigned", min_length=1)


class Dispatcher(ABC):
    """One site's task channel. Methods are safe to call from more than one thread."""

    backend: ClassVar[str]

    def __init__(self, site: SiteSpec, run_dir: Path) -> None:
        self.site = site
        self.run_dir = Path(run_dir)

    @abstractmethod
    def submit(self, task: TaskSpec) -> str:
        """Start the task (or queue it); return an opaque handle to persist for ``reattach``.

        Idempotent per task id: submitting a task id again returns the same handle and does
        not run it again (a retry therefore needs a new task id)."""

    @abstractmethod
    def reattach(self, task_id: str, handle: str) -> None:
        """Track a task submitted earlier, by this or a previous coordinator process."""

    @abstractmethod
    def poll(self) -> list[DispatchEvent]:
        """Events since the last poll, in order per task; never blocks on the site."""

    @abstractmethod
    def cancel(self, task_id: str, reason: str) -> None:
        """Stop the task; it finishes with ``CANCELLED`` unless it already finished."""

    @abstractmethod
    def close(self) -> None:
        """Stop tracking. Site workers keep running: they must outlive a coordinator restart."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the site's worker processes (``fedhpc down``, tests)."""


# Backends by name: a class, or "module:Class" imported on first use so that a backend's
# dependencies (globus_compute_sdk, parsl) are only needed by sites that use it.
_BACKENDS: dict[str, type[Dispatcher] | str] = {
    "local": "fedhpc.coordinator.dispatch.local:LocalDispatcher",
    "globus-compute": "fedhpc.coordinator.dispatch.globus_compute:GlobusComputeDispatcher",
    "endpoint-engine": "fedhpc.coordinator.dispatch.endpoint_engine:EndpointEngineDispatcher",
}


def register_backend(name: str, target: type[Dispatcher] | str) -> None:
    """Make ``name`` available to :func:`make_dispatcher` (a class or a ``"module:Class"`` path)."""
    if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
        raise DispatchError(f"backend name {name!r} must be lower-case letters, digits and '-'")
    _BACKENDS[name] = target


def known_backends() -> list[str]:
    return sorted(_BACKENDS)


def _resolve(name: str, target: type[Dispatcher] | str) -> type[Dispatcher]:
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise DispatchError(f"dispatch backend {name!r} cannot be loaded from {target}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Dispatcher)):
        raise DispatchError(f"dispatch backend {name!r}: {target} is not a Dispatcher class")
    return cls


def make_dispatcher(site: SiteSpec, run_dir: Path) -> Dispatcher:
    """The dispatcher for ``site``; raises DispatchError for an unknown backend or a bad config."""
    target = _BACKENDS.get(site.backend)
    if target is None:
        raise DispatchError(
            f"site {site.name!r}: unknown dispatch backend {site.backend!r}; "
            f"known backends: {', '.join(known_backends())}"
        )
    return _resolve(site.backend, target)(site, run_dir)
