#!/usr/bin/env python3
"""FedAvg aggregation speed and memory: fedhpc's streaming core against Flower and APPFL, in one run.

For each case (every --params P with every --clients N) one synthetic base model and N
synthetic updates (deltas, local - global) are written once as safetensors files, with
fedhpc.testing.synthetic.write_synthetic_model (P * 4 bytes each: about 60 tensors of mixed
shapes, float32 weights and float16 biases), client k holding 100 + 37 k samples. The same
data is then aggregated with FedAvg (sample-weighted: base + sum_k n_k d_k / sum_k n_k) by:

  fedhpc          fedhpc.aggregator.core.aggregate(FileReader(base), [UpdateInput(FileReader(u_k),
                  num_samples=n_k)], make_algorithm("fedavg"), out, options=
                  AggregationOptions(verify_checksums=False, tensor_hashes=False)). Its time
                  INCLUDES reading every update from its file and writing the new model to a
                  file with its whole-file sha256; as in the aggregator service, the per-tensor
                  checksums for the manifest are left to RegistryClient.push, which reads them
                  back while the file uploads.
  fedhpc-sha256   the same with verify_checksums=True (AggregationOptions' default) and each
                  update's expected sha256: every update file is also hashed, i.e. read twice.
  flower          flwr.server.strategy.aggregate.aggregate([(ndarrays_k, n_k), ...]).
  flower-inplace  flwr.server.strategy.aggregate.aggregate_inplace([(proxy, FitRes_k), ...]),
                  the clients' weights serialized in FitRes.parameters (flwr's FedAvg default
                  path; the call deserializes them itself).
  appfl           appfl.algorithm.aggregator.FedAvgAggregator(model, {"client_weights_mode":
                  "sample_size"}).aggregate({client_id: state_dict}), the model holding the base.

The anchors (Flower, APPFL) get their inputs ALREADY IN MEMORY in their own formats (numpy
arrays, FitRes, torch state dicts), loaded and converted before their timer starts: the
clients' full local weights base + d_k in float32, which is what both frameworks average
(see benchmarks/anchors/anchor_data.py). Only the aggregation call is timed.

Every run of every method is a fresh subprocess: fedhpc in this interpreter's venv, the
anchors in benchmarks/.anchors-venv (gitignored), created on first use with torch==2.13.0
(CPU wheel) installed FIRST and held by a constraints file in every later pip step, then
flwr 1.41.0 and appfl 1.12.0 (pinned below; appfl with --no-deps plus the few packages its
aggregator imports: its full dependency list -- ray, wandb, globus-compute-endpoint,
torchvision, ... -- is gigabytes the aggregator never touches). The runners live in
benchmarks/anchors/ and print one JSON line each (see runner_common.py).

A memory bandwidth reference is measured once: ``dst += src`` on two warm, reused 1 GiB
float32 torch tensors (best of 5).

What the table shows, per case and method (best of --repeat runs for seconds, largest of
them for memory):

  seconds     the timed call (for fedhpc: open files, aggregate, write the output file)
  GB/s        effective: bytes of all N update files / seconds (10^9 bytes); the same
              byte count for every method, so the figures compare directly. For the
              bandwidth reference: the 1 GiB source tensor / seconds (its memory traffic
              is 3x that: read src, read and write dst)
  peak MiB    the process's peak RSS over its life (VmHWM), loading the inputs included
  call +MiB   peak RSS during the timed call above the RSS right before it (what the
              aggregation itself allocates; VmHWM is reset just before the call)
  max|d| f32  max abs difference from fedhpc's output over the float32 tensors, after
              rounding the method's output to the model's dtypes (must be <= 1e-5)
  f16 ulp     the same over the float16 tensors, in float16 units in the last place (must
              be <= 1: results computed in float32 may round either way at a tie)

fedhpc's own output is also checked against a float64 numpy reference computed from the
files tensor by tensor (same criteria). Any disagreement, or any method failing to run
(e.g. killed for memory), makes the script exit 1 after printing the table.

Targets (printed as met / MISSED; they do not change the exit status), judged at the
largest case run (largest --params, then largest --clients):

  speedup_vs_best_anchor     best anchor seconds / fedhpc seconds                   >= 3.0
  peak_rss_ratio_n16_vs_n4   fedhpc peak RSS at the largest --clients / at the
                             smallest, at the largest --params                     <= 1.25
  fedhpc_vs_bandwidth        fedhpc GB/s / bandwidth reference GB/s                 >= 0.5

Options:

  --params LIST     model sizes in parameters, comma-separated, with K/M/G suffixes
                    (10^3, 10^6, 10^9) [25M,100M]
  --clients LIST    numbers of updates, comma-separated [4,16]
  --repeat K        runs per method and case, interleaved; best time counts [3]
  --json            print a JSON summary as the last stdout line: speedup_vs_best_anchor,
                    peak_rss_ratio_n16_vs_n4, fedhpc_vs_bandwidth, targets, bandwidth,
                    outputs_agree (+ disagreements), all_ran (+ failures) and per-case
                    figures under "cases" (anchor fields are null with --skip-anchors)
  --warmup W        untimed calls of the same method in the same process before the timed
                    one, for every method [0]: 0 is the one-shot figure (a fresh process
                    whose every page is touched for the first time inside the timer), W >= 1
                    the steady state of a long-running server. On virtual machines that hand
                    freed memory back to the host, first touches are slow (here ~0.3 GB/s
                    against ~8 GB/s for memory freed a moment ago), which mostly costs the
                    methods that allocate per call (Flower's aggregate: about 2 x N x model).
  --workdir DIR     where the synthetic files go [the system temp dir]; removed at the end.
                    Every file is written and synced before any run, and every run starts
                    after a sync, so only page-cache reads are timed, never disk I/O or an
                    earlier run's writeback. A disk-backed file system is the realistic
                    place (an aggregator's spool is on local disk); tmpfs (/dev/shm) reads
                    more slowly on kernels that keep tmpfs files in 4 KiB pages (here, with
                    shmem_enabled=never: ~12.6 against ~19.6 GB/s for pread into a buffer).
  --skip-anchors    do not install or run Flower and APPFL (fedhpc, its checks and the
                    bandwidth reference still run)
  --anchors-venv D  the anchors' virtual environment [benchmarks/.anchors-venv]
  --timeout S       seconds allowed to one run of one method [1800]

Memory: the files live in --workdir ((N + 2) x P x 4 bytes, in the page cache while the case
runs; on tmpfs that is RAM), and the anchors hold every client's weights at once (Flower's
aggregate copies them once more).

    python benchmarks/aggregation.py --params 25M,100M --clients 4,16 --json
    python benchmarks/aggregation.py --params 2M --clients 2,3 --skip-anchors --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))

import numpy as np  # noqa: E402
from safetensors import safe_open  # noqa: E402

from fedhpc.testing.synthetic import write_synthetic_model  # noqa: E402

ANCHORS_DIR = ROOT / "benchmarks" / "anchors"
DEFAULT_ANCHORS_VENV = ROOT / "benchmarks" / ".anchors-venv"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; any other torch spec pulls GBs of CUDA packages
FLWR_VERSION = "1.41.0"  # 1.42.0 needs a certifi newer than PyPI has
APPFL_VERSION = "1.12.0"
# pip steps, in order, every one under a constraints file pinning torch.
ANCHOR_INSTALL_STEPS: tuple[tuple[str, ...], ...] = (
    (TORCH_PIN,),
    (f"flwr=={FLWR_VERSION}", "numpy==2.4.6", "safetensors==0.8.0"),
    # appfl's requirements include ray[default], wandb, globus-compute-endpoint, proxystore[all],
    # piq (-> torchvision), matplotlib, scikit-learn...; FedAvgAggregator's imports need only these:
    ("--no-deps", f"appfl=={APPFL_VERSION}"),
    ("omegaconf==2.4.0", "opacus==1.6.0", "packaging"),
)
ANCHORS_STAMP = "fedhpc-anchors-installed"
TOLERANCE = 1e-5
MAX_F16_ULP = 1.0
BANDWIDTH_GIB = 1.0
BANDWIDTH_ITERATIONS = 5


@dataclass(frozen=True)
class Method:
    name: str
    runner: str
    anchor: bool


METHODS = (
    Method("fedhpc", "run_fedhpc.py", anchor=False),
    Method("fedhpc-sha256", "run_fedhpc.py", anchor=False),
    Method("flower", "run_flower.py", anchor=True),
    Method("flower-inplace", "run_flower.py", anchor=True),
    Method("appfl", "run_appfl.py", anchor=True),
)
ANCHORS = tuple(m.name for m in METHODS if m.anchor)
TARGETS: dict[str, tuple[str, float]] = {
    "speedup_vs_best_anchor": (">=", 3.0),
    "peak_rss_ratio_n16_vs_n4": ("<=", 1.25),
    "fedhpc_vs_bandwidth": (">=", 0.5),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    number = float(text[:-1] if scale != 1 else text)
    if number <= 0:
        raise ValueError(f"{text!r} is not positive")
    return int(number * scale)


def parse_list(text: str) -> list[int]:
    return sorted({parse_count(part) for part in text.split(",") if part.strip()})


def label(params: int) -> str:
    for suffix, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if params >= scale:
            return f"{params / scale:g}{suffix}"
    return str(params)


# ---------------------------------------------------------------------------- anchors venv


def anchors_python(venv: Path) -> Path:
    """The anchors venv's interpreter, creating and filling the venv on first use."""
    python = venv / "bin" / "python"
    stamp = venv / ANCHORS_STAMP
    wanted = json.dumps(ANCHOR_INSTALL_STEPS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    log(f"creating the anchors venv {venv} (torch, flwr {FLWR_VERSION}, appfl {APPFL_VERSION}; minutes) ...")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    install_log = venv / "install.log"
    with install_log.open("a") as out:
        for step in ANCHOR_INSTALL_STEPS:
            command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c"]
            command += [str(constraints), *step]
            log("  pip install " + " ".join(step))
            out.write("$ " + " ".join(command) + "\n")
            out.flush()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = install_log.read_text()[-3000:]
                raise SystemExit(f"installing {' '.join(step)} into {venv} failed:\n{tail}")
    check = (
        "import torch, flwr, appfl, numpy, safetensors, omegaconf;"
        "from flwr.server.strategy.aggregate import aggregate, aggregate_inplace;"
        "from appfl.algorithm.aggregator import FedAvgAggregator;"
        f"assert torch.__version__.split('+')[0] == {TORCH_PIN.split('==')[1]!r}, torch.__version__;"
        "assert torch.version.cuda is None, 'a CUDA torch slipped in'"
    )
    subprocess.run([str(python), "-c", check], check=True)
    stamp.write_text(wanted)
    return python


# ---------------------------------------------------------------------------- runners


def run_runner(
    python: Path | str, method: str, runner: str, spec: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """One fresh process; its last stdout line is the result, else {"error": ...}."""
    command = [str(python), str(ANCHORS_DIR / runner), json.dumps({**spec, "method": method})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if done.returncode != 0:
        if done.returncode < 0:
            name = signal.Signals(-done.returncode).name
            why = f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        else:
            why = f"exit status {done.returncode}"
        stderr = done.stderr.strip()[-1500:]
        return {"error": f"{why}: {stderr}" if stderr else why}
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result line: {done.stdout[-500:]} {done.stderr[-1500:]}"}
    return result


# ---------------------------------------------------------------------------- agreement


@dataclass
class Agreement:
    max_abs_diff_f32: float = 0.0
    max_ulp_f16: float = 0.0
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff_f32": self.max_abs_diff_f32,
            "max_ulp_f16": self.max_ulp_f16,
            "agrees": self.ok,
            "problem": self.problem or None,
        }


def compare(expected: Callable[[str], np.ndarray], actual_path: Path) -> Agreement:
    """Compare a stored model (the reference dtypes) with `expected` values, tensor by tensor.

    expected(name) is rounded to the stored tensor's dtype first: float32 tensors must agree
    within TOLERANCE, float16 tensors within MAX_F16_ULP units in the last place, others exactly.
    """
    agreement = Agreement()
    with safe_open(str(actual_path), framework="np") as actual:
        for name in actual.keys():  # noqa: SIM118 (safe_open is not a mapping)
            stored = actual.get_tensor(name)
            try:
                got = np.asarray(expected(name))
            except KeyError:
                agreement.problem = f"tensor {name!r} missing"
                return agreement
            if got.shape != stored.shape:
                agreement.problem = f"tensor {name!r} has shape {got.shape}, expected {stored.shape}"
                return agreement
            rounded = got.astype(stored.dtype)
            if stored.dtype == np.float32:
                diff = float(np.max(np.abs(rounded - stored), initial=0.0))
                agreement.max_abs_diff_f32 = max(agreement.max_abs_diff_f32, diff)
                if not diff <= TOLERANCE:
                    agreement.problem = f"tensor {name!r}: max abs diff {diff:.3g} > {TOLERANCE:g}"
            elif stored.dtype == np.float16:
                spacing = np.spacing(np.maximum(np.abs(rounded), np.abs(stored))).astype(np.float32)
                ulp = float(
                    np.max(
                        np.abs(rounded.astype(np.float32) - stored.astype(np.float32)) / spacing, initial=0.0
                    )
                )
                agreement.max_ulp_f16 = max(agreement.max_ulp_f16, ulp)
                if not ulp <= MAX_F16_ULP:
                    agreement.problem = f"tensor {name!r}: {ulp:g} float16 ulp apart"
            elif not np.array_equal(rounded, stored):
                agreement.problem = f"tensor {name!r} differs"
            if agreement.problem:
                return agreement
    return agreement


def float64_reference(base: Path, updates: Sequence[dict[str, Any]]) -> Callable[[str], np.ndarray]:
    """base + sum_k n_k d_k / n in float64, computed per tensor on demand from the files."""
    total = sum(u["num_samples"] for u in updates)

    def tensor(name: str) -> np.ndarray:
        with safe_open(str(base), framework="np") as b:
            acc: np.ndarray = b.get_tensor(name).astype(np.float64)
        for update in updates:
            with safe_open(update["path"], framework="np") as u:
                acc += u.get_tensor(name).astype(np.float64) * (update["num_samples"] / total)
        return acc

    return tensor


# ---------------------------------------------------------------------------- one case


def summarize(runs: list[dict[str, Any]], update_bytes: int) -> dict[str, Any]:
    errors = [r["error"] for r in runs if "error" in r]
    good = [r for r in runs if "error" not in r]
    if errors:
        return {"error": errors[0], "runs": len(runs)}
    best = min(good, key=lambda r: r["seconds"])
    return {
        "seconds": best["seconds"],
        "gb_s": update_bytes / best["seconds"] / 1e9,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in good),
        "call_peak_rss_mib": max(r["call_peak_rss_mib"] for r in good),
        "rss_before_mib": best["rss_before_mib"],
        "peak_above_before_mib": max(r["peak_above_before_mib"] for r in good),
        "hwm_reset": all(r["hwm_reset"] for r in good),
        "all_seconds": [r["seconds"] for r in good],
        "extra": best["extra"],
    }


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_case(case_dir: Path, params: int, clients: int) -> tuple[Path, list[dict[str, Any]]]:
    # base + updates + fedhpc's output + one more output at a time
    need = (clients + 3) * params * 4
    stat = os.statvfs(case_dir.parent)
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise SystemExit(
            f"{case_dir.parent} has {free / 2**30:.1f} GiB free, the {label(params)} x {clients} case "
            f"needs about {need / 2**30:.1f} GiB there: free some or pass another --workdir"
        )
    megabytes = params * 4 / 2**20
    case_dir.mkdir(parents=True)
    base = case_dir / "base.safetensors"
    write_synthetic_model(base, megabytes, seed=0)
    updates = []
    for k in range(clients):
        path = case_dir / f"update-{k}.safetensors"
        blob = write_synthetic_model(path, megabytes, seed=1 + k)
        updates.append({"path": str(path), "num_samples": 100 + 37 * k, "sha256": blob.sha256})
    os.sync()  # on disk now: no writeback of the inputs runs during a timed call
    return base, updates


def run_case(
    params: int,
    clients: int,
    work: Path,
    methods: Sequence[Method],
    pythons: dict[str, Path | str],
    repeat: int,
    timeout: float,
    warmup: int = 0,
) -> dict[str, Any]:
    case_dir = work / f"{label(params)}-x{clients}"
    log(f"case {label(params)} params x {clients} clients: writing the synthetic base and updates ...")
    base, updates = write_case(case_dir, params, clients)
    update_bytes = sum(Path(u["path"]).stat().st_size for u in updates)
    model_bytes = base.stat().st_size
    if any(m.anchor for m in methods):
        # Flower's aggregate holds every client's weights plus a weighted copy of each.
        need, available = (2 * clients + 2) * model_bytes, mem_available()
        if available is not None and available < need:
            log(
                f"  warning: {available / 2**30:.1f} GiB of memory available, the anchors may need "
                f"{need / 2**30:.1f} GiB: they may be killed (reported as FAILED)"
            )
    reference_out = case_dir / "out-fedhpc.safetensors"
    runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    agreements: dict[str, Agreement] = {}
    try:
        for round_ in range(repeat):
            for method in methods:
                out = case_dir / f"out-{method.name}.safetensors"
                spec = {"base": str(base), "updates": updates, "out": str(out), "warmup": warmup}
                os.sync()  # the previous run's output is written back before this run starts
                log(f"  [{round_ + 1}/{repeat}] {method.name} ...")
                result = run_runner(pythons[method.name], method.name, method.runner, spec, timeout)
                runs[method.name].append(result)
                if "error" in result:
                    log(f"    {method.name} FAILED: {result['error'][:300]}")
                    out.unlink(missing_ok=True)
                    continue
                kernel = result.get("extra", {}).get("fused_kernel")
                note = "" if kernel is None else (" (fused C kernel)" if kernel else " (torch path)")
                log(f"    {result['seconds']:.3f} s, peak RSS {result['peak_rss_mib']:.0f} MiB{note}")
                if method.name == "fedhpc":
                    continue
                if not reference_out.exists():
                    agreements[method.name] = Agreement(problem="fedhpc produced no output to compare with")
                else:
                    with safe_open(str(out), framework="np") as produced:
                        agreement = compare(produced.get_tensor, reference_out)
                    previous = agreements.get(method.name)
                    if previous is None or previous.ok:
                        agreements[method.name] = agreement
                out.unlink(missing_ok=True)
        if reference_out.exists():
            log("  checking fedhpc against a float64 numpy reference ...")
            reference = compare(float64_reference(base, updates), reference_out)
        else:
            reference = Agreement(problem="fedhpc produced no output")
    finally:
        for path in sorted(case_dir.iterdir()):
            path.unlink()
        case_dir.rmdir()

    results: dict[str, Any] = {}
    for method in methods:
        summary = summarize(runs[method.name], update_bytes)
        if method.name == "fedhpc":
            summary.update(Agreement().as_dict())
        elif "error" not in summary:
            summary.update(agreements[method.name].as_dict())
        results[method.name] = summary
    return {
        "params": params,
        "clients": clients,
        "update_bytes": update_bytes,
        "model_bytes": model_bytes,
        "methods": results,
        "reference_check": reference.as_dict(),
    }


# ---------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_case(case: dict[str, Any], bandwidth: dict[str, Any], repeat: int) -> None:
    gib = case["update_bytes"] / (1 << 30)
    print()
    print(
        f"== {label(case['params'])} params x {case['clients']} clients: "
        f"{case['clients']} updates, {gib:.2f} GiB read per aggregation (best of {repeat}) =="
    )
    header = f"{'method':<16}{'seconds':>9}{'GB/s':>8}{'peak MiB':>10}{'call +MiB':>11}{'max|d| f32':>12}{'f16 ulp':>9}  agrees"
    print(header)
    print("-" * len(header))
    for name, m in case["methods"].items():
        if m is None:
            print(f"{name:<16}{'skipped':>9}")
            continue
        if "error" in m:
            print(f"{name:<16}{'FAILED':>9}  {m['error'][:200]}")
            continue
        agrees = "(reference)" if name == "fedhpc" else ("yes" if m["agrees"] else f"NO: {m['problem']}")
        print(
            f"{name:<16}{m['seconds']:>9.3f}{m['gb_s']:>8.2f}{m['peak_rss_mib']:>10.0f}"
            f"{m['peak_above_before_mib']:>11.0f}{m['max_abs_diff_f32']:>12.2e}{m['max_ulp_f16']:>9.2g}  {agrees}"
        )
    print(
        f"{'bandwidth ref':<16}{bandwidth['seconds']:>9.3f}{bandwidth['gb_s']:>8.2f}{bandwidth['peak_rss_mib']:>10.0f}"
        f"{bandwidth['peak_above_before_mib']:>11.0f}  (dst += src, 1 GiB float32, per GiB)"
    )
    for name in ("fedhpc", "fedhpc-sha256"):
        m = case["methods"].get(name)
        if m and "error" not in m:
            x = m["extra"]
            print(
                f"{name} inside aggregate(): read+sum {x['compute_s']:.3f} s, write {x['write_s']:.3f} s, "
                f"verify {x['verify_s']:.3f} s, total {x['aggregate_total_s']:.3f} s ({x['threads']} threads)"
            )
    ref = case["reference_check"]
    print(
        f"fedhpc vs float64 numpy reference: max|d| f32 {ref['max_abs_diff_f32']:.2e}, "
        f"f16 ulp {ref['max_ulp_f16']:.2g}: " + ("ok" if ref["agrees"] else f"NO: {ref['problem']}")
    )
    line = f"fedhpc vs bandwidth reference: {fmt(case['fedhpc_vs_bandwidth'], '.2f')}x"
    if case["best_anchor"]:
        line += (
            f"; speedup vs best anchor ({case['best_anchor']}, {case['best_anchor_seconds']:.3f} s): "
            f"{fmt(case['speedup_vs_best_anchor'], '.2f')}x"
        )
    print(line)


def judge(name: str, value: float | None) -> dict[str, Any]:
    op, target = TARGETS[name]
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"op": op, "target": target, "value": value, "met": met}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params", default="25M,100M", help="model sizes in parameters, K/M/G suffixes [25M,100M]"
    )
    parser.add_argument("--clients", default="4,16", help="numbers of updates [4,16]")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method and case; the best counts [3]")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed calls before the timed one, every method, same process [0: one-shot]",
    )
    parser.add_argument("--workdir", default=None, help="where the synthetic files go [the system temp dir]")
    parser.add_argument("--skip-anchors", action="store_true", help="do not install or run Flower and APPFL")
    parser.add_argument(
        "--anchors-venv", type=Path, default=DEFAULT_ANCHORS_VENV, help="anchors venv [%(default)s]"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run [1800]")
    args = parser.parse_args()
    try:
        params_list = parse_list(args.params)
        clients_list = parse_list(args.clients)
    except ValueError as error:
        parser.error(str(error))
    if not params_list or not clients_list:
        parser.error("--params and --clients need at least one value each")
    if args.repeat <= 0:
        parser.error("--repeat must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")

    methods = [m for m in METHODS if not (args.skip_anchors and m.anchor)]
    pythons: dict[str, Path | str] = {m.name: sys.executable for m in METHODS if not m.anchor}
    anchor_versions: dict[str, str] | None = None
    if not args.skip_anchors:
        venv_python = anchors_python(args.anchors_venv.resolve())
        pythons.update(dict.fromkeys(ANCHORS, venv_python))
        anchor_versions = {"flwr": FLWR_VERSION, "appfl": APPFL_VERSION, "torch": TORCH_PIN.split("==")[1]}

    log(f"bandwidth reference: dst += src on {BANDWIDTH_GIB:g} GiB float32 tensors ...")
    bw_spec = {"gib": BANDWIDTH_GIB, "iterations": BANDWIDTH_ITERATIONS}
    bw = run_runner(sys.executable, "bandwidth", "run_fedhpc.py", bw_spec, args.timeout)
    if "error" in bw:
        raise SystemExit(f"bandwidth reference failed: {bw['error']}")
    bandwidth = {
        "seconds": bw["seconds"],
        "gb_s": bw["extra"]["bytes"] / bw["seconds"] / 1e9,
        "traffic_gb_s": 3 * bw["extra"]["bytes"] / bw["seconds"] / 1e9,
        "peak_rss_mib": bw["peak_rss_mib"],
        "peak_above_before_mib": bw["peak_above_before_mib"],
        "torch_threads": bw["extra"]["torch_threads"],
    }

    started = time.perf_counter()
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedhpc-aggbench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for params in params_list:
            for clients in clients_list:
                case = run_case(
                    params, clients, work, methods, pythons, args.repeat, args.timeout, args.warmup
                )
                for name in ANCHORS:
                    case["methods"].setdefault(name, None)
                finish_case(case, bandwidth)
                cases.append(case)
                print_case(case, bandwidth, args.repeat)

    largest = max(cases, key=lambda c: (c["params"], c["clients"]))
    top_params = [c for c in cases if c["params"] == largest["params"]]
    few = next(c for c in top_params if c["clients"] == min(clients_list))
    many = next(c for c in top_params if c["clients"] == max(clients_list))
    rss_ratio = None
    if (
        len(clients_list) > 1
        and "error" not in few["methods"]["fedhpc"]
        and "error" not in many["methods"]["fedhpc"]
    ):
        rss_ratio = many["methods"]["fedhpc"]["peak_rss_mib"] / few["methods"]["fedhpc"]["peak_rss_mib"]
    figures = {
        "speedup_vs_best_anchor": largest["speedup_vs_best_anchor"],
        "peak_rss_ratio_n16_vs_n4": rss_ratio,
        "fedhpc_vs_bandwidth": largest["fedhpc_vs_bandwidth"],
    }
    targets = {name: judge(name, value) for name, value in figures.items()}
    labelled = [(f"{label(c['params'])} x {c['clients']}", c) for c in cases]
    # A method that did not run (crashed, killed for memory, timed out) ...
    failed_runs = [
        f"{at}: {name}: {m['error']}"
        for at, c in labelled
        for name, m in c["methods"].items()
        if m and "error" in m
    ]
    # ... and an output that disagrees: both exit 1.
    disagreements = [
        f"{at}: {name}: {m['problem']}"
        for at, c in labelled
        for name, m in c["methods"].items()
        if m and "error" not in m and not m["agrees"]
    ]
    disagreements += [
        f"{at}: fedhpc vs float64 reference: {c['reference_check']['problem']}"
        for at, c in labelled
        if not c["reference_check"]["agrees"]
    ]

    print()
    where = f"{label(largest['params'])} x {largest['clients']}"
    print(
        f"targets (at the largest case, {where}; peak RSS ratio at {min(clients_list)} vs {max(clients_list)} clients):"
    )
    for name, t in targets.items():
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        print(f"  {name:<26} {fmt(t['value'], '.3f'):>8}  (target {t['op']} {t['target']:g}): {verdict}")
    verdict = "yes" if not disagreements else "NO"
    print(f"outputs agree (within {TOLERANCE:g} float32, {MAX_F16_ULP:g} ulp float16): {verdict}")
    for problem in disagreements:
        print(f"  DISAGREES {problem}")
    print(f"every method ran: {'yes' if not failed_runs else 'NO'}")
    for problem in failed_runs:
        print(f"  FAILED {problem}")
    log(f"cases took {time.perf_counter() - started:.0f} s")

    if args.json:
        summary = {
            **figures,
            "largest_case": {"params": largest["params"], "clients": largest["clients"]},
            "fedhpc_gb_s": largest["methods"]["fedhpc"].get("gb_s"),
            "bandwidth_gb_s": bandwidth["gb_s"],
            "best_anchor": largest["best_anchor"],
            "targets": targets,
            "outputs_agree": not disagreements,
            "all_ran": not failed_runs,
            "disagreements": disagreements,
            "failures": failed_runs,
            "bandwidth": bandwidth,
            "anchor_versions": anchor_versions,
            "skip_anchors": args.skip_anchors,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "workdir": args.workdir or tempfile.gettempdir(),
            "cases": cases,
        }
        print(json.dumps(summary))
    return 1 if disagreements or failed_runs else 0


def finish_case(case: dict[str, Any], bandwidth: dict[str, Any]) -> None:
    """Add the per-case ratios: speedup vs the best anchor and fedhpc vs the bandwidth reference."""
    fedhpc = case["methods"]["fedhpc"]
    ran = {n: m for n, m in case["methods"].items() if n in ANCHORS and m is not None and "error" not in m}
    best = min(ran, key=lambda n: ran[n]["seconds"]) if ran else None
    ok = "error" not in fedhpc
    case["best_anchor"] = best
    case["best_anchor_seconds"] = ran[best]["seconds"] if best else None
    case["speedup_vs_best_anchor"] = ran[best]["seconds"] / fedhpc["seconds"] if best and ok else None
    case["fedhpc_vs_bandwidth"] = fedhpc["gb_s"] / bandwidth["gb_s"] if ok else None


if __name__ == "__main__":
    sys.exit(main())
