"""A 300 MB model through the registry running as its own process on a real S3 server.

Both data paths (presigned URLs and the gRPC streams) in both directions; the
checksums must match and the registry's peak RSS must stay under 200 MB: the
bytes stream through it and are never held whole.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedhpc.common.config import S3StoreConfig
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.registry_client import RegistryClient, parse_model_ref
from fedhpc.testing.ports import free_port
from fedhpc.testing.processes import ServiceProcess
from fedhpc.testing.s3server import SeaweedS3Server
from fedhpc.testing.synthetic import write_synthetic_model

MODEL_MB = 300
RSS_LIMIT_MB = 200


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_300mb_model_through_both_paths_with_bounded_registry_memory(
    s3_server: SeaweedS3Server, s3_store_config: S3StoreConfig, tmp_path: Path
) -> None:
    config = s3_store_config
    source = tmp_path / "model.safetensors"
    write_synthetic_model(source, MODEL_MB)
    expected = _sha256(source)
    port = free_port()
    env = {
        "FEDHPC_STORE__KIND": "s3",
        "FEDHPC_STORE__ENDPOINT": s3_server.endpoint,
        "FEDHPC_STORE__BUCKET": config.bucket,
        "FEDHPC_STORE__ACCESS_KEY": s3_server.access_key,
        "FEDHPC_STORE__SECRET_KEY": s3_server.secret_key,
        "FEDHPC_LOG__LEVEL": "WARNING",
    }
    registry = ServiceProcess(
        ["registry", "serve", "--host", "127.0.0.1", "--port", str(port)],
        address=f"127.0.0.1:{port}",
        env=env,
        log_path=tmp_path / "registry.log",
    )
    with registry:
        idle_mb = registry.rss_mib()
        with make_channel(registry.address) as channel:
            client = RegistryClient(channel)
            client.create_model("big")
            presigned = client.push("big", source, version="presigned", transport="presigned")
            streamed = client.push("big", source, version="streamed", transport="stream")
            assert presigned.manifest.sha256 == streamed.manifest.sha256 == expected
            for version in ("presigned", "streamed"):
                for transport in ("presigned", "stream"):
                    dest = tmp_path / f"{version}-{transport}.safetensors"
                    client.pull(parse_model_ref(f"big:{version}"), dest, transport=transport)  # type: ignore[arg-type]
                    assert _sha256(dest) == expected
                    dest.unlink()
        peak_mb = registry.peak_rss_mib()
        print(f"registry RSS: idle {idle_mb:.0f} MiB, peak {peak_mb:.0f} MiB over 4x{MODEL_MB} MB moved")
        assert peak_mb < RSS_LIMIT_MB, (
            f"registry peaked at {peak_mb:.0f} MiB (limit {RSS_LIMIT_MB})\n{registry.log_tail()}"
        )
