"""The experiment spec: the YAML a user submits with ``fedhpc run SPEC.yaml``.

Example (``examples/digits.yaml``)::

    name: digits-fedavg
    task:
      plugin: digits
      hyperparameters: {alpha: 0.5, epochs: 1}
    strategy: {name: sync, rounds: 20, min_sites: 3, round_deadline_s: 120}
    algorithm: {name: fedavg, params: {weighting: samples}}
    aggregation: {min_accepted: 1}
    sites: []          # empty: every site registered when the experiment starts

Every error names the bad key (``strategy.rounds: Input should be greater than 0``).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedhpc.common.config import errors_by_key
from fedhpc.coordinator.strategies import StrategyConfig, strategy_config_from_dict

# The aggregator owns the math; the coordinator only checks the name early so a typo fails
# at submit time, not at the first aggregation.
KNOWN_ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedasync", "fedbuff")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class SpecError(ValueError):
    """An experiment spec that does not validate; the message names every bad key."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSection(_Spec):
    plugin: str = Field(description="Task plugin name (entry point group fedhpc.tasks) or module:attribute.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="Passed to the plugin.")


class AlgorithmSection(_Spec):
    name: str = Field(
        default="fedavg", description=f"Server algorithm: one of {', '.join(KNOWN_ALGORITHMS)}."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Its parameters (see docs/aggregation.md)."
    )

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in KNOWN_ALGORITHMS:
            raise ValueError(f"unknown algorithm {value!r}; known: {', '.join(KNOWN_ALGORITHMS)}")
        return value


class AggregationSection(_Spec):
    min_accepted: int = Field(default=1, ge=1, description="Fewer accepted updates fail the aggregation.")
    max_update_norm: float = Field(
        default=0.0, ge=0, description="Reject updates above this L2 norm; 0 = off."
    )
    clip_to_norm: bool = Field(default=False, description="Clip instead of rejecting above max_update_norm.")
    accumulate_float64: bool = Field(default=False, description="Accumulate in float64 instead of float32.")


class ExperimentSpec(_Spec):
    name: str = Field(description="Experiment name; also the default id (lower case, digits, . _ -).")
    description: str = ""
    model: str | None = Field(
        default=None, description="Registry model the versions go to (default: the id)."
    )
    initial_version: str | None = Field(
        default=None,
        description="Start from this registry version 'model@version' instead of the plugin's initial weights.",
    )
    task: TaskSection
    strategy: StrategyConfig
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    aggregation: AggregationSection = Field(default_factory=AggregationSection)
    sites: list[str] = Field(default_factory=list, description="Sites to use; empty = every registered site.")
    seed: int = Field(default=0, description="Seeds the initial weights and every task.")

    @field_validator("name", "model")
    @classmethod
    def _name_ok(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"{value!r} must be 1-63 of a-z 0-9 . _ - starting with a letter or digit")
        return value

    @field_validator("strategy", mode="before")
    @classmethod
    def _strategy(cls, value: Any) -> Any:
        return strategy_config_from_dict(value) if isinstance(value, dict) else value


def parse_spec(text: str) -> ExperimentSpec:
    """Parse and validate a YAML spec; SpecError names each bad key."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"the spec is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError("the spec must be a YAML mapping with at least name, task and strategy")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(errors_by_key(exc, "(spec)")) from exc
    except ValueError as exc:  # strategy_config_from_dict's own errors
        raise SpecError(f"strategy: {exc}") from exc
