"""The `fedhpc` CLI end to end: a registry process on the embedded file store, driven by the
client commands as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedhpc.common.tensors import write_safetensors_file
from fedhpc.testing.ports import free_ports
from fedhpc.testing.processes import ServiceProcess


def fedhpc(*args: str, registry: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedhpc.cli", *args]
    if registry:
        command += ["--registry", registry]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("cli-registry")
    port, metrics_port = free_ports(2)
    process = ServiceProcess(
        [
            "registry",
            "serve",
            "--store-root",
            str(root / "store"),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        address=f"127.0.0.1:{port}",
        log_path=root / "registry.log",
    )
    with process:
        yield process.address, metrics_port
    assert process.process is not None and process.process.returncode == 0, process.log_tail()


def test_push_list_show_pull(registry: tuple[str, int], tmp_path: Path) -> None:
    address, _ = registry
    weights = tmp_path / "w.safetensors"
    write_safetensors_file(weights, {"w": np.arange(12, dtype=np.float32).reshape(3, 4)})
    pushed = fedhpc(
        "models",
        "push",
        "cli-model",
        str(weights),
        "--version",
        "r0",
        "--alias",
        "best",
        "-q",
        registry=address,
    )
    assert "committed cli-model:r0" in pushed.stdout
    fedhpc(
        "models",
        "push",
        "cli-model",
        str(weights),
        "--version",
        "r1",
        "--parent",
        "r0",
        "--round",
        "1",
        "-q",
        registry=address,
    )
    listed = fedhpc("models", "list", "cli-model", registry=address).stdout
    assert "r0" in listed and "best" in listed and "r1" in listed and "latest" in listed
    as_json = json.loads(fedhpc("models", "list", "cli-model", "--json", registry=address).stdout)
    assert [v["manifest"]["version"] for v in as_json] == ["r0", "r1"]
    shown = json.loads(fedhpc("models", "show", "cli-model", registry=address).stdout)
    assert shown["manifest"]["version"] == "r1" and shown["manifest"]["parent"] == "r0"
    models = fedhpc("models", "list", registry=address).stdout
    assert "cli-model" in models
    dest = tmp_path / "pulled.safetensors"
    pulled = fedhpc("models", "pull", "cli-model:best", str(dest), "-q", registry=address)
    assert "sha256 verified" in pulled.stdout
    assert dest.read_bytes() == weights.read_bytes()


def test_errors_are_one_clear_line(registry: tuple[str, int], tmp_path: Path) -> None:
    address, _ = registry
    missing = fedhpc("models", "show", "no-such-model:r0", registry=address, check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: NOT_FOUND: model 'no-such-model' does not exist"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    refused = fedhpc("models", "push", "cli-model", str(bad), "-q", registry=address, check=False)
    assert refused.returncode == 1 and "is not a valid safetensors file" in refused.stderr
    (port,) = free_ports(1)
    down = fedhpc("models", "list", registry=f"127.0.0.1:{port}", check=False)
    assert down.returncode == 1 and "unavailable" in down.stderr


def test_metrics_endpoint_counts_calls_by_method_and_code(registry: tuple[str, int]) -> None:
    address, metrics_port = registry
    fedhpc("models", "show", "no-such-model", registry=address, check=False)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'method="GetVersion"' in text and 'code="NOT_FOUND"' in text
    assert "fedhpc_grpc_server_handling_seconds_bucket" in text


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["registry"],
        ["registry", "serve"],
        ["models"],
        ["models", "list"],
        ["models", "show"],
        ["models", "push"],
        ["models", "pull"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = fedhpc(*command, "--help")
    assert "Usage:" in result.stdout
    if command and command[-1] in ("serve", "push", "pull"):
        assert "Example" in result.stdout
