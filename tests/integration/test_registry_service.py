"""The Registry service in-process over both object store backends: every call, and every bad input
with its own status code and message. Auth is on: admin and site tokens."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedhpc.api.v1 import common_pb2, registry_pb2
from fedhpc.common.config import FedhpcConfig, RegistryConfig, ServerConfig
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.grpc_server import GrpcServer
from fedhpc.common.manifest import manifest_for_blob
from fedhpc.common.registry_client import RegistryClient, parse_model_ref
from fedhpc.common.storage import ObjectStore
from fedhpc.common.tensors import VerifiedBlob, verify_file, write_safetensors_file
from fedhpc.registry.server import build_registry_server

ADMIN = "admin-token-for-tests"
SITE = "site-token-for-tests"


def _config(store_kind: str) -> FedhpcConfig:
    auth = {
        "enabled": True,
        "admin_tokens": [ADMIN],
        "site_tokens": [{"token": SITE, "site": "polaris", "experiment": "exp1"}],
    }
    server = ServerConfig.model_validate({"host": "127.0.0.1", "port": 0, "auth": auth})
    return FedhpcConfig(registry=RegistryConfig(server=server, max_chunk_bytes=256 << 10))


@pytest.fixture(params=["file", "s3"])
def registry_server(request: pytest.FixtureRequest) -> Iterator[tuple[GrpcServer, ObjectStore]]:
    store: ObjectStore = request.getfixturevalue(f"{request.param}_store")
    server = build_registry_server(_config(request.param), store)
    server.start()
    yield server, store
    server.stop(0)


@pytest.fixture
def admin(registry_server: tuple[GrpcServer, ObjectStore]) -> Iterator[RegistryClient]:
    channel = make_channel(registry_server[0].address, token=ADMIN)
    yield RegistryClient(channel)
    channel.close()


def _weights(path: Path, seed: int = 0, scale: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    tensors = {
        "conv.weight": rng.standard_normal((8, 1, 3, 3 * scale), dtype=np.float32),
        "conv.bias": rng.standard_normal(8, dtype=np.float32),
        "fc.weight": rng.standard_normal((10, 64 * scale), dtype=np.float32),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
    }
    write_safetensors_file(path, tensors)
    return path


def _begin(
    client: RegistryClient, model: str, version: str, *, presign: bool
) -> registry_pb2.BeginUploadResponse:
    return client.stub.BeginUpload(
        registry_pb2.BeginUploadRequest(model=model, version=version, presign=presign)
    )


def _stream(
    client: RegistryClient, upload_id: str, data: bytes, chunk: int = 64 << 10
) -> registry_pb2.UploadResponse:
    def messages() -> Iterator[registry_pb2.UploadChunk]:
        yield registry_pb2.UploadChunk(header=registry_pb2.UploadHeader(upload_id=upload_id))
        for i in range(0, len(data), chunk):
            yield registry_pb2.UploadChunk(data=data[i : i + chunk])

    return client.stub.Upload(messages())


def _commit(
    client: RegistryClient, begun: registry_pb2.BeginUploadResponse, blob: VerifiedBlob
) -> registry_pb2.ModelVersion:
    manifest = manifest_for_blob(blob, model=begun.model, version=begun.version)
    return client.stub.CommitVersion(
        registry_pb2.CommitVersionRequest(upload_id=begun.upload_id, manifest=manifest)
    )


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined, no-any-return]


def _details(exc: pytest.ExceptionInfo[grpc.RpcError]) -> str:
    return exc.value.details()  # type: ignore[attr-defined, no-any-return]


def test_push_list_show_pull_round_trip_over_both_transports(admin: RegistryClient, tmp_path: Path) -> None:
    admin.create_model("exp1", "digits CNN")
    src = _weights(tmp_path / "w.safetensors")
    v0 = admin.push("exp1", src, version="r0", transport="stream", aliases=["latest"])
    v1 = admin.push(
        "exp1", _weights(tmp_path / "w1.safetensors", seed=1), version="r1", parent="r0", round_number=1
    )
    assert v0.manifest.sha256 == verify_file(src).sha256
    assert {t.name for t in v0.manifest.tensors} == {
        "conv.weight",
        "conv.bias",
        "fc.weight",
        "bn.num_batches_tracked",
    }
    assert all(len(t.sha256) == 64 for t in v0.manifest.tensors)
    assert v1.manifest.parent == "r0" and v1.manifest.round == 1 and v1.manifest.created_at.seconds > 0
    listed = list(admin.list_versions("exp1"))
    assert [v.manifest.version for v in listed] == ["r0", "r1"]
    assert listed[1].aliases == ["latest"]
    for transport in ("stream", "auto"):
        dest = tmp_path / f"pulled-{transport}.safetensors"
        got = admin.pull(parse_model_ref("exp1:r0"), dest, transport=transport)  # type: ignore[arg-type]
        assert dest.read_bytes() == src.read_bytes()
        assert got.manifest.version == "r0"
    latest = admin.get_version(parse_model_ref("exp1"))
    assert latest.manifest.version == "r1"


def test_presigned_urls_on_s3_and_none_on_file(
    admin: RegistryClient, registry_server: tuple[GrpcServer, ObjectStore], tmp_path: Path
) -> None:
    admin.create_model("exp1")
    begun = _begin(admin, "exp1", "r0", presign=True)
    if registry_server[1].kind == "file":
        assert begun.put_url == ""
        return
    data = _weights(tmp_path / "w.safetensors").read_bytes()
    request = urllib.request.Request(begun.put_url, data=data, method="PUT")
    with urllib.request.urlopen(request) as response:
        assert response.status == 200
    committed = _commit(admin, begun, verify_file(tmp_path / "w.safetensors"))
    assert committed.manifest.size_bytes == len(data)
    got = admin.get_version(parse_model_ref("exp1:r0"), presign=True)
    with urllib.request.urlopen(got.get_url) as response:
        assert response.read() == data
    # The URL names one object: pointing it at another key is refused by the store.
    other = got.get_url.replace("weights.safetensors", "manifest.json")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(other)
    assert err.value.code == 403


def test_presigned_put_bound_to_the_stated_sha256(
    admin: RegistryClient, registry_server: tuple[GrpcServer, ObjectStore], tmp_path: Path
) -> None:
    """On S3 the upload URL only accepts the bytes whose sha256 BeginUpload was told;
    the commit then records that sha256 without re-reading the upload."""
    if registry_server[1].kind == "file":
        pytest.skip("the file store has no HTTP endpoint to presign")
    admin.create_model("exp1")
    path = _weights(tmp_path / "w.safetensors")
    blob = verify_file(path)
    begun = admin.stub.BeginUpload(
        registry_pb2.BeginUploadRequest(model="exp1", version="r0", presign=True, sha256=blob.sha256)
    )
    assert begun.put_url and dict(begun.put_headers)
    other = _weights(tmp_path / "other.safetensors", seed=9).read_bytes()
    refused = urllib.request.Request(begun.put_url, data=other, method="PUT", headers=dict(begun.put_headers))
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(refused)
    assert err.value.code == 400
    ok = urllib.request.Request(
        begun.put_url, data=path.read_bytes(), method="PUT", headers=dict(begun.put_headers)
    )
    with urllib.request.urlopen(ok) as response:
        assert response.status == 200
    # A manifest claiming another sha256 than the one the store enforced is refused.
    wrong = manifest_for_blob(blob, model="exp1", version="r0")
    wrong.sha256 = "ab" * 32
    with pytest.raises(grpc.RpcError) as rpc_err:
        admin.stub.CommitVersion(registry_pb2.CommitVersionRequest(upload_id=begun.upload_id, manifest=wrong))
    assert _code(rpc_err) == grpc.StatusCode.INVALID_ARGUMENT and "checksum mismatch" in _details(rpc_err)
    committed = _commit(admin, begun, blob)
    assert committed.manifest.sha256 == blob.sha256
    assert {t.name: t.sha256 for t in committed.manifest.tensors} == blob.tensor_sha256


def test_bad_sha256_in_begin_upload_is_refused(admin: RegistryClient) -> None:
    admin.create_model("exp1")
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.BeginUpload(registry_pb2.BeginUploadRequest(model="exp1", presign=True, sha256="xyz"))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "64 hex digits" in _details(err)


def test_aliases_set_list_delete(admin: RegistryClient, tmp_path: Path) -> None:
    admin.create_model("exp1")
    admin.push("exp1", _weights(tmp_path / "a.safetensors"), version="r0", aliases=[])
    admin.push("exp1", _weights(tmp_path / "b.safetensors", seed=2), version="r1", aliases=["latest"])
    admin.set_alias("exp1", "best", "r0")
    assert {a.name: a.version for a in admin.list_aliases("exp1")} == {"best": "r0", "latest": "r1"}
    assert admin.get_version(parse_model_ref("exp1:best")).manifest.version == "r0"
    admin.stub.DeleteAlias(registry_pb2.DeleteAliasRequest(model="exp1", name="best"))
    with pytest.raises(grpc.RpcError) as err:
        admin.get_version(parse_model_ref("exp1:best"))
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.set_alias("exp1", "best", "r9")
    assert _code(err) == grpc.StatusCode.NOT_FOUND


def test_restarted_registry_sees_every_committed_version(
    registry_server: tuple[GrpcServer, ObjectStore], tmp_path: Path
) -> None:
    server, store = registry_server
    with make_channel(server.address, token=ADMIN) as channel:
        client = RegistryClient(channel)
        client.create_model("exp1")
        for i in range(3):
            client.push("exp1", _weights(tmp_path / f"{i}.safetensors", seed=i), version=f"r{i}")
    server.stop(0)
    fresh = build_registry_server(_config(store.kind), store)
    fresh.start()
    try:
        with make_channel(fresh.address, token=ADMIN) as channel:
            versions = [v.manifest.version for v in RegistryClient(channel).list_versions("exp1")]
    finally:
        fresh.stop(0)
    assert versions == ["r0", "r1", "r2"]


def test_list_versions_paginates(admin: RegistryClient, tmp_path: Path) -> None:
    admin.create_model("exp1")
    path = _weights(tmp_path / "w.safetensors")
    for i in range(5):
        admin.push("exp1", path, version=f"r{i}")
    page = admin.stub.ListVersions(
        registry_pb2.ListVersionsRequest(model="exp1", page=common_pb2.PageRequest(page_size=2))
    )
    assert [v.manifest.version for v in page.versions] == ["r0", "r1"] and page.next_page_token
    assert [v.manifest.version for v in admin.list_versions("exp1")] == [f"r{i}" for i in range(5)]


# -- bad input: each refused with its own status and message, nothing lost ------------------


def test_checksum_mismatch_is_refused_and_upload_can_be_retried(
    admin: RegistryClient, tmp_path: Path
) -> None:
    admin.create_model("exp1")
    path = _weights(tmp_path / "w.safetensors")
    begun = _begin(admin, "exp1", "r0", presign=False)
    _stream(admin, begun.upload_id, path.read_bytes())
    blob = verify_file(path)
    manifest = manifest_for_blob(blob, model="exp1", version="r0")
    manifest.sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.CommitVersion(
            registry_pb2.CommitVersionRequest(upload_id=begun.upload_id, manifest=manifest)
        )
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "checksum mismatch" in _details(err)
    # Nothing was committed, and the same upload commits once the manifest is right.
    assert list(admin.list_versions("exp1")) == []
    assert _commit(admin, begun, blob).manifest.version == "r0"


def test_truncated_safetensors_is_refused_on_both_paths(
    admin: RegistryClient, registry_server: tuple[GrpcServer, ObjectStore], tmp_path: Path
) -> None:
    admin.create_model("exp1")
    data = _weights(tmp_path / "w.safetensors").read_bytes()
    truncated = data[: len(data) - 100]
    begun = _begin(admin, "exp1", "r0", presign=False)
    with pytest.raises(grpc.RpcError) as err:
        _stream(admin, begun.upload_id, truncated)
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid safetensors file" in _details(err) and "truncat" in _details(err).lower()
    # A refused stream leaves no weights behind.
    assert not registry_server[1].exists(begun.object_key)
    # Bytes that bypassed the registry (written straight to storage) are checked at commit.
    registry_server[1].put_bytes(begun.object_key, truncated)
    with pytest.raises(grpc.RpcError) as err:
        _commit(admin, begun, verify_file(tmp_path / "w.safetensors"))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid safetensors file" in _details(err)


def test_manifest_that_disagrees_with_blob_is_refused(admin: RegistryClient, tmp_path: Path) -> None:
    admin.create_model("exp1")
    path = _weights(tmp_path / "w.safetensors")
    begun = _begin(admin, "exp1", "r0", presign=False)
    _stream(admin, begun.upload_id, path.read_bytes())
    manifest = manifest_for_blob(verify_file(path), model="exp1", version="r0")
    manifest.tensors[0].shape[:] = [1, 2, 3]
    manifest.tensors[1].dtype = "F16"
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.CommitVersion(
            registry_pb2.CommitVersionRequest(upload_id=begun.upload_id, manifest=manifest)
        )
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    assert "disagrees with the uploaded weights" in _details(err)
    assert "shape [1, 2, 3]" in _details(err) and "dtype F16" in _details(err)


def test_second_commit_of_a_version_is_refused(admin: RegistryClient, tmp_path: Path) -> None:
    admin.create_model("exp1")
    path = _weights(tmp_path / "w.safetensors")
    begun = _begin(admin, "exp1", "r0", presign=False)
    _stream(admin, begun.upload_id, path.read_bytes())
    _commit(admin, begun, verify_file(path))
    with pytest.raises(grpc.RpcError) as err:
        _commit(admin, begun, verify_file(path))
    assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    assert "immutable" in _details(err)
    with pytest.raises(grpc.RpcError) as err:
        _begin(admin, "exp1", "r0", presign=False)
    assert _code(err) == grpc.StatusCode.ALREADY_EXISTS


def test_unknown_model_and_version_are_not_found(admin: RegistryClient, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as err:
        admin.get_version(parse_model_ref("nope:r0"))
    assert _code(err) == grpc.StatusCode.NOT_FOUND and "model 'nope' does not exist" in _details(err)
    admin.create_model("exp1")
    with pytest.raises(grpc.RpcError) as err:
        admin.get_version(parse_model_ref("exp1:r7"))
    assert _code(err) == grpc.StatusCode.NOT_FOUND and "'r7'" in _details(err)
    with pytest.raises(grpc.RpcError) as err:
        list(admin.stub.Download(registry_pb2.DownloadRequest(ref=parse_model_ref("exp1:r7"))))
    assert _code(err) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.CommitVersion(registry_pb2.CommitVersionRequest(upload_id="exp1:r0:feedface"))
    assert _code(err) == grpc.StatusCode.NOT_FOUND and "unknown upload" in _details(err)


def test_oversized_stream_chunk_is_refused(
    admin: RegistryClient, registry_server: tuple[GrpcServer, ObjectStore], tmp_path: Path
) -> None:
    admin.create_model("exp1")
    begun = _begin(admin, "exp1", "r0", presign=False)
    data = os.urandom(begun.max_chunk_bytes + 1)
    with pytest.raises(grpc.RpcError) as err:
        _stream(admin, begun.upload_id, data, chunk=len(data))
    assert _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"exceeds max_chunk_bytes={begun.max_chunk_bytes}" in _details(err)
    assert not registry_server[1].exists(begun.object_key)


def test_invalid_names_are_refused(admin: RegistryClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        admin.create_model("../etc")
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "model name" in _details(err)


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_invalid_token_is_unauthenticated(
    registry_server: tuple[GrpcServer, ObjectStore], token: str | None
) -> None:
    with (
        make_channel(registry_server[0].address, token=token) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        RegistryClient(channel).list_aliases("exp1")
    assert _code(err) == grpc.StatusCode.UNAUTHENTICATED


def test_site_token_may_read_its_experiment_but_not_make_admin_calls(
    admin: RegistryClient, registry_server: tuple[GrpcServer, ObjectStore], tmp_path: Path
) -> None:
    admin.create_model("exp1")
    admin.create_model("exp2")
    admin.push("exp1", _weights(tmp_path / "w.safetensors"), version="r0")
    with make_channel(registry_server[0].address, token=SITE) as channel:
        site = RegistryClient(channel)
        assert site.get_version(parse_model_ref("exp1:r0")).manifest.version == "r0"
        with pytest.raises(grpc.RpcError) as err:
            site.create_model("exp3")
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            site.push("exp1", tmp_path / "w.safetensors", version="r1")
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            site.get_version(parse_model_ref("exp2:latest"))
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
        if registry_server[1].kind == "s3":
            own = site.stub.PresignBlob(
                registry_pb2.PresignBlobRequest(
                    object_key="updates/exp1/r1/t1.safetensors", method=registry_pb2.PRESIGN_METHOD_PUT
                )
            )
            assert own.url
        with pytest.raises(grpc.RpcError) as err:
            site.stub.PresignBlob(
                registry_pb2.PresignBlobRequest(
                    object_key="updates/exp2/r1/t1.safetensors", method=registry_pb2.PRESIGN_METHOD_PUT
                )
            )
        assert _code(err) == grpc.StatusCode.PERMISSION_DENIED
