"""The model registry service: immutable, content-checked model versions over an object store."""
