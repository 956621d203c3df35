"""fedhpc.aggregator._kernels, the fused accumulate-and-square-sum kernel, against numpy.

The kernel is an optional extension: these tests fail (rather than skip) when it is missing
on a machine with a C compiler, where `pip install` should have built it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from fedhpc.aggregator import core

pytestmark = pytest.mark.skipif(
    not core.FUSED_KERNEL_AVAILABLE and shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler here, so the optional kernel was not built; the torch path is tested instead",
)


def kernels():  # type: ignore[no-untyped-def]
    assert core.FUSED_KERNEL_AVAILABLE, "a C compiler is present but fedhpc.aggregator._kernels was not built"
    from fedhpc.aggregator import _kernels

    return _kernels


def _x(n: int, dtype: str, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """n values as stored bytes of dtype, and the same values widened to float64."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    stored = values.to(torch.bfloat16) if dtype == "BF16" else values
    raw = stored.contiguous().view(torch.uint8).numpy().tobytes()
    return raw, stored.to(torch.float64).numpy()


# Lengths around the vector width (16), the square-sum block (4096) and a typical chunk.
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4095, 4096, 4097, 100_003])
@pytest.mark.parametrize("acc_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_dtype", ["F32", "BF16"])
def test_first_sets_then_adds_and_returns_the_square_sum(n: int, acc_dtype: type, x_dtype: str) -> None:
    k = kernels()
    raw0, x0 = _x(n, x_dtype, seed=1)
    raw1, x1 = _x(n, x_dtype, seed=2)
    acc = np.full(n, 123.0, dtype=acc_dtype)  # garbage: `first` must overwrite it
    sq0 = k.accumulate(acc, raw0, 0.25, True, x_dtype)
    np.testing.assert_allclose(acc, (0.25 * x0).astype(acc_dtype), rtol=1e-6, atol=0)
    sq1 = k.accumulate(acc, raw1, 0.75, False, x_dtype)
    expected = 0.25 * x0 + 0.75 * x1
    rtol = 1e-6 if acc_dtype == np.float32 else 1e-12
    np.testing.assert_allclose(acc, expected, rtol=rtol, atol=rtol)
    assert sq0 == pytest.approx(float(np.sum(x0 * x0)), rel=1e-6)
    assert sq1 == pytest.approx(float(np.sum(x1 * x1)), rel=1e-6)


def test_matches_the_torch_path_it_replaces() -> None:
    """Same rounding as acc = w0 * x0; acc.add_(x1, alpha=w1) in float32, up to one FMA rounding."""
    k = kernels()
    raw0, _ = _x(10_000, "F32", seed=3)
    raw1, _ = _x(10_000, "F32", seed=4)
    acc = np.empty(10_000, dtype=np.float32)
    k.accumulate(acc, raw0, 0.3, True, "F32")
    k.accumulate(acc, raw1, 0.7, False, "F32")
    t0 = torch.frombuffer(bytearray(raw0), dtype=torch.float32)
    t1 = torch.frombuffer(bytearray(raw1), dtype=torch.float32)
    reference = torch.mul(t0, 0.3).add_(t1, alpha=0.7).numpy()
    np.testing.assert_allclose(acc, reference, rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_makes_the_square_sum_non_finite(bad: float) -> None:
    k = kernels()
    x = np.ones(5000, dtype=np.float32)
    x[4321] = bad
    acc = np.zeros(5000, dtype=np.float32)
    assert not np.isfinite(k.accumulate(acc, x.tobytes(), 1.0, True, "F32"))


def test_bad_arguments_are_refused_with_the_reason() -> None:
    k = kernels()
    acc = np.zeros(8, dtype=np.float32)
    x = np.ones(8, dtype=np.float32).tobytes()
    with pytest.raises(ValueError, match="x_dtype must be 'F32' or 'BF16', got 'F16'"):
        k.accumulate(acc, x, 1.0, True, "F16")
    with pytest.raises(ValueError, match="x holds 16 bytes, 8 elements of F32 need 32"):
        k.accumulate(acc, x[:16], 1.0, True, "F32")
    with pytest.raises(ValueError, match="acc must hold float32 or float64 elements"):
        k.accumulate(np.zeros(8, dtype=np.int32), x, 1.0, True, "F32")
    with pytest.raises(BufferError):
        k.accumulate(bytes(32), x, 1.0, True, "F32")  # read-only accumulator
    with pytest.raises((ValueError, BufferError)):
        k.accumulate(np.zeros(16, dtype=np.float32)[::2], x, 1.0, True, "F32")  # not contiguous
