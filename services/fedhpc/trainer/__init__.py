"""The trainer: runs one task on a site (HPC compute node, local process) and reports a result.

``run_task(task) -> result`` is the entry point the coordinator dispatches; task plugins
(``TaskPlugin`` subclasses, entry point group ``fedhpc.tasks``) hold the training code.
"""

from __future__ import annotations

from fedhpc.trainer.plugins import (
    EvalOutput,
    HyperparameterError,
    NoHyperparameters,
    PluginError,
    PluginNotFoundError,
    SiteConfigError,
    TaskConfigError,
    TaskContext,
    TaskPlugin,
    TrainOutput,
    installed_plugins,
    load_plugin,
    make_initial_weights,
    validate_model,
)
from fedhpc.trainer.runtime import PHASES, compute_delta, run_task

__all__ = [
    "PHASES",
    "EvalOutput",
    "HyperparameterError",
    "NoHyperparameters",
    "PluginError",
    "PluginNotFoundError",
    "SiteConfigError",
    "TaskConfigError",
    "TaskContext",
    "TaskPlugin",
    "TrainOutput",
    "compute_delta",
    "installed_plugins",
    "load_plugin",
    "make_initial_weights",
    "run_task",
    "validate_model",
]
