"""The Gaussian optimal-transport probability path (book, Part I, chapter 1).

Convention: t = 0 is noise, t = 1 is data. With x0 ~ N(0, I) and x1 ~ data,

    x_t = sigma_t x0 + t x1,        sigma_t = 1 - (1 - sigma_min) t,

and sigma_min = 0 (the default) is the pure OT path. Every function here accepts
``t`` as a Python number, a 0-d tensor or a per-row ``(B,)`` tensor.
"""

from __future__ import annotations

import math

import torch

from nwflow._checks import check_same_shape, check_sigma_min, check_time

__all__ = [
    "sigma",
    "alpha",
    "bandwidth",
    "sample_xt",
    "conditional_velocity",
    "conditional_target",
]


def sigma(t: float | torch.Tensor, sigma_min: float = 0.0) -> float | torch.Tensor:
    """Noise scale of the path, sigma_t = 1 - (1 - sigma_min) t.

    Shapes: ``t`` a number or a tensor of any shape; the result has the same type and shape.
    Derived in chapter 1 (``book/part1_closed_form/01_flow_matching``).
    """
    check_sigma_min(sigma_min)
    return 1.0 - (1.0 - sigma_min) * t


def alpha(t: float | torch.Tensor) -> float | torch.Tensor:
    """Signal scale of the path, alpha_t = t (data enters linearly in t)."""
    return t


def bandwidth(t: float | torch.Tensor, sigma_min: float = 0.0) -> float | torch.Tensor:
    """Nadaraya-Watson bandwidth h(t) = sigma_t / t of the rescaled query x / t.

    h runs from infinity at t = 0 (every support point equally weighted: the data mean)
    down to sigma_min at t = 1 (the nearest neighbour when sigma_min = 0).
    Returns ``inf`` where t = 0. Derived in chapter 2.
    """
    check_sigma_min(sigma_min)
    if isinstance(t, torch.Tensor):
        s = 1.0 - (1.0 - sigma_min) * t
        return torch.where(t > 0, s / t, torch.full_like(s, math.inf))
    t = float(t)
    return math.inf if t == 0 else (1.0 - (1.0 - sigma_min) * t) / t


def _per_sample(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor broadcastable against ``like`` of shape (B, *S)."""
    tt = check_time(t, batch=like.shape[0], dtype=like.dtype, device=like.device, name="t")
    return tt.reshape((-1,) + (1,) * (like.dim() - 1))


def sample_xt(
    x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    """A point of the conditional path, x_t = sigma_t x0 + t x1.

    Shapes: ``x0`` and ``x1`` (B, *S); ``t`` a number, 0-d or (B,). Returns (B, *S).
    """
    check_same_shape(x0, x1, "x0", "x1")
    check_sigma_min(sigma_min)
    tt = _per_sample(t, x1)
    return (1.0 - (1.0 - sigma_min) * tt) * x0 + tt * x1


def conditional_velocity(
    x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    """The conditional (CFM) target d x_t / dt = x1 - (1 - sigma_min) x0, constant in t.

    Shapes: ``x0`` and ``x1`` (B, *S). Returns (B, *S). Chapter 1.
    """
    check_same_shape(x0, x1, "x0", "x1")
    check_sigma_min(sigma_min)
    return x1 - (1.0 - sigma_min) * x0


def conditional_target(
    x: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    """The conditional velocity written in the current point x = x_t:

        u(x | x1, t) = (x1 - (1 - sigma_min) x) / sigma_t.

    Equal to :func:`conditional_velocity` on the path; singular at t = 1 when sigma_min = 0.
    Shapes: ``x`` and ``x1`` (B, *S); ``t`` a number, 0-d or (B,). Chapter 1.
    """
    check_same_shape(x, x1, "x", "x1")
    check_sigma_min(sigma_min)
    tt = check_time(t, batch=x.shape[0], dtype=x.dtype, device=x.device, name="t",
                    sigma_min=sigma_min)
    s = (1.0 - (1.0 - sigma_min) * tt).reshape((-1,) + (1,) * (x.dim() - 1))
    return (x1 - (1.0 - sigma_min) * x) / s
