"""What every runner of benchmarks/aggregation.py shares: the case spec, the clock and the RSS probes.

A runner is started as ``python RUNNER SPEC_JSON`` in a fresh process. SPEC_JSON is::

    {"method": "...", "base": "base.safetensors", "out": "out.safetensors",
     "updates": [{"path": "u0.safetensors", "num_samples": 100, "sha256": "..."}, ...],
     "warmup": 0}

("warmup": untimed calls before the timed one, see measure().)

The runner prepares its inputs (untimed), then calls :func:`measure` around exactly the call
being benchmarked, writes its result, and prints ONE JSON line (the last line of stdout)::

    {"method": ..., "seconds": ..., "peak_rss_mib": ..., "rss_before_mib": ...,
     "call_peak_rss_mib": ..., "peak_above_before_mib": ..., "hwm_reset": ..., "extra": {...}}

peak_rss_mib is the process's VmHWM (its peak resident set over its whole life, loading
included); rss_before_mib is VmRSS right before the timed call; call_peak_rss_mib is the
peak during the call alone (VmHWM is reset through /proc/self/clear_refs just before the
call where the kernel allows it; otherwise it equals peak_rss_mib, an upper bound);
peak_above_before_mib = call_peak_rss_mib - rss_before_mib: what the call itself added.

Only the standard library here: it runs in the project venv and in the anchors venv.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
MIB = 1 << 20


def load_spec() -> dict[str, Any]:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SPEC_JSON")
    spec: dict[str, Any] = json.loads(sys.argv[1])
    return spec


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return _status_kib("VmRSS") * 1024 / MIB


def hwm_mib() -> float:
    return _status_kib("VmHWM") * 1024 / MIB


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class Measurement:
    seconds: float
    rss_before_mib: float
    call_peak_rss_mib: float
    hwm_reset: bool
    # VmHWM before the reset: the peak of everything before the call (loading the inputs).
    peak_before_call_mib: float

    @property
    def peak_above_before_mib(self) -> float:
        return max(0.0, self.call_peak_rss_mib - self.rss_before_mib)


def measure(
    call: Callable[[], T], *, warmups: int = 0, before_each: Callable[[], None] | None = None
) -> tuple[T, Measurement]:
    """Run call() once, timed, with the RSS probes around it.

    With warmups > 0 (spec "warmup"), call() first runs that many times untimed, so the timed
    call finds memory the process has already touched: the steady state of a long-running
    server, where the one-shot figure includes first-touch page faults. before_each() runs
    untimed before every call (e.g. removing the previous call's output file).
    """
    for _ in range(warmups):
        if before_each is not None:
            before_each()
        call()
    if before_each is not None:
        before_each()
    gc.collect()
    peak_before = hwm_mib()
    before = rss_mib()
    was_reset = reset_hwm()
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    return result, Measurement(seconds, before, hwm_mib(), was_reset, peak_before)


def emit(method: str, measurement: Measurement, extra: dict[str, Any] | None = None) -> None:
    """Print the result line; call it last, so that peak_rss_mib covers the whole run."""
    line = {
        "method": method,
        "seconds": measurement.seconds,
        "peak_rss_mib": max(measurement.peak_before_call_mib, hwm_mib()),
        "rss_before_mib": measurement.rss_before_mib,
        "call_peak_rss_mib": measurement.call_peak_rss_mib,
        "peak_above_before_mib": measurement.peak_above_before_mib,
        "hwm_reset": measurement.hwm_reset,
        "extra": extra or {},
    }
    sys.stdout.flush()
    print(json.dumps(line), flush=True)
