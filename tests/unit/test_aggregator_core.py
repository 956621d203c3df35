"""The streaming aggregation core against a plain in-memory reference, and every way an update can be bad.

Every test runs twice: with the fused C kernel (fedhpc.aggregator._kernels) and with the
torch path it replaces where the kernel is not built.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedhpc.aggregator import core
from fedhpc.aggregator.algorithms import make_algorithm
from fedhpc.aggregator.core import (
    AggregationOptions,
    FileReader,
    NotEnoughUpdates,
    Outcome,
    UpdateInput,
    aggregate,
    state_tensor_name,
)
from fedhpc.common.tensors import write_safetensors_file

_RUNS = itertools.count()


@pytest.fixture(autouse=True, params=["fused-kernel", "torch-path"])
def accumulation_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fused-kernel":
        if not core.FUSED_KERNEL_AVAILABLE:
            pytest.skip(
                "fedhpc.aggregator._kernels is not built (tests/unit/test_aggregator_kernels.py fails then)"
            )
    else:
        monkeypatch.setattr(core, "FUSED_KERNEL_AVAILABLE", False)
    return str(request.param)


SHAPES = {"conv.weight": (8, 3, 3, 3), "conv.bias": (8,), "fc.weight": (10, 300), "fc.bias": (10,)}


def _base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    tensors["bn.num_batches_tracked"] = torch.tensor(100, dtype=torch.int64)
    tensors["half.weight"] = torch.randn(4, 5, generator=g).to(torch.bfloat16)
    return tensors


def _delta(seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = _base()
    out = {}
    for name, t in base.items():
        if t.dtype == torch.int64:
            out[name] = torch.tensor(seed + 3, dtype=torch.int64)
        else:
            out[name] = (torch.randn(t.shape, generator=g) * scale).to(t.dtype)
    return out


def _save(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    base = _save(tmp_path / "base.safetensors", _base())
    updates = [_save(tmp_path / f"u{i}.safetensors", _delta(i + 1)) for i in range(4)]
    yield base, updates


def _run(
    tmp_path: Path,
    base: Path,
    updates: list[UpdateInput],
    algorithm: str = "fedavg",
    params: Mapping[str, object] | None = None,
    options: AggregationOptions | None = None,
    state: Path | None = None,
) -> tuple[dict[str, torch.Tensor], object, Path | None]:
    # A fresh name per run: load_file may map the file, so it must not be rewritten later.
    run_id = next(_RUNS)
    out_path = tmp_path / f"out-{run_id}.safetensors"
    state_path = tmp_path / f"state-out-{run_id}.safetensors"
    algo = make_algorithm(algorithm, params)
    with open(out_path, "w+b") as out, open(state_path, "w+b") as state_out:
        result = aggregate(
            FileReader(base),
            updates,
            algo,
            out,
            state=FileReader(state) if state else None,
            state_out=state_out if algo.state_slots else None,
            options=options,
        )
    assert result.weights.sha256 == hashlib.sha256(out_path.read_bytes()).hexdigest()
    return load_file(str(out_path)), result, state_path if algo.state_slots else None


def _inputs(paths: list[Path], samples: list[int] | None = None, **kw: object) -> list[UpdateInput]:
    samples = samples or [10 * (i + 1) for i in range(len(paths))]
    return [
        UpdateInput(FileReader(p), num_samples=n, name=p.name, **kw)
        for p, n in zip(paths, samples, strict=True)
    ]  # type: ignore[arg-type]


def _reference_fedavg(base: Path, updates: list[Path], samples: list[int]) -> dict[str, torch.Tensor]:
    b = load_file(str(base))
    ds = [load_file(str(u)) for u in updates]
    total = sum(samples)
    out = {}
    for name, t in b.items():
        mean = sum(d[name].to(torch.float64) * (n / total) for d, n in zip(ds, samples, strict=True))
        value = t.to(torch.float64) + mean
        out[name] = value.round().to(t.dtype) if not t.is_floating_point() else value.to(t.dtype)
    return out


def test_fedavg_matches_the_in_memory_reference(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    samples = [10, 20, 30, 40]
    got, result, _ = _run(tmp_path, base, _inputs(updates, samples))
    expected = _reference_fedavg(base, updates, samples)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        tol = 1e-2 if got[name].dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(
            got[name].to(torch.float64), expected[name].to(torch.float64), atol=tol, rtol=tol
        )
    assert all(o.outcome is Outcome.ACCEPTED for o in result.outcomes)  # type: ignore[attr-defined]
    assert sum(o.weight for o in result.outcomes) == pytest.approx(1.0)  # type: ignore[attr-defined]


def test_identical_updates_give_base_plus_that_update(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    same = [updates[0]] * 5
    got, _, _ = _run(tmp_path, base, _inputs(same, [1, 7, 3, 9, 2]))
    expected = _reference_fedavg(base, [updates[0]], [1])
    for name in SHAPES:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6)


def test_full_weights_updates_equal_their_deltas(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    b = load_file(str(base))
    full_paths = []
    for i, u in enumerate(updates):
        d = load_file(str(u))
        local = {k: b[k] + d[k] for k in b}
        full_paths.append(_save(tmp_path / f"full{i}.safetensors", local))
    from_deltas, _, _ = _run(tmp_path, base, _inputs(updates))
    from_full, _, _ = _run(tmp_path, base, _inputs(full_paths, full_weights=True))
    for name in SHAPES:
        torch.testing.assert_close(from_full[name], from_deltas[name], atol=1e-5, rtol=1e-5)
    assert from_full["bn.num_batches_tracked"] == from_deltas["bn.num_batches_tracked"]


def test_integer_buffers_take_base_plus_rounded_sample_weighted_mean(
    files: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, updates = files
    got, _, _ = _run(tmp_path, base, _inputs(updates[:2], [1, 3]), algorithm="fedadam")
    # deltas 4 and 5, weights 1/4 and 3/4: 100 + round(4.75) = 105, whatever the algorithm.
    assert int(got["bn.num_batches_tracked"]) == 105


def test_accumulating_in_float64_is_an_option(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    f32, _, _ = _run(tmp_path, base, _inputs(updates))
    f64, _, _ = _run(tmp_path, base, _inputs(updates), options=AggregationOptions(accumulate_float64=True))
    for name in SHAPES:
        torch.testing.assert_close(f32[name], f64[name], atol=1e-5, rtol=1e-5)


def test_bf16_compressed_updates_are_upcast(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    compressed = []
    for i, u in enumerate(updates):
        d = load_file(str(u))
        compressed.append(
            _save(
                tmp_path / f"c{i}.safetensors",
                {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in d.items()},
            )
        )
    exact, _, _ = _run(tmp_path, base, _inputs(updates))
    got, result, _ = _run(tmp_path, base, _inputs(compressed, compression="bf16"))
    assert all(o.outcome is Outcome.ACCEPTED for o in result.outcomes)  # type: ignore[attr-defined]
    for name in SHAPES:
        torch.testing.assert_close(got[name], exact[name], atol=2e-3, rtol=2e-2)


def test_optimizer_state_carries_between_rounds(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    params = {"server_lr": 0.05}
    round1, _, state1 = _run(tmp_path, base, _inputs(updates), algorithm="fedadam", params=params)
    assert state1 is not None
    state = load_file(str(state1))
    assert set(state) == {state_tensor_name(s, n) for s in ("m", "v") for n in [*SHAPES, "half.weight"]}
    kept = _save(tmp_path / "state-in.safetensors", state)
    base2 = _save(tmp_path / "base2.safetensors", round1)
    round2, _, _ = _run(tmp_path, base2, _inputs(updates), algorithm="fedadam", params=params, state=kept)
    fresh, _, _ = _run(tmp_path, base2, _inputs(updates), algorithm="fedadam", params=params)
    # With its first-round moments the second step differs from a fresh start.
    assert not torch.allclose(round2["fc.weight"], fresh["fc.weight"])


# -- bad updates ------------------------------------------------------------------------------


def _bad(tmp_path: Path, kind: str) -> tuple[Path, str]:
    d = _delta(99)
    if kind == "shape":
        d["fc.weight"] = torch.zeros(300, 10)
    elif kind == "dtype":
        d["fc.bias"] = d["fc.bias"].to(torch.float16)
    elif kind == "missing":
        del d["conv.bias"]
    elif kind == "extra":
        d["ghost"] = torch.zeros(3)
    elif kind == "nan":
        d["fc.weight"][3, 7] = float("nan")
    elif kind == "inf":
        d["conv.weight"][0, 0, 0, 0] = float("inf")
    elif kind == "norm":
        d["fc.weight"] *= 1000
    return _save(tmp_path / f"bad-{kind}.safetensors", d), kind


@pytest.mark.parametrize(
    ("kind", "outcome", "words"),
    [
        ("shape", Outcome.WRONG_SHAPE, "shape [300, 10]"),
        ("dtype", Outcome.WRONG_DTYPE, "dtype F16"),
        ("missing", Outcome.MISSING_TENSOR, "'conv.bias'"),
        ("extra", Outcome.EXTRA_TENSOR, "'ghost'"),
        ("nan", Outcome.NOT_FINITE, "'fc.weight'"),
        ("inf", Outcome.NOT_FINITE, "'conv.weight'"),
        ("norm", Outcome.NORM_EXCEEDED, "exceeds max_update_norm"),
        ("checksum", Outcome.CHECKSUM_MISMATCH, "sha256"),
    ],
)
def test_a_bad_update_is_rejected_with_its_reason_and_the_rest_aggregated(
    files: tuple[Path, list[Path]], tmp_path: Path, kind: str, outcome: Outcome, words: str
) -> None:
    base, updates = files
    good = _inputs(updates, [10, 20, 30, 40])
    if kind == "checksum":
        bad = UpdateInput(FileReader(updates[0]), num_samples=50, sha256="0" * 64)
    else:
        path, _ = _bad(tmp_path, kind)
        bad = UpdateInput(FileReader(path), num_samples=50)
    options = AggregationOptions(max_update_norm=50.0)
    got, result, _ = _run(tmp_path, base, [*good[:2], bad, *good[2:]], options=options)
    rejected = result.outcomes[2]  # type: ignore[attr-defined]
    assert rejected.outcome is outcome and words in rejected.message
    assert rejected.weight == 0.0
    assert [o.outcome for i, o in enumerate(result.outcomes) if i != 2] == [Outcome.ACCEPTED] * 4  # type: ignore[attr-defined]
    expected = _reference_fedavg(base, updates, [10, 20, 30, 40])
    for name in SHAPES:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)


def test_clipping_scales_an_update_down_to_the_bound(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    big, _ = _bad(tmp_path, "norm")
    options = AggregationOptions(max_update_norm=50.0, clip_to_norm=True)
    _, result, _ = _run(
        tmp_path,
        base,
        [*_inputs(updates[:1], [10]), UpdateInput(FileReader(big), num_samples=10)],
        options=options,
    )
    clipped = result.outcomes[1]  # type: ignore[attr-defined]
    assert clipped.outcome is Outcome.CLIPPED and clipped.l2_norm > 50
    assert clipped.weight == pytest.approx(0.5 * 50.0 / clipped.l2_norm)


def test_below_min_accepted_fails_with_every_reason(files: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, updates = files
    nan, _ = _bad(tmp_path, "nan")
    shape, _ = _bad(tmp_path, "shape")
    inputs = [
        *_inputs(updates[:1]),
        UpdateInput(FileReader(nan), num_samples=1),
        UpdateInput(FileReader(shape), num_samples=1),
    ]
    with pytest.raises(NotEnoughUpdates) as err:
        _run(tmp_path, base, inputs, options=AggregationOptions(min_accepted=2))
    message = str(err.value)
    assert (
        "1 of 3 updates accepted, need 2" in message and "NOT_FINITE" in message and "WRONG_SHAPE" in message
    )


def test_matches_numpy_written_files_too(tmp_path: Path) -> None:
    base = tmp_path / "b.safetensors"
    write_safetensors_file(base, {"w": np.ones((3, 4), dtype=np.float32)})
    upd = tmp_path / "u.safetensors"
    write_safetensors_file(upd, {"w": np.full((3, 4), 0.5, dtype=np.float32)})
    got, _, _ = _run(tmp_path, base, _inputs([upd], [1]))
    torch.testing.assert_close(got["w"], torch.full((3, 4), 1.5))


# -- sharding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["fedavg", "fedyogi"])
@pytest.mark.parametrize("shard_count", [2, 3, 7])
def test_sharded_results_are_bit_identical_to_unsharded(
    files: tuple[Path, list[Path]], tmp_path: Path, algorithm: str, shard_count: int
) -> None:
    from fedhpc.aggregator.core import assemble, shard_tensors

    base, updates = files
    algo = make_algorithm(algorithm)
    metadata = {"fedhpc.algorithm": algorithm}
    base_reader = FileReader(base)
    names = tuple(base_reader.header.names)

    def run(tensors: tuple[str, ...] | None, tag: str) -> tuple[Path, Path]:
        out, state = tmp_path / f"{tag}.safetensors", tmp_path / f"{tag}-state.safetensors"
        with open(out, "w+b") as o, open(state, "w+b") as so:
            aggregate(
                base_reader,
                _inputs(updates),
                algo,
                o,
                state_out=so if algo.state_slots else None,
                options=AggregationOptions(tensors=tensors),
                metadata=metadata,
            )
        return out, state

    whole, whole_state = run(None, "whole")
    shards = [run(shard_tensors(base_reader.header, k, shard_count), f"shard{k}") for k in range(shard_count)]
    owned = [shard_tensors(base_reader.header, k, shard_count) for k in range(shard_count)]
    assert sorted(n for part in owned for n in part) == sorted(names)  # every tensor in exactly one shard
    with open(tmp_path / "assembled.safetensors", "w+b") as out:
        assembled = assemble(names, [FileReader(p) for p, _ in shards], out, metadata=metadata)
    assert assembled.sha256 == hashlib.sha256(whole.read_bytes()).hexdigest()
    if algo.state_slots:
        state_names = tuple(FileReader(whole_state).header.names)
        with open(tmp_path / "assembled-state.safetensors", "w+b") as out:
            merged = assemble(
                state_names, [FileReader(s) for _, s in shards], out, metadata={"fedhpc.algorithm": algorithm}
            )
        assert merged.sha256 == hashlib.sha256(whole_state.read_bytes()).hexdigest()


def test_shard_assignment_balances_bytes_and_rejects_bad_indices(files: tuple[Path, list[Path]]) -> None:
    from fedhpc.aggregator.core import shard_tensors

    header = FileReader(files[0]).header
    with pytest.raises(ValueError, match="shard_index"):
        shard_tensors(header, 2, 2)
    sizes = [sum(header.entry(n).nbytes for n in shard_tensors(header, k, 2)) for k in range(2)]
    assert abs(sizes[0] - sizes[1]) <= max(e.nbytes for e in header.entries)


def test_without_norms_a_non_finite_update_is_still_found(
    files: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, updates = files
    nan, _ = _bad(tmp_path, "nan")
    inputs = [*_inputs(updates[:2]), UpdateInput(FileReader(nan), num_samples=5)]
    got, result, _ = _run(tmp_path, base, inputs, options=AggregationOptions(compute_norms=False))
    assert [o.outcome for o in result.outcomes] == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.NOT_FINITE]  # type: ignore[attr-defined]
    assert "'fc.weight'" in result.outcomes[2].message  # type: ignore[attr-defined]
    expected = _reference_fedavg(base, updates[:2], [10, 20])
    for name in SHAPES:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-5)
