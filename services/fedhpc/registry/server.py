"""Wires the Registry servicer into the shared gRPC server builder."""

from __future__ import annotations

from fedhpc.api.v1 import registry_pb2_grpc
from fedhpc.common.config import FedhpcConfig
from fedhpc.common.grpc_server import GrpcServer, ServiceBinding
from fedhpc.common.logging import get_logger
from fedhpc.common.storage import ObjectStore, make_store
from fedhpc.registry.service import METHOD_ROLES, SERVICE_NAME, RegistryService

log = get_logger(__name__)


def build_registry_server(config: FedhpcConfig, store: ObjectStore | None = None) -> GrpcServer:
    """A registry server (not yet started) over config.store, or over the given store."""
    store = store if store is not None else make_store(config.store)
    servicer = RegistryService(store, config.registry)
    binding = ServiceBinding(SERVICE_NAME, registry_pb2_grpc.add_RegistryServicer_to_server, servicer)
    return GrpcServer(config.registry.server, [binding], component="registry", method_roles=METHOD_ROLES)


def serve(config: FedhpcConfig) -> None:
    """Run the registry until SIGTERM/SIGINT."""
    store = make_store(config.store)
    log.info("registry store ready", extra={"store": store.kind})
    try:
        build_registry_server(config, store).serve_forever()
    finally:
        store.close()
