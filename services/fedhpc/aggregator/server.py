"""Wires the Aggregator servicer into the shared gRPC server builder."""

from __future__ import annotations

from fedhpc.aggregator.service import SERVICE_NAME, AggregatorService
from fedhpc.api.v1 import aggregator_pb2_grpc
from fedhpc.common.config import FedhpcConfig
from fedhpc.common.grpc_client import make_channel
from fedhpc.common.grpc_server import GrpcServer, ServiceBinding
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import ObjectStore, make_store


def build_aggregator_server(config: FedhpcConfig, store: ObjectStore | None = None) -> GrpcServer:
    """An aggregator server (not yet started) over config.store, talking to the registry at
    config.aggregator.registry_address."""
    settings = config.aggregator
    store = store if store is not None else make_store(config.store)
    token = settings.registry_token.get_secret_value() if settings.registry_token else None
    channel = make_channel(settings.registry_address, token=token, tls_ca_file=settings.registry_tls_ca)
    servicer = AggregatorService(store, RegistryClient(channel), settings)
    binding = ServiceBinding(SERVICE_NAME, aggregator_pb2_grpc.add_AggregatorServicer_to_server, servicer)
    return GrpcServer(settings.server, [binding], component="aggregator")


def serve(config: FedhpcConfig) -> None:
    """Run the aggregator until SIGTERM/SIGINT."""
    store = make_store(config.store)
    try:
        build_aggregator_server(config, store).serve_forever()
    finally:
        store.close()
