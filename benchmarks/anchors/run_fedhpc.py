"""fedhpc's side of benchmarks/aggregation.py, run in the project venv, one fresh process per run.

Methods (spec "method"):

  fedhpc          aggregate() over FileReaders of the base and update files, FedAvg, checksums
                  off. Timed: opening the files, the whole aggregation (reading every update
                  from its file, summing, writing the new model to a new file spec "out"), closing
                  them. A file left at spec "out" by an earlier run is removed before the timer.
  fedhpc-sha256   the same with verify_checksums=True and each update's expected sha256: every
                  update file is hashed (read once more) before aggregating.
  bandwidth       the memory bandwidth reference: ``dst += src`` on two warm, reused float32
                  tensors of spec "gib" GiB each; the best of spec "iterations" runs is timed.

See runner_common for the spec and the JSON line printed at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from runner_common import emit, load_spec, measure

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "services"))

import torch  # noqa: E402

from fedhpc.aggregator.algorithms import make_algorithm  # noqa: E402
from fedhpc.aggregator.core import (  # noqa: E402
    FUSED_KERNEL_AVAILABLE,
    AggregationOptions,
    AggregationResult,
    FileReader,
    UpdateInput,
    aggregate,
)


def run_fedhpc(spec: dict[str, Any], *, verify: bool) -> None:
    # As the aggregator service runs it: per-tensor checksums for the manifest are read back
    # while the result uploads (RegistryClient.push), so only the whole-file sha256 is timed here.
    options = AggregationOptions(verify_checksums=verify, tensor_hashes=False)
    algorithm = make_algorithm("fedavg")

    def call() -> AggregationResult:
        readers = [FileReader(u["path"]) for u in spec["updates"]]
        base = FileReader(spec["base"])
        try:
            ups = [
                UpdateInput(reader, num_samples=u["num_samples"], sha256=u["sha256"] if verify else "")
                for reader, u in zip(readers, spec["updates"], strict=True)
            ]
            with open(spec["out"], "w+b") as out:
                return aggregate(base, ups, algorithm, out, options=options)
        finally:
            for reader in [base, *readers]:
                reader.close()

    def remove_output() -> None:
        # The previous call's result (or the previous run's): deleting it is not this call's
        # work, and opening it with truncation would be (ext4 then starts writeback on close).
        Path(spec["out"]).unlink(missing_ok=True)

    result, measurement = measure(call, warmups=spec.get("warmup", 0), before_each=remove_output)
    if result.accepted != len(spec["updates"]):
        sys.exit(f"fedhpc rejected updates: {[o.outcome.value for o in result.outcomes]}")
    timing = result.timing
    emit(
        spec["method"],
        measurement,
        {
            "compute_s": timing.compute_s,
            "write_s": timing.write_s,
            "verify_s": timing.verify_s,
            "aggregate_total_s": timing.total_s,
            "bytes_read": timing.bytes_read,
            "threads": options.threads,
            "fused_kernel": FUSED_KERNEL_AVAILABLE,
        },
    )


def run_bandwidth(spec: dict[str, Any]) -> None:
    numel = int(spec["gib"] * (1 << 30)) // 4
    dst = torch.zeros(numel, dtype=torch.float32)
    src = torch.full((numel,), 1e-3, dtype=torch.float32)
    for _ in range(2):  # warm: pages faulted in, caches and thread pool ready
        dst += src
    best = None
    for _ in range(spec["iterations"]):
        _, measurement = measure(lambda: dst.add_(src))
        if best is None or measurement.seconds < best.seconds:
            best = measurement
    assert best is not None
    emit(
        "bandwidth",
        best,
        {"bytes": numel * 4, "torch_threads": torch.get_num_threads(), "iterations": spec["iterations"]},
    )


def main() -> None:
    spec = load_spec()
    method = spec["method"]
    if method == "bandwidth":
        run_bandwidth(spec)
    elif method in ("fedhpc", "fedhpc-sha256"):
        run_fedhpc(spec, verify=method == "fedhpc-sha256")
    else:
        sys.exit(f"unknown method {method!r}")


if __name__ == "__main__":
    main()
