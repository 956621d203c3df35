"""The streaming aggregation core: one tensor at a time, memory O(model) whatever the number of updates.

For every tensor of the base model, in file order, each update's bytes for that
tensor are read chunk by chunk (pread from local files, byte ranges from object
storage) into small reused buffers, accumulated into a reused float32/float64 buffer
with the algorithm's weights (the fused C kernel in fedhpc.aggregator._kernels where
built: add and sum of squares in one pass), turned into the new weights by the
algorithm, and written out while the next tensor is computed. No full copy of any
update, and no N x model anything, is ever held.

Validation happens in the same pass: header checks (names, shapes, dtypes) up
front, then finiteness and L2 norms while accumulating, and the whole-file
sha256 where asked. An update found bad mid-way is dropped and the pass starts
over without it (the output is a seekable spool file, rewritten from the start),
so the common case reads every byte once.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

import torch

from fedhpc.aggregator.algorithms import ServerAlgorithm, UpdateInfo
from fedhpc.common.tensors import (
    SafetensorsError,
    SafetensorsHeader,
    SafetensorsWriter,
    TensorEntry,
    TensorSource,
    TruncatedError,
    VerifiedBlob,
    read_header,
    read_source_header,
)

try:
    from fedhpc.aggregator import _kernels
except ImportError:  # installed without a C compiler: the torch path does the same in two passes
    _kernels = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from typing_extensions import Buffer

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# frombuffer views of read-only mappings are only ever read here.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# Elements per accumulation step: small enough that a chunk of the accumulator and
# of each update stay in cache while every update is added to it.
CHUNK_ELEMENTS = 1 << 19
COMPRESSED_DTYPES = {"": None, "bf16": "BF16", "fp16": "F16"}
# Whether the fused C kernel (fedhpc.aggregator._kernels) was built, and the update dtypes it reads.
FUSED_KERNEL_AVAILABLE = _kernels is not None
_FUSED_DTYPES = frozenset({"F32", "BF16"})


class Outcome(StrEnum):
    """Per-update outcome; the names match fedhpc.v1.UpdateOutcomeCode."""

    ACCEPTED = "ACCEPTED"
    CLIPPED = "CLIPPED"
    WRONG_SHAPE = "WRONG_SHAPE"
    WRONG_DTYPE = "WRONG_DTYPE"
    MISSING_TENSOR = "MISSING_TENSOR"
    EXTRA_TENSOR = "EXTRA_TENSOR"
    NOT_FINITE = "NOT_FINITE"
    CHECKSUM_MISMATCH = "CHECKSUM_MISMATCH"
    NORM_EXCEEDED = "NORM_EXCEEDED"
    UNREADABLE = "UNREADABLE"

    @property
    def accepted(self) -> bool:
        return self in (Outcome.ACCEPTED, Outcome.CLIPPED)


class BlobReader(Protocol):
    """Random access to one safetensors blob: the caller supplies (and reuses) the buffers."""

    @property
    def header(self) -> SafetensorsHeader: ...
    def readinto(self, offset: int, view: memoryview) -> None: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def sha256(self) -> str: ...
    def close(self) -> None: ...


class FileReader:
    """A local safetensors file, read with pread into the caller's buffers.

    Nothing is mapped: memory stays O(buffers) whatever the number and size of the
    files, and reading into reused buffers avoids the fault on every fresh page that
    makes touching new memory slow.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._size = os.fstat(self._fd).st_size
            self._header = read_header(self.read, file_size=self._size)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def header(self) -> SafetensorsHeader:
        return self._header

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def readinto(self, offset: int, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = os.preadv(self._fd, [view[got:]], offset + got)
            if n <= 0:
                raise TruncatedError(f"{self.path} ends at byte {offset + got}, inside a tensor")
            got += n

    def sha256(self) -> str:
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(1 << 20))
        offset = 0
        while n := os.preadv(self._fd, [buffer], offset):
            digest.update(buffer[:n])
            offset += n
        return digest.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SourceReader:
    """Any TensorSource (e.g. an object in S3): ranged reads."""

    def __init__(self, source: TensorSource) -> None:
        self._source = source
        self._header = read_source_header(source)

    @property
    def header(self) -> SafetensorsHeader:
        return self._header

    def read(self, offset: int, length: int) -> bytes:
        return self._source.read_range(offset, length)

    def readinto(self, offset: int, view: memoryview) -> None:
        data = self._source.read_range(offset, len(view))
        if len(data) != len(view):
            raise TruncatedError(f"blob ends at byte {offset + len(data)}, inside a tensor")
        view[:] = data

    def sha256(self) -> str:
        digest = hashlib.sha256()
        step = 8 << 20
        for offset in range(0, self._source.size, step):
            digest.update(self._source.read_range(offset, min(step, self._source.size - offset)))
        return digest.hexdigest()

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if callable(close):
            close()


@dataclass(frozen=True)
class UpdateInput:
    """One update to aggregate and what is known about it."""

    reader: BlobReader
    num_samples: int
    staleness: int = 0
    full_weights: bool = False
    compression: str = ""
    # Expected whole-file sha256; checked when verify_checksums is on.
    sha256: str = ""
    name: str = ""


@dataclass
class UpdateOutcome:
    index: int
    outcome: Outcome
    message: str = ""
    weight: float = 0.0
    l2_norm: float = 0.0


@dataclass(frozen=True)
class AggregationOptions:
    accumulate_float64: bool = False
    # Reject updates whose L2 norm exceeds this (or scale them down to it, with clip_to_norm); 0 = off.
    max_update_norm: float = 0.0
    clip_to_norm: bool = False
    min_accepted: int = 1
    verify_checksums: bool = True
    # Worker threads reading and summing chunks (torch ops and pread release the GIL).
    threads: int = 2
    # Elements per chunk; larger for object-store sources, where every chunk is a request.
    chunk_elements: int = CHUNK_ELEMENTS
    # Aggregate only these tensors (one shard of a sharded aggregation); None = all.
    tensors: tuple[str, ...] | None = None
    # Report each update's L2 norm. Always on with max_update_norm. With the fused kernel the
    # squares are summed in the same pass as the accumulation (free); on the torch path it costs
    # a dot product per chunk, and off, non-finite values are still caught (the sum turns NaN/Inf).
    compute_norms: bool = True
    # Use the fused C kernel for float32/bfloat16 updates where it was built
    # (FUSED_KERNEL_AVAILABLE): one pass per chunk instead of two. Off: the torch path.
    fused_kernel: bool = True
    # Hash every output tensor while writing it (its manifest entry). Off, only the whole-file
    # sha256 is computed and the result's tensor_sha256 is empty: the service has
    # RegistryClient.push read them back while the file uploads, off the critical path.
    tensor_hashes: bool = True


@dataclass
class AggregationTiming:
    total_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0
    verify_s: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    passes: int = 0


@dataclass
class AggregationResult:
    outcomes: list[UpdateOutcome]
    weights: VerifiedBlob
    state: VerifiedBlob | None
    timing: AggregationTiming = field(default_factory=AggregationTiming)

    @property
    def accepted(self) -> int:
        return sum(1 for o in self.outcomes if o.outcome.accepted)


class NotEnoughUpdates(Exception):
    """Fewer updates passed validation than min_accepted; nothing was written."""

    def __init__(self, outcomes: list[UpdateOutcome], min_accepted: int) -> None:
        accepted = sum(1 for o in outcomes if o.outcome.accepted)
        reasons = "; ".join(
            f"update {o.index}: {o.outcome.value}: {o.message}" for o in outcomes if not o.outcome.accepted
        )
        super().__init__(f"{accepted} of {len(outcomes)} updates accepted, need {min_accepted} ({reasons})")
        self.outcomes = outcomes


class _Restart(Exception):
    """An update turned out bad mid-pass: aggregate again without it."""


def state_tensor_name(slot: str, tensor: str) -> str:
    return f"{slot}/{tensor}"


class _WorkerBuffer:
    """One worker's read buffer, with a tensor view per dtype made once."""

    def __init__(self, nbytes: int) -> None:
        self.raw = bytearray(nbytes)
        self.view = memoryview(self.raw)
        self._tensors: dict[str, torch.Tensor] = {}

    def tensor(self, code: str, numel: int) -> torch.Tensor:
        whole = self._tensors.get(code)
        if whole is None:
            whole = torch.frombuffer(self.raw, dtype=_TORCH_DTYPES[code])
            self._tensors[code] = whole
        return whole[:numel]


class _Buffers:
    """Scratch reused across tensors (and, when the caller keeps it, across rounds).

    The accumulator and the output buffers come in WRITE_SIDES sides, used in turn: while
    the results of earlier tensors are written out (and hashed) from their sides, the next
    tensor is computed on a free one. Two sides are not enough: models alternate large
    weights with small biases, and with two the next weight would wait for the previous
    weight's write to finish (its side is the one it needs), leaving the cores idle.
    """

    WRITE_SIDES = 3

    def __init__(self, numel: int, dtype: torch.dtype, workers: int, chunk_elements: int) -> None:
        self.dtype = dtype
        self.numel = numel
        self.chunk_elements = chunk_elements
        self._accs = [torch.empty(numel, dtype=dtype)]
        self.base = torch.empty(numel, dtype=dtype)
        self.scratch = torch.empty(numel, dtype=dtype)
        self.workers = [_WorkerBuffer(chunk_elements * 8) for _ in range(workers)]
        self._outs: list[dict[torch.dtype, torch.Tensor]] = [{} for _ in range(self.WRITE_SIDES)]
        self._side = 0

    @property
    def acc(self) -> torch.Tensor:
        return self._accs[self._side]

    def flip(self) -> None:
        """Move to the next side: the current side's buffers now belong to a write in flight."""
        self._side = (self._side + 1) % self.WRITE_SIDES
        if len(self._accs) <= self._side:
            self._accs.append(torch.empty_like(self._accs[0]))

    def out(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        outs = self._outs[self._side]
        buffer = outs.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, self.numel), dtype=dtype)
            outs[dtype] = buffer
        return buffer[:numel]


def _view(data: memoryview | bytes, entry: TensorEntry) -> torch.Tensor:
    dtype = _TORCH_DTYPES[entry.dtype]
    if entry.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype)


def _check_header(
    base: SafetensorsHeader, update: SafetensorsHeader, compression: str
) -> tuple[Outcome, str] | None:
    names, update_names = set(base.names), set(update.names)
    missing = sorted(names - update_names)
    if missing:
        return Outcome.MISSING_TENSOR, f"missing tensor(s) {', '.join(repr(n) for n in missing[:5])}"
    extra = sorted(update_names - names)
    if extra:
        return Outcome.EXTRA_TENSOR, f"unexpected tensor(s) {', '.join(repr(n) for n in extra[:5])}"
    wire = COMPRESSED_DTYPES[compression]
    for entry in base.entries:
        got = update.entry(entry.name)
        if got.shape != entry.shape:
            return (
                Outcome.WRONG_SHAPE,
                f"tensor {entry.name!r} has shape {list(got.shape)}, the model {list(entry.shape)}",
            )
        expected = wire if (wire and entry.dtype in _FLOAT_CODES) else entry.dtype
        if got.dtype != expected:
            return Outcome.WRONG_DTYPE, f"tensor {entry.name!r} has dtype {got.dtype}, expected {expected}"
    return None


def aggregate(
    base: BlobReader,
    updates: Sequence[UpdateInput],
    algorithm: ServerAlgorithm,
    out: BinaryIO,
    *,
    state: BlobReader | None = None,
    state_out: BinaryIO | None = None,
    options: AggregationOptions | None = None,
    metadata: Mapping[str, str] | None = None,
) -> AggregationResult:
    """Aggregate updates into new weights written to `out` (a seekable file, rewritten on a restart).

    The algorithm's optimizer state is read from `state` (zeros when None) and the
    new state written to `state_out` when the algorithm keeps one. Raises
    NotEnoughUpdates (with every outcome) when fewer than options.min_accepted pass.
    """
    options = options or AggregationOptions()
    started = time.perf_counter()
    timing = AggregationTiming()
    outcomes = [UpdateOutcome(index=i, outcome=Outcome.ACCEPTED) for i in range(len(updates))]
    for i, update in enumerate(updates):
        if update.compression not in COMPRESSED_DTYPES:
            outcomes[i].outcome, outcomes[i].message = (
                Outcome.UNREADABLE,
                f"unsupported compression {update.compression!r}",
            )
            continue
        problem = _check_header(base.header, update.reader.header, update.compression)
        if problem:
            outcomes[i].outcome, outcomes[i].message = problem
    threads = max(1, options.threads)
    torch_threads = torch.get_num_threads()
    # Our workers already use the cores; torch's own intra-op threads would oversubscribe them.
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="fedhpc-aggregate") as pool:
            if options.verify_checksums:
                _verify_checksums(updates, outcomes, pool, timing)
            return _aggregate_passes(
                base,
                updates,
                algorithm,
                out,
                state,
                state_out,
                options,
                metadata,
                outcomes,
                timing,
                pool,
                started,
            )
    finally:
        torch.set_num_threads(torch_threads)


def _verify_checksums(
    updates: Sequence[UpdateInput],
    outcomes: list[UpdateOutcome],
    pool: ThreadPoolExecutor,
    timing: AggregationTiming,
) -> None:
    verify_started = time.perf_counter()
    todo = [i for i, u in enumerate(updates) if outcomes[i].outcome.accepted and u.sha256]
    for i, actual in zip(todo, pool.map(lambda i: updates[i].reader.sha256(), todo), strict=True):
        if actual != updates[i].sha256.lower():
            outcomes[i].outcome = Outcome.CHECKSUM_MISMATCH
            outcomes[i].message = f"sha256 is {actual}, the update reference says {updates[i].sha256}"
    timing.verify_s = time.perf_counter() - verify_started


def _aggregate_passes(
    base: BlobReader,
    updates: Sequence[UpdateInput],
    algorithm: ServerAlgorithm,
    out: BinaryIO,
    state: BlobReader | None,
    state_out: BinaryIO | None,
    options: AggregationOptions,
    metadata: Mapping[str, str] | None,
    outcomes: list[UpdateOutcome],
    timing: AggregationTiming,
    pool: ThreadPoolExecutor,
    started: float,
) -> AggregationResult:
    dtype = torch.float64 if options.accumulate_float64 else torch.float32
    largest = max((math.prod(e.shape) for e in base.header.entries), default=1)
    buffers = _Buffers(max(1, largest), dtype, max(1, options.threads), max(1, options.chunk_elements))
    scales = [1.0] * len(updates)
    while True:
        active = [i for i, o in enumerate(outcomes) if o.outcome.accepted]
        if len(active) < max(1, options.min_accepted):
            raise NotEnoughUpdates(outcomes, options.min_accepted)
        timing.passes += 1
        _rewind(out)
        if state_out is not None:
            _rewind(state_out)
        try:
            weights_blob, state_blob, norms = _one_pass(
                base,
                updates,
                active,
                scales,
                algorithm,
                out,
                state,
                state_out,
                buffers,
                options,
                metadata,
                timing,
                pool,
            )
        except _RejectUpdate as reject:
            # The job numbers updates among the active ones.
            index = active[reject.index] if reject.in_active else reject.index
            outcomes[index].outcome = reject.outcome
            outcomes[index].message = reject.message
            continue
        except _ClipUpdate as clip:
            outcomes[clip.index].outcome = Outcome.CLIPPED
            outcomes[
                clip.index
            ].message = f"L2 norm {clip.norm:.6g} clipped to max_update_norm {options.max_update_norm:g}"
            continue
        for i in active:
            outcomes[i].l2_norm = norms[i]
        break
    weights = algorithm.weights([UpdateInfo(updates[i].num_samples, updates[i].staleness) for i in active])
    for i, w in zip(active, weights, strict=True):
        outcomes[i].weight = w * scales[i]
    timing.total_s = time.perf_counter() - started
    timing.bytes_written = weights_blob.size + (state_blob.size if state_blob else 0)
    return AggregationResult(outcomes=outcomes, weights=weights_blob, state=state_blob, timing=timing)


def _rewind(sink: BinaryIO) -> None:
    """Empty `sink` for a fresh pass. An empty sink is left alone: on ext4 a truncate to zero
    makes close() start writeback of everything written since (auto_da_alloc), ~0.1 s per
    400 MB on the critical path of every call."""
    if sink.seek(0, os.SEEK_END) > 0:
        sink.truncate(0)
    sink.seek(0)


def _one_pass(
    base: BlobReader,
    updates: Sequence[UpdateInput],
    active: list[int],
    scales: list[float],
    algorithm: ServerAlgorithm,
    out: BinaryIO,
    state: BlobReader | None,
    state_out: BinaryIO | None,
    buffers: _Buffers,
    options: AggregationOptions,
    metadata: Mapping[str, str] | None,
    timing: AggregationTiming,
    pool: ThreadPoolExecutor,
) -> tuple[VerifiedBlob, VerifiedBlob | None, dict[int, float]]:
    infos = [UpdateInfo(updates[i].num_samples, updates[i].staleness) for i in active]
    weights = [w * scales[i] for w, i in zip(algorithm.weights(infos), active, strict=True)]
    # Integer tensors take the sample-weighted mean whatever the algorithm (documented rule).
    total_samples = sum(max(0, updates[i].num_samples) for i in active)
    int_weights = [
        (updates[i].num_samples / total_samples) if total_samples else 1.0 / len(active) for i in active
    ]
    wanted = None if options.tensors is None else set(options.tensors)
    entries = [e for e in base.header.entries if wanted is None or e.name in wanted]
    writer = SafetensorsWriter(
        out,
        [(e.name, e.dtype, e.shape) for e in entries],
        metadata=metadata,
        tensor_hashes=options.tensor_hashes,
    )
    slots = algorithm.state_slots
    float_entries = [e for e in entries if e.dtype in _FLOAT_CODES]
    state_writer = None
    if slots and state_out is not None:
        specs = [
            (state_tensor_name(slot, e.name), "F64" if buffers.dtype == torch.float64 else "F32", e.shape)
            for e in float_entries
            for slot in slots
        ]
        state_writer = SafetensorsWriter(state_out, specs, metadata={"fedhpc.algorithm": algorithm.name})
    sq_norms = dict.fromkeys(active, 0.0)
    # Stateless algorithms write each result on a thread of its own while the next tensor is
    # computed (the optimizer-state tensors of the others live in single buffers).
    overlap = state_writer is None
    pending: list[Future[None]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="fedhpc-aggregate-write") as write_pool:
        try:
            for entry in entries:
                if len(pending) >= _Buffers.WRITE_SIDES:
                    pending.pop(0).result()  # the side about to be reused is free again
                output, state_tensors = _compute_tensor(
                    entry,
                    base,
                    updates,
                    active,
                    weights,
                    int_weights,
                    algorithm,
                    state,
                    buffers,
                    options,
                    timing,
                    pool,
                    sq_norms,
                    scales,
                )
                tensor = output.view(entry.shape) if entry.shape else output.reshape(())
                if overlap:
                    pending.append(write_pool.submit(_timed_write, writer, entry.name, tensor, timing))
                    buffers.flip()
                    continue
                _timed_write(writer, entry.name, tensor, timing)
                if state_writer is not None and entry.dtype in _FLOAT_CODES:
                    for slot in slots:
                        state_writer.write(
                            state_tensor_name(slot, entry.name), state_tensors[slot].view(entry.shape)
                        )
            for future in pending:
                future.result()
        finally:
            # A rejected update restarts the pass: no write may still be running into `out`.
            wait(pending)
    _check_norms(sq_norms, active, updates, options, scales, final=True)
    norms = {i: math.sqrt(v) for i, v in sq_norms.items()}
    return writer.close(), state_writer.close() if state_writer is not None else None, norms


def _timed_write(
    writer: SafetensorsWriter, name: str, tensor: torch.Tensor, timing: AggregationTiming
) -> None:
    started = time.perf_counter()
    writer.write(name, tensor)
    timing.write_s += time.perf_counter() - started


def _compute_tensor(
    entry: TensorEntry,
    base: BlobReader,
    updates: Sequence[UpdateInput],
    active: list[int],
    weights: list[float],
    int_weights: list[float],
    algorithm: ServerAlgorithm,
    state: BlobReader | None,
    buffers: _Buffers,
    options: AggregationOptions,
    timing: AggregationTiming,
    pool: ThreadPoolExecutor,
    sq_norms: dict[int, float],
    scales: list[float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One tensor's new value (in the buffers' current side) and its new optimizer state."""
    compute_started = time.perf_counter()
    numel = math.prod(entry.shape)
    # Each update has its own layout: its header gives this tensor's byte range.
    own = [updates[i].reader.header.entry(entry.name) for i in active]
    timing.bytes_read += sum(e.nbytes for e in own)
    state_tensors: dict[str, torch.Tensor] = {}
    if entry.dtype in _FLOAT_CODES:
        state_tensors = _load_state(algorithm, state, entry, buffers, numel)
        model_dtype = _TORCH_DTYPES[entry.dtype]
        # When the model's dtype is the accumulation dtype the result is left in the
        # accumulator itself (apply writes it there): no extra pass copying it out.
        output = buffers.acc[:numel] if model_dtype == buffers.dtype else buffers.out(model_dtype, numel)
        job = _FloatTensorJob(
            entry,
            numel,
            base,
            [updates[i] for i in active],
            own,
            weights,
            state_tensors,
            algorithm,
            buffers,
            output,
            norms=options.compute_norms or options.max_update_norm > 0,
            fused=options.fused_kernel and FUSED_KERNEL_AVAILABLE,
        )
        for i, sq in zip(active, job.run(pool), strict=True):
            sq_norms[i] += sq
        _check_norms(sq_norms, active, updates, options, scales, final=False)
    else:
        output = _integer_rule(entry, numel, base, [updates[i] for i in active], own, int_weights, buffers)
    timing.compute_s += time.perf_counter() - compute_started
    return output, state_tensors


class _FloatTensorJob:
    """One float tensor: base, every update's delta and the algorithm step, chunk by chunk.

    Chunks are dealt round-robin to the worker threads; each reads its chunk of the
    base and of every update into its own small buffer (so the data is in cache when
    it is summed), adds it to the accumulator, records squared norms and finiteness,
    then applies the algorithm to that chunk (every algorithm is elementwise).
    """

    def __init__(
        self,
        entry: TensorEntry,
        numel: int,
        base: BlobReader,
        updates: list[UpdateInput],
        own: list[TensorEntry],
        weights: list[float],
        state: dict[str, torch.Tensor],
        algorithm: ServerAlgorithm,
        buffers: _Buffers,
        output: torch.Tensor,
        norms: bool = True,
        fused: bool = False,
    ) -> None:
        self.entry, self.numel, self.base, self.updates, self.own = entry, numel, base, updates, own
        self.weights, self.state, self.algorithm, self.buffers, self.output = (
            weights,
            state,
            algorithm,
            buffers,
            output,
        )
        self.norms = norms
        self.fused = fused
        # Full-weights updates add w * local; their delta is local - base, so base comes off once.
        self.full_weight = sum(w for w, u in zip(weights, updates, strict=True) if u.full_weights)

    def run(self, pool: ThreadPoolExecutor) -> list[float]:
        workers = len(self.buffers.workers)
        futures = [pool.submit(self._work, k, workers) for k in range(workers)]
        wait(futures)  # every worker is done with the shared buffers before anyone moves on
        totals = [0.0] * len(self.updates)
        for future in futures:
            for j, sq in enumerate(future.result()):
                totals[j] += sq
        return totals

    def _work(self, worker: int, workers: int) -> list[float]:
        buffer = self.buffers.workers[worker]
        acc_dtype = self.buffers.dtype
        sq = [0.0] * len(self.updates)
        base_size = _TORCH_DTYPES[self.entry.dtype].itemsize
        base_direct = _TORCH_DTYPES[self.entry.dtype] == acc_dtype
        # Equal parts, a multiple of the worker count: with fixed-size chunks one thread idles
        # for up to a whole chunk at the end of every tensor, waiting at the tensor's barrier.
        parts = workers * max(1, -(-self.numel // (workers * self.buffers.chunk_elements)))
        chunk = -(-self.numel // parts)
        for start in range(worker * chunk, self.numel, workers * chunk):
            end = min(self.numel, start + chunk)
            n = end - start
            base_c = self.buffers.base[start:end]
            acc_c = self.buffers.acc[start:end]
            scratch_c = self.buffers.scratch[start:end]
            base_at = self.entry.begin + start * base_size
            if base_direct:
                # Same dtype as the accumulator: read straight into place, no copy.
                self.base.readinto(base_at, _bytes_of(base_c))
            else:
                self.base.readinto(base_at, buffer.view[: n * base_size])
                base_c.copy_(buffer.tensor(self.entry.dtype, n))
            unchecked = False  # some update was summed without its own finiteness check
            # numpy carries the float format the kernel reads; one view per chunk, not per update.
            acc_array = cast("Buffer", acc_c.numpy()) if self.fused else None
            for j, (update, own) in enumerate(zip(self.updates, self.own, strict=True)):
                size = _TORCH_DTYPES[own.dtype].itemsize
                raw = buffer.view[: n * size]
                update.reader.readinto(own.begin + start * size, raw)
                part = buffer.tensor(own.dtype, n)
                if acc_array is not None and own.dtype in _FUSED_DTYPES and not update.full_weights:
                    square = _kernels.accumulate(acc_array, raw, self.weights[j], j == 0, own.dtype)
                    square = self._checked_square(square, j, part)
                    if self.norms:
                        sq[j] += square
                    continue
                if not self.norms:
                    _accumulate(acc_c, part, self.weights[j], first=j == 0)
                    unchecked = True
                    continue
                if update.full_weights:
                    torch.sub(part, base_c, out=scratch_c)
                    delta = scratch_c
                elif part.dtype != acc_dtype:
                    scratch_c.copy_(part)
                    delta = scratch_c
                else:
                    delta = part
                sq[j] += self._checked_square(float(torch.dot(delta, delta)), j, delta)
                _accumulate(acc_c, part, self.weights[j], first=j == 0)
            if unchecked and not bool(torch.isfinite(acc_c).all()):
                self._find_non_finite(start, n, buffer)
            if self.full_weight:
                acc_c.sub_(base_c, alpha=self.full_weight)
            state_c = {slot: tensor[start:end] for slot, tensor in self.state.items()}
            new = self.algorithm.apply(base_c, acc_c, state_c, scratch=scratch_c)
            out_c = self.output[start:end]
            if out_c.data_ptr() != new.data_ptr():
                out_c.copy_(new)
        return sq

    def _checked_square(self, square: float, j: int, delta: torch.Tensor) -> float:
        """Update j's sum of squares over this chunk, or its rejection if the chunk holds NaN/Inf."""
        if math.isfinite(square):
            return square
        if not bool(torch.isfinite(delta).all()):
            raise _RejectUpdate(j, Outcome.NOT_FINITE, f"tensor {self.entry.name!r} holds NaN or Inf")
        return math.inf  # finite values whose squares overflow: an enormous norm

    def _find_non_finite(self, start: int, n: int, buffer: _WorkerBuffer) -> None:
        """The sum of a chunk is not finite: find the update that made it so (rare path)."""
        for j, (update, own) in enumerate(zip(self.updates, self.own, strict=True)):
            size = _TORCH_DTYPES[own.dtype].itemsize
            update.reader.readinto(own.begin + start * size, buffer.view[: n * size])
            if not bool(torch.isfinite(buffer.tensor(own.dtype, n)).all()):
                raise _RejectUpdate(j, Outcome.NOT_FINITE, f"tensor {self.entry.name!r} holds NaN or Inf")
        raise SafetensorsError(
            f"the weighted sum of tensor {self.entry.name!r} overflowed although every update is finite; "
            "accumulate in float64"
        )


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (pread fills it in place)."""
    return memoryview(cast("Buffer", tensor.numpy())).cast("B")


def _accumulate(acc: torch.Tensor, part: torch.Tensor, weight: float, *, first: bool) -> None:
    """acc += weight * part; the first update sets acc instead, saving a pass zeroing it."""
    if not first:
        acc.add_(part, alpha=weight)
    elif part.dtype == acc.dtype:
        torch.mul(part, weight, out=acc)
    else:
        # Widen first: multiplying in the narrow dtype would round before accumulating.
        acc.copy_(part).mul_(weight)


class _RejectUpdate(_Restart):
    def __init__(self, index: int, outcome: Outcome, message: str, *, in_active: bool = True) -> None:
        super().__init__(message)
        self.index = index
        self.in_active = in_active
        self.outcome = outcome
        self.message = message


def _check_norms(
    sq_norms: dict[int, float],
    active: list[int],
    updates: Sequence[UpdateInput],
    options: AggregationOptions,
    scales: list[float],
    *,
    final: bool,
) -> None:
    bound = options.max_update_norm
    if bound <= 0:
        return
    for i in active:
        norm = math.sqrt(sq_norms[i])
        if norm <= bound or scales[i] != 1.0:
            continue
        if options.clip_to_norm and math.isfinite(norm):
            if final:
                # Clipping needs the whole norm, known only now: rerun with the scale.
                scales[i] = bound / norm
                raise _ClipUpdate(i, norm)
            continue
        raise _RejectUpdate(
            i, Outcome.NORM_EXCEEDED, f"L2 norm {norm:.6g} exceeds max_update_norm {bound:g}", in_active=False
        )


class _ClipUpdate(_Restart):
    def __init__(self, index: int, norm: float) -> None:
        super().__init__(f"update {index} clipped from norm {norm}")
        self.index = index
        self.norm = norm


def _integer_rule(
    entry: TensorEntry,
    numel: int,
    base: BlobReader,
    updates: list[UpdateInput],
    own: list[TensorEntry],
    int_weights: list[float],
    buffers: _Buffers,
) -> torch.Tensor:
    """Integer tensors: base + round(sample-weighted mean delta); full weights: round(weighted mean).
    Bool tensors keep the base value. (Small tensors: read whole.)"""
    base_t = _view(base.read(entry.begin, entry.nbytes), entry)
    output = buffers.out(base_t.dtype, numel)
    if entry.dtype == "BOOL" or numel == 0:
        output.copy_(base_t)
        return output
    base64 = base_t.to(torch.float64)
    mean = torch.zeros(numel, dtype=torch.float64)
    for update, entry_u, weight in zip(updates, own, int_weights, strict=True):
        values = _view(update.reader.read(entry_u.begin, entry_u.nbytes), entry_u).to(torch.float64)
        mean.add_(values - base64 if update.full_weights else values, alpha=weight)
    output.copy_((base64 + mean).round_())
    return output


def _load_state(
    algorithm: ServerAlgorithm, state: BlobReader | None, entry: TensorEntry, buffers: _Buffers, numel: int
) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    like = buffers.base[:numel]
    for slot in algorithm.state_slots:
        name = state_tensor_name(slot, entry.name)
        if state is not None and name in state.header:
            stored = state.header.entry(name)
            if stored.shape != entry.shape:
                raise SafetensorsError(
                    f"optimizer state {name!r} has shape {list(stored.shape)}, the model {list(entry.shape)}"
                )
            tensors[slot] = _view(state.read(stored.begin, stored.nbytes), stored).to(buffers.dtype).clone()
        else:
            tensors[slot] = algorithm.initial_state(slot, like)
    return tensors


def shard_tensors(header: SafetensorsHeader, shard_index: int, shard_count: int) -> tuple[str, ...]:
    """The tensors shard `shard_index` of `shard_count` aggregates: largest first, each to the
    shard with the fewest bytes so far, so shards read about the same amount. Deterministic."""
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    loads = [0] * shard_count
    owner: dict[str, int] = {}
    for entry in sorted(header.entries, key=lambda e: (-e.nbytes, e.name)):
        target = min(range(shard_count), key=lambda k: (loads[k], k))
        owner[entry.name] = target
        loads[target] += entry.nbytes
    return tuple(e.name for e in header.entries if owner[e.name] == shard_index)


def assemble(
    names: Sequence[str],
    parts: Sequence[BlobReader],
    out: BinaryIO,
    metadata: Mapping[str, str] | None = None,
    chunk_bytes: int = 8 << 20,
) -> VerifiedBlob:
    """Write one safetensors file with tensors `names`, in that order, copied from whichever
    shard output holds each (byte for byte: the result is what one unsharded run writes)."""
    holder: dict[str, tuple[BlobReader, TensorEntry]] = {}
    for part in parts:
        for entry in part.header.entries:
            holder[entry.name] = (part, entry)
    missing = [n for n in names if n not in holder]
    if missing:
        raise SafetensorsError(f"no shard holds tensor(s) {', '.join(repr(n) for n in missing[:5])}")
    writer = SafetensorsWriter(
        out, [(n, holder[n][1].dtype, holder[n][1].shape) for n in names], metadata=metadata
    )
    buffer = bytearray(chunk_bytes)
    for name in names:
        part, entry = holder[name]
        data = bytearray(entry.nbytes) if entry.nbytes > chunk_bytes else memoryview(buffer)[: entry.nbytes]
        part.readinto(entry.begin, memoryview(data))
        writer.write(name, data)
    return writer.close()
