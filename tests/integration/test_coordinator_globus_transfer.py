"""The coordinator's Globus Transfer path for sites with ``transport: globus``, in process:
real registry and aggregator servers (file store), the real engine, a dispatch backend whose
trainer answers at once from the staged path, and a stand-in for the Globus Transfer service
(the Globus cloud cannot run here): it copies files between the store and a site directory as a
transfer would, and can be told to fail."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from fedhpc.aggregator.server import build_aggregator_server
from fedhpc.api.v1 import aggregator_pb2_grpc
from fedhpc.common.config import FedhpcConfig
from fedhpc.common.contracts import TaskResultDoc, TaskSpec, Timings, UpdateBlob
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import FileObjectStore
from fedhpc.common.tensors import write_safetensors_file
from fedhpc.coordinator import engine as engine_module
from fedhpc.coordinator.dispatch import Dispatcher, DispatchEvent, SiteSpec, register_backend
from fedhpc.coordinator.engine import Engine
from fedhpc.coordinator.state import ExperimentRow, SiteRow, StateStore
from fedhpc.coordinator.transfer import StagedFile, TransferErrorCode, TransferFailed
from fedhpc.registry.server import build_registry_server


class FakeGlobusStager:
    """Stands in for GlobusTransferStager against the unreachable Globus service."""

    def __init__(self, store_root: Path, site_dir: Path, fail_stage: bool = False) -> None:
        self.store_root, self.site_dir, self.fail_stage = store_root, site_dir, fail_stage
        self.staged: list[str] = []
        self.fetched: list[str] = []

    def stage_model(self, experiment: str, version: str, key: str, sha256: str, size: int) -> StagedFile:
        if self.fail_stage:
            raise TransferFailed(
                TransferErrorCode.TRANSFER_FAILED, "PERMISSION_DENIED on the site collection"
            )
        time.sleep(0.2)  # a transfer takes a while: the engine must not wait for it
        target = self.site_dir / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.store_root / key, target)
        self.staged.append(version)
        return StagedFile(str(target), "/globus/" + key, key, sha256, size, "task-1", False)

    def update_location(self, key: str) -> Any:
        return type("Location", (), {"local_path": str(self.site_dir / key)})()

    def fetch_update(self, task_id: str, site_path: str, object_key: str | None = None) -> Any:
        assert object_key is not None
        target = self.store_root / object_key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.site_dir / object_key, target)
        self.fetched.append(object_key)
        return None


class StagedPathTrainer(Dispatcher):
    """A trainer that reads the staged model path and writes a small delta where told."""

    backend = "staged-path"

    def __init__(self, site: SiteSpec, run_dir: Path) -> None:
        super().__init__(site, run_dir)
        self._ready: list[DispatchEvent] = []
        self._lock = threading.Lock()

    def submit(self, task: TaskSpec) -> str:
        assert task.model.path is not None and Path(task.model.path).is_file()
        result = TaskResultDoc(
            task_id=task.task_id, num_samples=10, timings=Timings(dispatched_at=task.dispatched_at)
        )
        if task.update is not None:
            assert task.update.path is not None
            Path(task.update.path).parent.mkdir(parents=True, exist_ok=True)
            blob = write_safetensors_file(Path(task.update.path), {"w": torch.full((4,), 0.5)})
            result.update = UpdateBlob(
                object_key=task.update.object_key, sha256=blob.sha256, size_bytes=blob.size
            )
        with self._lock:
            self._ready.append(DispatchEvent(task.task_id, "finished", time.time(), result))
        return f"staged:{task.task_id}"

    def reattach(self, task_id: str, handle: str) -> None:
        del task_id, handle

    def poll(self) -> list[DispatchEvent]:
        with self._lock:
            ready, self._ready = self._ready, []
        return ready

    def cancel(self, task_id: str, reason: str) -> None:
        del task_id, reason

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[FedhpcConfig, FileObjectStore, RegistryClient, Any]]:
    register_backend("staged-path", StagedPathTrainer)
    store = FileObjectStore(tmp_path / "store")
    config = FedhpcConfig.model_validate(
        {
            "store": {"kind": "file", "root": str(tmp_path / "store")},
            "registry": {"server": {"port": 0}},
            "aggregator": {"server": {"port": 0}},
            "coordinator": {"data_dir": str(tmp_path / "coordinator"), "tick_seconds": 0.05},
        }
    )
    registry = build_registry_server(config, store)
    registry.start()
    config = config.model_copy(
        update={"aggregator": config.aggregator.model_copy(update={"registry_address": registry.address})}
    )
    aggregator = build_aggregator_server(config, store)
    aggregator.start()
    registry_channel = grpc.insecure_channel(registry.address)
    aggregator_channel = grpc.insecure_channel(aggregator.address)
    client = RegistryClient(registry_channel)
    init = tmp_path / "init.safetensors"
    write_safetensors_file(init, {"w": torch.zeros(4)})
    client.create_model("init")
    client.push("init", init, version="v0")
    try:
        yield config, store, client, aggregator_pb2_grpc.AggregatorStub(aggregator_channel)
    finally:
        registry_channel.close()
        aggregator_channel.close()
        aggregator.stop(0)
        registry.stop(0)
        store.close()


def _run(
    services: Any, tmp_path: Path, stager: FakeGlobusStager, monkeypatch: pytest.MonkeyPatch
) -> StateStore:
    config, store, client, aggregator = services
    monkeypatch.setattr(
        engine_module.GlobusTransferStager, "for_site", classmethod(lambda cls, *a, **k: stager)
    )
    state = StateStore(config.coordinator.data_dir / "coordinator.db")
    engine = Engine(config.coordinator, state, client, aggregator, config.store, store)
    for name in ("hpc-1", "hpc-2"):
        state.upsert_site(SiteRow(name, "staged-path", {}, "globus", 1, "ACTIVE", {}, time.time(), None))
    spec = {
        "name": "globus",
        "initial_version": "init@v0",
        "task": {"plugin": "digits"},
        "strategy": {
            "name": "sync",
            "rounds": 2,
            "min_sites": 2,
            "round_deadline_s": 60,
            "max_task_retries": 0,
        },
        "algorithm": {"name": "fedavg"},
    }
    state.insert_experiment(
        ExperimentRow(
            "g1",
            "globus",
            yaml.safe_dump(spec),
            "RUNNING",
            "g1",
            [],
            time.time(),
            time.time(),
            None,
            "",
            None,
            "",
            "",
        )
    )
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = state.experiment("g1")
            if row is not None and row.state in ("COMPLETED", "FAILED", "STOPPED"):
                break
            time.sleep(0.05)
    finally:
        engine.stop()
    return state


def test_models_are_staged_and_updates_fetched_through_the_stand_in_for_globus_transfer(
    services: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, store, _, _ = services
    stager = FakeGlobusStager(tmp_path / "store", tmp_path / "site")
    state = _run(services, tmp_path, stager, monkeypatch)
    experiment = state.experiment("g1")
    assert experiment is not None and experiment.state == "COMPLETED", experiment
    assert [r.version for r in state.rounds("g1")] == ["r0000", "r0001", "r0002"]
    assert sorted(stager.staged) == ["r0000", "r0000", "r0001", "r0001"]
    assert len(stager.fetched) == 4 and all(store.local_path(key) is not None for key in stager.fetched)
    assert all(r.accepted == 2 for r in state.rounds("g1")[1:])


def test_a_failed_transfer_fails_the_task_with_its_reason(
    services: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stager = FakeGlobusStager(tmp_path / "store", tmp_path / "site", fail_stage=True)
    state = _run(services, tmp_path, stager, monkeypatch)
    experiment = state.experiment("g1")
    assert experiment is not None and experiment.state == "FAILED"
    failures = [t for t in state.tasks("g1") if t.phase == "FAILED"]
    assert failures and all(t.error_code == "DISPATCH_FAILED" for t in failures)
    assert all(
        "TRANSFER_FAILED" in t.error_message and "PERMISSION_DENIED" in t.error_message for t in failures
    )
