"""The task plugin API: the training code a site runs, written by scientists, installed in the image.

A plugin is a :class:`TaskPlugin` subclass registered under the entry point group
``fedhpc.tasks`` of the package that ships it (see docs/plugins.md)::

    [project.entry-points."fedhpc.tasks"]
    my-task = "my_package.task:MyTask"

fedhpc never ships plugin code to sites and never unpickles anything: the trainer resolves the
plugin by name inside its container image and hands it plain tensors. A plugin declares its
hyperparameters as a pydantic model, so a typo in an experiment's config fails at once with a
message that names the key.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from fedhpc.common.config import errors_by_key

__all__ = [
    "ENTRY_POINT_GROUP",
    "EvalOutput",
    "HyperparameterError",
    "NoHyperparameters",
    "PluginError",
    "PluginNotFoundError",
    "ProgressCallback",
    "SiteConfigError",
    "TaskConfigError",
    "TaskContext",
    "TaskPlugin",
    "TrainOutput",
    "installed_plugins",
    "load_plugin",
    "make_initial_weights",
    "validate_model",
]

ENTRY_POINT_GROUP = "fedhpc.tasks"

ProgressCallback = Callable[[float, str], None]
Weights = dict[str, torch.Tensor]


# -- errors ------------------------------------------------------------------------------------


class PluginError(RuntimeError):
    """A plugin could not be resolved, imported or instantiated; the message says which and why."""


class PluginNotFoundError(PluginError, LookupError):
    """No plugin of that name is installed (the message lists the installed ones)."""


class TaskConfigError(ValueError):
    """The task's hyperparameters or site_config do not fit the plugin; the message names the key."""


class HyperparameterError(TaskConfigError):
    """A hyperparameter is unknown, missing or has a bad value."""


class SiteConfigError(TaskConfigError):
    """A site_config key is unknown, missing or has a bad value."""


# -- data passed to and from plugins -------------------------------------------------------------


class NoHyperparameters(BaseModel):
    """For plugins without hyperparameters: any key given is an error."""

    model_config = ConfigDict(extra="forbid")


H = TypeVar("H", bound=BaseModel)


def _no_progress(fraction: float, message: str) -> None:
    del fraction, message


@dataclass
class TaskContext(Generic[H]):
    """What a plugin knows about the task it runs.

    ``seed`` is the task's seed (shuffling, dropout: it differs between tasks); ``site_config``
    holds the site's own settings (data directory, partition, ...) minus the keys the runtime
    consumes itself (``device``). ``work_dir`` is an empty scratch directory removed after the
    task. Call ``progress(fraction, message)`` now and then with 0 <= fraction <= 1.
    ``deadline`` (epoch seconds, or None) is when the coordinator stops waiting for the result.
    """

    site: str
    round: int
    seed: int
    hyperparameters: H
    site_config: Mapping[str, Any]
    work_dir: Path
    device: torch.device
    progress: ProgressCallback = _no_progress
    experiment_id: str = ""
    task_id: str = ""
    deadline: float | None = None


@dataclass
class TrainOutput:
    """The locally trained weights (same names, shapes and dtypes as the global model's) and what
    it took: ``num_samples`` weighs this update in FedAvg; ``metrics`` keys are unprefixed
    (``loss``, ``accuracy``): the runtime reports them as ``train_<key>``; ``steps`` counts
    optimizer steps."""

    weights: Weights
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0


@dataclass
class EvalOutput:
    """An evaluation on the site's held-out data; the runtime reports metrics as ``eval_<key>``."""

    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


# -- the plugin base class -------------------------------------------------------------------------


M = TypeVar("M", bound=BaseModel)


def validate_model(
    model: type[M], data: Mapping[str, Any], what: str, error: type[TaskConfigError] = TaskConfigError
) -> M:
    """Validate ``data`` against a pydantic model; ``error`` naming each bad key, e.g.
    ``invalid hyperparameters for digits: lr: Input should be greater than 0``."""
    if not isinstance(data, Mapping):
        raise error(f"invalid {what}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise error(f"invalid {what}: {errors_by_key(exc)}") from exc


class TaskPlugin(ABC, Generic[H]):
    """Subclass this, set ``name`` and ``hyperparameters_model``, implement the three methods.

    The trainer creates one instance per task (no constructor arguments), so instances may
    cache read-only data between calls but must not rely on surviving across tasks.
    """

    #: The name the plugin is registered under (shown in messages).
    name: str = ""
    #: A pydantic model of the hyperparameters; give it ``extra="forbid"`` so typos are errors.
    hyperparameters_model: type[H]

    def validate_hyperparameters(self, raw: Mapping[str, Any]) -> H:
        """The task's hyperparameters as the plugin's model (defaults filled in), or
        :class:`HyperparameterError` naming the offending key."""
        label = self.name or type(self).__name__
        return validate_model(
            self.hyperparameters_model, raw, f"hyperparameters for {label}", HyperparameterError
        )

    def check_site_config(self, site_config: Mapping[str, Any]) -> None:
        """Raise :class:`SiteConfigError` naming the bad key if ``site_config`` does not fit.

        Optional: the runtime calls it before downloading the model, so a misconfigured site
        fails in seconds instead of after a large download. The default accepts anything.
        """
        del site_config

    @abstractmethod
    def initial_weights(self, hyperparameters: H, seed: int) -> Weights:
        """The round-0 global model, deterministic in ``seed`` (the coordinator calls this)."""

    @abstractmethod
    def train(self, weights: Weights, ctx: TaskContext[H]) -> TrainOutput:
        """Train locally from the global ``weights`` (CPU tensors) and return the new weights."""

    @abstractmethod
    def evaluate(self, weights: Weights, ctx: TaskContext[H]) -> EvalOutput:
        """Evaluate ``weights`` on the site's held-out data."""


# -- resolving plugins ---------------------------------------------------------------------------------


def installed_plugins() -> dict[str, str]:
    """Installed plugin names -> their ``module:attribute`` targets, sorted by name."""
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    return {ep.name: ep.value for ep in sorted(eps, key=lambda ep: ep.name)}


def _import_target(target: str) -> object:
    module_name, _, attr_path = target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import plugin module {module_name!r} ({target}): {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"module {module_name!r} has no attribute {attr_path!r} ({target})") from None
    return obj


def _resolve(name: str) -> tuple[object, str]:
    """The object ``name`` refers to and the target it came from."""
    if ":" in name:
        # An import path: lets tests and scientists run a plugin that is not installed.
        return _import_target(name), name
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    ep = next(iter(eps), None)
    if ep is None:
        names = ", ".join(installed_plugins()) or "none"
        raise PluginNotFoundError(
            f"no task plugin named {name!r} (entry point group {ENTRY_POINT_GROUP!r}); installed: {names}. "
            "Install the package that provides it in the trainer image, or give 'module:ClassName'"
        )
    try:
        return ep.load(), ep.value
    except Exception as exc:  # an entry point runs arbitrary import-time code
        raise PluginError(
            f"task plugin {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc


def load_plugin(name: str) -> TaskPlugin[Any]:
    """A new instance of the plugin registered as ``name`` in ``fedhpc.tasks``, or of the class
    at the import path ``module:Class``.

    Raises :class:`PluginNotFoundError` for an unknown name (listing the installed ones) and
    :class:`PluginError` when the plugin cannot be imported or is not a TaskPlugin.
    """
    obj, target = _resolve(name)
    if not (isinstance(obj, type) and issubclass(obj, TaskPlugin)):
        raise PluginError(f"task plugin {name!r} ({target}) is {obj!r}, not a TaskPlugin subclass")
    hp_model = getattr(obj, "hyperparameters_model", None)
    if not (isinstance(hp_model, type) and issubclass(hp_model, BaseModel)):
        raise PluginError(
            f"task plugin {name!r} ({target}) sets no hyperparameters_model (a pydantic BaseModel subclass; "
            "NoHyperparameters if it takes none)"
        )
    try:
        plugin: TaskPlugin[Any] = obj()
    except Exception as exc:
        raise PluginError(
            f"task plugin {name!r} ({target}) could not be created: {type(exc).__name__}: {exc}"
        ) from exc
    if not plugin.name:
        plugin.name = name
    return plugin


def make_initial_weights(name: str, hyperparameters: Mapping[str, Any], seed: int) -> Weights:
    """Round 0 of an experiment: the plugin's initial weights for raw (unvalidated) hyperparameters.

    Raises PluginError / PluginNotFoundError and HyperparameterError with readable messages.
    """
    plugin = load_plugin(name)
    return plugin.initial_weights(plugin.validate_hyperparameters(hyperparameters), seed)
