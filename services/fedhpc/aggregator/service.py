"""The Aggregator gRPC servicer: Aggregate(base, updates, algorithm) -> a new model version.

Stateless: the base model, the updates and the server-optimizer state are read
from object storage (the registry's store); the new weights and state are
spooled to a local file tensor by tensor and pushed through the registry's own
API, so any replica can serve any round.
"""

from __future__ import annotations

import json
import math
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from prometheus_client import Counter, Histogram

from fedhpc.aggregator.algorithms import AlgorithmError, ServerAlgorithm, make_algorithm
from fedhpc.aggregator.core import (
    AggregationOptions,
    AggregationResult,
    NotEnoughUpdates,
    Outcome,
    SourceReader,
    UpdateInput,
    UpdateOutcome,
    aggregate,
    assemble,
    shard_tensors,
)
from fedhpc.api.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2, registry_pb2
from fedhpc.common.config import AggregatorConfig
from fedhpc.common.logging import get_logger, log_context
from fedhpc.common.manifest import check_name
from fedhpc.common.registry_client import RegistryClient
from fedhpc.common.storage import ObjectNotFound, ObjectStore, StorageError
from fedhpc.common.tensors import SafetensorsError, StoreTensorSource, VerifiedBlob

log = get_logger(__name__)

SERVICE_NAME = "fedhpc.v1.Aggregator"
STATE_SUFFIX = ".state"

AGGREGATIONS = Counter("fedhpc_aggregations_total", "Aggregate calls by result.", ["result"])
AGGREGATION_SECONDS = Histogram(
    "fedhpc_aggregation_seconds",
    "Time to aggregate one round (read, sum, write, commit).",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
AGGREGATION_BYTES = Counter(
    "fedhpc_aggregation_bytes_total", "Bytes read and written by aggregation.", ["direction"]
)
AGGREGATION_THROUGHPUT = Histogram(
    "fedhpc_aggregation_throughput_gbps",
    "Update bytes read per second of aggregation (GB/s).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
)
UPDATES = Counter(
    "fedhpc_aggregation_updates_total", "Updates by outcome (rejections by reason).", ["outcome"]
)
# Every series exists from the start at 0: increase() cannot see a counter's first increment.
for _result in ("committed", "failed"):
    AGGREGATIONS.labels(_result)
for _outcome in Outcome:
    UPDATES.labels(_outcome.value)
for _direction in ("read", "written"):
    AGGREGATION_BYTES.labels(_direction)


def state_model_name(model: str) -> str:
    """Registry model lineage holding a model's server-optimizer state."""
    return f"{model}{STATE_SUFFIX}"


class AggregatorService(aggregator_pb2_grpc.AggregatorServicer):
    def __init__(self, store: ObjectStore, registry: RegistryClient, config: AggregatorConfig) -> None:
        self._store = store
        self._registry = registry
        self._config = config
        self._producer = f"aggregator/{socket.gethostname()}"

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        log.info("aggregate refused", extra={"code": code.name, "reason": message})
        context.abort(code, message)

    def Aggregate(
        self, request: aggregator_pb2.AggregateRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.AggregateResponse:
        started = time.perf_counter()
        with log_context(experiment=request.base.model, round=request.round):
            try:
                response = self._aggregate(request, context)
            except Exception:
                AGGREGATIONS.labels("failed").inc()
                raise
            AGGREGATIONS.labels("committed").inc()
            AGGREGATION_SECONDS.observe(time.perf_counter() - started)
            return response

    def _aggregate(
        self, request: aggregator_pb2.AggregateRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.AggregateResponse:
        algorithm = self._algorithm(request, context)
        if not request.updates:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "no updates to aggregate")
        sharded = request.shard.shard_count > 1
        if sharded:
            self._check_shard(request, context)
        if request.new_version and (problem := check_name("new_version", request.new_version)):
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.min_accepted < 0 or request.max_update_norm < 0:
            self._abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "min_accepted and max_update_norm must be >= 0"
            )
        base = self._registry_call(context, lambda: self._registry.get_version(request.base))
        model = base.manifest.model
        if request.new_version:
            existing = self._existing(model, request.new_version)
            if existing is not None:
                # Idempotent: a retried request finds its version already committed.
                return aggregator_pb2.AggregateResponse(version=existing, shards_done=1, complete=True)
        with ExitStack() as stack:
            base_reader = stack.enter_context(self._reader(context, base.object_key, what="base model"))
            inputs = [stack.enter_context(self._update_input(ref)) for ref in request.updates]
            state_reader = None
            if request.optimizer_state.model and algorithm.state_slots:
                state = self._registry_call(
                    context, lambda: self._registry.get_version(request.optimizer_state)
                )
                state_reader = stack.enter_context(
                    self._reader(context, state.object_key, what="optimizer state")
                )
            spool = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self._config.spool_dir)))
            tensors = None
            if sharded:
                tensors = shard_tensors(
                    base_reader.header, request.shard.shard_index, request.shard.shard_count
                )
            result = self._run(context, request, algorithm, base_reader, inputs, state_reader, spool, tensors)
            if sharded:
                return self._shard_done(context, request, base, algorithm, base_reader, result, spool)
            version = self._commit(
                context,
                request,
                base,
                algorithm,
                spool / "weights.safetensors",
                result.weights,
                result.accepted,
            )
            state_ref = common_pb2.ModelRef()
            if result.state is not None:
                state_ref = self._commit_state(
                    context, model, version.manifest.version, spool / "state.safetensors", result.state
                )
        return _response(request, result, version=version, state=state_ref, shards_done=1, complete=True)

    # -- sharding ------------------------------------------------------------------------
    def _check_shard(self, request: aggregator_pb2.AggregateRequest, context: grpc.ServicerContext) -> None:
        shard = request.shard
        if problem := check_name("shard.aggregation_id", shard.aggregation_id):
            self._abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, f"a sharded aggregation needs an id: {problem}"
            )
        if not 0 <= shard.shard_index < shard.shard_count:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"shard_index {shard.shard_index} is outside [0, {shard.shard_count})",
            )
        if request.clip_to_norm:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "clip_to_norm needs each update's whole norm before summing; it cannot be combined with sharding",
            )

    def _shard_done(
        self,
        context: grpc.ServicerContext,
        request: aggregator_pb2.AggregateRequest,
        base: registry_pb2.ModelVersion,
        algorithm: ServerAlgorithm,
        base_reader: SourceReader,
        result: AggregationResult,
        spool: Path,
    ) -> aggregator_pb2.AggregateResponse:
        """Store this shard's part; the shard that completes the set assembles and commits."""
        shard = request.shard
        prefix = f"aggregations/{base.manifest.model}/{shard.aggregation_id}/"
        record = {
            "shard_count": shard.shard_count,
            "accepted": [o.index for o in result.outcomes if o.outcome.accepted],
            "sq_norms": [o.l2_norm**2 for o in result.outcomes],
            "outcomes": [[o.outcome.value, o.message, o.weight] for o in result.outcomes],
        }
        try:
            self._store.put_file(
                f"{prefix}shard-{shard.shard_index}.safetensors", spool / "weights.safetensors"
            )
            if result.state is not None:
                self._store.put_file(
                    f"{prefix}state-{shard.shard_index}.safetensors", spool / "state.safetensors"
                )
            # The record is written last: its presence says the shard's parts are complete.
            self._store.put_bytes(f"{prefix}shard-{shard.shard_index}.json", json.dumps(record).encode())
            records = []
            for k in range(shard.shard_count):
                try:
                    records.append(json.loads(self._store.get_bytes(f"{prefix}shard-{k}.json")))
                except ObjectNotFound:
                    continue
        except StorageError as exc:
            self._abort(
                context, grpc.StatusCode.UNAVAILABLE, f"cannot store shard {shard.shard_index}: {exc}"
            )
        if len(records) < shard.shard_count:
            return _response(request, result, shards_done=len(records), complete=False)
        self._check_shards_agree(context, request, records)
        names = tuple(base_reader.header.names)
        metadata = {"fedhpc.algorithm": algorithm.name, "fedhpc.round": str(request.round)}
        with ExitStack() as stack:
            parts = [
                stack.enter_context(
                    self._reader(context, f"{prefix}shard-{k}.safetensors", what=f"shard {k}")
                )
                for k in range(shard.shard_count)
            ]
            with open(spool / "assembled.safetensors", "w+b") as out:
                weights = assemble(names, parts, out, metadata=metadata)
            accepted = len(records[0]["accepted"])
            version = self._commit(
                context, request, base, algorithm, spool / "assembled.safetensors", weights, accepted
            )
            state_ref = common_pb2.ModelRef()
            if result.state is not None:
                state_parts = [
                    stack.enter_context(
                        self._reader(context, f"{prefix}state-{k}.safetensors", what=f"state {k}")
                    )
                    for k in range(shard.shard_count)
                ]
                state_names = [n for part in state_parts for n in part.header.names]
                order = {name: i for i, name in enumerate(names)}
                state_names.sort(
                    key=lambda n: (order[n.split("/", 1)[1]], algorithm.state_slots.index(n.split("/", 1)[0]))
                )
                with open(spool / "assembled-state.safetensors", "w+b") as out:
                    state_blob = assemble(
                        state_names, state_parts, out, metadata={"fedhpc.algorithm": algorithm.name}
                    )
                state_ref = self._commit_state(
                    context,
                    base.manifest.model,
                    version.manifest.version,
                    spool / "assembled-state.safetensors",
                    state_blob,
                )
        self._store.delete_prefix(prefix)
        for o in result.outcomes:
            o.l2_norm = math.sqrt(sum(r["sq_norms"][o.index] for r in records))
        return _response(
            request, result, version=version, state=state_ref, shards_done=len(records), complete=True
        )

    def _check_shards_agree(
        self,
        context: grpc.ServicerContext,
        request: aggregator_pb2.AggregateRequest,
        records: list[dict[str, Any]],
    ) -> None:
        accepted = {tuple(r["accepted"]) for r in records}
        if len(accepted) > 1:
            refused = sorted(
                {
                    (i, r["outcomes"][i][0])
                    for r in records
                    for i, o in enumerate(r["outcomes"])
                    if o[0] not in ("ACCEPTED", "CLIPPED")
                }
            )
            self._abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "shards disagree on which updates to use (rejected in some shards: "
                + ", ".join(f"update {i}: {code}" for i, code in refused)
                + "); re-run every shard without those updates",
            )
        bound = request.max_update_norm
        if bound > 0:
            for i in records[0]["accepted"]:
                norm = math.sqrt(sum(r["sq_norms"][i] for r in records))
                if norm > bound:
                    self._abort(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"update {i} has L2 norm {norm:.6g} over all shards, above max_update_norm {bound:g}; "
                        "re-run every shard without it",
                    )

    # -- steps ---------------------------------------------------------------------------
    def _algorithm(
        self, request: aggregator_pb2.AggregateRequest, context: grpc.ServicerContext
    ) -> ServerAlgorithm:
        params = (
            json_format.MessageToDict(request.algorithm.params)
            if request.algorithm.HasField("params")
            else {}
        )
        try:
            return make_algorithm(request.algorithm.name or "fedavg", params)
        except AlgorithmError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def _registry_call(
        self, context: grpc.ServicerContext, call: Callable[[], registry_pb2.ModelVersion]
    ) -> registry_pb2.ModelVersion:
        try:
            return call()
        except grpc.RpcError as exc:
            code = exc.code()
            status = (
                grpc.StatusCode.NOT_FOUND
                if code == grpc.StatusCode.NOT_FOUND
                else grpc.StatusCode.UNAVAILABLE
            )
            self._abort(context, status, f"registry: {exc.details()}")

    def _existing(self, model: str, version: str) -> registry_pb2.ModelVersion | None:
        try:
            found = self._registry.get_version(common_pb2.ModelRef(model=model, version=version))
        except grpc.RpcError:
            return None
        return found if found.manifest.version == version else None

    @contextmanager
    def _reader(self, context: grpc.ServicerContext, key: str, *, what: str) -> Iterator[SourceReader]:
        try:
            reader = SourceReader(StoreTensorSource(self._store, key))
        except (ObjectNotFound, SafetensorsError, StorageError) as exc:
            self._abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"cannot read the {what} at {key}: {exc}"
            )
        try:
            yield reader
        finally:
            reader.close()

    @contextmanager
    def _update_input(self, ref: aggregator_pb2.UpdateRef) -> Iterator[UpdateInput]:
        """The update, or a stand-in the core rejects as UNREADABLE with the reason."""
        try:
            reader: SourceReader | _Unreadable = SourceReader(
                StoreTensorSource(self._store, ref.blob.object_key)
            )
        except (ObjectNotFound, SafetensorsError, StorageError) as exc:
            reader = _Unreadable(str(exc))
        yield UpdateInput(
            reader=reader,  # type: ignore[arg-type]
            num_samples=ref.num_samples,
            staleness=ref.staleness,
            full_weights=ref.full_weights,
            compression=ref.compression,
            sha256=ref.blob.sha256,
            name=ref.site or ref.blob.object_key,
        )

    def _run(
        self,
        context: grpc.ServicerContext,
        request: aggregator_pb2.AggregateRequest,
        algorithm: ServerAlgorithm,
        base: SourceReader,
        inputs: list[UpdateInput],
        state: SourceReader | None,
        spool: Path,
        tensors: tuple[str, ...] | None = None,
    ) -> AggregationResult:
        options = AggregationOptions(
            accumulate_float64=request.accumulate_float64,
            max_update_norm=request.max_update_norm,
            clip_to_norm=request.clip_to_norm,
            min_accepted=max(1, request.min_accepted),
            threads=self._config.threads,
            chunk_elements=max(1, (self._config.chunk_mb << 20) // 4),
            tensors=tensors,
            # Unsharded results get their per-tensor hashes while they upload (RegistryClient.push);
            # a shard's part is assembled later and keeps them.
            tensor_hashes=tensors is not None,
        )
        unreadable = {i: u.reader.reason for i, u in enumerate(inputs) if isinstance(u.reader, _Unreadable)}
        readable = [u for i, u in enumerate(inputs) if i not in unreadable]
        try:
            with (
                open(spool / "weights.safetensors", "w+b") as out,
                open(spool / "state.safetensors", "w+b") as state_out,
            ):
                if not readable:
                    raise NotEnoughUpdates([], options.min_accepted)
                result = aggregate(
                    base,
                    readable,
                    algorithm,
                    out,
                    state=state,
                    state_out=state_out if algorithm.state_slots else None,
                    options=options,
                    metadata={"fedhpc.algorithm": algorithm.name, "fedhpc.round": str(request.round)},
                )
        except NotEnoughUpdates as exc:
            for i, reason in unreadable.items():
                UPDATES.labels(Outcome.UNREADABLE.value).inc()
                log.warning("update unreadable", extra={"update": inputs[i].name, "reason": reason})
            for outcome in exc.outcomes:
                UPDATES.labels(outcome.outcome.value).inc()
            extra = f"; {len(unreadable)} unreadable" if unreadable else ""
            self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"nothing written: {exc}{extra}")
        except (SafetensorsError, StorageError) as exc:
            self._abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"aggregation failed reading its inputs: {exc}"
            )
        result.outcomes = _merge_unreadable(result, unreadable, len(inputs))
        for outcome in result.outcomes:
            UPDATES.labels(outcome.outcome.value).inc()
        AGGREGATION_BYTES.labels("read").inc(result.timing.bytes_read)
        AGGREGATION_BYTES.labels("written").inc(result.timing.bytes_written)
        if result.timing.total_s > 0:
            AGGREGATION_THROUGHPUT.observe(result.timing.bytes_read / result.timing.total_s / 1e9)
        return result

    def _commit(
        self,
        context: grpc.ServicerContext,
        request: aggregator_pb2.AggregateRequest,
        base: registry_pb2.ModelVersion,
        algorithm: ServerAlgorithm,
        path: Path,
        weights: VerifiedBlob,
        accepted: int,
    ) -> registry_pb2.ModelVersion:
        try:
            return self._registry.push(
                base.manifest.model,
                path,
                version=request.new_version,
                parent=base.manifest.version,
                round_number=request.round,
                algorithm=algorithm.name,
                producer=self._producer,
                metrics={**request.metrics, "accepted_updates": float(accepted)},
                aliases=list(request.aliases),
                verified=weights,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS and request.new_version:
                # Another replica (the other shard finishing at once, or a retry) committed it.
                existing = self._existing(base.manifest.model, request.new_version)
                if existing is not None and existing.manifest.sha256 == weights.sha256:
                    return existing
            self._abort(context, exc.code(), f"registry refused the new version: {exc.details()}")

    def _commit_state(
        self, context: grpc.ServicerContext, model: str, version: str, path: Path, state: VerifiedBlob
    ) -> common_pb2.ModelRef:
        lineage = state_model_name(model)
        try:
            self._registry.create_model(lineage, f"server-optimizer state of {model}")
            committed = self._registry.push(
                lineage,
                path,
                version=version,
                algorithm="optimizer-state",
                producer=self._producer,
                aliases=["latest"],
                kind=common_pb2.BLOB_KIND_OPTIMIZER_STATE,
                verified=state,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                return common_pb2.ModelRef(model=lineage, version=version)
            self._abort(context, exc.code(), f"registry refused the optimizer state: {exc.details()}")
        return common_pb2.ModelRef(model=lineage, version=committed.manifest.version)


def _response(
    request: aggregator_pb2.AggregateRequest,
    result: AggregationResult,
    *,
    version: registry_pb2.ModelVersion | None = None,
    state: common_pb2.ModelRef | None = None,
    shards_done: int,
    complete: bool,
) -> aggregator_pb2.AggregateResponse:
    return aggregator_pb2.AggregateResponse(
        version=version,
        outcomes=[
            aggregator_pb2.UpdateOutcome(
                object_key=ref.blob.object_key,
                site=ref.site,
                task_id=ref.task_id,
                code=aggregator_pb2.UpdateOutcomeCode.Value(f"UPDATE_OUTCOME_CODE_{o.outcome.value}"),
                message=o.message,
                weight=o.weight,
                l2_norm=o.l2_norm,
            )
            for ref, o in zip(request.updates, result.outcomes, strict=True)
        ],
        timing=aggregator_pb2.AggregationTiming(
            total_s=result.timing.total_s,
            read_s=result.timing.verify_s,
            compute_s=result.timing.compute_s,
            write_s=result.timing.write_s,
            bytes_read=result.timing.bytes_read,
            bytes_written=result.timing.bytes_written,
        ),
        optimizer_state=state,
        shards_done=shards_done,
        complete=complete,
    )


class _Unreadable:
    """Stands in for an update whose object is missing or not a safetensors file."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _merge_unreadable(
    result: AggregationResult, unreadable: dict[int, str], total: int
) -> list[UpdateOutcome]:
    merged = []
    readable = iter(result.outcomes)
    for i in range(total):
        if i in unreadable:
            merged.append(UpdateOutcome(index=i, outcome=Outcome.UNREADABLE, message=unreadable[i]))
        else:
            outcome = next(readable)
            outcome.index = i
            merged.append(outcome)
    return merged
