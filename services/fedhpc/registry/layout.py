"""Where the registry keeps things in the object store (the source of truth).

models/<model>/model.json                      model metadata
models/<model>/<version>/weights.safetensors   the weights
models/<model>/<version>/upload.json           reservation while uncommitted (+ what the
                                               registry verified when bytes came through it)
models/<model>/<version>/manifest.json         written last: its presence IS the commit
aliases/<model>/<alias>.json                   alias -> version
updates/<experiment>/...   state/...           blobs reachable through PresignBlob
"""

from __future__ import annotations

MODELS = "models/"
ALIASES = "aliases/"
BLOB_PREFIXES = ("updates/", "state/")


def model_prefix(model: str) -> str:
    return f"{MODELS}{model}/"


def model_meta_key(model: str) -> str:
    return f"{MODELS}{model}/model.json"


def version_prefix(model: str, version: str) -> str:
    return f"{MODELS}{model}/{version}/"


def weights_key(model: str, version: str) -> str:
    return f"{MODELS}{model}/{version}/weights.safetensors"


def manifest_key(model: str, version: str) -> str:
    return f"{MODELS}{model}/{version}/manifest.json"


def upload_key(model: str, version: str) -> str:
    return f"{MODELS}{model}/{version}/upload.json"


def alias_prefix(model: str) -> str:
    return f"{ALIASES}{model}/"


def alias_key(model: str, alias: str) -> str:
    return f"{ALIASES}{model}/{alias}.json"
