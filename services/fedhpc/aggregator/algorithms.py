"""Server-side aggregation math: FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedAsync, FedBuff.

Pure functions and classes on torch tensors: no I/O, no threads, no clocks. The streaming core
drives an algorithm one tensor at a time:

1. ``w = algorithm.weights(updates)`` once per aggregation, from each update's
   :class:`UpdateInfo` (sample count, staleness).
2. For every floating-point tensor of the model, the core accumulates
   ``acc = sum_i w[i] * delta_i`` in the accumulation dtype (float32, or float64 when asked),
   where ``delta_i = x_i - x`` is update *i* relative to the current base ``x``.
3. ``new = algorithm.apply(base, acc, state, scratch=...)`` returns the tensor's new weights and
   updates that tensor's optimizer state in place. The state starts from
   :meth:`ServerAlgorithm.initial_state` and is carried between rounds by the core.

One algorithm instance serves every tensor of every round, so instances hold parameters only,
never per-tensor or per-round data. Every ``apply`` writes its result into ``acc``'s storage and
returns ``acc`` itself (``reuses_acc``): the core recycles buffers instead of allocating, and the
update rules are arranged as in-place operations so no full-size temporary is allocated.
"""

from __future__ import annotations

import difflib
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch

__all__ = [
    "ALGORITHMS",
    "STALENESS_KINDS",
    "AlgorithmError",
    "FedAdagrad",
    "FedAdam",
    "FedAsync",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedYogi",
    "ParamSpec",
    "ServerAlgorithm",
    "UpdateInfo",
    "make_algorithm",
    "staleness_factor",
]

STALENESS_KINDS: tuple[str, ...] = ("constant", "polynomial", "hinge")
WEIGHTINGS: tuple[str, ...] = ("samples", "uniform")


class AlgorithmError(ValueError):
    """An unknown algorithm, or a parameter (or update description) it cannot accept.

    The message names the offending algorithm/parameter and says what is allowed, so it can be
    shown to users as is.
    """


# ---------------------------------------------------------------------------------------------
# Parameters


def _fmt_number(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


@dataclass(frozen=True)
class ParamSpec:
    """One documented parameter: its default and what values are valid.

    A numeric parameter is a finite real number within ``[low, high]`` (either end open when
    ``low_open``/``high_open``; ``None`` means unbounded); a choice parameter is one of
    ``choices`` (compared case-insensitively, stored lower-case). ``derived_default`` computes the
    default from the other (already resolved) parameters, for defaults such as ``v0 = tau**2``;
    ``default_doc`` then says how, for documentation.
    """

    doc: str
    default: float | str | None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    derived_default: Callable[[Mapping[str, Any]], float | str] | None = field(default=None, compare=False)
    default_doc: str | None = None

    def allowed(self) -> str:
        """What values are valid, in words, e.g. ``a number in [0, 1)``."""
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        left = "(" if self.low is None or self.low_open else "["
        right = ")" if self.high is None or self.high_open else "]"
        low = "-inf" if self.low is None else _fmt_number(self.low)
        high = "inf" if self.high is None else _fmt_number(self.high)
        return f"a number in {left}{low}, {high}{right}"

    def describe_default(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        return repr(self.default)

    def validate(self, algorithm: str, name: str, value: object) -> float | str:
        """Return ``value`` normalised (float, or lower-case choice) or raise :class:`AlgorithmError`."""

        def bad(got: str) -> AlgorithmError:
            return AlgorithmError(f"parameter '{name}' for {algorithm} must be {self.allowed()}, got {got}")

        if self.choices:
            if not isinstance(value, str) or value.strip().lower() not in self.choices:
                raise bad(repr(value))
            return value.strip().lower()
        # bool is an int subclass, but `momentum: true` in a YAML file is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad(f"{value!r} ({type(value).__name__})")
        number = float(value)
        if not math.isfinite(number):
            raise bad(repr(value))
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            raise bad(repr(value))
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            raise bad(repr(value))
        return number


def _server_lr(default: float, symbol: str) -> ParamSpec:
    return ParamSpec(f"server learning rate {symbol}", default, low=0.0, low_open=True)


def _weighting(default: str) -> ParamSpec:
    return ParamSpec(
        "how updates are mixed: 'samples' weighs update k by n_k / sum(n), 'uniform' by 1/K",
        default,
        choices=WEIGHTINGS,
    )


def _staleness_params() -> dict[str, ParamSpec]:
    return {
        "staleness": ParamSpec(
            "staleness function s: 'constant' s=1; 'polynomial' s=(staleness+1)^-a; "
            "'hinge' s=1 while staleness <= b, then 1/(a*(staleness-b)+1)",
            "polynomial",
            choices=STALENESS_KINDS,
        ),
        "a": ParamSpec("exponent (polynomial) or slope (hinge) of s", 0.5, low=0.0),
        "b": ParamSpec("staleness up to which the hinge s stays 1 (hinge only)", 4.0, low=0.0),
    }


# ---------------------------------------------------------------------------------------------
# Update descriptions and staleness


@dataclass(frozen=True)
class UpdateInfo:
    """What the weights of one update depend on.

    ``num_samples``: local training samples behind the update (n_k). ``staleness``: how many
    server versions were committed between the version the update was trained from and the
    version being updated now (t - tau in Xie et al.; 0 for synchronous rounds).
    """

    num_samples: int
    staleness: int = 0

    def __post_init__(self) -> None:
        for name in ("num_samples", "staleness"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise AlgorithmError(f"UpdateInfo.{name} must be an integer >= 0, got {value!r}")
            # numpy integers are accepted above; store a plain int so weights use exact int maths.
            object.__setattr__(self, name, int(value))


def staleness_factor(kind: str, staleness: int, *, a: float, b: float) -> float:
    """The staleness function s(t - tau) of Xie et al., "Asynchronous Federated Optimization" (2019).

    - ``constant``:   s = 1
    - ``polynomial``: s_a = (staleness + 1)^(-a)
    - ``hinge``:      s_{a,b} = 1 if staleness <= b else 1 / (a * (staleness - b) + 1)

    All are 1 at staleness 0, non-increasing in staleness and in (0, 1] (barring float underflow
    for absurd ``a``). FedBuff's default s = 1/sqrt(1 + staleness) is ``polynomial`` with a = 0.5.
    """
    key = kind.strip().lower() if isinstance(kind, str) else kind
    if key not in STALENESS_KINDS:
        raise AlgorithmError(f"unknown staleness function {kind!r}; known: {', '.join(STALENESS_KINDS)}")
    if isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral) or staleness < 0:
        raise AlgorithmError(f"staleness must be an integer >= 0, got {staleness!r}")
    for name, value in (("a", a), ("b", b)):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value < 0
        ):
            raise AlgorithmError(f"staleness parameter '{name}' must be a number in [0, inf), got {value!r}")
    if key == "constant":
        return 1.0
    if key == "polynomial":
        return float(int(staleness) + 1) ** (-float(a))
    if staleness <= b:
        return 1.0
    return 1.0 / (float(a) * (int(staleness) - float(b)) + 1.0)


def _mixing_weights(algorithm: str, weighting: str, updates: Sequence[UpdateInfo]) -> list[float]:
    if weighting == "uniform":
        return [1.0 / len(updates)] * len(updates)
    # Exact integer total and int/int true division: each weight is correctly rounded and
    # independent of the order of the updates.
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise AlgorithmError(
            f"{algorithm} with weighting='samples' needs an update with num_samples > 0 "
            "(use weighting='uniform' to ignore sample counts)"
        )
    return [u.num_samples / total for u in updates]


# ---------------------------------------------------------------------------------------------
# Tensor argument checks


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    if t.numel() == 0:
        return start, start
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + extent * t.element_size()


def _overlaps(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.device != y.device:
        return False
    x0, x1 = _span(x)
    y0, y1 = _span(y)
    return x0 < y1 and y0 < x1


def _check_like(what: str, t: torch.Tensor, acc: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != acc.shape or t.dtype != acc.dtype or t.device != acc.device:
        raise ValueError(
            f"{what} has shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}; "
            f"expected those of acc: {tuple(acc.shape)}, {acc.dtype}, {acc.device}"
        )


# ---------------------------------------------------------------------------------------------
# Algorithms


class ServerAlgorithm(ABC):
    """A server-side aggregation rule, driven one tensor at a time by the streaming core.

    Subclasses declare ``name``, ``state_slots`` (per-tensor optimizer state kept between rounds),
    ``PARAMS`` (documented parameters) and ``needs_scratch`` (whether ``apply`` benefits from a
    scratch buffer; without one it allocates a temporary).
    """

    name: ClassVar[str]
    state_slots: ClassVar[tuple[str, ...]]
    PARAMS: ClassVar[Mapping[str, ParamSpec]]
    # Every algorithm here writes its result into acc and returns acc itself.
    reuses_acc: ClassVar[bool] = True
    needs_scratch: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        given: Mapping[str, Any] = {} if params is None else params
        if not isinstance(given, Mapping):
            raise AlgorithmError(f"parameters for {self.name} must be a mapping, got {type(given).__name__}")
        for key in given:
            if not isinstance(key, str) or key not in self.PARAMS:
                raise AlgorithmError(self._unknown_param_message(key))
        resolved: dict[str, Any] = {}
        for key, spec in self.PARAMS.items():
            if key in given:
                resolved[key] = spec.validate(self.name, key, given[key])
            elif spec.derived_default is None:
                resolved[key] = spec.default
        for key, spec in self.PARAMS.items():
            if key not in resolved and spec.derived_default is not None:
                resolved[key] = spec.derived_default(resolved)
        self._params = resolved

    @classmethod
    def _unknown_param_message(cls, key: object) -> str:
        known = ", ".join(sorted(cls.PARAMS)) or "(none)"
        message = f"unknown parameter {key!r} for {cls.name}; known: {known}"
        if isinstance(key, str):
            close = difflib.get_close_matches(key, list(cls.PARAMS), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
        return message

    @property
    def params(self) -> dict[str, Any]:
        """The effective parameters, defaults included (a copy)."""
        return dict(self._params)

    @classmethod
    def describe_params(cls) -> str:
        """One line per parameter: name, valid values, default, meaning (for CLI help and docs)."""
        return "\n".join(
            f"{key}: {spec.allowed()}, default {spec.describe_default()} -- {spec.doc}"
            for key, spec in cls.PARAMS.items()
        )

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({inner})"

    @abstractmethod
    def weights(self, updates: Sequence[UpdateInfo]) -> list[float]:
        """Mixing weight w_i of each update, in order; finite and >= 0."""

    def _check_updates(self, updates: Sequence[UpdateInfo]) -> None:
        if len(updates) == 0:
            raise AlgorithmError(f"{self.name} needs at least one update to aggregate, got none")
        for i, u in enumerate(updates):
            if not isinstance(u, UpdateInfo):
                raise AlgorithmError(f"update {i} must be an UpdateInfo, got {type(u).__name__}")

    def _initial_value(self, slot: str) -> float:
        return 0.0

    def initial_state(
        self, slot: str, like: torch.Tensor, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The value of state ``slot`` before the first round, shaped like ``like``.

        Zeros for every slot except the adaptive methods' ``v``, which starts at ``v0``. With
        ``out`` (same shape, dtype and device as ``like``) the value is written into ``out``,
        which is returned, so the core can recycle state buffers. The core must create state
        with this method rather than with zeros.
        """
        if slot not in self.state_slots:
            raise ValueError(
                f"{self.name} has no state slot {slot!r}; slots: {', '.join(self.state_slots) or '(none)'}"
            )
        value = self._initial_value(slot)
        if out is None:
            return torch.full(like.shape, value, dtype=like.dtype, device=like.device)
        _check_like(f"out for state {slot!r}", out, like)
        return out.fill_(value)

    def initial_states(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh state for one tensor: ``{slot: initial_state(slot, like)}``."""
        return {slot: self.initial_state(slot, like) for slot in self.state_slots}

    @abstractmethod
    def apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New weights of one tensor from its current weights ``base`` and ``acc = sum_i w_i delta_i``.

        ``base`` and ``acc`` share shape and a floating dtype (the accumulation dtype); ``state``
        holds one tensor per ``state_slots`` entry, alike, and is updated in place. The result is
        written into ``acc`` and ``acc`` is returned. ``scratch``, used only where
        ``needs_scratch``, is a contiguous tensor of the same dtype and device with at least
        ``acc.numel()`` elements; its contents are overwritten.
        """

    def _check_apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: Mapping[str, torch.Tensor],
        scratch: torch.Tensor | None,
    ) -> None:
        # O(ndim) checks only: a wrong buffer here would silently corrupt a model.
        if not isinstance(acc, torch.Tensor) or not acc.is_floating_point():
            raise ValueError(f"acc must be a floating-point torch.Tensor, got {getattr(acc, 'dtype', acc)!r}")
        _check_like("base", base, acc)
        if set(state) != set(self.state_slots):
            raise ValueError(
                f"{self.name} state must have exactly the slots {list(self.state_slots)}, got {sorted(state)}"
            )
        buffers: list[tuple[str, torch.Tensor]] = [("base", base), ("acc", acc)]
        for slot in self.state_slots:
            _check_like(f"state {slot!r}", state[slot], acc)
            buffers.append((f"state {slot!r}", state[slot]))
        if scratch is not None and self.needs_scratch:
            if (
                not isinstance(scratch, torch.Tensor)
                or scratch.dtype != acc.dtype
                or scratch.device != acc.device
            ):
                raise ValueError(f"scratch must be a tensor of dtype {acc.dtype} on {acc.device}")
            if not scratch.is_contiguous() or scratch.numel() < acc.numel():
                raise ValueError(
                    f"scratch must be contiguous with at least {acc.numel()} elements, "
                    f"got {scratch.numel()} (contiguous={scratch.is_contiguous()})"
                )
            buffers.append(("scratch", scratch.view(-1)[: acc.numel()]))
        # Only base is read-only, so every pair involves a buffer written in place. Views into one
        # shared arena are fine as long as their byte ranges do not meet.
        for i, (name_i, t_i) in enumerate(buffers):
            for name_j, t_j in buffers[i + 1 :]:
                if _overlaps(t_i, t_j):
                    raise ValueError(f"{name_i} and {name_j} share memory; they must be distinct buffers")

    @staticmethod
    def _scratch_like(acc: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
        if scratch is None:
            return torch.empty_like(acc)
        return scratch.view(-1)[: acc.numel()].view(acc.shape)


def _add_scaled_base(acc: torch.Tensor, base: torch.Tensor, lr: float) -> torch.Tensor:
    # x * 1.0 == x exactly, so skipping the multiply saves a pass over memory without changing bits.
    if lr != 1.0:
        acc.mul_(lr)
    return acc.add_(base)


class FedAvg(ServerAlgorithm):
    """FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data" (AISTATS 2017), with a server learning rate.

    With K updates Delta_k = x_k - x_t and sample counts n_k (n = sum_k n_k)::

        x_{t+1} = x_t + eta * sum_k p_k Delta_k,   p_k = n_k / n  (weighting='samples')
                                                   p_k = 1 / K    (weighting='uniform')

    With eta = 1 this is the paper's x_{t+1} = sum_k (n_k / n) x_k.

    Parameters:
        weighting: 'samples' [default] or 'uniform' -- the p_k above.
        server_lr: eta > 0 [1.0].

    State: none. ``apply`` writes the result into ``acc`` and returns it.
    """

    name = "fedavg"
    state_slots = ()
    PARAMS = MappingProxyType({"weighting": _weighting("samples"), "server_lr": _server_lr(1.0, "eta")})

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self._weighting: str = self._params["weighting"]
        self._lr: float = self._params["server_lr"]

    def weights(self, updates: Sequence[UpdateInfo]) -> list[float]:
        self._check_updates(updates)
        return _mixing_weights(self.name, self._weighting, updates)

    def apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_apply(base, acc, state, scratch)
        return _add_scaled_base(acc, base, self._lr)


class FedAvgM(ServerAlgorithm):
    """FedAvgM (server momentum): Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification" (2019).

    With Delta_t = sum_k p_k Delta_k the weighted mean update (Delta_k = x_k - x_t)::

        v_t     = beta * v_{t-1} + Delta_t,    v_{-1} = 0
        x_{t+1} = x_t + eta * v_t

    (The paper writes Delta as x_t - x_k and subtracts; the rule is the same.)

    Parameters:
        weighting: 'samples' [default] or 'uniform' -- p_k = n_k / n or 1 / K.
        server_lr: eta > 0 [1.0].
        momentum: beta in [0, 1) [0.9]; 0 gives FedAvg.

    State: ``momentum`` (v). ``apply`` writes the result into ``acc`` and returns it.
    """

    name = "fedavgm"
    state_slots = ("momentum",)
    PARAMS = MappingProxyType(
        {
            "weighting": _weighting("samples"),
            "server_lr": _server_lr(1.0, "eta"),
            "momentum": ParamSpec("server momentum beta", 0.9, low=0.0, high=1.0, high_open=True),
        }
    )

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self._weighting: str = self._params["weighting"]
        self._lr: float = self._params["server_lr"]
        self._beta: float = self._params["momentum"]

    def weights(self, updates: Sequence[UpdateInfo]) -> list[float]:
        self._check_updates(updates)
        return _mixing_weights(self.name, self._weighting, updates)

    def apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_apply(base, acc, state, scratch)
        v = state["momentum"]
        v.mul_(self._beta).add_(acc)
        torch.mul(v, self._lr, out=acc)
        return acc.add_(base)


class _Adaptive(ServerAlgorithm):
    """Shared part of FedAdagrad/FedAdam/FedYogi (Reddi et al. 2021, Algorithm 2)."""

    state_slots = ("m", "v")

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self._weighting: str = self._params["weighting"]
        self._lr: float = self._params["server_lr"]
        self._beta1: float = self._params["beta1"]
        self._beta2: float = self._params.get("beta2", 0.0)
        self._tau: float = self._params["tau"]
        self._v0: float = self._params["v0"]

    def _initial_value(self, slot: str) -> float:
        return self._v0 if slot == "v" else 0.0

    def weights(self, updates: Sequence[UpdateInfo]) -> list[float]:
        self._check_updates(updates)
        return _mixing_weights(self.name, self._weighting, updates)

    @abstractmethod
    def _update_v(self, v: torch.Tensor, acc: torch.Tensor, scratch: torch.Tensor | None) -> None:
        """v_t from v_{t-1} (in place) and Delta_t = acc; may overwrite acc, which is free afterwards."""

    def apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_apply(base, acc, state, scratch)
        m, v = state["m"], state["v"]
        m.mul_(self._beta1).add_(acc, alpha=1.0 - self._beta1)
        self._update_v(v, acc, scratch)
        # Delta_t is no longer needed, so acc hosts the denominator and then the result.
        torch.sqrt(v, out=acc).add_(self._tau)
        torch.div(m, acc, out=acc)
        return _add_scaled_base(acc, base, self._lr)


def _adaptive_params(*, with_beta2: bool) -> Mapping[str, ParamSpec]:
    specs: dict[str, ParamSpec] = {
        "weighting": _weighting("samples"),
        "server_lr": _server_lr(0.01, "eta"),
        "beta1": ParamSpec("first-moment decay beta_1", 0.9, low=0.0, high=1.0, high_open=True),
    }
    if with_beta2:
        specs["beta2"] = ParamSpec("second-moment decay beta_2", 0.99, low=0.0, high=1.0, high_open=True)
    specs["tau"] = ParamSpec("adaptivity tau (added to sqrt(v_t))", 1e-3, low=0.0, low_open=True)
    specs["v0"] = ParamSpec(
        "initial second moment v_{-1} (the paper asks v_{-1} >= tau^2)",
        None,
        low=0.0,
        derived_default=lambda p: float(p["tau"]) ** 2,
        default_doc="tau**2",
    )
    return MappingProxyType(specs)


class FedAdagrad(_Adaptive):
    """FedAdagrad: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2.

    With Delta_t = sum_k p_k Delta_k the weighted mean update (Delta_k = x_k - x_t)::

        m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t,      m_{-1} = 0
        v_t     = v_{t-1} + Delta_t^2
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

    No bias correction, as in the paper.

    Parameters:
        weighting: 'samples' [default] or 'uniform' -- p_k = n_k / n or 1 / K (the paper: 1 / K).
        server_lr: eta > 0 [0.01].
        beta1: beta_1 in [0, 1) [0.9].
        tau: tau > 0 [1e-3] -- degree of adaptivity; bounds the step where v_t is small.
        v0: v_{-1} >= 0 [tau**2] -- initial second moment; the paper requires v_{-1} >= tau^2.

    State: ``m`` and ``v``; create them with ``initial_state`` (``v`` starts at v0, not zero).
    ``apply`` writes the result into ``acc`` and returns it.
    """

    name = "fedadagrad"
    PARAMS = _adaptive_params(with_beta2=False)

    def _update_v(self, v: torch.Tensor, acc: torch.Tensor, scratch: torch.Tensor | None) -> None:
        v.addcmul_(acc, acc)


class FedAdam(_Adaptive):
    """FedAdam: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2.

    With Delta_t = sum_k p_k Delta_k the weighted mean update (Delta_k = x_k - x_t)::

        m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t,      m_{-1} = 0
        v_t     = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t^2
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

    No bias correction, as in the paper.

    Parameters:
        weighting: 'samples' [default] or 'uniform' -- p_k = n_k / n or 1 / K (the paper: 1 / K).
        server_lr: eta > 0 [0.01].
        beta1: beta_1 in [0, 1) [0.9].
        beta2: beta_2 in [0, 1) [0.99].
        tau: tau > 0 [1e-3] -- degree of adaptivity; bounds the step where v_t is small.
        v0: v_{-1} >= 0 [tau**2] -- initial second moment; the paper requires v_{-1} >= tau^2.

    State: ``m`` and ``v``; create them with ``initial_state`` (``v`` starts at v0, not zero).
    ``apply`` writes the result into ``acc`` and returns it.
    """

    name = "fedadam"
    PARAMS = _adaptive_params(with_beta2=True)

    def _update_v(self, v: torch.Tensor, acc: torch.Tensor, scratch: torch.Tensor | None) -> None:
        v.mul_(self._beta2).addcmul_(acc, acc, value=1.0 - self._beta2)


class FedYogi(_Adaptive):
    """FedYogi: Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2.

    With Delta_t = sum_k p_k Delta_k the weighted mean update (Delta_k = x_k - x_t)::

        m_t     = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t,      m_{-1} = 0
        v_t     = v_{t-1} - (1 - beta_2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
        x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

    No bias correction, as in the paper.

    Parameters:
        weighting: 'samples' [default] or 'uniform' -- p_k = n_k / n or 1 / K (the paper: 1 / K).
        server_lr: eta > 0 [0.01].
        beta1: beta_1 in [0, 1) [0.9].
        beta2: beta_2 in [0, 1) [0.99].
        tau: tau > 0 [1e-3] -- degree of adaptivity; bounds the step where v_t is small.
        v0: v_{-1} >= 0 [tau**2] -- initial second moment; the paper requires v_{-1} >= tau^2.

    State: ``m`` and ``v``; create them with ``initial_state`` (``v`` starts at v0, not zero).
    ``apply`` writes the result into ``acc`` and returns it.
    Pass ``scratch`` (``needs_scratch``) to avoid a full-size temporary per call.
    """

    name = "fedyogi"
    PARAMS = _adaptive_params(with_beta2=True)
    needs_scratch = True

    def _update_v(self, v: torch.Tensor, acc: torch.Tensor, scratch: torch.Tensor | None) -> None:
        # Three full-size values are live at once (v, Delta_t^2, the sign), hence the scratch.
        sign = self._scratch_like(acc, scratch)
        square = acc.mul_(acc)
        torch.sub(v, square, out=sign).sign_()
        v.addcmul_(square, sign, value=-(1.0 - self._beta2))


class FedAsync(ServerAlgorithm):
    """FedAsync: Xie, Koyejo and Gupta, "Asynchronous Federated Optimization" (2019).

    Each update, trained from server version tau and applied at version t, is mixed in with
    alpha_t = alpha * s(t - tau)::

        x_t = (1 - alpha_t) * x_{t-1} + alpha_t * x_new  =  x_{t-1} + alpha_t * Delta,
        Delta = x_new - x_{t-1}

    Weights are alpha_t per update and are not normalised: aggregate one update at a time as in
    the paper (several updates at once each get their own alpha_t, summed).

    Parameters:
        alpha: alpha in (0, 1] [0.6] -- mixing hyperparameter.
        staleness: s, one of 'constant' (s = 1), 'polynomial' [default] (s_a = (t - tau + 1)^-a),
            'hinge' (s_{a,b} = 1 if t - tau <= b else 1 / (a (t - tau - b) + 1)).
        a: a >= 0 [0.5] -- exponent (polynomial) or slope (hinge).
        b: b >= 0 [4] -- hinge threshold (hinge only).

    State: none. ``apply`` writes the result into ``acc`` and returns it.
    """

    name = "fedasync"
    state_slots = ()
    PARAMS = MappingProxyType(
        {
            "alpha": ParamSpec("mixing hyperparameter alpha", 0.6, low=0.0, high=1.0, low_open=True),
            **_staleness_params(),
        }
    )

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self._alpha: float = self._params["alpha"]
        self._kind: str = self._params["staleness"]
        self._a: float = self._params["a"]
        self._b: float = self._params["b"]

    def weights(self, updates: Sequence[UpdateInfo]) -> list[float]:
        self._check_updates(updates)
        return [
            self._alpha * staleness_factor(self._kind, u.staleness, a=self._a, b=self._b) for u in updates
        ]

    def apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_apply(base, acc, state, scratch)
        return acc.add_(base)


class FedBuff(ServerAlgorithm):
    """FedBuff: Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation"
    (AISTATS 2022).

    The server buffers K updates, each discounted by its staleness tau_k, then steps::

        Delta_bar = sum_k s(tau_k) * p_k * Delta_k,   p_k = 1 / K (uniform) or n_k / n (samples)
        x_{t+1}   = x_t + eta_g * Delta_bar

    The paper's s(tau) = 1 / sqrt(1 + tau) is the default ('polynomial' with a = 0.5).

    Parameters:
        server_lr: eta_g > 0 [1.0].
        weighting: 'uniform' [default] or 'samples' -- the p_k above.
        staleness: s, one of 'constant', 'polynomial' [default] (s = (tau + 1)^-a), 'hinge'
            (s = 1 if tau <= b else 1 / (a (tau - b) + 1)).
        a: a >= 0 [0.5] -- exponent (polynomial) or slope (hinge).
        b: b >= 0 [4] -- hinge threshold (hinge only).

    State: none. ``apply`` writes the result into ``acc`` and returns it.
    """

    name = "fedbuff"
    state_slots = ()
    PARAMS = MappingProxyType(
        {
            "server_lr": _server_lr(1.0, "eta_g"),
            "weighting": _weighting("uniform"),
            **_staleness_params(),
        }
    )

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(params)
        self._lr: float = self._params["server_lr"]
        self._weighting: str = self._params["weighting"]
        self._kind: str = self._params["staleness"]
        self._a: float = self._params["a"]
        self._b: float = self._params["b"]

    def weights(self, updates: Sequence[UpdateInfo]) -> list[float]:
        self._check_updates(updates)
        mixing = _mixing_weights(self.name, self._weighting, updates)
        return [
            staleness_factor(self._kind, u.staleness, a=self._a, b=self._b) * p
            for u, p in zip(updates, mixing, strict=True)
        ]

    def apply(
        self,
        base: torch.Tensor,
        acc: torch.Tensor,
        state: dict[str, torch.Tensor],
        *,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check_apply(base, acc, state, scratch)
        return _add_scaled_base(acc, base, self._lr)


ALGORITHMS: Mapping[str, type[ServerAlgorithm]] = MappingProxyType(
    {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedAsync, FedBuff)}
)


def make_algorithm(name: str, params: Mapping[str, Any] | None = None) -> ServerAlgorithm:
    """The algorithm called ``name`` (case-insensitive) with ``params`` validated."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key is None or key not in ALGORITHMS:
        message = f"unknown algorithm {name!r}; known: {', '.join(sorted(ALGORITHMS))}"
        close = difflib.get_close_matches(key, list(ALGORITHMS), n=1) if key else []
        if close:
            message += f" (did you mean {close[0]!r}?)"
        raise AlgorithmError(message)
    return ALGORITHMS[key](params)
