"""Scheduling strategies: pure, clock-injected state machines (events in, decisions out).

``strategy_config_from_dict(spec["strategy"])`` validates an experiment's ``strategy:``
section, ``make_strategy(config)`` builds a fresh strategy and
``restore_strategy(config, snapshot)`` rebuilds one after a coordinator restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from fedhpc.common.config import ConfigError
from fedhpc.coordinator.strategies.base import (
    REASON_COMPLETED,
    REASON_DEADLINE,
    REASON_SITE_LEFT,
    REASON_STOPPED,
    Aggregate,
    AggregationFailed,
    AggregationSucceeded,
    CancelTask,
    CancelTimer,
    Decision,
    DispatchTask,
    Event,
    Finish,
    LogEntry,
    SetTimer,
    SiteJoined,
    SiteLeft,
    SnapshotError,
    Started,
    StopRequested,
    Strategy,
    StrategyConfigBase,
    TaskFailed,
    TaskSucceeded,
    TimerFired,
    UpdateChoice,
)
from fedhpc.coordinator.strategies.fedasync import FedAsyncConfig, FedAsyncStrategy
from fedhpc.coordinator.strategies.fedbuff import FedBuffConfig, FedBuffStrategy
from fedhpc.coordinator.strategies.sync import SyncConfig, SyncStrategy

__all__ = [
    "REASON_COMPLETED",
    "REASON_DEADLINE",
    "REASON_SITE_LEFT",
    "REASON_STOPPED",
    "STRATEGIES",
    "Aggregate",
    "AggregationFailed",
    "AggregationSucceeded",
    "CancelTask",
    "CancelTimer",
    "Decision",
    "DispatchTask",
    "Event",
    "FedAsyncConfig",
    "FedAsyncStrategy",
    "FedBuffConfig",
    "FedBuffStrategy",
    "Finish",
    "LogEntry",
    "SetTimer",
    "SiteJoined",
    "SiteLeft",
    "SnapshotError",
    "Started",
    "StopRequested",
    "Strategy",
    "StrategyConfig",
    "StrategyConfigBase",
    "SyncConfig",
    "SyncStrategy",
    "TaskFailed",
    "TaskSucceeded",
    "TimerFired",
    "UpdateChoice",
    "make_strategy",
    "restore_strategy",
    "strategy_config_from_dict",
]

# The ``strategy:`` section of an experiment spec; ``name`` picks the strategy.
StrategyConfig = Annotated[SyncConfig | FedAsyncConfig | FedBuffConfig, Field(discriminator="name")]

# name -> implementation. A new strategy adds its class here and its config to StrategyConfig.
STRATEGIES: dict[str, type[Strategy[Any]]] = {
    cls.name: cls for cls in (SyncStrategy, FedAsyncStrategy, FedBuffStrategy)
}

_ADAPTER: TypeAdapter[StrategyConfig] = TypeAdapter(StrategyConfig)


def strategy_config_from_dict(data: Mapping[str, Any], *, where: str = "strategy") -> StrategyConfig:
    """Validate a ``strategy:`` section. Raises :class:`ConfigError` whose message names
    every bad key as ``strategy.<key>`` (``where`` is the prefix)."""
    try:
        return _ADAPTER.validate_python(dict(data) if isinstance(data, Mapping) else data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, data, where)) from None


def _format_error(error: ValidationError, data: Any, where: str) -> str:
    lines = [f"invalid {where} configuration:"]
    tag = data.get("name") if isinstance(data, Mapping) else None
    names = ", ".join(STRATEGIES)
    for item in error.errors():
        loc = list(item["loc"])
        message = item["msg"]
        # pydantic puts the union tag first (sync.rounds); the spec has none (strategy.rounds).
        if loc and tag is not None and loc[0] == tag:
            loc = loc[1:]
        if item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = ["name"]
            message = f"{'unknown strategy ' + repr(tag) if tag is not None else 'missing'}; one of {names}"
        key = ".".join([where, *(str(part) for part in loc)])
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def make_strategy(config: StrategyConfig) -> Strategy[Any]:
    """A fresh strategy for ``config``."""
    return STRATEGIES[config.name](config)


def restore_strategy(config: StrategyConfig, snapshot: Mapping[str, Any]) -> Strategy[Any]:
    """The strategy ``snapshot`` (from :meth:`Strategy.snapshot`) recorded. Raises
    :class:`SnapshotError` when the snapshot belongs to another strategy or is corrupt."""
    return STRATEGIES[config.name].restore(config, snapshot)
