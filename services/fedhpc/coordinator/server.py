"""Wires the Coordinator servicer and its engine into the shared gRPC server builder."""

from __future__ import annotations

from fedhpc.api.v1 import aggregator_pb2_grpc, coordinator_pb2_grpc
from fedhpc.common.config import FedhpcConfig
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.grpc_server import GrpcServer, ServiceBinding
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import ObjectStore, make_store
from fedhpc.coordinator.engine import Engine
from fedhpc.coordinator.service import METHOD_ROLES, SERVICE_NAME, CoordinatorService
from fedhpc.coordinator.state import StateStore


def _secret(value: object) -> str | None:
    return value.get_secret_value() if value is not None else None  # type: ignore[attr-defined]


def build_coordinator(config: FedhpcConfig) -> tuple[GrpcServer, Engine, StateStore, ObjectStore | None]:
    """The server (not started), its engine (not started), state and -- for a file store --
    the store the trainers' local paths point into."""
    settings = config.coordinator
    state = StateStore(settings.data_dir / "coordinator.db")
    registry = RegistryClient(
        make_channel(
            settings.registry_address,
            token=_secret(settings.registry_token),
            tls_ca_file=settings.registry_tls_ca,
        )
    )
    aggregator = aggregator_pb2_grpc.AggregatorStub(
        make_channel(
            settings.aggregator_address,
            token=_secret(settings.aggregator_token),
            tls_ca_file=settings.aggregator_tls_ca,
        )
    )
    # Only a file store gives trainers a local path; with S3 they use presigned URLs.
    store = make_store(config.store) if config.store.kind == "file" else None
    engine = Engine(settings, state, registry, aggregator, config.store, store)
    servicer = CoordinatorService(state, engine)
    binding = ServiceBinding(SERVICE_NAME, coordinator_pb2_grpc.add_CoordinatorServicer_to_server, servicer)
    server = GrpcServer(settings.server, [binding], component="coordinator", method_roles=METHOD_ROLES)
    return server, engine, state, store


def serve(config: FedhpcConfig) -> None:
    """Run the coordinator until SIGTERM/SIGINT; running experiments resume on the next start."""
    server, engine, state, store = build_coordinator(config)
    engine.start()
    try:
        server.serve_forever()
    finally:
        engine.stop()
        state.close()
        if store is not None:
            store.close()
