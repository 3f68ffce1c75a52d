"""Input validation shared by the public functions: one vocabulary, one policy.

Policy (every module follows it, so the same fault gets the same error everywhere):

- A value of the wrong type raises ``TypeError``; a value of the right type that breaks
  the rule raises ``ValueError``.
- ``bool`` is never an int or a real number (``True`` is not a count or a bandwidth).
- A real number is a Python or NumPy real or a one-element real tensor; it must be finite.
  An int is a Python or NumPy integer (an integer tensor is not accepted).
- A tensor's dtype is part of its type: an integer tensor where a floating-point one is
  expected, or an integer ``dtype`` argument where a floating-point one is asked, is a
  ``TypeError``; a wrong shape, device, range or a NaN is a ``ValueError``.
- Every message names the argument and what was expected, then what came:
  ``"<name> must be <expected>, got <what>"``, where ``<what>`` is the type's name for a
  ``TypeError`` and the value (its ``repr``) for a ``ValueError``, e.g.
  ``"n must be a positive int, got 0"`` and ``"sigma must be a real number, got str"``.

A module keeps a check of its own only where the rule is specific to it, and words its
message the same way.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def _type_name(value: object) -> str:
    return type(value).__name__


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def check_int(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An int (not a bool) in [minimum, maximum]; either bound may be left open (None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_type_name(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if minimum == 1 and maximum is None:
            expected = "a positive int"
        elif minimum == 0 and maximum is None:
            expected = "a non-negative int"
        else:
            expected = f"an int {_interval(minimum, maximum, False, False)}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_positive_int(value: object, name: str) -> int:
    """An int >= 1: a count or a size."""
    return check_int(value, name, minimum=1)


def check_nonnegative_int(value: object, name: str) -> int:
    """An int >= 0: a count that may be zero, or a seed."""
    return check_int(value, name, minimum=0)


def check_optional_positive_int(value: object, name: str) -> int | None:
    """None or an int >= 1 (a chunk size: None lets the library choose)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {_type_name(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


def check_real(
    value: object,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (not a bool), optionally in an interval, returned as a float.

    ``low``/``high`` bound it, closed unless ``low_open``/``high_open``.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_type_name(value)}")
    v = float(value)
    bad = not math.isfinite(v)
    bad = bad or (low is not None and (v <= low if low_open else v < low))
    bad = bad or (high is not None and (v >= high if high_open else v > high))
    if bad:
        if low == 0 and high is None:
            expected = "a positive real number" if low_open else "a non-negative real number"
        elif low is None and high is None:
            expected = "a finite real number"
        else:
            expected = f"a real number {_interval(low, high, low_open, high_open)}"
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v


def check_positive_real(value: object, name: str) -> float:
    """A finite real number > 0 (a bandwidth, a temperature, a tolerance)."""
    return check_real(value, name, low=0.0, low_open=True)


def check_nonnegative_real(value: object, name: str) -> float:
    """A finite real number >= 0 (a noise level, a smoothing that may be off)."""
    return check_real(value, name, low=0.0)


def check_probability(value: object, name: str) -> float:
    """A real number in [0, 1] (a fraction, a time on the path)."""
    return check_real(value, name, low=0.0, high=1.0)


def check_choice(value: object, name: str, choices: Sequence[object]) -> object:
    """One of ``choices``; a non-string where the choices are strings is a type error."""
    names = [c for c in choices if c is not None]
    if (names and all(isinstance(c, str) for c in names) and not isinstance(value, str)
            and not (value is None and None in choices)):
        raise TypeError(f"{name} must be a str, got {_type_name(value)}")
    if value not in choices:
        listed = ", ".join(repr(c) for c in names) + (" or None" if None in choices else "")
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_instance(value: object, name: str, cls: type | tuple[type, ...], expected: str | None = None
                   ) -> object:
    """An instance of ``cls``; ``expected`` words it in the message (default: the class name)."""
    if not isinstance(value, cls):
        if expected is None:
            expected = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
            expected = f"a {expected}"
        raise TypeError(f"{name} must be {expected}, got {_type_name(value)}")
    return value


def check_callable(value: object, name: str) -> object:
    """A callable (a velocity field, a batch function)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {_type_name(value)}")
    return value


def check_float_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """A floating-point torch.dtype."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        got = dtype if isinstance(dtype, torch.dtype) else _type_name(dtype)
        raise TypeError(f"{name} must be a floating-point torch.dtype, got {got}")
    return dtype


def check_sigma_min(sigma_min: float) -> float:
    """sigma_min must be a real number in [0, 1)."""
    return check_real(sigma_min, "sigma_min", 0.0, 1.0, high_open=True)


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    """A floating-point tensor with finite values."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_time(
    t: float | torch.Tensor,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str = "t",
    sigma_min: float | None = None,
    values: bool = True,
) -> torch.Tensor:
    """``t`` (a number, a 0-d tensor or a (batch,) tensor in [0, 1]) as a (batch,) tensor.

    With ``sigma_min == 0`` the value t = 1 is refused: the path has no noise left there
    and the velocity is singular. ``values=False`` checks the layout only (see
    :func:`check_per_row`).
    """
    tt = check_per_row(t, batch, dtype, device, name, values=values)
    if values and tt.numel():
        lo, hi = float(tt.detach().min()), float(tt.detach().max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} must be in [0, 1], got values in [{lo}, {hi}]")
        if sigma_min == 0.0 and hi == 1.0:
            raise ValueError(
                f"{name} = 1 with sigma_min = 0 is singular (sigma_1 = 0): "
                "stop short of 1 or use sigma_min > 0"
            )
    return tt


def check_per_row(
    t: float | torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device, name: str,
    values: bool = True,
) -> torch.Tensor:
    """A per-row scalar (a number, a 0-d tensor or a (batch,) tensor, finite) as a (batch,) tensor.

    The layout shared by every per-row argument (a time, a step size); the caller checks the range.
    ``values=False`` skips the finiteness check, which reads the values: a network's forward
    must also run under ``torch.func.vmap``, where a tensor's values cannot be read.
    """
    if isinstance(t, torch.Tensor):
        if torch.is_complex(t) or t.dtype == torch.bool:
            raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
        if t.dim() == 0:
            tt = t.to(device=device, dtype=dtype).expand(batch)
        elif t.shape == (batch,):
            if t.device != device:
                raise ValueError(f"{name} must be on the device of x ({device}), got {t.device}")
            tt = t.to(dtype=dtype)
        else:
            raise ValueError(
                f"{name} must be a number, a 0-d tensor or a ({batch},) tensor (one per row of the "
                f"batch), got shape {tuple(t.shape)}"
            )
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        tt = torch.full((batch,), float(t), dtype=dtype, device=device)
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(t).__name__}")
    # a t that requires grad keeps its graph; the check needs none
    if values and tt.numel() and not bool(torch.isfinite(tt.detach()).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return tt


def check_points(x: object, name: str, dim: int | None = None, min_rows: int = 1, rows: str = "B"
                 ) -> torch.Tensor:
    """A (B, D) batch of points: a floating-point tensor with finite values, B >= min_rows,
    D >= 1 (D == dim when given); ``rows`` names B in the message (``"n"`` for a support)."""
    x = check_float_tensor(x, name)
    expected = f"shape ({rows}, {'D' if dim is None else dim})"
    expected += f" with {rows} >= {min_rows}" if min_rows else ""
    if (x.dim() != 2 or x.shape[0] < min_rows or x.shape[1] < 1
            or (dim is not None and x.shape[1] != dim)):
        raise ValueError(f"{name} must have {expected}, got shape {tuple(x.shape)}")
    return x


def check_same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Two tensors that must live on one device."""
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Two tensors that must match element for element."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_support(support: object, name: str = "support") -> torch.Tensor:
    """A non-empty (n, *S) floating-point tensor with finite values."""
    return check_float_tensor(check_support_layout(support, name), name)


def check_support_layout(support: object, name: str = "support") -> torch.Tensor:
    """A non-empty (n, *S) floating-point tensor; its values are not inspected.

    For callers that check finiteness themselves without an (n, D) mask (``EmpiricalField``).
    """
    if not isinstance(support, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(support).__name__}")
    if not torch.is_floating_point(support):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {support.dtype}")
    if support.dim() < 2:
        raise ValueError(
            f"{name} must have shape (n, *S) with at least 2 dimensions, got {tuple(support.shape)}"
        )
    if support.shape[0] == 0:
        raise ValueError(f"{name} is empty (n = 0): the field needs at least one point")
    return support


def check_query(
    x: object, sample_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str = "x"
) -> torch.Tensor:
    """A (B, *S) query matching the support's trailing shape, dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or tuple(x.shape[1:]) != tuple(sample_shape):
        raise ValueError(
            f"{name} must have shape (B, {', '.join(map(str, sample_shape))}) to match the "
            f"support's trailing shape {tuple(sample_shape)}, got {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"{name} must be on the support's device ({device}), got {x.device}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have the support's dtype ({dtype}), got {x.dtype}")
    return check_float_tensor(x, name)
