"""The Aggregator service in-process next to a registry, over both object stores: a round of
FedAvg, bad and unreadable updates, too few updates, optimizer state across rounds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import struct_pb2
from safetensors.torch import load_file, save_file

from fedhpc.aggregator.server import build_aggregator_server
from fedhpc.api.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2
from fedhpc.common.config import AggregatorConfig, FedhpcConfig, RegistryConfig, ServerConfig
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.grpc_server import GrpcServer
from fedhpc.common.registry_client import RegistryClient, parse_model_ref
from fedhpc.common.storage import ObjectStore
from fedhpc.common.tensors import verify_file
from fedhpc.registry.server import build_registry_server

SHAPES = {"w1": (64, 32), "b1": (64,), "w2": (10, 64)}


@pytest.fixture(params=["file", "s3"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[RegistryClient, aggregator_pb2_grpc.AggregatorStub, ObjectStore]]:
    store: ObjectStore = request.getfixturevalue(f"{request.param}_store")
    local = ServerConfig(host="127.0.0.1", port=0)
    registry = build_registry_server(FedhpcConfig(registry=RegistryConfig(server=local)), store)
    registry.start()
    config = FedhpcConfig(
        aggregator=AggregatorConfig(
            server=local, registry_address=registry.address, spool_dir=tmp_path, chunk_mb=1
        )
    )
    aggregator: GrpcServer = build_aggregator_server(config, store)
    aggregator.start()
    registry_channel = make_channel(registry.address)
    aggregator_channel = make_channel(aggregator.address)
    try:
        yield RegistryClient(registry_channel), aggregator_pb2_grpc.AggregatorStub(aggregator_channel), store
    finally:
        aggregator_channel.close()
        registry_channel.close()
        aggregator.stop(0)
        registry.stop(0)


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * scale for name, shape in SHAPES.items()}


def _push_base(registry: RegistryClient, tmp_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    base = _tensors(0)
    save_file(base, str(tmp_path / "base.safetensors"))
    registry.create_model("exp1")
    version = registry.push("exp1", tmp_path / "base.safetensors", version="r0")
    return base, version.manifest.version


def _put_update(
    store: ObjectStore, tmp_path: Path, name: str, tensors: dict[str, torch.Tensor], samples: int
) -> aggregator_pb2.UpdateRef:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    key = f"updates/exp1/r1/{name}.safetensors"
    store.put_file(key, path)
    blob = verify_file(path)
    return aggregator_pb2.UpdateRef(
        blob=common_pb2.BlobRef(object_key=key, sha256=blob.sha256, size_bytes=blob.size),
        num_samples=samples,
        site=name,
        task_id=f"t-{name}",
    )


def _pull(registry: RegistryClient, ref: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    dest = tmp_path / f"pulled-{ref.replace(':', '-')}.safetensors"
    registry.pull(parse_model_ref(ref), dest)
    return {k: v.clone() for k, v in load_file(str(dest)).items()}


def test_a_fedavg_round_commits_a_new_version(stack: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    base, base_version = _push_base(registry, tmp_path)
    deltas = [_tensors(i + 1, 0.01) for i in range(3)]
    samples = [10, 30, 60]
    refs = [
        _put_update(store, tmp_path, f"site{i}", d, n)
        for i, (d, n) in enumerate(zip(deltas, samples, strict=True))
    ]
    response = aggregator.Aggregate(
        aggregator_pb2.AggregateRequest(
            base=common_pb2.ModelRef(model="exp1", version=base_version),
            updates=refs,
            algorithm=aggregator_pb2.AlgorithmSpec(name="fedavg"),
            new_version="r1",
            round=1,
            aliases=["latest"],
        )
    )
    manifest = response.version.manifest
    assert (manifest.version, manifest.parent, manifest.round, manifest.algorithm) == (
        "r1",
        "r0",
        1,
        "fedavg",
    )
    assert manifest.producer.startswith("aggregator/")
    assert [o.code for o in response.outcomes] == [aggregator_pb2.UPDATE_OUTCOME_CODE_ACCEPTED] * 3
    assert sum(o.weight for o in response.outcomes) == pytest.approx(1.0)
    assert response.timing.bytes_read > 0 and response.complete
    got = _pull(registry, "exp1:latest", tmp_path)
    for name in SHAPES:
        expected = base[name] + sum(d[name] * (n / 100) for d, n in zip(deltas, samples, strict=True))
        torch.testing.assert_close(got[name], expected, atol=1e-6, rtol=1e-6)
    # Every tensor's checksum is in the manifest (read back while the result uploaded).
    pulled = verify_file(tmp_path / "pulled-exp1-latest.safetensors")
    assert {t.name: t.sha256 for t in manifest.tensors} == pulled.tensor_sha256
    # A retried request finds the committed version instead of aggregating again.
    again = aggregator.Aggregate(
        aggregator_pb2.AggregateRequest(
            base=common_pb2.ModelRef(model="exp1", version=base_version), updates=refs, new_version="r1"
        )
    )
    assert again.version.manifest.sha256 == manifest.sha256


def test_bad_and_unreadable_updates_are_reported_and_the_rest_aggregated(
    stack: tuple, tmp_path: Path
) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    _push_base(registry, tmp_path)
    good = _put_update(store, tmp_path, "good", _tensors(1, 0.01), 10)
    poisoned = _tensors(2, 0.01)
    poisoned["w2"][0, 0] = float("nan")
    bad = _put_update(store, tmp_path, "nan", poisoned, 10)
    missing = aggregator_pb2.UpdateRef(
        blob=common_pb2.BlobRef(object_key="updates/exp1/r1/gone.safetensors"), num_samples=5
    )
    response = aggregator.Aggregate(
        aggregator_pb2.AggregateRequest(
            base=common_pb2.ModelRef(model="exp1", version="r0"), updates=[good, bad, missing]
        )
    )
    codes = [o.code for o in response.outcomes]
    assert codes == [
        aggregator_pb2.UPDATE_OUTCOME_CODE_ACCEPTED,
        aggregator_pb2.UPDATE_OUTCOME_CODE_NOT_FINITE,
        aggregator_pb2.UPDATE_OUTCOME_CODE_UNREADABLE,
    ]
    assert "'w2'" in response.outcomes[1].message and "not found" in response.outcomes[2].message
    assert response.outcomes[0].weight == pytest.approx(1.0)


def test_too_few_accepted_updates_fail_and_write_nothing(stack: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    _push_base(registry, tmp_path)
    wrong = {"w1": torch.zeros(3, 3), "b1": torch.zeros(64), "w2": torch.zeros(10, 64)}
    refs = [
        _put_update(store, tmp_path, "ok", _tensors(1, 0.01), 10),
        _put_update(store, tmp_path, "shape", wrong, 10),
    ]
    with pytest.raises(grpc.RpcError) as err:
        aggregator.Aggregate(
            aggregator_pb2.AggregateRequest(
                base=common_pb2.ModelRef(model="exp1", version="r0"),
                updates=refs,
                min_accepted=2,
                new_version="r1",
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "1 of 2 updates accepted, need 2" in err.value.details()  # type: ignore[attr-defined]
    assert "WRONG_SHAPE" in err.value.details()  # type: ignore[attr-defined]
    assert [v.manifest.version for v in registry.list_versions("exp1")] == ["r0"]


def test_unknown_algorithm_or_parameter_is_invalid_argument(stack: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    _push_base(registry, tmp_path)
    ref = _put_update(store, tmp_path, "a", _tensors(1), 1)
    base = common_pb2.ModelRef(model="exp1", version="r0")
    with pytest.raises(grpc.RpcError) as err:
        aggregator.Aggregate(
            aggregator_pb2.AggregateRequest(
                base=base, updates=[ref], algorithm=aggregator_pb2.AlgorithmSpec(name="fedmagic")
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fedmagic" in err.value.details()  # type: ignore[attr-defined]
    params = struct_pb2.Struct()
    params.update({"beta1": 1.5})
    with pytest.raises(grpc.RpcError) as err:
        aggregator.Aggregate(
            aggregator_pb2.AggregateRequest(
                base=base,
                updates=[ref],
                algorithm=aggregator_pb2.AlgorithmSpec(name="fedadam", params=params),
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "beta1" in err.value.details()  # type: ignore[attr-defined]


def test_fedadam_state_lives_in_the_registry_between_rounds(stack: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    _push_base(registry, tmp_path)
    params = struct_pb2.Struct()
    params.update({"server_lr": 0.05})
    spec = aggregator_pb2.AlgorithmSpec(name="fedadam", params=params)
    ref = _put_update(store, tmp_path, "a", _tensors(1, 0.01), 10)
    first = aggregator.Aggregate(
        aggregator_pb2.AggregateRequest(
            base=common_pb2.ModelRef(model="exp1", version="r0"),
            updates=[ref],
            algorithm=spec,
            new_version="r1",
            round=1,
        )
    )
    assert first.optimizer_state.model == "exp1.state" and first.optimizer_state.version == "r1"
    state = _pull(registry, "exp1.state:r1", tmp_path)
    assert set(state) == {f"{slot}/{name}" for slot in ("m", "v") for name in SHAPES}
    second = aggregator.Aggregate(
        aggregator_pb2.AggregateRequest(
            base=common_pb2.ModelRef(model="exp1", version="r1"),
            updates=[ref],
            algorithm=spec,
            optimizer_state=first.optimizer_state,
            new_version="r2",
            round=2,
        )
    )
    assert second.version.manifest.parent == "r1" and second.optimizer_state.version == "r2"
    assert [v.manifest.version for v in registry.list_versions("exp1")] == ["r0", "r1", "r2"]


@pytest.mark.parametrize("algorithm", ["fedavg", "fedadam"])
def test_sharded_aggregation_commits_once_and_matches_unsharded(
    stack: tuple, tmp_path: Path, algorithm: str
) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    _push_base(registry, tmp_path)
    refs = [_put_update(store, tmp_path, f"s{i}", _tensors(i + 1, 0.01), 10 * (i + 1)) for i in range(3)]
    base = common_pb2.ModelRef(model="exp1", version="r0")
    spec = aggregator_pb2.AlgorithmSpec(name=algorithm)
    whole = aggregator.Aggregate(
        aggregator_pb2.AggregateRequest(base=base, updates=refs, algorithm=spec, new_version="whole", round=1)
    )
    responses = [
        aggregator.Aggregate(
            aggregator_pb2.AggregateRequest(
                base=base,
                updates=refs,
                algorithm=spec,
                new_version="sharded",
                round=1,
                shard=aggregator_pb2.ShardSpec(shard_index=k, shard_count=3, aggregation_id="agg-r1"),
            )
        )
        for k in (2, 0, 1)
    ]
    assert [(r.shards_done, r.complete) for r in responses] == [(1, False), (2, False), (3, True)]
    assert not responses[0].HasField("version")
    final = responses[-1]
    assert final.version.manifest.version == "sharded"
    # Byte for byte what one unsharded run writes.
    assert final.version.manifest.sha256 == whole.version.manifest.sha256
    assert [o.l2_norm for o in final.outcomes] == pytest.approx([o.l2_norm for o in whole.outcomes])
    if algorithm == "fedadam":
        a = _pull(registry, f"exp1.state:{final.optimizer_state.version}", tmp_path)
        b = _pull(registry, f"exp1.state:{whole.optimizer_state.version}", tmp_path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The shard parts are cleaned up once committed.
    assert list(store.list("aggregations/")) == []


def test_shards_that_disagree_on_an_update_do_not_commit(stack: tuple, tmp_path: Path) -> None:  # type: ignore[type-arg]
    registry, aggregator, store = stack
    _push_base(registry, tmp_path)
    poisoned = _tensors(5, 0.01)
    poisoned["w1"][0, 0] = float("inf")  # only the shard holding w1 sees it
    refs = [
        _put_update(store, tmp_path, "ok", _tensors(1, 0.01), 10),
        _put_update(store, tmp_path, "inf", poisoned, 10),
    ]
    base = common_pb2.ModelRef(model="exp1", version="r0")
    requests = [
        aggregator_pb2.AggregateRequest(
            base=base,
            updates=refs,
            new_version="r1",
            shard=aggregator_pb2.ShardSpec(shard_index=k, shard_count=2, aggregation_id="agg-bad"),
        )
        for k in range(2)
    ]
    aggregator.Aggregate(requests[0])
    with pytest.raises(grpc.RpcError) as err:
        aggregator.Aggregate(requests[1])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert "update 1: NOT_FINITE" in err.value.details()  # type: ignore[attr-defined]
    assert [v.manifest.version for v in registry.list_versions("exp1")] == ["r0"]
