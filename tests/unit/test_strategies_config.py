"""Strategy configuration: the ``strategy:`` section, its errors, the factory, and the docs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from fedhpc.common.config import ConfigError
from fedhpc.coordinator.strategies import (
    STRATEGIES,
    FedAsyncConfig,
    FedAsyncStrategy,
    FedBuffConfig,
    FedBuffStrategy,
    SnapshotError,
    Started,
    SyncConfig,
    SyncStrategy,
    make_strategy,
    restore_strategy,
    strategy_config_from_dict,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "strategies.md"
CONFIGS: tuple[type[BaseModel], ...] = (SyncConfig, FedAsyncConfig, FedBuffConfig)


@pytest.mark.parametrize(
    ("data", "kind", "strategy"),
    [
        ({"name": "sync"}, SyncConfig, SyncStrategy),
        ({"name": "fedasync"}, FedAsyncConfig, FedAsyncStrategy),
        ({"name": "fedbuff"}, FedBuffConfig, FedBuffStrategy),
    ],
)
def test_defaults_parse_and_build(data: dict[str, Any], kind: type[BaseModel], strategy: type[Any]) -> None:
    config = strategy_config_from_dict(data)
    assert type(config) is kind
    built = make_strategy(config)
    assert type(built) is strategy and built.name == data["name"]
    assert not built.done and built.completed_rounds == 0


def test_the_design_example_parses() -> None:
    config = strategy_config_from_dict(
        yaml.safe_load("{name: sync, rounds: 20, min_sites: 3, round_deadline_s: 120}")
    )
    assert isinstance(config, SyncConfig)
    assert (config.rounds, config.min_sites, config.round_deadline_s) == (20, 3, 120.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "sync", "rounds": 0}, "strategy.rounds: Input should be greater than or equal to 1"),
        ({"name": "sync", "round": 3}, "strategy.round: Extra inputs are not permitted"),
        ({"name": "fedbuff", "buffer_size": "many"}, "strategy.buffer_size: Input should be a valid integer"),
        (
            {"name": "sync", "round_deadline_s": float("inf")},
            "strategy.round_deadline_s: Input should be a finite",
        ),
        (
            {"name": "fedasync", "task_deadline_s": 0},
            "strategy.task_deadline_s: Input should be greater than 0",
        ),
        ({"name": "fedasync", "max_staleness": -1}, "strategy.max_staleness"),
        ({"name": "fedavg"}, "strategy.name: unknown strategy 'fedavg'; one of sync, fedasync, fedbuff"),
        ({"rounds": 3}, "strategy.name: missing; one of sync, fedasync, fedbuff"),
        (
            {"name": "sync", "min_sites": 3, "sites_per_round": 2},
            "sites_per_round (2) is below min_sites (3)",
        ),
        ({"name": "sync", "min_sites": 1, "min_accepted": 2}, "min_accepted (2) exceeds min_sites (1)"),
        (
            {"name": "fedbuff", "buffer_size": 2, "min_accepted": 3},
            "min_accepted (3) exceeds buffer_size (2)",
        ),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        strategy_config_from_dict(data)
    assert message in str(excinfo.value)


def test_configs_are_frozen() -> None:
    config = SyncConfig()
    with pytest.raises(ValidationError):
        setattr(config, "rounds", 3)  # noqa: B010 - bypass the static check: it is the runtime one under test


def test_restore_strategy_uses_the_configs_strategy() -> None:
    config = strategy_config_from_dict({"name": "fedbuff", "rounds": 2})
    strategy = make_strategy(config)
    strategy.handle(Started(0.0, ("a",)))
    restored = restore_strategy(config, json.loads(json.dumps(strategy.snapshot())))
    assert isinstance(restored, FedBuffStrategy)
    assert restored.snapshot() == strategy.snapshot()
    with pytest.raises(SnapshotError):
        restore_strategy(SyncConfig(), strategy.snapshot())


def test_registry_matches_the_config_union() -> None:
    assert set(STRATEGIES) == {model.model_fields["name"].default for model in CONFIGS}


# -- docs/strategies.md stays true ---------------------------------------------------------


def _yaml_blocks() -> list[Any]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)]


def test_every_yaml_example_in_the_docs_is_valid() -> None:
    blocks = _yaml_blocks()
    names = set()
    for block in blocks:
        config = strategy_config_from_dict(block["strategy"])
        names.add(config.name)
    assert names == set(STRATEGIES)


def _default_text(value: Any) -> str:
    return json.dumps(value)


@pytest.mark.parametrize("model", CONFIGS, ids=lambda m: m.__name__)
def test_docs_list_every_key_with_its_default(model: type[BaseModel]) -> None:
    text = DOCS.read_text()
    name = model.model_fields["name"].default
    section = text.split(f"## `{name}`", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.M))
    assert set(rows) == set(model.model_fields), f"docs table for {name} out of date"
    for key, field in model.model_fields.items():
        assert rows[key] == _default_text(field.default), f"{name}.{key}: default in docs"
