r"""The Gaussian optimal-transport probability path: the single source of sigma_t and x_t.

Book: Part I, chapter 1 (the path), chapter 2 (the bandwidth).

Convention: t = 0 is noise, t = 1 is data. With x0 ~ N(0, I) and x1 ~ data,

.. math::

    x_t = \sigma_t x_0 + t x_1, \qquad \sigma_t = 1 - (1 - \sigma_{\min}) t,

and sigma_min = 0 (the default) is the pure OT path. Every module of the library asks
this one for sigma_t and x_t, and turns its ``t`` (a Python number, a 0-d tensor or a
per-row (B,) tensor) into a per-row tensor with :func:`time_per_row` and broadcasts it
with :func:`expand_like`.
"""

from __future__ import annotations

import math

import torch

from nwflow._checks import check_same_shape, check_sigma_min, check_time

__all__ = [
    "sigma",
    "bandwidth",
    "time_per_row",
    "expand_like",
    "sample_xt",
    "conditional_velocity",
    "conditional_target",
]


def sigma(t: float | torch.Tensor, sigma_min: float = 0.0) -> float | torch.Tensor:
    r"""Noise scale of the path.

    .. math:: \sigma_t = 1 - (1 - \sigma_{\min})\, t

    Shapes: ``t`` a number or a tensor of any shape; the result has its type and shape.
    Chapter 1.
    """
    check_sigma_min(sigma_min)
    return 1.0 - (1.0 - sigma_min) * t


def bandwidth(t: float | torch.Tensor, sigma_min: float = 0.0) -> float | torch.Tensor:
    r"""Nadaraya-Watson bandwidth of the rescaled query x / t.

    .. math:: h(t) = \sigma_t / t

    h runs from infinity at t = 0 (every support point equally weighted: the data mean)
    down to sigma_min at t = 1 (the nearest neighbour when sigma_min = 0).
    Shapes: ``t`` a number or a tensor of any shape; ``inf`` where t = 0. Chapter 2.
    """
    s = sigma(t, sigma_min)
    if isinstance(t, torch.Tensor):
        return torch.where(t > 0, s / t, torch.full_like(s, math.inf))
    return math.inf if float(t) == 0 else s / float(t)


def time_per_row(
    t: float | torch.Tensor,
    like: torch.Tensor,
    sigma_min: float | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""``t`` as a per-row (B,) tensor for a batch ``like`` of shape (B, *S).

    .. math:: t_b = t \quad (b = 1, \dots, B) \ \text{for one number } t, \qquad 0 \le t_b \le 1

    ``t`` is a number, a 0-d tensor or a (B,) tensor with values in [0, 1]; with
    ``sigma_min == 0`` the singular value t = 1 is refused. The result has ``like``'s
    device and ``dtype`` (default: ``like``'s dtype). Chapter 1.
    """
    return check_time(t, batch=like.shape[0], dtype=dtype or like.dtype, device=like.device, name="t",
                      sigma_min=sigma_min)


def expand_like(tt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""A per-row (B,) tensor reshaped to (B, 1, ..., 1) so it broadcasts against x (B, *S).

    .. math:: (t\, x)_{b, i} = t_b\, x_{b, i} \quad \text{for every entry } i \text{ of row } b

    as in x_t = sigma_t x0 + t x1 with per-row times. Shapes: ``tt`` (B,), ``x`` (B, *S);
    returns a view of ``tt`` with x's number of dimensions. Chapter 1.
    """
    return tt.reshape((-1,) + (1,) * (x.dim() - 1))


def sample_xt(
    x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    r"""A point of the conditional path.

    .. math:: x_t = \sigma_t x_0 + t x_1

    Shapes: ``x0`` and ``x1`` (B, *S); ``t`` a number, 0-d or (B,). Returns (B, *S). Chapter 1.
    """
    check_same_shape(x0, x1, "x0", "x1")
    tt = expand_like(time_per_row(t, x1), x1)
    return sigma(tt, sigma_min) * x0 + tt * x1


def conditional_velocity(
    x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    r"""The conditional (CFM) target, constant in t.

    .. math:: \frac{d x_t}{dt} = x_1 - (1 - \sigma_{\min})\, x_0

    Shapes: ``x0`` and ``x1`` (B, *S). Returns (B, *S). Chapter 1.
    """
    check_same_shape(x0, x1, "x0", "x1")
    # d sigma_t / dt = -(1 - sigma_min)
    return x1 - (1.0 - check_sigma_min(sigma_min)) * x0


def conditional_target(
    x: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor, sigma_min: float = 0.0
) -> torch.Tensor:
    r"""The conditional velocity written in the current point x = x_t.

    .. math:: u(x \mid x_1, t) = \frac{x_1 - (1 - \sigma_{\min})\, x}{\sigma_t}

    Equal to :func:`conditional_velocity` on the path; singular at t = 1 when sigma_min = 0.
    Shapes: ``x`` and ``x1`` (B, *S); ``t`` a number, 0-d or (B,). Returns (B, *S). Chapter 1.
    """
    check_same_shape(x, x1, "x", "x1")
    tt = expand_like(time_per_row(t, x, sigma_min=check_sigma_min(sigma_min)), x)
    return (x1 - (1.0 - sigma_min) * x) / sigma(tt, sigma_min)
