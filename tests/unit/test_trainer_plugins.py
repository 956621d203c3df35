"""Resolving task plugins (entry points, module:attribute paths, unknown names) and validating
their hyperparameters with messages that name the key."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedhpc.trainer import (
    EvalOutput,
    HyperparameterError,
    NoHyperparameters,
    PluginError,
    PluginNotFoundError,
    TaskContext,
    TaskPlugin,
    TrainOutput,
    installed_plugins,
    load_plugin,
    make_initial_weights,
)
from fedhpc.trainer.tasks.digits import DigitsTask


class ScaleHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: float = Field(default=1.0, gt=0)
    layers: int = 1


class ScalePlugin(TaskPlugin[ScaleHyperparameters]):
    hyperparameters_model = ScaleHyperparameters

    def initial_weights(self, hyperparameters: ScaleHyperparameters, seed: int) -> dict[str, torch.Tensor]:
        return {
            f"layer{i}": torch.full((2,), hyperparameters.scale * seed) for i in range(hyperparameters.layers)
        }

    def train(self, weights: dict[str, torch.Tensor], ctx: TaskContext[ScaleHyperparameters]) -> TrainOutput:
        return TrainOutput(weights=weights, num_samples=1)

    def evaluate(
        self, weights: dict[str, torch.Tensor], ctx: TaskContext[ScaleHyperparameters]
    ) -> EvalOutput:
        return EvalOutput(num_samples=1)


class PlainPlugin(TaskPlugin[NoHyperparameters]):
    name = "plain"
    hyperparameters_model = NoHyperparameters

    def initial_weights(self, hyperparameters: NoHyperparameters, seed: int) -> dict[str, torch.Tensor]:
        return {}

    def train(self, weights: dict[str, torch.Tensor], ctx: TaskContext[NoHyperparameters]) -> TrainOutput:
        return TrainOutput(weights=weights, num_samples=0)

    def evaluate(self, weights: dict[str, torch.Tensor], ctx: TaskContext[NoHyperparameters]) -> EvalOutput:
        return EvalOutput(num_samples=0)


class NoModelPlugin(TaskPlugin[Any]):
    def initial_weights(self, hyperparameters: Any, seed: int) -> dict[str, torch.Tensor]:
        return {}

    def train(self, weights: dict[str, torch.Tensor], ctx: TaskContext[Any]) -> TrainOutput:
        return TrainOutput(weights=weights, num_samples=0)

    def evaluate(self, weights: dict[str, torch.Tensor], ctx: TaskContext[Any]) -> EvalOutput:
        return EvalOutput(num_samples=0)


class BrokenInitPlugin(PlainPlugin):
    def __init__(self) -> None:
        raise RuntimeError("needs a licence server")


NOT_A_PLUGIN = 42


def test_digits_is_installed_as_an_entry_point() -> None:
    assert installed_plugins()["digits"] == "fedhpc.trainer.tasks.digits:DigitsTask"
    plugin = load_plugin("digits")
    assert isinstance(plugin, DigitsTask)
    assert plugin.name == "digits"


def test_module_attribute_path_loads_a_class_that_is_not_installed() -> None:
    plugin = load_plugin(f"{__name__}:ScalePlugin")
    assert isinstance(plugin, ScalePlugin)
    assert plugin.name == f"{__name__}:ScalePlugin"  # unnamed plugins are called what they were asked as
    assert isinstance(load_plugin("fedhpc.trainer.tasks.digits:DigitsTask"), DigitsTask)


def test_each_load_is_a_new_instance() -> None:
    assert load_plugin("digits") is not load_plugin("digits")


def test_unknown_name_lists_the_installed_plugins() -> None:
    with pytest.raises(PluginNotFoundError) as err:
        load_plugin("mnist-resnet")
    message = str(err.value)
    assert "mnist-resnet" in message and "installed: digits" in message


@pytest.mark.parametrize(
    ("target", "needle"),
    [
        ("no_such_module_xyz:Task", "cannot import plugin module 'no_such_module_xyz'"),
        (f"{__name__}:MissingClass", "has no attribute 'MissingClass'"),
        (f"{__name__}:NOT_A_PLUGIN", "not a TaskPlugin subclass"),
        (f"{__name__}:NoModelPlugin", "hyperparameters_model"),
        (f"{__name__}:BrokenInitPlugin", "needs a licence server"),
    ],
)
def test_bad_import_paths_are_plugin_errors(target: str, needle: str) -> None:
    with pytest.raises(PluginError, match=needle):
        load_plugin(target)


def test_hyperparameter_defaults_are_filled_in() -> None:
    hp = load_plugin(f"{__name__}:ScalePlugin").validate_hyperparameters({"layers": 3})
    assert hp == ScaleHyperparameters(scale=1.0, layers=3)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"scael": 2.0}, "scael"),  # a typo is an error, never silently ignored
        ({"scale": -1.0}, "scale"),
        ({"layers": "many"}, "layers"),
    ],
)
def test_bad_hyperparameters_name_the_key(raw: dict[str, Any], key: str) -> None:
    plugin = load_plugin(f"{__name__}:ScalePlugin")
    with pytest.raises(HyperparameterError) as err:
        plugin.validate_hyperparameters(raw)
    assert f"{key}:" in str(err.value)
    assert "hyperparameters for" in str(err.value)


def test_plugin_without_hyperparameters_refuses_any() -> None:
    with pytest.raises(HyperparameterError, match="lr"):
        PlainPlugin().validate_hyperparameters({"lr": 0.1})


@pytest.mark.parametrize(
    ("raw", "key"),
    [({"epochs": 0}, "epochs"), ({"lr": 0}, "lr"), ({"alpha": -1}, "alpha"), ({"bach_size": 8}, "bach_size")],
)
def test_digits_hyperparameters_name_the_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(HyperparameterError, match=f"{key}:"):
        DigitsTask().validate_hyperparameters(raw)


def test_make_initial_weights_validates_and_is_deterministic_in_seed() -> None:
    first = make_initial_weights("digits", {"alpha": 0.3}, seed=7)
    again = make_initial_weights("digits", {}, seed=7)
    other = make_initial_weights("digits", {}, seed=8)
    assert list(first) == list(again)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert all(t.dtype == torch.float32 for t in first.values())
    with pytest.raises(HyperparameterError, match="epoch"):
        make_initial_weights("digits", {"epoch": 3}, seed=0)


def test_initial_weights_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_initial_weights("digits", {}, seed=1)
    assert torch.equal(torch.rand(3), expected)
