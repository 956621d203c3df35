"""Blob storage behind one interface: a directory ("file") or any S3 service ("s3")."""

from fedhpc.common.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    PresignedPut,
    StorageError,
    validate_key,
)
from fedhpc.common.storage.factory import make_store
from fedhpc.common.storage.file import FileObjectStore
from fedhpc.common.storage.s3 import S3ObjectStore

__all__ = [
    "FileObjectStore",
    "InvalidKey",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PresignedPut",
    "S3ObjectStore",
    "StorageError",
    "make_store",
    "validate_key",
]
