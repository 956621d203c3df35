"""Build the configured ObjectStore."""

from __future__ import annotations

from fedhpc.common.config import FileStoreConfig, S3StoreConfig
from fedhpc.common.storage.base import ObjectStore
from fedhpc.common.storage.file import FileObjectStore
from fedhpc.common.storage.s3 import S3ObjectStore


def make_store(config: FileStoreConfig | S3StoreConfig) -> ObjectStore:
    """The backend config.kind names; an S3 store checks (and creates) its bucket here."""
    if isinstance(config, FileStoreConfig):
        return FileObjectStore(config.root)
    if isinstance(config, S3StoreConfig):
        return S3ObjectStore(config)
    raise TypeError(f"unknown store configuration: {type(config).__name__}")
