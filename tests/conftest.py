"""Fixtures every test directory can use: object stores on a directory and on a real S3 server.

The S3 server (SeaweedFS ``weed mini``) starts once per session, on the first test
that asks for it, on free loopback ports; each test gets its own bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedhpc.common.config import S3StoreConfig
from fedhpc.common.storage import FileObjectStore, ObjectStore, S3ObjectStore
from fedhpc.testing.s3server import SeaweedS3Server, SeaweedStartError, WeedNotFoundError


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    # Under pytest's temp root, so the weed log of a failed run is still there to read.
    server = SeaweedS3Server(workdir=tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except WeedNotFoundError as exc:
        # Never a skip: a missing server must not turn the S3 half of the suite green.
        pytest.fail(str(exc), pytrace=False)
    except SeaweedStartError as exc:
        pytest.fail(f"SeaweedFS did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_store_config(s3_server: SeaweedS3Server) -> Iterator[S3StoreConfig]:
    """Config for a fresh bucket (created by the store); the bucket is deleted afterwards."""
    bucket = f"fedhpc-test-{uuid.uuid4().hex[:12]}"
    yield s3_server.store_config(bucket)
    s3_server.delete_bucket(bucket)


@pytest.fixture
def s3_store(s3_store_config: S3StoreConfig) -> Iterator[S3ObjectStore]:
    store = S3ObjectStore(s3_store_config)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[FileObjectStore]:
    store = FileObjectStore(tmp_path / "store")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def object_store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each backend in turn, for tests of the ObjectStore contract."""
    store: ObjectStore = request.getfixturevalue(f"{request.param}_store")
    return store
