"""nwflow._checks: every validator, every fault class, and one fault read the same way everywhere.

The policy (module docstring of nwflow._checks): a wrong type is a TypeError, a right type
with a bad value a ValueError, bool is never a number, and every message reads
"<name> must be <expected>, got <what>".
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from nwflow import _checks as C
from nwflow import metrics, ot, proximal, rectified, solvers
from nwflow.data import toy
from nwflow.empirical import EmpiricalField


def raises(error: type[Exception], message: str, call, *args, **kwargs) -> None:
    """``call`` raises exactly ``error`` with exactly ``message``."""
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    assert type(info.value) is error
    assert str(info.value) == message


# -- ints -------------------------------------------------------------------------------------
def test_check_int_accepts_python_and_numpy_ints_and_returns_an_int():
    assert C.check_int(3, "n") == 3
    out = C.check_int(np.int64(7), "n")
    assert out == 7 and type(out) is int
    assert C.check_int(-5, "seed") == -5          # no bounds: any int
    assert C.check_int(2, "k", 1, 2) == 2 and C.check_int(1, "k", 1, 2) == 1


@pytest.mark.parametrize("bad, got", [(True, "bool"), (2.0, "float"), ("3", "str"), (None, "NoneType"),
                                      (torch.tensor(3), "Tensor")])
def test_check_int_refuses_every_non_int_with_a_type_error(bad, got):
    raises(TypeError, f"n must be an int, got {got}", C.check_int, bad, "n", 1)
    raises(TypeError, f"n must be an int, got {got}", C.check_positive_int, bad, "n")
    raises(TypeError, f"n must be an int, got {got}", C.check_nonnegative_int, bad, "n")


def test_check_int_bounds_are_value_errors_that_say_the_range():
    raises(ValueError, "n must be a positive int, got 0", C.check_positive_int, 0, "n")
    raises(ValueError, "n must be a positive int, got -3", C.check_int, -3, "n", 1)
    raises(ValueError, "seed must be a non-negative int, got -1", C.check_nonnegative_int, -1, "seed")
    raises(ValueError, "dim must be an int >= 2, got 1", C.check_int, 1, "dim", 2)
    raises(ValueError, "k must be an int in [1, 5], got 6", C.check_int, 6, "k", 1, 5)
    raises(ValueError, "k must be an int in [1, 5], got 0", C.check_int, 0, "k", 1, 5)
    raises(ValueError, "size must be an int <= 4, got 5", C.check_int, 5, "size", None, 4)
    assert C.check_positive_int(1, "n") == 1 and C.check_nonnegative_int(0, "seed") == 0


def test_check_optional_positive_int():
    assert C.check_optional_positive_int(None, "chunk_size") is None
    assert C.check_optional_positive_int(np.int32(4), "chunk_size") == 4
    raises(ValueError, "chunk_size must be a positive int or None, got 0",
           C.check_optional_positive_int, 0, "chunk_size")
    raises(TypeError, "chunk_size must be an int or None, got bool",
           C.check_optional_positive_int, True, "chunk_size")
    raises(TypeError, "chunk_size must be an int or None, got float",
           C.check_optional_positive_int, 8.0, "chunk_size")


# -- reals ------------------------------------------------------------------------------------
def test_check_real_accepts_numbers_and_one_element_tensors_and_returns_a_float():
    for value in (2, 2.0, np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor([2.0])):
        out = C.check_real(value, "sigma")
        assert out == 2.0 and type(out) is float


@pytest.mark.parametrize("bad, got", [(True, "bool"), ("0.1", "str"), (None, "NoneType"), (1j, "complex")])
def test_check_real_refuses_every_non_real_with_a_type_error(bad, got):
    for check in (C.check_real, C.check_positive_real, C.check_nonnegative_real, C.check_probability):
        raises(TypeError, f"sigma must be a real number, got {got}", check, bad, "sigma")


def test_check_real_refuses_tensors_that_are_not_one_real_number():
    raises(TypeError, "sigma must be a real number, got a tensor of shape (2,)",
           C.check_real, torch.zeros(2), "sigma")
    raises(TypeError, "sigma must be a real number, got a torch.bool tensor",
           C.check_real, torch.tensor(True), "sigma")


def test_check_real_values_and_intervals():
    raises(ValueError, "h must be a finite real number, got inf", C.check_real, math.inf, "h")
    raises(ValueError, "h must be a finite real number, got nan", C.check_real, math.nan, "h")
    raises(ValueError, "reg must be a positive real number, got 0.0", C.check_positive_real, 0.0, "reg")
    raises(ValueError, "reg must be a positive real number, got inf", C.check_positive_real, math.inf, "reg")
    raises(ValueError, "sigma must be a non-negative real number, got -1",
           C.check_nonnegative_real, -1, "sigma")
    raises(ValueError, "tau must be a real number in [0, 1], got 1.5", C.check_probability, 1.5, "tau")
    raises(ValueError, "tau must be a real number in [0, 1], got nan", C.check_probability, math.nan, "tau")
    raises(ValueError, "ratio must be a real number in (0, 1], got 0.0",
           C.check_real, 0.0, "ratio", 0.0, 1.0, low_open=True)
    raises(ValueError, "a must be a real number in [0, 1), got 1.0",
           C.check_real, 1.0, "a", 0.0, 1.0, high_open=True)
    raises(ValueError, "a must be a real number >= 1, got 0.5", C.check_real, 0.5, "a", low=1.0)
    raises(ValueError, "a must be a real number < 2, got 2", C.check_real, 2, "a", high=2.0, high_open=True)
    assert C.check_nonnegative_real(0, "sigma") == 0.0
    assert C.check_probability(1, "tau") == 1.0 and C.check_probability(0.0, "tau") == 0.0
    assert C.check_real(1.0, "ratio", 0.0, 1.0, low_open=True) == 1.0


def test_check_sigma_min():
    assert C.check_sigma_min(0) == 0.0 and C.check_sigma_min(torch.tensor(0.25)) == 0.25
    raises(ValueError, "sigma_min must be a real number in [0, 1), got 1.0", C.check_sigma_min, 1.0)
    raises(ValueError, "sigma_min must be a real number in [0, 1), got -0.1", C.check_sigma_min, -0.1)
    raises(TypeError, "sigma_min must be a real number, got bool", C.check_sigma_min, False)


# -- choices, types, callables, dtypes ----------------------------------------------------------
def test_check_choice():
    assert C.check_choice("exact", "method", ("exact", "sinkhorn")) == "exact"
    raises(ValueError, "method must be one of 'exact', 'sinkhorn', got 'greedy'",
           C.check_choice, "greedy", "method", ("exact", "sinkhorn"))
    raises(TypeError, "method must be a str, got int", C.check_choice, 3, "method", ("exact", "sinkhorn"))
    assert C.check_choice(None, "family", ("mixture", None)) is None
    raises(ValueError, "family must be one of 'mixture' or None, got 'rings'",
           C.check_choice, "rings", "family", ("mixture", None))
    assert C.check_choice(2, "order", (1, 2)) == 2
    raises(ValueError, "order must be one of 1, 2, got 3", C.check_choice, 3, "order", (1, 2))


def test_check_instance_and_callable():
    g = torch.Generator()
    assert C.check_instance(g, "generator", torch.Generator) is g
    raises(TypeError, "generator must be a Generator, got int",
           C.check_instance, 1, "generator", torch.Generator)
    raises(TypeError, "root must be a path or None, got int",
           C.check_instance, 3, "root", (str, bytes), "a path or None")
    raises(TypeError, "x must be a str or bytes, got int", C.check_instance, 3, "x", (str, bytes))
    assert C.check_callable(len, "velocity_fn") is len
    raises(TypeError, "velocity_fn must be callable, got NoneType", C.check_callable, None, "velocity_fn")


def test_check_float_dtype():
    assert C.check_float_dtype(torch.float16) is torch.float16
    raises(TypeError, "dtype must be a floating-point torch.dtype, got torch.int64",
           C.check_float_dtype, torch.int64)
    raises(TypeError, "dtype must be a floating-point torch.dtype, got str", C.check_float_dtype, "float32")


# -- tensors ----------------------------------------------------------------------------------
def test_check_float_tensor():
    x = torch.zeros(2, 3)
    assert C.check_float_tensor(x, "x") is x
    raises(TypeError, "x must be a torch.Tensor, got ndarray", C.check_float_tensor, np.zeros(3), "x")
    raises(TypeError, "x must be a floating-point tensor, got dtype torch.int64",
           C.check_float_tensor, torch.zeros(3, dtype=torch.int64), "x")
    raises(ValueError, "x contains NaN or inf", C.check_float_tensor, torch.tensor([0.0, math.inf]), "x")


def test_check_points():
    x = torch.zeros(4, 3)
    assert C.check_points(x, "x") is x and C.check_points(x, "x", dim=3) is x
    assert C.check_points(torch.zeros(0, 3), "x", dim=3, min_rows=0).shape == (0, 3)
    raises(ValueError, "x must have shape (B, D) with B >= 1, got shape (3,)",
           C.check_points, torch.zeros(3), "x")
    raises(ValueError, "x must have shape (B, D) with B >= 1, got shape (0, 3)",
           C.check_points, torch.zeros(0, 3), "x")
    raises(ValueError, "x must have shape (B, 2), got shape (4, 3)",
           C.check_points, x, "x", dim=2, min_rows=0)
    raises(ValueError, "support must have shape (n, D) with n >= 2, got shape (1, 3)",
           C.check_points, torch.zeros(1, 3), "support", min_rows=2, rows="n")
    raises(TypeError, "x must be a floating-point tensor, got dtype torch.int32",
           C.check_points, torch.zeros(4, 3, dtype=torch.int32), "x")


def test_check_same_shape_and_device():
    a = torch.zeros(2, 3)
    C.check_same_shape(a, torch.ones(2, 3), "a", "b")
    C.check_same_device(a, torch.ones(5), "a", "b")
    raises(ValueError, "a and b must have the same shape, got (2, 3) and (3, 2)",
           C.check_same_shape, a, torch.zeros(3, 2), "a", "b")
    raises(ValueError, "b must be on the device of a (cpu), got meta",
           C.check_same_device, a, torch.zeros(2, device="meta"), "a", "b")


def test_check_per_row_and_check_time():
    cpu = torch.device("cpu")
    out = C.check_per_row(0.5, 3, torch.float64, cpu, "h")
    assert out.shape == (3,) and out.dtype == torch.float64 and bool((out == 0.5).all())
    assert C.check_per_row(torch.tensor([1.0, 2.0, 30.0]), 3, torch.float64, cpu, "h").tolist() == [1, 2, 30]
    raises(ValueError, "h must be a number, a 0-d tensor or a (3,) tensor (one per row of the batch), "
           "got shape (2,)", C.check_per_row, torch.zeros(2), 3, torch.float64, cpu, "h")
    raises(TypeError, "h must be a number or a tensor, got str",
           C.check_per_row, "1", 3, torch.float64, cpu, "h")
    raises(TypeError, "h must be a real tensor, got dtype torch.bool",
           C.check_per_row, torch.tensor(True), 3, torch.float64, cpu, "h")
    raises(ValueError, "h contains NaN or inf", C.check_per_row, math.nan, 3, torch.float64, cpu, "h")
    # values=False reads the layout only (a network's forward under torch.func.vmap).
    assert bool(C.check_per_row(math.nan, 2, torch.float64, cpu, "h", values=False).isnan().all())
    raises(ValueError, "t must be in [0, 1], got values in [1.5, 1.5]",
           C.check_time, 1.5, 2, torch.float64, cpu)
    assert float(C.check_time(1.5, 2, torch.float64, cpu, values=False)[0]) == 1.5
    with pytest.raises(ValueError, match="^t = 1 with sigma_min = 0 is singular"):
        C.check_time(1.0, 2, torch.float64, cpu, sigma_min=0.0)
    assert float(C.check_time(1.0, 2, torch.float64, cpu, sigma_min=0.1)[0]) == 1.0


# -- one fault, one error, across modules ---------------------------------------------------------
def _fault(call) -> tuple[type[Exception], str]:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return type(info.value), str(info.value)


def _same_fault(calls, pattern: str) -> None:
    """Every call fails with the same exception type and a message matching ``pattern``."""
    faults = [_fault(call) for call in calls]
    assert len({error for error, _ in faults}) == 1, faults
    for _, message in faults:
        assert re.fullmatch(pattern, message), message


def test_n_zero_reads_the_same_in_the_toy_data_and_in_proximal():
    _same_fault([lambda: toy.two_moons(0), lambda: proximal.standard_normal_qmc(0, 2)],
                r"n must be a positive int, got 0")
    _same_fault([lambda: toy.two_moons(2.5), lambda: proximal.standard_normal_qmc(2.5, 2)],
                r"n must be an int, got float")
    assert _fault(lambda: toy.two_moons(0))[0] is ValueError
    assert _fault(lambda: proximal.standard_normal_qmc(True, 2))[0] is TypeError


def test_a_negative_non_negative_real_reads_the_same_in_rectified_and_the_toy_data():
    x0 = torch.zeros(4, 2)
    _same_fault([lambda: rectified.interpolant(x0, x0, 0.5, -1, torch.zeros(4, 2)),
                 lambda: rectified.pair_weights(x0, 0.5, x0, x0, -1)],
                r"sigma must be a non-negative real number, got -1")
    _same_fault([lambda: rectified.interpolant(x0, x0, 0.5, -1, torch.zeros(4, 2)),
                 lambda: toy.two_moons(10, noise=-1)],
                r"(sigma|noise) must be a non-negative real number, got -1")
    _same_fault([lambda: rectified.interpolant(x0, x0, 0.5, "1", torch.zeros(4, 2)),
                 lambda: toy.two_moons(10, noise="1")],
                r"(sigma|noise) must be a real number, got str")


def test_a_non_positive_real_reads_the_same_in_ot_metrics_and_solvers():
    x = torch.randn(6, 2, dtype=torch.float64)
    _same_fault([lambda: ot.ot_plan(x, x, method="sinkhorn", reg=-1),
                 lambda: metrics.mmd2_unbiased(x, x, bandwidth=-1),
                 lambda: solvers.integrate_adaptive(lambda y, t: y, x, 0.0, 0.5, rtol=-1)],
                r"(reg|bandwidth|rtol) must be a positive real number, got -1")
    _same_fault([lambda: ot.ot_plan(x, x, method="sinkhorn", reg=True),
                 lambda: metrics.mmd2_unbiased(x, x, bandwidth=True)],
                r"(reg|bandwidth) must be a real number, got bool")


def test_chunk_size_zero_reads_the_same_in_the_engine_and_metrics():
    X = torch.randn(10, 3)
    _same_fault([lambda: EmpiricalField(X, chunk_size=0),
                 lambda: metrics.nearest_neighbour_distance(X, X, chunk_size=0)],
                r"chunk_size must be a positive int or None, got 0")
    _same_fault([lambda: EmpiricalField(X, chunk_size=2.0),
                 lambda: metrics.nearest_neighbour_distance(X, X, chunk_size=2.0)],
                r"chunk_size must be an int or None, got float")


def test_an_unknown_method_reads_the_same_in_ot_and_solvers():
    x = torch.randn(4, 2, dtype=torch.float64)
    _same_fault([lambda: ot.ot_plan(x, x, method="greedy"),
                 lambda: solvers.integrate(lambda y, t: y, x, method="greedy")],
                r"method must be one of .*, got 'greedy'")


def test_a_bad_steps_reads_the_same_in_solvers_and_efm():
    from nwflow.efm import hybrid_samples

    f = lambda y, t: y  # noqa: E731
    x = torch.zeros(2, 2)
    _same_fault([lambda: solvers.integrate(f, x, steps=0), lambda: hybrid_samples(f, f, x, [0.0], steps=0)],
                r"steps must be a positive int, got 0")
    _same_fault([lambda: solvers.integrate(f, x, steps=2.5),
                 lambda: hybrid_samples(f, f, x, [0.0], steps=2.5)],
                r"steps must be an int, got float")
