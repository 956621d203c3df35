"""The fedhpc gRPC API: generated stubs under ``fedhpc.api.v1`` (source: protos/fedhpc/v1)."""
