"""The built-in ``digits`` task: a small CNN on scikit-learn's 8x8 handwritten digits.

The data set (1797 images, 10 classes) ships inside scikit-learn, so the task needs no
download and no data directory: it is the demo and test workload of the whole system.

Data layout, identical on every site because every split is seeded by the ``seed``
hyperparameter (not the task's seed, which changes between tasks):

* a fixed, stratified held-out test set (``test_fraction``, 20%);
* the rest split into ``num_partitions`` non-IID training partitions: for each class, the
  share each partition gets is drawn from Dirichlet(``alpha``), redrawn until every partition
  has at least ``MIN_PARTITION_SIZE`` training samples;
* each site evaluates on its slice of the held-out test set, cut with the same per-class
  shares as its training partition, so its evaluation data follows its own label distribution.
  The slices tile the test set, so the sample-weighted mean of all sites' ``eval_accuracy``
  (the federated evaluation) is exactly the global model's accuracy on the whole test set.

A site takes partition ``site_config["partition"]`` of ``site_config["num_partitions"]``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional

from fedhpc.trainer.plugins import (
    EvalOutput,
    SiteConfigError,
    TaskContext,
    TaskPlugin,
    TrainOutput,
    validate_model,
)

__all__ = [
    "MIN_PARTITION_SIZE",
    "DigitsCNN",
    "DigitsHyperparameters",
    "DigitsSiteConfig",
    "DigitsTask",
    "SiteData",
    "dirichlet_partition",
    "load_split",
    "site_data",
]

MIN_PARTITION_SIZE = 10
_MAX_DRAWS = 1000
NUM_CLASSES = 10


class DigitsHyperparameters(BaseModel):
    """Hyperparameters of the ``digits`` task (every site of an experiment must use the same
    ``seed``, ``alpha`` and ``test_fraction``: they define the data split)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        default=0.5, gt=0, description="Dirichlet concentration of the label skew; smaller = more non-IID."
    )
    epochs: int = Field(default=3, ge=1, le=1000, description="Local epochs per round.")
    batch_size: int = Field(default=32, ge=1, le=65536, description="Local minibatch size.")
    lr: float = Field(default=0.05, gt=0, le=10, description="SGD learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum (reset every round).")
    seed: int = Field(default=0, ge=0, description="Seed of the held-out split and the partitioning.")
    test_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Share of the data held out for evaluation."
    )


class DigitsSiteConfig(BaseModel):
    """The site_config keys the ``digits`` task reads."""

    model_config = ConfigDict(extra="forbid")

    partition: int = Field(ge=0, description="This site's partition index, 0 <= partition < num_partitions.")
    num_partitions: int = Field(ge=1, description="How many partitions the training data is split into.")
    data_dir: str | None = Field(
        default=None, description="Accepted for uniformity; digits needs no data files."
    )

    @model_validator(mode="after")
    def _index_in_range(self) -> DigitsSiteConfig:
        if self.partition >= self.num_partitions:
            raise ValueError(
                f"partition {self.partition} is out of range for num_partitions={self.num_partitions}"
            )
        return self


# -- data ------------------------------------------------------------------------------------------


def _bundled_csv() -> Path | None:
    """scikit-learn's copy of the digits CSV, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@functools.cache
def _dataset() -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.int64]]]:
    """(images N x 1 x 8 x 8 scaled to 0..1, labels N): the 1797 digits of ``load_digits()``.

    The CSV that ``load_digits`` reads is read directly: importing scikit-learn costs a
    second or more, paid by every task when each task is its own process. Should a future
    scikit-learn move the file, ``load_digits`` is the fallback.
    """
    csv = _bundled_csv()
    if csv is not None:
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    # Pixel values are 0..16; scale to 0..1 and add the channel axis the CNN expects.
    images = (np.asarray(pixels, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return images, np.asarray(labels, dtype=np.int64)


@functools.cache
def load_split(
    seed: int, test_fraction: float
) -> tuple[np.ndarray[Any, np.dtype[np.int64]], np.ndarray[Any, np.dtype[np.int64]]]:
    """(train indices, test indices): a stratified split, fixed by ``seed``: every class gives
    round(test_fraction x its count) of its samples, chosen at random, to the test set."""
    _, labels = _dataset()
    rng = np.random.default_rng([seed, 0x7E57])
    test = []
    for cls in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[: round(test_fraction * len(members))])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx).astype(np.int64)
    return train_idx, test_idx


def _class_shares(
    labels: np.ndarray[Any, Any], num_partitions: int, alpha: float, rng: np.random.Generator
) -> np.ndarray[Any, Any]:
    """A (classes x partitions) matrix of shares, each row a Dirichlet(alpha) draw, redrawn until
    every partition gets at least MIN_PARTITION_SIZE samples of ``labels``."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    for _ in range(_MAX_DRAWS):
        shares = rng.dirichlet(np.full(num_partitions, alpha), size=NUM_CLASSES)
        sizes = _cut_sizes(counts, shares).sum(axis=0)
        if sizes.min() >= MIN_PARTITION_SIZE:
            return shares
    raise ValueError(
        f"cannot give each of {num_partitions} partitions {MIN_PARTITION_SIZE} samples with alpha={alpha} "
        f"in {_MAX_DRAWS} draws; use fewer partitions or a larger alpha"
    )


def _cut_sizes(counts: np.ndarray[Any, Any], shares: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per class and partition, how many samples a split by ``shares`` gives (rows sum to counts)."""
    bounds = np.floor(np.cumsum(shares, axis=1) * counts[:, None]).astype(np.int64)
    bounds[:, -1] = counts  # float rounding must not drop the last sample of a class
    return np.diff(bounds, axis=1, prepend=0)


def _split_by_shares(
    indices: np.ndarray[Any, Any],
    labels: np.ndarray[Any, Any],
    shares: np.ndarray[Any, Any],
    rng: np.random.Generator,
) -> list[np.ndarray[Any, np.dtype[np.int64]]]:
    """Split ``indices`` (with their ``labels``) into len(shares[0]) parts, class by class."""
    num_partitions = shares.shape[1]
    parts: list[list[np.ndarray[Any, Any]]] = [[] for _ in range(num_partitions)]
    sizes = _cut_sizes(np.bincount(labels, minlength=NUM_CLASSES), shares)
    for cls in range(NUM_CLASSES):
        members = rng.permutation(indices[labels == cls])
        for p, chunk in enumerate(np.split(members, np.cumsum(sizes[cls])[:-1])):
            parts[p].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]


@functools.cache
def dirichlet_partition(
    seed: int, alpha: float, num_partitions: int, test_fraction: float = 0.2
) -> tuple[tuple[np.ndarray[Any, np.dtype[np.int64]], ...], tuple[np.ndarray[Any, np.dtype[np.int64]], ...]]:
    """(train parts, test parts): data set indices per partition, the same on every machine.

    Train parts tile the training split and test parts tile the held-out split; partition i
    gets the same per-class shares of both.
    """
    _, labels = _dataset()
    train, test = load_split(seed, test_fraction)
    # A generator of its own, seeded by all that defines the partitioning: deterministic and
    # independent of any other randomness in the process.
    rng = np.random.default_rng([seed, num_partitions, round(alpha * 1_000_000)])
    shares = _class_shares(labels[train], num_partitions, alpha, rng)
    train_parts = _split_by_shares(train, labels[train], shares, rng)
    test_parts = _split_by_shares(test, labels[test], shares, rng)
    return tuple(train_parts), tuple(test_parts)


@dataclass(frozen=True)
class SiteData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


def site_data(hp: DigitsHyperparameters, config: DigitsSiteConfig) -> SiteData:
    """The site's training partition and its slice of the held-out set, as CPU tensors."""
    images, labels = _dataset()
    train_parts, test_parts = dirichlet_partition(hp.seed, hp.alpha, config.num_partitions, hp.test_fraction)
    train, test = train_parts[config.partition], test_parts[config.partition]
    return SiteData(
        x_train=torch.from_numpy(images[train]),
        y_train=torch.from_numpy(labels[train]),
        x_eval=torch.from_numpy(images[test]),
        y_eval=torch.from_numpy(labels[test]),
    )


# -- model -------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, two linear layers: ~38k parameters (float32).

    No batch norm: its running statistics do not average well across non-IID sites.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.relu(self.conv1(x))
        x = functional.max_pool2d(functional.relu(self.conv2(x)), 2)
        x = functional.relu(self.fc1(x.flatten(1)))
        out: torch.Tensor = self.fc2(x)
        return out


def _model_from(weights: dict[str, torch.Tensor], device: torch.device) -> DigitsCNN:
    model = DigitsCNN()
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"the global model does not fit the digits CNN: {exc}") from exc
    return model.to(device)


def _cpu_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}


@contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread while training: four concurrent sites on two cores must not fight over
    them (and tiny tensors gain nothing from more). Restores the setting for in-process callers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _MomentumSGD:
    """SGD with momentum, as torch.optim.SGD computes it (no dampening, no weight decay).

    Written out because constructing any torch.optim optimizer imports torch._dynamo, which
    adds seconds to the start of every task process; these are three lines of tensor math.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float) -> None:
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = p.grad.detach().clone()
            else:
                buf.mul_(self.momentum).add_(p.grad)
            p.add_(buf, alpha=-self.lr)


def _task_generator(ctx: TaskContext[Any], partition: int) -> torch.Generator:
    # Different shuffles per round and site, reproducible for a given task seed.
    state = np.random.SeedSequence([ctx.seed, ctx.round, partition]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


# -- the plugin ---------------------------------------------------------------------------------------


class DigitsTask(TaskPlugin[DigitsHyperparameters]):
    """sklearn digits, a small CNN, non-IID Dirichlet partitions (see the module docstring)."""

    name = "digits"
    hyperparameters_model = DigitsHyperparameters

    def initial_weights(self, hyperparameters: DigitsHyperparameters, seed: int) -> dict[str, torch.Tensor]:
        # fork_rng: seeding for the init must not disturb the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _cpu_weights(DigitsCNN())

    def check_site_config(self, site_config: Mapping[str, Any]) -> None:
        validate_model(DigitsSiteConfig, site_config, "site_config for digits", SiteConfigError)

    def _site(self, ctx: TaskContext[DigitsHyperparameters]) -> tuple[DigitsSiteConfig, SiteData]:
        config = validate_model(DigitsSiteConfig, ctx.site_config, "site_config for digits", SiteConfigError)
        try:
            data = site_data(ctx.hyperparameters, config)
        except ValueError as exc:  # partitioning impossible for these settings
            raise SiteConfigError(str(exc)) from exc
        return config, data

    def train(self, weights: dict[str, torch.Tensor], ctx: TaskContext[DigitsHyperparameters]) -> TrainOutput:
        hp = ctx.hyperparameters
        config, data = self._site(ctx)
        with _one_thread():
            model = _model_from(weights, ctx.device)
            optimizer = _MomentumSGD(list(model.parameters()), hp.lr, hp.momentum)
            x, y = data.x_train.to(ctx.device), data.y_train.to(ctx.device)
            generator = _task_generator(ctx, config.partition)
            steps, loss_sum, correct = 0, 0.0, 0
            model.train()
            for epoch in range(hp.epochs):
                # Loss and accuracy of the last epoch: the state the update was trained into.
                loss_sum, correct = 0.0, 0
                order = torch.randperm(len(y), generator=generator).to(ctx.device)
                for batch in torch.split(order, hp.batch_size):
                    logits = model(x[batch])
                    loss = functional.cross_entropy(logits, y[batch])
                    model.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                    optimizer.step()
                    steps += 1
                    loss_sum += float(loss.detach()) * len(batch)
                    correct += int((logits.argmax(1) == y[batch]).sum())
                ctx.progress((epoch + 1) / hp.epochs, f"epoch {epoch + 1}/{hp.epochs}")
        n = len(y)
        return TrainOutput(
            weights=_cpu_weights(model),
            num_samples=n,
            metrics={"loss": loss_sum / n, "accuracy": correct / n},
            steps=steps,
        )

    def evaluate(
        self, weights: dict[str, torch.Tensor], ctx: TaskContext[DigitsHyperparameters]
    ) -> EvalOutput:
        _, data = self._site(ctx)
        n = len(data.y_eval)
        if n == 0:
            return EvalOutput(num_samples=0)
        with _one_thread(), torch.no_grad():
            model = _model_from(weights, ctx.device).eval()
            logits = model(data.x_eval.to(ctx.device))
            y = data.y_eval.to(ctx.device)
            loss = float(functional.cross_entropy(logits, y))
            accuracy = int((logits.argmax(1) == y).sum()) / n
        return EvalOutput(num_samples=n, metrics={"loss": loss, "accuracy": accuracy})
