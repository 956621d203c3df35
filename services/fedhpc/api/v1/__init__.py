"""Generated gRPC stubs for fedhpc v1 (do not edit: run `make protos`)."""
