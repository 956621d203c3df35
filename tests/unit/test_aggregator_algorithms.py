"""Server aggregation algorithms against independent float64 references of the papers' rules.

The references below are written from the update rules as published (McMahan 2017, Hsu 2019,
Reddi 2021 Algorithm 2, Xie 2019, Nguyen 2022) in plain numpy, without the module under test;
the API is driven the way the streaming core drives it: weights once per round, then per tensor
acc = sum_i w_i delta_i in the accumulation dtype, apply, state carried between rounds.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from fedhpc.aggregator.algorithms import (
    ALGORITHMS,
    AlgorithmError,
    FedAdam,
    FedYogi,
    ServerAlgorithm,
    UpdateInfo,
    make_algorithm,
    staleness_factor,
)

Array = NDArray[np.float64]
Model = dict[str, Array]

SHAPES: dict[str, tuple[int, ...]] = {"conv.weight": (4, 3, 2), "fc.bias": (7,), "scalar": ()}
ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")
NORMALISED = ("fedavg", "fedavgm", *ADAPTIVE)


# ---------------------------------------------------------------------------------------------
# Independent references (float64 numpy)


@dataclass
class Update:
    num_samples: int
    staleness: int
    delta: Model


def ref_s(kind: str, t: int, a: float, b: float) -> float:
    # Xie et al. 2019, section 5: s(t - tau) for the three families.
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((t + 1) ** -a)
    return 1.0 if t <= b else 1.0 / (a * (t - b) + 1.0)


def ref_p(updates: list[Update], weighting: str) -> list[float]:
    if weighting == "uniform":
        return [1.0 / len(updates)] * len(updates)
    n = float(sum(u.num_samples for u in updates))
    return [u.num_samples / n for u in updates]


def ref_sum(terms: list[Array]) -> Array:
    total = np.zeros_like(terms[0])
    for term in terms:
        total = total + term
    return total


def ref_mean(updates: list[Update], p: list[float], name: str) -> Array:
    total = np.zeros(SHAPES[name])
    for u, pk in zip(updates, p, strict=True):
        total = total + pk * u.delta[name]
    return total


class Reference:
    """One round of the algorithm on a whole model; state keyed by (slot, tensor)."""

    def __init__(self, name: str, params: Mapping[str, Any]) -> None:
        self.name = name
        self.p = dict(params)
        self.state: dict[tuple[str, str], Array] = {}
        self.yogi_signs: set[float] = set()

    def num(self, key: str, default: float) -> float:
        return float(self.p.get(key, default))

    def word(self, key: str, default: str) -> str:
        return str(self.p.get(key, default)).lower()

    def round(self, x: Model, updates: list[Update]) -> Model:
        return {name: self.tensor(name, x[name], updates) for name in x}

    def tensor(self, name: str, x: Array, updates: list[Update]) -> Array:
        algo = self.name
        if algo == "fedavg":
            eta = self.num("server_lr", 1.0)
            return x + eta * ref_mean(updates, ref_p(updates, self.word("weighting", "samples")), name)
        if algo == "fedavgm":
            eta, beta = self.num("server_lr", 1.0), self.num("momentum", 0.9)
            v = self.state.get(("v", name), np.zeros_like(x))
            v = beta * v + ref_mean(updates, ref_p(updates, self.word("weighting", "samples")), name)
            self.state[("v", name)] = v
            return x + eta * v
        if algo in ADAPTIVE:
            eta, b1 = self.num("server_lr", 0.01), self.num("beta1", 0.9)
            b2, tau = self.num("beta2", 0.99), self.num("tau", 1e-3)
            v0 = self.num("v0", tau**2)
            delta = ref_mean(updates, ref_p(updates, self.word("weighting", "samples")), name)
            m = self.state.get(("m", name), np.zeros_like(x))
            v = self.state.get(("v", name), np.full_like(x, v0))
            m = b1 * m + (1 - b1) * delta
            if algo == "fedadagrad":
                v = v + delta**2
            elif algo == "fedadam":
                v = b2 * v + (1 - b2) * delta**2
            else:
                sign = np.sign(v - delta**2)
                self.yogi_signs.update(np.unique(sign).tolist())
                v = v - (1 - b2) * delta**2 * sign
            self.state[("m", name)], self.state[("v", name)] = m, v
            return x + eta * m / (np.sqrt(v) + tau)
        if algo == "fedasync":
            alpha, kind = self.num("alpha", 0.6), self.word("staleness", "polynomial")
            a, b = self.num("a", 0.5), self.num("b", 4.0)
            if len(updates) == 1:
                # The paper's form: x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new.
                u = updates[0]
                alpha_t = alpha * ref_s(kind, u.staleness, a, b)
                return (1 - alpha_t) * x + alpha_t * (x + u.delta[name])
            return x + ref_sum([alpha * ref_s(kind, u.staleness, a, b) * u.delta[name] for u in updates])
        if algo == "fedbuff":
            eta, kind = self.num("server_lr", 1.0), self.word("staleness", "polynomial")
            a, b = self.num("a", 0.5), self.num("b", 4.0)
            p = ref_p(updates, self.word("weighting", "uniform"))
            bar = ref_sum(
                [
                    ref_s(kind, u.staleness, a, b) * pk * u.delta[name]
                    for u, pk in zip(updates, p, strict=True)
                ]
            )
            return x + eta * bar
        raise AssertionError(algo)


# ---------------------------------------------------------------------------------------------
# Driving the API as the core does


def run_api(
    algo: ServerAlgorithm, x0: Model, rounds: list[list[Update]], dtype: torch.dtype, *, use_scratch: bool
) -> Model:
    x = {name: torch.from_numpy(np.asarray(v)).to(dtype) for name, v in x0.items()}
    state = {name: algo.initial_states(t) for name, t in x.items()}
    # One shared scratch for every tensor, larger than any of them, as a core would keep it.
    scratch = torch.full((64,), float("nan"), dtype=dtype) if use_scratch else None
    for updates in rounds:
        w = algo.weights([UpdateInfo(u.num_samples, u.staleness) for u in updates])
        new: dict[str, torch.Tensor] = {}
        for name, base in x.items():
            acc = torch.zeros_like(base)
            for wi, u in zip(w, updates, strict=True):
                acc.add_(torch.from_numpy(np.asarray(u.delta[name])).to(dtype), alpha=wi)
            new[name] = algo.apply(base, acc, state[name], scratch=scratch)
        x = new
    return {name: t.double().numpy() for name, t in x.items()}


def make_rounds(rng: np.random.Generator, n_rounds: int, per_round: list[int]) -> list[list[Update]]:
    rounds = []
    # Scales vary between rounds so Yogi's sign(v - Delta^2) takes both signs.
    scales = [1.0, 0.05, 0.5, 0.01, 2.0, 0.1]
    for r in range(n_rounds):
        updates = []
        for _ in range(per_round[r % len(per_round)]):
            delta = {
                name: np.asarray(scales[r % len(scales)] * rng.standard_normal(shape), np.float32).astype(
                    np.float64
                )
                for name, shape in SHAPES.items()
            }
            updates.append(Update(int(rng.integers(1, 5000)), int(rng.integers(0, 9)), delta))
        rounds.append(updates)
    return rounds


CASES: list[tuple[str, dict[str, Any], list[int]]] = [
    ("fedavg", {}, [3, 1, 4]),
    ("fedavg", {"weighting": "uniform", "server_lr": 0.7}, [3, 2]),
    ("fedavgm", {}, [3, 1, 4]),
    ("fedavgm", {"weighting": "uniform", "server_lr": 0.5, "momentum": 0.5}, [2, 3]),
    ("fedadam", {}, [3, 1, 4]),
    ("fedadam", {"weighting": "uniform", "server_lr": 0.1, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}, [2]),
    ("fedyogi", {}, [3, 1, 4]),
    ("fedyogi", {"server_lr": 0.05, "tau": 1e-4, "v0": 0.0}, [2, 3]),
    ("fedadagrad", {}, [3, 1, 4]),
    ("fedadagrad", {"weighting": "uniform", "v0": 0.5, "tau": 0.1}, [2]),
    ("fedasync", {}, [1]),
    ("fedasync", {"alpha": 0.9, "staleness": "hinge", "a": 2.0, "b": 3}, [1, 2]),
    ("fedasync", {"alpha": 1, "staleness": "constant"}, [1]),
    ("fedbuff", {}, [4, 3]),
    ("fedbuff", {"weighting": "samples", "server_lr": 0.3, "staleness": "hinge", "a": 1.0, "b": 2.0}, [5]),
    ("fedbuff", {"staleness": "polynomial", "a": 1.5}, [3]),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("name", "params", "per_round"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_matches_the_paper_reference(
    name: str, params: dict[str, Any], per_round: list[int], dtype: torch.dtype
) -> None:
    # A fixed seed per case (str hashes are salted per process, so not hash()).
    rng = np.random.default_rng(zlib.crc32(repr((name, params, per_round)).encode()))
    x0 = {
        n: np.asarray(rng.standard_normal(shape), np.float32).astype(np.float64)
        for n, shape in SHAPES.items()
    }
    rounds = make_rounds(rng, 6, per_round)
    ref = Reference(name, params)
    expected = dict(x0)
    for updates in rounds:
        expected = ref.round(expected, updates)
    if name == "fedyogi":
        assert {-1.0, 1.0} <= ref.yogi_signs, "the data must exercise both branches of Yogi's sign"
    for use_scratch in (False, True):
        got = run_api(make_algorithm(name, params), x0, rounds, dtype, use_scratch=use_scratch)
        for n in SHAPES:
            if dtype == torch.float64:
                np.testing.assert_allclose(got[n], expected[n], rtol=1e-12, atol=1e-14, err_msg=n)
            else:
                np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-6, err_msg=n)
            # The model must actually move, or the comparison proves nothing.
            assert not np.array_equal(got[n], x0[n])


# ---------------------------------------------------------------------------------------------
# Properties

updates_st = st.lists(
    st.builds(UpdateInfo, st.integers(0, 10**7), st.integers(0, 10**4)), min_size=1, max_size=40
).filter(lambda us: sum(u.num_samples for u in us) > 0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 25),
    samples=st.data(),
    weighting=st.sampled_from(["samples", "uniform"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**32 - 1),
)
def test_fedavg_of_identical_deltas_is_base_plus_delta(
    n: int, samples: st.DataObject, weighting: str, dtype: torch.dtype, seed: int
) -> None:
    counts = samples.draw(st.lists(st.integers(1, 10**9), min_size=n, max_size=n))
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.standard_normal(17)).to(dtype)
    delta = torch.from_numpy(rng.standard_normal(17)).to(dtype)
    algo = make_algorithm("fedavg", {"weighting": weighting})
    acc = torch.zeros_like(base)
    for w in algo.weights([UpdateInfo(c) for c in counts]):
        acc.add_(delta, alpha=w)
    new = algo.apply(base, acc, {})
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(new, base + delta, rtol=tol, atol=tol)


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(NORMALISED), weighting=st.sampled_from(["samples", "uniform"]), updates=updates_st
)
def test_normalised_weights_sum_to_one(name: str, weighting: str, updates: list[UpdateInfo]) -> None:
    w = make_algorithm(name, {"weighting": weighting}).weights(updates)
    assert len(w) == len(updates)
    assert all(math.isfinite(x) and x >= 0 for x in w)
    assert math.fsum(w) == pytest.approx(1.0, abs=1e-12)


ALL_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    *((n, {"weighting": w}) for n in (*NORMALISED, "fedbuff") for w in ("samples", "uniform")),
    *(("fedasync", {"staleness": k, "a": 1.5, "b": 2}) for k in ("constant", "polynomial", "hinge")),
    *(("fedbuff", {"staleness": k, "a": 0.7, "b": 3}) for k in ("constant", "polynomial", "hinge")),
]


@settings(max_examples=80, deadline=None)
@given(config=st.sampled_from(ALL_CONFIGS), updates=updates_st, data=st.data())
def test_permuting_updates_permutes_weights(
    config: tuple[str, dict[str, Any]], updates: list[UpdateInfo], data: st.DataObject
) -> None:
    algo = make_algorithm(*config)
    perm = data.draw(st.permutations(range(len(updates))))
    w = algo.weights(updates)
    assert all(math.isfinite(x) and x >= 0 for x in w)
    assert algo.weights([updates[i] for i in perm]) == [w[i] for i in perm]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from([*NORMALISED, "fedbuff"]),
    pairs=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 50)), min_size=1, max_size=20
    ),
)
def test_uniform_weighting_ignores_num_samples(name: str, pairs: list[tuple[int, int, int]]) -> None:
    algo = make_algorithm(name, {"weighting": "uniform"})
    first = algo.weights([UpdateInfo(n, s) for n, _, s in pairs])
    second = algo.weights([UpdateInfo(m, s) for _, m, s in pairs])
    assert first == second


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["constant", "polynomial", "hinge"]),
    a=st.floats(0.0, 10.0),
    b=st.floats(0.0, 1000.0),
    t1=st.integers(0, 10**6),
    t2=st.integers(0, 10**6),
)
def test_staleness_factor_properties(kind: str, a: float, b: float, t1: int, t2: int) -> None:
    assert staleness_factor(kind, 0, a=a, b=b) == 1.0
    lo, hi = sorted((t1, t2))
    s_lo, s_hi = staleness_factor(kind, lo, a=a, b=b), staleness_factor(kind, hi, a=a, b=b)
    assert 0.0 < s_hi <= s_lo <= 1.0
    assert s_lo == pytest.approx(ref_s(kind, lo, a, b), rel=1e-12)


def test_staleness_factor_known_values() -> None:
    # FedBuff's 1/sqrt(1 + tau) and a few hinge points worked out by hand.
    assert staleness_factor("polynomial", 3, a=0.5, b=0) == pytest.approx(0.5)
    assert staleness_factor("hinge", 4, a=2.0, b=4) == 1.0
    assert staleness_factor("hinge", 6, a=2.0, b=4) == pytest.approx(1 / 5)
    assert staleness_factor("Constant", 10**6, a=3.0, b=0) == 1.0
    assert make_algorithm("fedbuff").weights([UpdateInfo(1, 0), UpdateInfo(1, 3)]) == pytest.approx(
        [0.5, 0.25]
    )
    assert make_algorithm("fedasync").weights([UpdateInfo(1, 8)]) == pytest.approx([0.6 / 3])


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(ADAPTIVE),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    lr=st.floats(1e-6, 10.0),
    tau=st.floats(1e-9, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_adaptive_with_zero_update_and_zero_momentum_leaves_base(
    name: str, dtype: torch.dtype, lr: float, tau: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.standard_normal(33)).to(dtype)
    v = torch.from_numpy(np.abs(rng.standard_normal(33)) * rng.choice([0.0, 1e-8, 1.0, 1e3], 33)).to(dtype)
    algo = make_algorithm(name, {"server_lr": lr, "tau": tau})
    state = {"m": torch.zeros_like(base), "v": v}
    new = algo.apply(base, torch.zeros_like(base), state)
    assert torch.equal(new, base)
    assert torch.equal(state["m"], torch.zeros_like(base))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_apply_writes_into_acc_and_state_in_place(name: str, dtype: torch.dtype) -> None:
    algo = make_algorithm(name)
    assert algo.reuses_acc
    base = torch.randn(5, 6, dtype=dtype)
    base_copy = base.clone()
    acc = torch.randn(5, 6, dtype=dtype)
    state = algo.initial_states(base)
    before = {slot: t.data_ptr() for slot, t in state.items()}
    scratch = torch.empty(100, dtype=dtype)
    out = algo.apply(base, acc, state, scratch=scratch)
    assert out is acc and out.data_ptr() == acc.data_ptr()
    assert {slot: t.data_ptr() for slot, t in state.items()} == before
    assert torch.equal(base, base_copy), "apply must not modify base"
    if algo.state_slots:
        assert any(not torch.equal(t, algo.initial_state(s, base)) for s, t in state.items())


def _max_allocation(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0], default=0)


def test_apply_allocates_no_full_size_temporaries() -> None:
    numel = 1 << 14
    nbytes = numel * 8
    base = torch.randn(numel, dtype=torch.float64)
    delta = torch.randn(numel, dtype=torch.float64)
    acc = torch.empty_like(base)
    scratch = torch.empty_like(base)
    algos = [cls() for cls in ALGORITHMS.values()]
    states = [algo.initial_states(base) for algo in algos]

    def run_all(with_scratch: bool) -> None:
        for algo, state in zip(algos, states, strict=True):
            for _ in range(2):
                acc.copy_(delta)
                algo.apply(base, acc, state, scratch=scratch if with_scratch else None)

    assert _max_allocation(lambda: run_all(True)) < nbytes // 8
    # The probe sees a full-size allocation when there is one: Yogi without scratch makes one.
    assert _max_allocation(lambda: run_all(False)) >= nbytes


# ---------------------------------------------------------------------------------------------
# Construction, parameters, state


def test_registry_and_case_insensitive_lookup() -> None:
    assert set(ALGORITHMS) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedasync", "fedbuff"}
    assert isinstance(make_algorithm(" FedAdam "), FedAdam)
    assert isinstance(make_algorithm("FEDYOGI", {"beta1": 0}), FedYogi)
    for key, cls in ALGORITHMS.items():
        assert cls.name == key


def test_params_include_defaults_and_derived_v0() -> None:
    assert make_algorithm("fedavg").params == {"weighting": "samples", "server_lr": 1.0}
    assert make_algorithm("fedbuff").params == {
        "server_lr": 1.0,
        "weighting": "uniform",
        "staleness": "polynomial",
        "a": 0.5,
        "b": 4.0,
    }
    assert make_algorithm("fedasync").params["alpha"] == 0.6
    assert make_algorithm("fedadam").params == {
        "weighting": "samples",
        "server_lr": 0.01,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
        "v0": 1e-3**2,
    }
    assert "beta2" not in make_algorithm("fedadagrad").params
    assert make_algorithm("fedyogi", {"tau": 0.1}).params["v0"] == pytest.approx(0.01)
    assert make_algorithm("fedyogi", {"tau": 0.1, "v0": 0}).params["v0"] == 0.0
    p = make_algorithm("fedavg", {"server_lr": 2, "weighting": "UNIFORM"}).params
    assert p == {"server_lr": 2.0, "weighting": "uniform"} and isinstance(p["server_lr"], float)
    p["server_lr"] = 5.0
    assert make_algorithm("fedavg").params["server_lr"] == 1.0


def test_initial_state() -> None:
    like = torch.empty(3, 2, dtype=torch.float32)
    adam = make_algorithm("fedadam", {"tau": 0.01})
    assert adam.state_slots == ("m", "v")
    assert torch.equal(adam.initial_state("m", like), torch.zeros(3, 2))
    assert torch.equal(adam.initial_state("v", like), torch.full((3, 2), 1e-4, dtype=torch.float32))
    out = torch.full((3, 2), float("nan"))
    assert adam.initial_state("v", like, out=out) is out
    assert torch.equal(out, torch.full((3, 2), 1e-4, dtype=torch.float32))
    momentum = make_algorithm("fedavgm").initial_states(like.double())
    assert list(momentum) == ["momentum"] and momentum["momentum"].dtype == torch.float64
    assert torch.count_nonzero(momentum["momentum"]) == 0
    for stateless in ("fedavg", "fedasync", "fedbuff"):
        assert make_algorithm(stateless).initial_states(like) == {}
    with pytest.raises(ValueError, match="no state slot 'momentum'"):
        adam.initial_state("momentum", like)
    with pytest.raises(ValueError, match="shape"):
        adam.initial_state("m", like, out=torch.empty(6))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_parameter_is_documented(name: str) -> None:
    cls = ALGORITHMS[name]
    doc = cls.__doc__ or ""
    assert re.search(r"\b20[12]\d\b", doc), "the docstring cites the paper"
    for key, spec in cls.PARAMS.items():
        assert f"{key}:" in doc, f"{name} docstring does not document {key!r}"
        assert spec.doc and spec.allowed()
        assert key in cls.describe_params()


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_algorithm_lists_known_names() -> None:
    with pytest.raises(AlgorithmError, match="unknown algorithm 'fedprox'") as info:
        make_algorithm("fedprox")
    assert "fedavg" in str(info.value) and "fedbuff" in str(info.value)
    with pytest.raises(AlgorithmError, match="did you mean 'fedadam'"):
        make_algorithm("fedadm")


def test_unknown_parameter_names_it_and_the_known_ones() -> None:
    with pytest.raises(AlgorithmError, match=r"unknown parameter 'lr' for fedadam; known: .*server_lr"):
        make_algorithm("fedadam", {"lr": 0.1})
    with pytest.raises(AlgorithmError, match="unknown parameter 'beta2' for fedadagrad"):
        make_algorithm("fedadagrad", {"beta2": 0.9})
    with pytest.raises(AlgorithmError, match="unknown parameter 'momentum' for fedavg"):
        make_algorithm("fedavg", {"momentum": 0.9})


@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("fedadam", {"beta1": 1.5}, r"'beta1' for fedadam must be a number in \[0, 1\), got 1.5"),
        ("fedyogi", {"beta2": 1.0}, r"'beta2' for fedyogi must be a number in \[0, 1\)"),
        ("fedavg", {"server_lr": -0.1}, r"'server_lr' for fedavg must be a number in \(0, inf\)"),
        ("fedbuff", {"server_lr": 0}, r"'server_lr' for fedbuff"),
        ("fedasync", {"alpha": 0}, r"'alpha' for fedasync must be a number in \(0, 1\], got 0"),
        ("fedasync", {"alpha": 1.01}, r"'alpha' for fedasync"),
        ("fedavgm", {"momentum": -0.1}, r"'momentum' for fedavgm"),
        ("fedadam", {"tau": 0.0}, r"'tau' for fedadam must be a number in \(0, inf\)"),
        ("fedadagrad", {"v0": -1.0}, r"'v0' for fedadagrad must be a number in \[0, inf\)"),
        ("fedasync", {"a": -1}, r"'a' for fedasync"),
        ("fedbuff", {"b": -2}, r"'b' for fedbuff"),
        ("fedavg", {"weighting": "median"}, r"'weighting' for fedavg must be one of 'samples', 'uniform'"),
        ("fedbuff", {"staleness": "exponential"}, r"'staleness' for fedbuff must be one of 'constant'"),
        ("fedavg", {"server_lr": "0.1"}, r"'server_lr' for fedavg .* got '0.1' \(str\)"),
        ("fedavgm", {"momentum": True}, r"'momentum' for fedavgm .* got True \(bool\)"),
        ("fedadam", {"server_lr": float("nan")}, r"'server_lr' for fedadam"),
        ("fedadam", {"server_lr": float("inf")}, r"'server_lr' for fedadam"),
    ],
)
def test_bad_parameter_values_name_the_parameter(name: str, params: dict[str, Any], pattern: str) -> None:
    with pytest.raises(AlgorithmError, match=pattern):
        make_algorithm(name, params)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_no_updates_is_an_error(name: str) -> None:
    with pytest.raises(AlgorithmError, match=f"{name} needs at least one update"):
        make_algorithm(name).weights([])


def test_bad_update_descriptions() -> None:
    with pytest.raises(AlgorithmError, match="num_samples > 0"):
        make_algorithm("fedavg").weights([UpdateInfo(0), UpdateInfo(0)])
    assert make_algorithm("fedavg", {"weighting": "uniform"}).weights([UpdateInfo(0), UpdateInfo(0)]) == [
        0.5,
        0.5,
    ]
    assert make_algorithm("fedavg").weights([UpdateInfo(0), UpdateInfo(3)]) == [0.0, 1.0]
    with pytest.raises(AlgorithmError, match="num_samples must be an integer >= 0"):
        UpdateInfo(-1)
    with pytest.raises(AlgorithmError, match="staleness must be an integer >= 0"):
        UpdateInfo(1, staleness=-2)
    with pytest.raises(AlgorithmError, match="num_samples"):
        UpdateInfo(True)
    with pytest.raises(AlgorithmError, match="num_samples"):
        UpdateInfo(2.5)  # type: ignore[arg-type]
    info = UpdateInfo(np.int64(7), np.int32(2))  # type: ignore[arg-type]
    assert type(info.num_samples) is int and type(info.staleness) is int
    with pytest.raises(AlgorithmError, match="unknown staleness function 'linear'"):
        staleness_factor("linear", 1, a=1, b=1)
    with pytest.raises(AlgorithmError, match="staleness must be"):
        staleness_factor("hinge", -1, a=1, b=1)
    with pytest.raises(AlgorithmError, match="'a'"):
        staleness_factor("polynomial", 1, a=-0.5, b=1)


def test_apply_rejects_mismatched_or_aliased_buffers() -> None:
    adam = make_algorithm("fedadam")
    base = torch.zeros(4)
    state = adam.initial_states(base)
    with pytest.raises(ValueError, match="base has shape"):
        adam.apply(torch.zeros(5), torch.zeros(4), state)
    with pytest.raises(ValueError, match="dtype"):
        adam.apply(base, torch.zeros(4, dtype=torch.float64), state)
    with pytest.raises(ValueError, match="floating-point"):
        adam.apply(base.long(), torch.zeros(4, dtype=torch.long), state)
    with pytest.raises(ValueError, match="exactly the slots"):
        adam.apply(base, torch.zeros(4), {"m": state["m"]})
    with pytest.raises(ValueError, match="state 'v' has shape"):
        adam.apply(base, torch.zeros(4), {"m": state["m"], "v": torch.zeros(3)})
    arena = torch.zeros(12)
    with pytest.raises(ValueError, match="base and acc share memory"):
        adam.apply(arena[0:4], arena[2:6], {"m": arena[6:10], "v": torch.zeros(4)})
    with pytest.raises(ValueError, match="share memory"):
        make_algorithm("fedavgm").apply(base, torch.zeros(4), {"momentum": base})
    # Disjoint views into one arena are what a buffer-reusing core passes: accepted.
    out = adam.apply(arena[0:4], arena[4:8], {"m": arena[8:12], "v": torch.full((4,), 1e-6)})
    assert out.data_ptr() == arena[4:8].data_ptr()
    yogi = make_algorithm("fedyogi")
    with pytest.raises(ValueError, match="at least 4 elements"):
        yogi.apply(base, torch.zeros(4), yogi.initial_states(base), scratch=torch.zeros(3))
    acc = torch.zeros(4)
    with pytest.raises(ValueError, match="acc and scratch share memory"):
        yogi.apply(base, acc, yogi.initial_states(base), scratch=acc)
