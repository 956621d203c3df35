"""The experiment spec, the coordinator's SQLite state and the outbox's decision encoding."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedhpc.coordinator.engine import decision_from_dict, decision_to_dict, version_id
from fedhpc.coordinator.spec import SpecError, parse_spec
from fedhpc.coordinator.state import ExperimentRow, StateStore, TaskRow
from fedhpc.coordinator.strategies import (
    Aggregate,
    CancelTask,
    CancelTimer,
    DispatchTask,
    Finish,
    LogEntry,
    SetTimer,
    UpdateChoice,
)
from fedhpc.federation_cli import DEMO_SPEC

ROOT = Path(__file__).resolve().parents[2]


def test_examples_digits_is_the_embedded_demo_spec() -> None:
    text = (ROOT / "examples" / "digits.yaml").read_text()
    assert parse_spec(text) == parse_spec(DEMO_SPEC)
    spec = parse_spec(DEMO_SPEC)
    assert spec.strategy.name == "sync" and spec.strategy.rounds == 20
    assert spec.task.plugin == "digits" and spec.algorithm.name == "fedavg"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (DEMO_SPEC.replace("rounds: 20", "rounds: -1"), "strategy"),
        (DEMO_SPEC + "colour: blue\n", "colour"),
        (DEMO_SPEC.replace("name: fedavg", "name: fedmagic"), "algorithm.name"),
        (DEMO_SPEC.replace("min_accepted: 1", "min_accepted: 0"), "aggregation.min_accepted"),
        (DEMO_SPEC.replace("name: digits-fedavg", "name: Digits FedAvg"), "name"),
        ("name: x\ntask: {plugin: digits}\n", "strategy"),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_specs_name_the_bad_key(text: str, named: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(text)
    assert named in str(caught.value)


def test_unknown_strategy_key_is_named() -> None:
    with pytest.raises(SpecError, match="roundz"):
        parse_spec(DEMO_SPEC.replace("rounds: 20", "roundz: 20"))


def test_every_decision_survives_the_outbox_encoding() -> None:
    decisions = [
        DispatchTask("r0001-a-a1", "a", 1, 0, "train", 1, 123.5),
        DispatchTask("eval-r0002-a", "a", 2, 2, "evaluate", 1, None),
        CancelTask("r0001-a-a1", "DEADLINE_EXCEEDED"),
        SetTimer("deadline-r0001-t0", 99.0),
        CancelTimer("deadline-r0001-t0"),
        Aggregate(2, 1, (UpdateChoice("t1", "a", 10, 0), UpdateChoice("t2", "b", 20, 1)), 1, "agg-0002"),
        Finish("completed", "done"),
        LogEntry("site_parked", "too many failures", site="a"),
    ]
    for decision in decisions:
        assert decision_from_dict(decision_to_dict(decision)) == decision


def test_version_ids_are_one_per_round_and_sort_in_order() -> None:
    ids = [version_id(r) for r in range(0, 1001, 7)]
    assert ids == sorted(ids) and version_id(0) == "r0000" and version_id(12) == "r0012"


@pytest.fixture
def state(tmp_path: Path) -> StateStore:
    store = StateStore(tmp_path / "coordinator.db")
    store.insert_experiment(
        ExperimentRow("e1", "e", "spec", "RUNNING", "e1", [], time.time(), None, None, "", None, "", "")
    )
    return store


def test_outbox_keeps_order_and_pops_one(state: StateStore) -> None:
    with state.transaction() as db:
        StateStore.push_outbox(db, "e1", [{"n": 1}, {"n": 2}])
        StateStore.push_outbox(db, "e1", [{"n": 3}])
    entries = state.outbox("e1")
    assert [d["n"] for _, d in entries] == [1, 2, 3]
    with state.transaction() as db:
        StateStore.pop_outbox(db, "e1", entries[0][0])
    assert [d["n"] for _, d in state.outbox("e1")] == [2, 3]


def test_a_failed_transaction_leaves_nothing(state: StateStore) -> None:
    with pytest.raises(RuntimeError), state.transaction() as db:
        StateStore.push_outbox(db, "e1", [{"n": 1}])
        raise RuntimeError("crash mid-step")
    assert state.outbox("e1") == []


def test_tasks_insert_once_and_round_evaluation_is_sample_weighted(state: StateStore) -> None:
    row = TaskRow("e1", "t1", 1, 0, "a", "train", 1, "DISPATCHED", "h", 1.0, None, "", "", 1.0)
    with state.transaction() as db:
        assert StateStore.insert_task(db, row)
        assert not StateStore.insert_task(db, row)  # a re-executed dispatch decision
        StateStore.ensure_round(db, "e1", 0, 1.0)
        StateStore.add_evaluation(db, "e1", 0, {"eval_accuracy": 1.0}, 30)
        StateStore.add_evaluation(db, "e1", 0, {"eval_accuracy": 0.0}, 10)
    assert state.rounds("e1")[0].metrics == {"eval_accuracy": pytest.approx(0.75)}
    assert [t.task_id for t in state.open_tasks("e1")] == ["t1"]
    with state.transaction() as db:
        StateStore.update_task(db, "e1", "t1", phase="SUCCEEDED")
    assert state.open_tasks("e1") == []


def test_events_are_numbered_per_experiment(state: StateStore) -> None:
    with state.transaction() as db:
        assert StateStore.append_event(db, "e1", 1.0, b"a") == 1
        assert StateStore.append_event(db, "e1", 2.0, b"b") == 2
        assert StateStore.append_event(db, "other", 2.0, b"c") == 1
    assert [seq for seq, _, _ in state.events_after("e1", 1)] == [2]
