"""APPFL's FedAvg aggregator (anchors venv), one fresh process per run.

    aggregator = appfl.algorithm.aggregator.FedAvgAggregator(
        model, DictConfig({"client_weights_mode": "sample_size"}), None)
    aggregator.set_client_sample_size(client_id, num_samples)     # per client
    new_global = aggregator.aggregate({client_id: state_dict})     # timed

APPFL averages full local models: with a model given, its global state starts as a copy of
the model's state dict (the base), and aggregate() adds sum_k p_k (local_k - global) to it,
loads the result into the model and returns a copy. The model here is a torch module whose
parameters are the base tensors, under the checkpoint's names; the local models are torch
state dicts (float32 tensors sharing memory with anchor_data's arrays), built before the
timer. Its defaults are kept (optimize_memory=True). The result goes to spec "out".
"""

from __future__ import annotations

from typing import Any

import appfl
import numpy as np
import torch
from anchor_data import full_local_weights, load_base, save_result
from appfl.algorithm.aggregator import FedAvgAggregator
from omegaconf import DictConfig
from runner_common import emit, load_spec, measure


def model_with(tensors: dict[str, np.ndarray]) -> torch.nn.Module:
    """A module whose named_parameters() are exactly `tensors` (dotted names become submodules)."""
    root = torch.nn.Module()
    for name, array in tensors.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            child = module._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                module.add_module(part, child)
            module = child
        module.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(array), requires_grad=False))
    return root


def main() -> None:
    spec = load_spec()
    base = load_base(spec)
    model = model_with(base)
    aggregator = FedAvgAggregator(model, DictConfig({"client_weights_mode": "sample_size"}), None)
    local_models: dict[int, dict[str, torch.Tensor]] = {}
    for client_id, (n, local) in enumerate(full_local_weights(spec, base)):
        aggregator.set_client_sample_size(client_id, n)
        local_models[client_id] = {name: torch.from_numpy(a) for name, a in local.items()}
    del base
    new_global, measurement = measure(
        lambda: aggregator.aggregate(local_models), warmups=spec.get("warmup", 0)
    )
    save_result(spec["out"], {k: v.numpy() for k, v in new_global.items()})
    extra: dict[str, Any] = {
        "appfl": appfl.__version__,
        "torch": torch.__version__,
        "optimize_memory": bool(aggregator.optimize_memory),
        "client_weights_mode": aggregator.client_weights_mode,
    }
    emit("appfl", measurement, extra)


if __name__ == "__main__":
    main()
