"""Synthetic checkpoints for tests and benchmarks: about 60 tensors of mixed shapes and dtypes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedhpc.common.tensors import VerifiedBlob, write_safetensors_file


def synthetic_tensors(megabytes: float, *, layers: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """`layers` float32 weight matrices of varying shapes plus float16 biases, ~megabytes in all."""
    rng = np.random.default_rng(seed)
    budget = int(megabytes * (1 << 20))
    # Uneven layer sizes (weights 1..3) so tensors differ in shape, as in real models.
    weights = [1 + (i % 3) for i in range(layers)]
    tensors: dict[str, np.ndarray] = {}
    for i, share in enumerate(weights):
        cols = (256, 512, 1024)[i % 3]
        rows = max(1, budget * share // sum(weights) // (4 * cols))
        tensors[f"layers.{i}.weight"] = rng.standard_normal((rows, cols), dtype=np.float32)
        tensors[f"layers.{i}.bias"] = rng.standard_normal(cols).astype(np.float16)
    return tensors


def write_synthetic_model(path: Path, megabytes: float, *, layers: int = 30, seed: int = 0) -> VerifiedBlob:
    return write_safetensors_file(path, synthetic_tensors(megabytes, layers=layers, seed=seed))
