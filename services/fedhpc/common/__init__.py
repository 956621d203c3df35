"""Code that more than one fedhpc service needs: config, tensors, storage, auth, metrics, gRPC helpers."""
