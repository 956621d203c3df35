#!/usr/bin/env python3
"""Coordination overhead per round at many sites: the real coordinator engine, registry and
aggregator, with trainers that answer at once.

Set-up (all in this process, on loopback, file object store in a temp dir): a registry and an
aggregator gRPC server; the coordinator's Engine over its SQLite state; --sites sites on an
in-process dispatch backend ("instant") whose trainer answers every task at once with the
same precomputed update of a --params model (about 60 tensors, float32) that sits in the
store. The experiment is synchronous FedAvg over every site for --rounds rounds.

Measured per round r >= 2, from the instant dispatcher's clock:

  overhead (aggregation included)  last result of round r-1 handed to the coordinator
                                   -> last task of round r dispatched
  aggregation                      the Aggregate RPC's wall time (the coordinator's call)
  overhead (aggregation excluded)  the difference
  first dispatch                   last result in -> first task of the next round out

and tasks/s over the whole run (tasks dispatched and answered / wall time). Target: median
overhead, aggregation excluded, under 100 ms per round at 200 sites.

Options:
  --sites N     sites (default 200)
  --rounds R    rounds (default 6)
  --params P    model parameters (default 1M; K/M suffixes)
  --json        print a JSON summary as the last line
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services"))

import grpc  # noqa: E402
import yaml  # noqa: E402

from fedhpc.aggregator.server import build_aggregator_server  # noqa: E402
from fedhpc.api.v1 import aggregator_pb2_grpc, coordinator_pb2  # noqa: E402
from fedhpc.common.config import FedhpcConfig  # noqa: E402
from fedhpc.common.contracts import TaskResultDoc, TaskSpec, Timings, UpdateBlob  # noqa: E402
from fedhpc.common.registry_client import RegistryClient  # noqa: E402
from fedhpc.common.storage import FileObjectStore  # noqa: E402
from fedhpc.common.tensors import write_safetensors_file  # noqa: E402
from fedhpc.coordinator.dispatch import (  # noqa: E402
    Dispatcher,
    DispatchEvent,
    SiteSpec,
    register_backend,
)
from fedhpc.coordinator.engine import Engine  # noqa: E402
from fedhpc.coordinator.state import SiteRow, StateStore  # noqa: E402
from fedhpc.registry.server import build_registry_server  # noqa: E402
from fedhpc.testing.synthetic import synthetic_tensors  # noqa: E402

TARGET_MS = 100.0


class Clock:
    """What the instant trainers saw: dispatch and answer times per round."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dispatched: dict[int, list[float]] = {}
        self.answered: dict[int, list[float]] = {}
        self.aggregations: list[tuple[float, float]] = []


CLOCK = Clock()
UPDATE: dict[str, Any] = {}


class InstantDispatcher(Dispatcher):
    """A site whose trainer answers at once with the precomputed update."""

    backend = "instant"

    def __init__(self, site: SiteSpec, run_dir: Path) -> None:
        super().__init__(site, run_dir)
        self._ready: list[DispatchEvent] = []
        self._lock = threading.Lock()

    def submit(self, task: TaskSpec) -> str:
        now = time.time()
        with CLOCK.lock:
            CLOCK.dispatched.setdefault(task.round, []).append(now)
        result = TaskResultDoc(
            task_id=task.task_id,
            update=UpdateBlob(**UPDATE) if task.mode == "train" else None,
            num_samples=100,
            eval_samples=10,
            metrics={"eval_accuracy": 0.5},
            timings=Timings(dispatched_at=task.dispatched_at, started_at=now, finished_at=now),
        )
        with self._lock:
            self._ready.append(DispatchEvent(task.task_id, "finished", now, result))
        return f"instant:{task.task_id}"

    def reattach(self, task_id: str, handle: str) -> None:
        del task_id, handle

    def poll(self) -> list[DispatchEvent]:
        with self._lock:
            ready, self._ready = self._ready, []
        if ready:
            now = time.time()
            with CLOCK.lock:
                for event in ready:
                    round_number = int(event.task_id.rsplit(".r", 1)[1][:4])
                    CLOCK.answered.setdefault(round_number, []).append(now)
        return ready

    def cancel(self, task_id: str, reason: str) -> None:
        del task_id, reason

    def close(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class TimedAggregator:
    """The aggregator stub, timing each Aggregate call."""

    def __init__(self, stub: aggregator_pb2_grpc.AggregatorStub) -> None:
        self._stub = stub

    def Aggregate(self, request: Any, timeout: float | None = None) -> Any:
        started = time.time()
        try:
            return self._stub.Aggregate(request, timeout=timeout)
        finally:
            with CLOCK.lock:
                CLOCK.aggregations.append((started, time.time()))


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--params", default="1M")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    register_backend("instant", InstantDispatcher)
    with tempfile.TemporaryDirectory(prefix="fedhpc-cp-bench-") as tmp:
        return run(Path(tmp), args)


def run(tmp: Path, args: argparse.Namespace) -> int:
    params = parse_count(args.params)
    store = FileObjectStore(tmp / "store")
    config = FedhpcConfig.model_validate(
        {
            "store": {"kind": "file", "root": str(tmp / "store")},
            "registry": {"server": {"port": 0}},
            "aggregator": {"server": {"port": 0}},
            "log": {"level": "WARNING"},
        }
    )
    registry_server = build_registry_server(config, store)
    registry_server.start()
    config = config.model_copy(
        update={
            "aggregator": config.aggregator.model_copy(update={"registry_address": registry_server.address})
        }
    )
    aggregator_server = build_aggregator_server(config, store)
    aggregator_server.start()
    channel = grpc.insecure_channel(registry_server.address)
    registry = RegistryClient(channel)
    aggregator = TimedAggregator(
        aggregator_pb2_grpc.AggregatorStub(grpc.insecure_channel(aggregator_server.address))
    )
    # The initial model and the one update every trainer returns.
    tensors = synthetic_tensors(params * 4 / (1 << 20), seed=0)
    init = tmp / "init.safetensors"
    write_safetensors_file(init, tensors)
    registry.create_model("bench-init")
    registry.push("bench-init", init, version="v0")
    delta = {k: (v * 0.001).astype(v.dtype) for k, v in tensors.items()}
    update_path = store.writable_path("updates/bench/update.safetensors")
    assert update_path is not None
    blob = write_safetensors_file(update_path, delta)
    UPDATE.update(object_key="updates/bench/update.safetensors", sha256=blob.sha256, size_bytes=blob.size)

    state = StateStore(tmp / "coordinator" / "coordinator.db")
    coordinator_config = config.coordinator.model_copy(update={"data_dir": tmp / "coordinator"})
    engine = Engine(coordinator_config, state, registry, aggregator, config.store, store)  # type: ignore[arg-type]
    for i in range(args.sites):
        state.upsert_site(
            SiteRow(f"s{i:04d}", "instant", {}, "presigned", 1, "ACTIVE", {}, time.time(), None)
        )
    spec = {
        "name": "cp-bench",
        "initial_version": "bench-init@v0",
        "task": {"plugin": "digits"},
        "strategy": {"name": "sync", "rounds": args.rounds, "min_sites": args.sites, "round_deadline_s": 600},
        "algorithm": {"name": "fedavg"},
    }
    from fedhpc.coordinator.service import CoordinatorService

    service = CoordinatorService(state, engine)

    class _Context:
        def abort(self, code: Any, message: str) -> None:
            raise RuntimeError(f"{code}: {message}")

    started = time.time()
    engine.start()
    experiment = service.CreateExperiment(
        coordinator_pb2.CreateExperimentRequest(spec_yaml=yaml.safe_dump(spec), id="cp-bench", start=True),
        _Context(),  # type: ignore[arg-type]
    )
    while state.experiment(experiment.id).state not in ("COMPLETED", "FAILED", "STOPPED"):  # type: ignore[union-attr]
        time.sleep(0.05)
    wall = time.time() - started
    final = state.experiment(experiment.id)
    engine.stop()
    aggregator_server.stop(0)
    registry_server.stop(0)
    store.close()
    if final is None or final.state != "COMPLETED":
        print(f"experiment did not complete: {final.error if final else 'missing'}", file=sys.stderr)
        return 1
    return report(args, wall)


def report(args: argparse.Namespace, wall: float) -> int:
    rows = []
    for r in range(2, args.rounds + 1):
        last_in = max(CLOCK.answered[r - 1])
        first_out, last_out = min(CLOCK.dispatched[r]), max(CLOCK.dispatched[r])
        aggregation = sum(end - begin for begin, end in CLOCK.aggregations if last_in <= begin <= last_out)
        included = last_out - last_in
        rows.append(
            {
                "round": r,
                "overhead_included_ms": included * 1000,
                "aggregation_ms": aggregation * 1000,
                "overhead_excluded_ms": (included - aggregation) * 1000,
                "first_dispatch_ms": (first_out - last_in) * 1000,
            }
        )
    tasks = sum(len(v) for v in CLOCK.dispatched.values())
    print(f"control plane: {args.sites} sites, {args.rounds} rounds, {args.params} parameters, sync FedAvg")
    print(
        f"{'round':>5} {'overhead incl. ms':>18} {'aggregation ms':>15} {'overhead excl. ms':>18} {'first out ms':>13}"
    )
    for row in rows:
        print(
            f"{row['round']:>5} {row['overhead_included_ms']:>18.1f} {row['aggregation_ms']:>15.1f} "
            f"{row['overhead_excluded_ms']:>18.1f} {row['first_dispatch_ms']:>13.1f}"
        )
    median_excluded = statistics.median(r["overhead_excluded_ms"] for r in rows)
    median_included = statistics.median(r["overhead_included_ms"] for r in rows)
    tasks_per_s = tasks / wall
    met = median_excluded < TARGET_MS
    print(
        f"median overhead, aggregation excluded: {median_excluded:.1f} ms (target < {TARGET_MS:.0f}: {'met' if met else 'MISSED'})"
    )
    print(f"median overhead, aggregation included: {median_included:.1f} ms")
    print(f"tasks: {tasks} in {wall:.1f} s = {tasks_per_s:.0f} tasks/s (dispatched, answered, recorded)")
    if args.json:
        print(
            json.dumps(
                {
                    "sites": args.sites,
                    "rounds": args.rounds,
                    "params": parse_count(args.params),
                    "median_overhead_excluded_ms": median_excluded,
                    "median_overhead_included_ms": median_included,
                    "tasks_per_s": tasks_per_s,
                    "target_ms": TARGET_MS,
                    "met": met,
                    "per_round": rows,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
