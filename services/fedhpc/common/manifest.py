"""Model-version manifests: built from a verified safetensors blob, stored as manifest.json.

The JSON form is the protobuf JSON mapping of ``fedhpc.v1.Manifest`` with the
proto field names, so the registry, the CLI and any other language read the
same document.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from fedhpc.api.v1 import common_pb2
from fedhpc.common.tensors import VerifiedBlob

# Model names and version ids become object-key segments and CLI arguments.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1-128 characters from [A-Za-z0-9._-], starting with a letter or digit"


def check_name(kind: str, value: str) -> str | None:
    """None when value is a valid model/version/alias name, else a message naming the problem."""
    if not value:
        return f"{kind} is empty"
    if not NAME_PATTERN.match(value):
        return f"{kind} {value!r} is invalid: use {NAME_RULE}"
    return None


def timestamp_now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def timestamp_at(seconds: float | None) -> Timestamp:
    """A Timestamp for epoch seconds; unset (zero) for None or 0."""
    stamp = Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def tensor_infos(blob: VerifiedBlob) -> list[common_pb2.TensorInfo]:
    """Manifest tensor records (file order) for a verified blob."""
    return [
        common_pb2.TensorInfo(
            name=entry.name,
            dtype=entry.dtype,
            shape=list(entry.shape),
            sha256=blob.tensor_sha256.get(entry.name, ""),
            data_offset=entry.begin,
            nbytes=entry.nbytes,
        )
        for entry in blob.header.entries
    ]


def manifest_for_blob(
    blob: VerifiedBlob,
    *,
    model: str,
    version: str,
    parent: str = "",
    round_number: int = 0,
    algorithm: str = "init",
    kind: common_pb2.BlobKind.ValueType = common_pb2.BLOB_KIND_MODEL,
    producer: str = "",
    metrics: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    compression: str = "",
) -> common_pb2.Manifest:
    return common_pb2.Manifest(
        model=model,
        version=version,
        parent=parent,
        round=round_number,
        algorithm=algorithm,
        kind=kind,
        tensors=tensor_infos(blob),
        producer=producer,
        metrics=dict(metrics or {}),
        size_bytes=blob.size,
        sha256=blob.sha256,
        compression=compression,
        labels=dict(labels or {}),
    )


def manifest_disagreements(manifest: common_pb2.Manifest, blob: VerifiedBlob) -> list[str]:
    """Every way the manifest contradicts the blob it describes (empty list = consistent).

    The manifest must state the blob's size and sha256. Its tensor list may be
    empty (the registry then records the blob's own), otherwise it must match
    the safetensors header exactly; per-tensor sha256 is checked where given.
    """
    problems: list[str] = []
    if manifest.size_bytes != blob.size:
        problems.append(f"size_bytes {manifest.size_bytes} disagrees with the uploaded {blob.size} bytes")
    if manifest.sha256.lower() != blob.sha256:
        problems.append(
            f"checksum mismatch: sha256 of the uploaded weights is {blob.sha256}, "
            f"the manifest says {manifest.sha256 or '(empty)'}"
        )
    if not manifest.tensors:
        return problems
    stated = {t.name: t for t in manifest.tensors}
    if len(stated) != len(manifest.tensors):
        problems.append("manifest lists a tensor more than once")
    actual = {entry.name: entry for entry in blob.header.entries}
    for name in sorted(set(stated) - set(actual)):
        problems.append(f"tensor {name!r} is in the manifest but not in the uploaded file")
    for name in sorted(set(actual) - set(stated)):
        problems.append(f"tensor {name!r} is in the uploaded file but not in the manifest")
    for name in sorted(set(stated) & set(actual)):
        info, entry = stated[name], actual[name]
        if info.dtype != entry.dtype:
            problems.append(f"tensor {name!r} dtype {info.dtype} disagrees with the file's {entry.dtype}")
        if tuple(info.shape) != entry.shape:
            problems.append(
                f"tensor {name!r} shape {list(info.shape)} disagrees with the file's {list(entry.shape)}"
            )
        if info.data_offset and info.data_offset != entry.begin:
            problems.append(
                f"tensor {name!r} data_offset {info.data_offset} disagrees with the file's {entry.begin}"
            )
        if info.nbytes and info.nbytes != entry.nbytes:
            problems.append(f"tensor {name!r} nbytes {info.nbytes} disagrees with the file's {entry.nbytes}")
        if info.sha256 and info.sha256.lower() != blob.tensor_sha256.get(name, info.sha256.lower()):
            problems.append(f"tensor {name!r} sha256 disagrees with the uploaded bytes")
    return problems


def manifest_to_json(manifest: common_pb2.Manifest) -> bytes:
    text = json_format.MessageToJson(manifest, preserving_proto_field_name=True, indent=1, sort_keys=True)
    return text.encode()


def manifest_from_json(data: bytes | str) -> common_pb2.Manifest:
    manifest = common_pb2.Manifest()
    json_format.Parse(data, manifest)
    return manifest
