"""The committed gRPC stubs must be exactly what protos/fedhpc/v1 generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_protos.py"
STUBS = ROOT / "services" / "fedhpc" / "api" / "v1"


def _check(stub_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--stub-dir", str(stub_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_stubs_match_a_fresh_generation() -> None:
    result = _check(STUBS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_on_a_stale_stub(tmp_path: Path) -> None:
    stale = tmp_path / "v1"
    shutil.copytree(STUBS, stale)
    target = stale / "registry_pb2.pyi"
    target.write_text(target.read_text().replace("class Model(", "class Modell(", 1))
    result = _check(stale)
    assert result.returncode == 1
    assert "stale" in result.stderr and "registry_pb2.pyi" in result.stdout


def test_every_service_is_in_the_api() -> None:
    from fedhpc.api.v1 import aggregator_pb2, coordinator_pb2, registry_pb2

    services = {
        name
        for module in (aggregator_pb2, coordinator_pb2, registry_pb2)
        for name in module.DESCRIPTOR.services_by_name
    }
    assert services == {"Aggregator", "Coordinator", "Registry"}
    coordinator = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    assert coordinator.methods_by_name["WatchExperiment"].server_streaming
    assert "ReportTaskResult" in coordinator.methods_by_name
    assert "Aggregate" in aggregator_pb2.DESCRIPTOR.services_by_name["Aggregator"].methods_by_name
