from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedhpc.common.manifest import (
    check_name,
    manifest_disagreements,
    manifest_for_blob,
    manifest_from_json,
    manifest_to_json,
)
from fedhpc.common.tensors import VerifiedBlob, write_safetensors_file


@pytest.fixture
def blob(tmp_path: Path) -> VerifiedBlob:
    return write_safetensors_file(
        tmp_path / "w.safetensors",
        {"a": np.ones((2, 3), dtype=np.float32), "b": np.arange(4, dtype=np.int64)},
    )


def test_manifest_for_blob_records_every_tensor(blob: VerifiedBlob) -> None:
    manifest = manifest_for_blob(
        blob, model="m", version="v1", parent="v0", round_number=3, metrics={"acc": 0.9}
    )
    assert [t.name for t in manifest.tensors] == ["a", "b"]
    assert manifest.tensors[0].dtype == "F32" and list(manifest.tensors[0].shape) == [2, 3]
    assert manifest.tensors[1].nbytes == 32
    assert manifest.size_bytes == blob.size and manifest.sha256 == blob.sha256
    assert manifest_disagreements(manifest, blob) == []


def test_json_round_trip_uses_proto_field_names(blob: VerifiedBlob) -> None:
    manifest = manifest_for_blob(blob, model="m", version="v1", metrics={"acc": 0.5})
    text = manifest_to_json(manifest)
    assert b'"size_bytes"' in text and b'"data_offset"' in text
    assert manifest_from_json(text) == manifest


def test_disagreements_name_each_problem(blob: VerifiedBlob) -> None:
    manifest = manifest_for_blob(blob, model="m", version="v1")
    manifest.size_bytes += 1
    manifest.sha256 = "f" * 64
    manifest.tensors[0].shape[:] = [3, 2]
    manifest.tensors[1].dtype = "I32"
    manifest.tensors[1].sha256 = "0" * 64
    extra = manifest.tensors.add()
    extra.name = "ghost"
    problems = "\n".join(manifest_disagreements(manifest, blob))
    assert "size_bytes" in problems and "checksum mismatch" in problems
    assert "'a' shape [3, 2]" in problems and "'b' dtype I32" in problems
    assert "'b' sha256" in problems and "'ghost' is in the manifest but not in the uploaded file" in problems


def test_missing_tensor_in_manifest_is_reported(blob: VerifiedBlob) -> None:
    manifest = manifest_for_blob(blob, model="m", version="v1")
    del manifest.tensors[0]
    assert manifest_disagreements(manifest, blob) == [
        "tensor 'a' is in the uploaded file but not in the manifest"
    ]


def test_empty_tensor_list_is_accepted(blob: VerifiedBlob) -> None:
    manifest = manifest_for_blob(blob, model="m", version="v1")
    del manifest.tensors[:]
    assert manifest_disagreements(manifest, blob) == []


@pytest.mark.parametrize("name", ["r0", "exp-1.v2_x", "A" * 128])
def test_valid_names(name: str) -> None:
    assert check_name("version", name) is None


@pytest.mark.parametrize("name", ["", "-x", "a/b", "..", "a b", "A" * 129, "é"])
def test_invalid_names_are_explained(name: str) -> None:
    problem = check_name("version", name)
    assert problem is not None and problem.startswith("version")
