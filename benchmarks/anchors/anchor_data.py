"""The anchors' inputs, prepared before their timer starts: full local weights in float32.

The benchmark's update files hold DELTAS (local - global). Flower's and APPFL's FedAvg
average the clients' full local weights, so each client's weights are rebuilt here as
base + delta, in float32 (the float16 biases are widened: fedhpc accumulates them in
float32 too, and a float16 sum would differ from it by more than rounding). Their weighted
mean is then the new global model directly: sum_k n_k (base + d_k) / n = base + mean delta.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


def load_base(spec: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: a.astype(np.float32, copy=False) for name, a in load_file(spec["base"]).items()}


def full_local_weights(
    spec: dict[str, Any], base: dict[str, np.ndarray]
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(num_samples, base + delta) per client, in spec order, one client loaded at a time."""
    for update in spec["updates"]:
        delta = load_file(update["path"])
        local: dict[str, np.ndarray] = {}
        for name, b in base.items():
            d = delta.pop(name)
            if d.dtype == np.float32:
                local[name] = np.add(d, b, out=d)
            else:
                local[name] = d.astype(np.float32) + b
        yield int(update["num_samples"]), local


def save_result(path: str, tensors: dict[str, np.ndarray]) -> None:
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, path)
