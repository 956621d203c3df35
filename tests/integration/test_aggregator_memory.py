"""A 100M-parameter model (400 MB, ~60 tensors) aggregated by the aggregator running as its own
process next to a registry process, both on a real S3 server, from N=4 and from N=16 updates.

The aggregator streams: its peak RSS above idle must stay under one model size whatever N.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhpc.api.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2
from fedhpc.common.config import S3StoreConfig
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import S3ObjectStore
from fedhpc.testing.ports import free_ports
from fedhpc.testing.processes import ServiceProcess
from fedhpc.testing.s3server import SeaweedS3Server
from fedhpc.testing.synthetic import write_synthetic_model

PARAMS = 100_000_000
MODEL_MB = PARAMS * 4 / (1 << 20)


@pytest.mark.slow
def test_aggregator_memory_is_flat_in_the_number_of_updates(
    s3_server: SeaweedS3Server, s3_store_config: S3StoreConfig, tmp_path: Path
) -> None:
    env = {
        "FEDHPC_STORE__KIND": "s3",
        "FEDHPC_STORE__ENDPOINT": s3_server.endpoint,
        "FEDHPC_STORE__BUCKET": s3_store_config.bucket,
        "FEDHPC_STORE__ACCESS_KEY": s3_server.access_key,
        "FEDHPC_STORE__SECRET_KEY": s3_server.secret_key,
        "FEDHPC_LOG__LEVEL": "WARNING",
    }
    registry_port, aggregator_port = free_ports(2)
    registry = ServiceProcess(
        ["registry", "serve", "--port", str(registry_port)],
        address=f"127.0.0.1:{registry_port}",
        env=env,
        log_path=tmp_path / "registry.log",
    )
    aggregator = ServiceProcess(
        ["aggregator", "serve", "--port", str(aggregator_port), "--registry", f"127.0.0.1:{registry_port}"],
        address=f"127.0.0.1:{aggregator_port}",
        env={**env, "FEDHPC_AGGREGATOR__SPOOL_DIR": str(tmp_path)},
        log_path=tmp_path / "aggregator.log",
    )
    store = S3ObjectStore(s3_store_config)
    with registry, aggregator, make_channel(registry.address) as rc, make_channel(aggregator.address) as ac:
        client = RegistryClient(rc)
        stub = aggregator_pb2_grpc.AggregatorStub(ac)
        client.create_model("big")
        base_path = tmp_path / "base.safetensors"
        base = write_synthetic_model(base_path, MODEL_MB, seed=0)
        assert len(base.header.entries) >= 55
        client.push("big", base_path, version="r0", verified=base)
        refs = []
        for i in range(16):
            path = tmp_path / "update.safetensors"
            blob = write_synthetic_model(path, MODEL_MB, seed=i + 1)
            key = f"updates/big/r1/site{i}.safetensors"
            store.put_file(key, path)
            refs.append(
                aggregator_pb2.UpdateRef(
                    blob=common_pb2.BlobRef(object_key=key, sha256=blob.sha256, size_bytes=blob.size),
                    num_samples=100 + 37 * i,
                    site=f"site{i}",
                )
            )
        path.unlink()
        figures = {}
        for n in (4, 16):
            idle = aggregator.rss_mib()
            aggregator.reset_peak()
            response = stub.Aggregate(
                aggregator_pb2.AggregateRequest(
                    base=common_pb2.ModelRef(model="big", version="r0"),
                    updates=refs[:n],
                    new_version=f"n{n}",
                    round=1,
                ),
                timeout=600,
            )
            peak = aggregator.peak_rss_mib()
            assert all(o.code == aggregator_pb2.UPDATE_OUTCOME_CODE_ACCEPTED for o in response.outcomes)
            assert [t.name for t in response.version.manifest.tensors] == base.header.names
            figures[n] = (idle, peak, response.timing.total_s)
        for n, (idle, peak, seconds) in figures.items():
            print(
                f"N={n}: aggregator RSS idle {idle:.0f} MiB, peak {peak:.0f} MiB, "
                f"+{peak - idle:.0f} MiB over idle (model {MODEL_MB:.0f} MiB), aggregation {seconds:.1f} s"
            )
            assert peak - idle < MODEL_MB, aggregator.log_tail()
    store.close()
