"""SiteSpec validation, DispatchEvent, and the backend registry behind make_dispatcher."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedhpc.common.contracts import TaskSpec
from fedhpc.coordinator.dispatch import (
    Dispatcher,
    DispatchError,
    DispatchEvent,
    SiteSpec,
    base,
    known_backends,
    make_dispatcher,
    register_backend,
)
from fedhpc.coordinator.dispatch.local import LocalDispatcher


class _NullDispatcher(Dispatcher):
    backend = "null"

    def submit(self, task: TaskSpec) -> str:
        return task.task_id

    def reattach(self, task_id: str, handle: str) -> None:
        pass

    def poll(self) -> list[DispatchEvent]:
        return []

    def cancel(self, task_id: str, reason: str) -> None:
        pass

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class _NotADispatcher:
    pass


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the backend registry after a test that registers backends."""
    saved = dict(base._BACKENDS)
    yield
    base._BACKENDS.clear()
    base._BACKENDS.update(saved)


def test_site_spec_defaults() -> None:
    site = SiteSpec(name="polaris", backend="local")
    assert site.config == {}
    assert site.max_concurrent_tasks == 1
    assert site.transport == "presigned"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"name": "polaris", "backend": "local", "max_concurent_tasks": 2}, "max_concurent_tasks"),
        ({"name": "../etc", "backend": "local"}, "name"),
        ({"name": "", "backend": "local"}, "name"),
        ({"name": "polaris", "backend": ""}, "backend"),
        ({"name": "polaris", "backend": "local", "max_concurrent_tasks": 0}, "max_concurrent_tasks"),
        ({"name": "polaris"}, "backend"),
    ],
)
def test_site_spec_rejects_bad_input_naming_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as info:
        SiteSpec.model_validate(data)
    assert key in str(info.value)


def test_dispatch_event_is_frozen() -> None:
    event = DispatchEvent(task_id="t1", phase="queued", at=1.0)
    assert event.result is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.phase = "running"  # type: ignore[misc]


def test_local_is_a_known_backend(tmp_path: Path) -> None:
    assert "local" in known_backends()
    dispatcher = make_dispatcher(SiteSpec(name="s1", backend="local"), tmp_path)
    assert isinstance(dispatcher, LocalDispatcher)
    assert dispatcher.backend == "local"
    assert dispatcher.spool.root == (tmp_path / "sites" / "s1").resolve()


def test_unknown_backend_names_it_and_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DispatchError) as info:
        make_dispatcher(SiteSpec(name="s1", backend="kubernetes"), tmp_path)
    message = str(info.value)
    assert (
        "'kubernetes'" in message
        and "'s1'" in message
        and "known backends: endpoint-engine, globus-compute, local" in message
    )


@pytest.mark.usefixtures("registry")
def test_register_backend_by_class_and_by_path(tmp_path: Path) -> None:
    register_backend("null", _NullDispatcher)
    register_backend("null-lazy", f"{__name__}:_NullDispatcher")
    assert {"local", "null", "null-lazy"} <= set(known_backends())
    assert isinstance(make_dispatcher(SiteSpec(name="s1", backend="null"), tmp_path), _NullDispatcher)
    lazy = make_dispatcher(SiteSpec(name="s1", backend="null-lazy"), tmp_path)
    assert isinstance(lazy, _NullDispatcher)
    assert lazy.run_dir == tmp_path


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("no_such_module_xyz:Thing", "cannot be loaded"),
        (f"{__name__}:Missing", "cannot be loaded"),
        (f"{__name__}:_NotADispatcher", "is not a Dispatcher class"),
    ],
)
def test_backend_that_cannot_load_is_a_clear_error(tmp_path: Path, target: str, expected: str) -> None:
    register_backend("broken", target)
    with pytest.raises(DispatchError, match=expected):
        make_dispatcher(SiteSpec(name="s1", backend="broken"), tmp_path)


def test_backend_names_are_checked() -> None:
    with pytest.raises(DispatchError, match="lower-case"):
        register_backend("Globus Compute", _NullDispatcher)
