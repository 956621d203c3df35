"""The digits plugin: the held-out split and the Dirichlet partitions are deterministic, cover
the data exactly once and are non-IID; training and evaluation behave."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedhpc.trainer import SiteConfigError, TaskContext
from fedhpc.trainer.tasks import digits
from fedhpc.trainer.tasks.digits import (
    MIN_PARTITION_SIZE,
    DigitsHyperparameters,
    DigitsTask,
    dirichlet_partition,
    load_split,
)

NUM_SAMPLES = 1797  # sklearn's digits


def _labels() -> np.ndarray[Any, Any]:
    return digits._dataset()[1]


def _ctx(
    hp: DigitsHyperparameters, partition: int, num_partitions: int, **site: Any
) -> TaskContext[DigitsHyperparameters]:
    return TaskContext(
        site=f"site-{partition}",
        round=1,
        seed=5,
        hyperparameters=hp,
        site_config={"partition": partition, "num_partitions": num_partitions, **site},
        work_dir=Path("."),
        device=torch.device("cpu"),
    )


def test_data_is_sklearns_load_digits() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = digits._dataset()
    assert images.shape == (NUM_SAMPLES, 1, 8, 8) and images.dtype == np.float32
    assert np.array_equal(images.reshape(NUM_SAMPLES, 64) * 16, bunch.data)
    assert np.array_equal(labels, bunch.target)


def test_a_task_imports_neither_sklearn_nor_dynamo() -> None:
    # Each task may be its own process: these imports would add seconds to every one of them.
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from fedhpc.trainer import TaskContext, load_plugin\n"
        "p = load_plugin('digits'); hp = p.validate_hyperparameters({'epochs': 1})\n"
        "ctx = TaskContext(site='s', round=1, seed=0, hyperparameters=hp, work_dir=Path('.'),\n"
        "    site_config={'partition': 0, 'num_partitions': 2}, device=torch.device('cpu'))\n"
        "w = p.initial_weights(hp, 0); p.evaluate(w, ctx); p.train(w, ctx)\n"
        "print(sorted(m for m in ('sklearn', 'torch._dynamo') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_held_out_split_is_stratified_fixed_and_disjoint() -> None:
    train, test = load_split(0, 0.2)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == NUM_SAMPLES
    assert abs(len(test) - 0.2 * NUM_SAMPLES) <= 5
    labels = _labels()
    shares = np.bincount(labels[test], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(shares - 0.2) < 0.02)  # stratified
    again_train, again_test = load_split.__wrapped__(0, 0.2)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


@pytest.mark.parametrize(("alpha", "parts"), [(0.5, 4), (0.1, 8), (100.0, 3), (1.0, 1)])
def test_partitions_tile_train_and_test_splits(alpha: float, parts: int) -> None:
    train_parts, test_parts = dirichlet_partition(0, alpha, parts)
    train, test = load_split(0, 0.2)
    assert len(train_parts) == len(test_parts) == parts
    assert np.array_equal(np.sort(np.concatenate(train_parts)), train)
    assert np.array_equal(np.sort(np.concatenate(test_parts)), test)
    assert min(len(p) for p in train_parts) >= MIN_PARTITION_SIZE


def test_partitioning_is_deterministic_and_seeded() -> None:
    # __wrapped__ bypasses the cache: a fresh computation, as on another site's machine.
    first = dirichlet_partition.__wrapped__(3, 0.5, 4)
    second = dirichlet_partition.__wrapped__(3, 0.5, 4)
    other = dirichlet_partition.__wrapped__(4, 0.5, 4)
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first[0], other[0], strict=True))


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    labels = _labels()

    def max_class_share(alpha: float) -> float:
        train_parts, _ = dirichlet_partition(0, alpha, 4)
        return max(float(np.bincount(labels[p], minlength=10).max() / len(p)) for p in train_parts)

    assert max_class_share(0.1) > 0.4
    assert max_class_share(1000.0) < 0.15


def test_eval_slice_follows_the_sites_label_distribution() -> None:
    labels = _labels()
    train_parts, test_parts = dirichlet_partition(0, 0.2, 4)
    for train, test in zip(train_parts, test_parts, strict=True):
        train_share = np.bincount(labels[train], minlength=10) / len(train)
        test_share = np.bincount(labels[test], minlength=10) / max(1, len(test))
        assert np.argmax(train_share) == np.argmax(test_share)


def test_too_many_partitions_is_a_site_config_error() -> None:
    hp = DigitsTask().validate_hyperparameters({"alpha": 0.01})
    with pytest.raises(SiteConfigError, match="partitions"):
        DigitsTask().evaluate(DigitsTask().initial_weights(hp, 0), _ctx(hp, 0, 200))


@pytest.mark.parametrize(
    ("site_config", "needle"),
    [
        ({"partition": 4, "num_partitions": 4}, "out of range"),
        ({"num_partitions": 4}, "partition:"),
        ({"partition": 0, "num_partitions": 4, "shard": 1}, "shard:"),
        ({"partition": -1, "num_partitions": 4}, "partition:"),
    ],
)
def test_bad_site_config_names_the_key(site_config: dict[str, Any], needle: str) -> None:
    with pytest.raises(SiteConfigError, match=needle):
        DigitsTask().check_site_config(site_config)


def test_data_dir_is_accepted() -> None:
    DigitsTask().check_site_config({"partition": 0, "num_partitions": 2, "data_dir": "/scratch/x"})


def test_train_returns_the_same_tensors_and_counts_steps() -> None:
    plugin = DigitsTask()
    hp = plugin.validate_hyperparameters({"epochs": 2, "batch_size": 50})
    weights = plugin.initial_weights(hp, 0)
    ctx = _ctx(hp, 1, 4)
    progress: list[float] = []
    ctx.progress = lambda fraction, message: progress.append(fraction)
    threads = torch.get_num_threads()
    out = plugin.train({k: v.clone() for k, v in weights.items()}, ctx)
    assert torch.get_num_threads() == threads  # restored for in-process callers
    assert list(out.weights) == list(weights)
    assert all(
        out.weights[k].shape == weights[k].shape and out.weights[k].dtype == weights[k].dtype for k in weights
    )
    n = len(dirichlet_partition(0, 0.5, 4)[0][1])
    assert out.num_samples == n
    assert out.steps == 2 * math.ceil(n / 50)
    assert progress == [0.5, 1.0]
    assert set(out.metrics) == {"loss", "accuracy"}
    assert not all(torch.equal(out.weights[k], weights[k]) for k in weights)


def test_training_is_reproducible_for_a_task_seed() -> None:
    plugin = DigitsTask()
    hp = plugin.validate_hyperparameters({"epochs": 1})
    weights = plugin.initial_weights(hp, 0)
    first = plugin.train({k: v.clone() for k, v in weights.items()}, _ctx(hp, 0, 4))
    second = plugin.train({k: v.clone() for k, v in weights.items()}, _ctx(hp, 0, 4))
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in weights)


def test_site_evaluations_average_to_the_global_test_accuracy() -> None:
    plugin = DigitsTask()
    hp = plugin.validate_hyperparameters({"epochs": 1})
    weights = plugin.train(plugin.initial_weights(hp, 0), _ctx(hp, 0, 1)).weights
    sites = [plugin.evaluate(weights, _ctx(hp, i, 4)) for i in range(4)]
    whole = plugin.evaluate(weights, _ctx(hp, 0, 1))
    assert sum(s.num_samples for s in sites) == whole.num_samples == len(load_split(0, 0.2)[1])
    federated = sum(s.metrics["accuracy"] * s.num_samples for s in sites) / whole.num_samples
    assert federated == pytest.approx(whole.metrics["accuracy"])


def test_global_model_that_does_not_fit_is_an_error() -> None:
    plugin = DigitsTask()
    hp = plugin.validate_hyperparameters({})
    with pytest.raises(ValueError, match="does not fit the digits CNN"):
        plugin.evaluate({"w": torch.zeros(3)}, _ctx(hp, 0, 2))
