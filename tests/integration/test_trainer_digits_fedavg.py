"""The digits workload the coordinator runs: 4 non-IID sites (Dirichlet alpha 0.5), 20 rounds of
FedAvg, with the default hyperparameters, must reach >= 0.93 held-out accuracy.

Every site-round goes through the real trainer path (``run_task`` with staged ``path`` models
and updates, safetensors files, checksums); only the aggregation is done here, by hand: the
sample-weighted mean of the deltas added to the global model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fedhpc.common.tensors import write_safetensors_file
from fedhpc.trainer import make_initial_weights, run_task

SITES = 4
ROUNDS = 20
ALPHA = 0.5
TARGET_ACCURACY = 0.93
HYPERPARAMETERS = {"alpha": ALPHA, "seed": 0}  # everything else: the plugin's defaults


def _stage(store: Path, round_number: int, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    path = store / "models" / "digits-fedavg" / f"r{round_number}" / "weights.safetensors"
    path.parent.mkdir(parents=True)
    blob = write_safetensors_file(path, weights)
    return {
        "model": "digits-fedavg",
        "version": f"r{round_number}",
        "sha256": blob.sha256,
        "size_bytes": blob.size,
        "path": str(path),
    }


def _task(
    store: Path, round_number: int, site: int, model: dict[str, Any], mode: str = "train"
) -> dict[str, Any]:
    task_id = f"digits-fedavg-r{round_number}-s{site}-{mode}"
    task: dict[str, Any] = {
        "experiment_id": "digits-fedavg",
        "round": round_number,
        "task_id": task_id,
        "site": f"site-{site}",
        "mode": mode,
        "plugin": {"name": "digits", "hyperparameters": HYPERPARAMETERS},
        "model": model,
        "site_config": {"partition": site, "num_partitions": SITES},
        "dispatched_at": time.time(),
        "seed": round_number,
    }
    if mode == "train":
        key = f"updates/digits-fedavg/r{round_number}/{task_id}.safetensors"
        task["update"] = {"object_key": key, "path": str(store / key)}
    return task


def _ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result["error"]
    return result


def _fedavg(
    store: Path, weights: dict[str, torch.Tensor], results: list[dict[str, Any]]
) -> dict[str, torch.Tensor]:
    total = sum(r["num_samples"] for r in results)
    mean = {name: torch.zeros_like(t) for name, t in weights.items()}
    for r in results:
        delta = safetensors.torch.load_file(str(store / r["update"]["object_key"]))
        for name in mean:
            mean[name] += delta[name] * (r["num_samples"] / total)
    return {name: weights[name] + mean[name] for name in weights}


def _federated_accuracy(results: list[dict[str, Any]]) -> float:
    samples = sum(r["eval_samples"] for r in results)
    return float(sum(r["metrics"]["eval_accuracy"] * r["eval_samples"] for r in results) / samples)


def test_fedavg_on_four_non_iid_sites_reaches_target_accuracy(tmp_path: Path) -> None:
    store = tmp_path / "store"
    weights = make_initial_weights("digits", HYPERPARAMETERS, seed=0)
    began = time.perf_counter()
    history = []
    for round_number in range(1, ROUNDS + 1):
        model = _stage(store, round_number - 1, weights)
        results = [_ok(run_task(_task(store, round_number, site, model))) for site in range(SITES)]
        # Each site evaluated the global model it received: round r reports model r-1.
        history.append(_federated_accuracy(results))
        weights = _fedavg(store, weights, results)
    final_model = _stage(store, ROUNDS, weights)
    final = [
        _ok(run_task(_task(store, ROUNDS + 1, site, final_model, mode="evaluate"))) for site in range(SITES)
    ]
    accuracy = _federated_accuracy(final)
    elapsed = time.perf_counter() - began
    print(
        f"digits FedAvg: {SITES} sites, alpha {ALPHA}, {ROUNDS} rounds: held-out accuracy {accuracy:.4f} "
        f"in {elapsed:.1f} s; per round: {', '.join(f'{a:.3f}' for a in history)}"
    )
    assert accuracy >= TARGET_ACCURACY
    assert history[0] < 0.3  # it really learned: the initial model is at chance level
