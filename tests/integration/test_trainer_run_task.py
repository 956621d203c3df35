"""run_task end to end with the digits plugin over every data path a site can have:

* staged ``path`` files in a file-store-like directory (local sites, Globus Transfer);
* presigned-style HTTP GET/PUT against a real HTTP server on loopback;
* the registry's gRPC Download stream, from a real in-process registry with auth on.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import safetensors
import safetensors.torch
import torch

from fedhpc.common.config import FedhpcConfig, RegistryConfig, ServerConfig
from fedhpc.common.contracts import parse_result
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.grpc_server import GrpcServer
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import FileObjectStore
from fedhpc.common.tensors import write_safetensors_file
from fedhpc.registry.server import build_registry_server
from fedhpc.trainer import make_initial_weights, run_task

HYPERPARAMETERS = {"epochs": 1}
SIGNATURE = "good-signature"
ADMIN = "admin-token-for-trainer-tests"
SITE = "site-token-for-trainer-tests"


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The trainer's scratch space, checked empty after each test: downloads are cleaned up."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch
    assert list(scratch.iterdir()) == []


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_model(path: Path, seed: int = 0) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = write_safetensors_file(path, make_initial_weights("digits", HYPERPARAMETERS, seed=seed))
    return {"model": "exp1", "version": "r0", "sha256": blob.sha256, "size_bytes": blob.size}


def _task(
    model: dict[str, Any], update: dict[str, Any] | None, site: int = 0, **extra: Any
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "experiment_id": "exp1",
        "round": 1,
        "task_id": f"exp1-r1-site-{site}",
        "site": f"site-{site}",
        "plugin": {"name": "digits", "hyperparameters": HYPERPARAMETERS},
        "model": model,
        "site_config": {"partition": site, "num_partitions": 2},
        "dispatched_at": time.time(),
        **extra,
    }
    if update is not None:
        task["update"] = update
    return task


def _ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result["error"]
    parse_result(result)
    return result


# -- staged files -----------------------------------------------------------------------------------------


def test_a_round_through_a_file_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = _write_model(store / "models" / "exp1" / "r0" / "weights.safetensors")
    model["path"] = str(store / "models" / "exp1" / "r0" / "weights.safetensors")
    results = []
    for site in range(2):
        key = f"updates/exp1/r1/site-{site}.safetensors"
        results.append(_ok(run_task(_task(model, {"object_key": key, "path": str(store / key)}, site))))

    base = safetensors.torch.load_file(model["path"])
    mean = {name: torch.zeros_like(t) for name, t in base.items()}
    total = sum(r["num_samples"] for r in results)
    for r in results:
        update = store / r["update"]["object_key"]
        assert r["update"]["sha256"] == _sha256(update)
        assert r["update"]["size_bytes"] == update.stat().st_size
        with safetensors.safe_open(str(update), "pt") as f:
            metadata = f.metadata()
        assert metadata["fedhpc.kind"] == "delta" and metadata["fedhpc.base_sha256"] == model["sha256"]
        delta = safetensors.torch.load_file(str(update))
        assert {n: (t.dtype, t.shape) for n, t in delta.items()} == {
            n: (t.dtype, t.shape) for n, t in base.items()
        }
        for name in mean:
            mean[name] += delta[name] * (r["num_samples"] / total)
        assert r["num_samples"] > 0 and r["eval_samples"] > 0 and r["steps"] > 0
        assert {"train_loss", "train_accuracy", "eval_loss", "eval_accuracy"} <= set(r["metrics"])
    # Both sites' training sets tile the training split; their eval slices tile the test split.
    assert total + sum(r["eval_samples"] for r in results) == 1797

    new_path = store / "models" / "exp1" / "r1" / "weights.safetensors"
    new_path.parent.mkdir(parents=True)
    blob = write_safetensors_file(new_path, {name: base[name] + mean[name] for name in base})
    new_model = {
        "model": "exp1",
        "version": "r1",
        "sha256": blob.sha256,
        "size_bytes": blob.size,
        "path": str(new_path),
    }
    evaluations = [_ok(run_task(_task(new_model, None, site, mode="evaluate"))) for site in range(2)]
    before = sum(r["metrics"]["eval_accuracy"] * r["eval_samples"] for r in results)
    after = sum(r["metrics"]["eval_accuracy"] * r["eval_samples"] for r in evaluations)
    assert after > before  # one round of FedAvg already helps


# -- presigned-style HTTP ----------------------------------------------------------------------------------


class ObjectServer(ThreadingHTTPServer):
    """A tiny object store: GET and PUT of files under ``root``, only with ?sig=<SIGNATURE>."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _ObjectHandler)
        self.root = root
        self.put_headers: list[dict[str, str]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, key: str, signature: str = SIGNATURE) -> str:
        return f"{self.base_url}/{key}?sig={signature}&expires=60"


class _ObjectHandler(BaseHTTPRequestHandler):
    server: ObjectServer

    def _target(self) -> Path | None:
        parts = urlsplit(self.path)
        if parse_qs(parts.query).get("sig") != [SIGNATURE]:
            self._reply(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
            return None
        return self.server.root / parts.path.lstrip("/")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        target = self._target()
        if target is None:
            return
        if not target.is_file():
            self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
            return
        self._reply(200, target.read_bytes())

    def do_PUT(self) -> None:
        target = self._target()
        if target is None:
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
        self.server.put_headers.append(dict(self.headers.items()))
        self._reply(200, b"")

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        del format, args


@pytest.fixture
def object_server(tmp_path: Path) -> Iterator[ObjectServer]:
    server = ObjectServer(tmp_path / "objects")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="object-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_presigned_http_get_and_put(object_server: ObjectServer) -> None:
    model = _write_model(object_server.root / "models/exp1/r0/weights.safetensors")
    model["url"] = object_server.url("models/exp1/r0/weights.safetensors")
    key = "updates/exp1/r1/site-0.safetensors"
    update = {"object_key": key, "url": object_server.url(key), "headers": {"x-amz-meta-site": "site-0"}}
    result = _ok(run_task(_task(model, update)))
    stored = object_server.root / key
    assert result["update"]["sha256"] == _sha256(stored)
    assert result["update"]["size_bytes"] == stored.stat().st_size
    (headers,) = object_server.put_headers
    assert headers["x-amz-meta-site"] == "site-0"
    assert headers["Content-Length"] == str(stored.stat().st_size)
    assert result["timings"]["download_s"] > 0 and result["timings"]["upload_s"] > 0


def test_http_errors_are_reported_without_the_signature(object_server: ObjectServer) -> None:
    model = _write_model(object_server.root / "models/exp1/r0/weights.safetensors")
    key = "updates/exp1/r1/site-0.safetensors"
    good_update = {"object_key": key, "url": object_server.url(key)}

    forbidden = run_task(
        _task({**model, "url": object_server.url("models/exp1/r0/weights.safetensors", "bad")}, good_update)
    )
    assert forbidden["error"]["code"] == "DOWNLOAD_FAILED"
    assert "403" in forbidden["error"]["message"] and "sig=" not in forbidden["error"]["message"]

    missing = run_task(
        _task({**model, "url": object_server.url("models/exp1/r9/weights.safetensors")}, good_update)
    )
    assert missing["error"]["code"] == "DOWNLOAD_FAILED" and "404" in missing["error"]["message"]

    _write_model(object_server.root / "models/exp1/other/weights.safetensors", seed=1)
    swapped = run_task(
        _task({**model, "url": object_server.url("models/exp1/other/weights.safetensors")}, good_update)
    )
    assert swapped["error"]["code"] == "DOWNLOAD_FAILED" and "sha256" in swapped["error"]["message"]

    model["url"] = object_server.url("models/exp1/r0/weights.safetensors")
    refused = run_task(_task(model, {"object_key": key, "url": object_server.url(key, "expired")}))
    assert refused["error"]["code"] == "UPLOAD_FAILED"
    assert "403" in refused["error"]["message"] and "expired" not in refused["error"]["message"]
    assert not (object_server.root / key).exists()


# -- registry gRPC stream ----------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[GrpcServer]:
    auth = {
        "enabled": True,
        "admin_tokens": [ADMIN],
        "site_tokens": [{"token": SITE, "site": "site-0", "experiment": "exp1"}],
    }
    server_config = ServerConfig.model_validate({"host": "127.0.0.1", "port": 0, "auth": auth})
    store = FileObjectStore(tmp_path / "registry-store")
    server = build_registry_server(FedhpcConfig(registry=RegistryConfig(server=server_config)), store)
    server.start()
    try:
        yield server
    finally:
        server.stop(0)
        store.close()


def _push(registry: GrpcServer, tmp_path: Path) -> dict[str, Any]:
    source = tmp_path / "r0.safetensors"
    model = _write_model(source)
    with make_channel(registry.address, token=ADMIN) as channel:
        client = RegistryClient(channel)
        client.create_model("exp1")
        client.push("exp1", source, version="r0", transport="stream")
    source.unlink()
    return {**model, "registry": registry.address}


def test_registry_stream_with_the_site_token(registry: GrpcServer, tmp_path: Path) -> None:
    model = _push(registry, tmp_path)
    update = {"object_key": "updates/u.safetensors", "path": str(tmp_path / "updates" / "u.safetensors")}
    report = {"coordinator": "127.0.0.1:1", "token": SITE}
    result = _ok(run_task(_task(model, update, report=report)))
    assert result["update"]["sha256"] == _sha256(tmp_path / "updates" / "u.safetensors")

    wrong_version = run_task(_task({**model, "version": "r7"}, update, report=report))
    assert (
        wrong_version["error"]["code"] == "DOWNLOAD_FAILED"
        and "NOT_FOUND" in wrong_version["error"]["message"]
    )

    no_token = run_task(_task(model, update))
    assert no_token["error"]["code"] == "DOWNLOAD_FAILED"
    assert "UNAUTHENTICATED" in no_token["error"]["message"]
    json.dumps(no_token)  # a plain JSON-able dict
