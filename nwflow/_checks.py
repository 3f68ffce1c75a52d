"""Input validation shared by the public functions: every error names the argument."""

from __future__ import annotations

import math
import numbers

import torch


def check_sigma_min(sigma_min: float) -> float:
    """sigma_min must be a real number in [0, 1)."""
    if isinstance(sigma_min, torch.Tensor):
        if sigma_min.numel() != 1:
            raise TypeError("sigma_min must be a number, got a tensor with several elements")
        sigma_min = float(sigma_min)
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, numbers.Real):
        raise TypeError(f"sigma_min must be a real number, got {type(sigma_min).__name__}")
    if not math.isfinite(sigma_min) or not 0.0 <= sigma_min < 1.0:
        raise ValueError(f"sigma_min must lie in [0, 1), got {sigma_min}")
    return float(sigma_min)


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
) -> torch.Tensor:
    """``t`` (a number, a 0-d tensor or a (batch,) tensor in [0, 1]) as a (batch,) tensor.

    With ``sigma_min == 0`` the value t = 1 is refused: the path has no noise left there
    and the velocity is singular.
    """
    if isinstance(t, torch.Tensor):
        if torch.is_complex(t) or t.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got dtype {t.dtype}")
        if t.dim() == 0:
            tt = t.to(device=device, dtype=dtype).expand(batch)
        elif t.dim() == 1:
            if t.shape[0] != batch:
                raise ValueError(
                    f"{name} has {t.shape[0]} entries but the batch has {batch} rows; "
                    f"pass a number, a 0-d tensor or a ({batch},) tensor"
                )
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but x is on {device}")
            tt = t.to(dtype=dtype)
        else:
            raise ValueError(
                f"{name} must be a number, a 0-d tensor or a (B,) tensor, got shape {tuple(t.shape)}"
            )
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        tt = torch.full((batch,), float(t), dtype=dtype, device=device)
    else:
        raise TypeError(f"{name} must be a number or a tensor, got {type(t).__name__}")
    if tt.numel():
        values = tt.detach()  # a t that requires grad keeps its graph; the checks need none
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} contains NaN or inf")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{lo}, {hi}]")
        if sigma_min == 0.0 and hi == 1.0:
            raise ValueError(
                f"{name} = 1 with sigma_min = 0 is singular (sigma_1 = 0): "
                "stop short of 1 or use sigma_min > 0"
            )
    return tt


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
        raise ValueError(f"{name} is on {x.device} but the support is on {device}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the support has dtype {dtype}")
    return check_float_tensor(x, name)
