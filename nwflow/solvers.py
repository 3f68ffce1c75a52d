r"""Integrating the flow ODE dx/dt = u(x, t) from noise (t = 0) to data (t = 1).

Book: Part I, chapter 4 (sampling).

Fixed-step solvers on the grid t_k = t0 + k (t1 - t0) / steps, h = (t1 - t0) / steps:

    euler   x_{k+1} = x_k + h u(x_k, t_k)                                       order 1, 1 call/step
    heun    x' = x_k + h u(x_k, t_k);  x_{k+1} = x_k + h/2 (u(x_k, t_k) + u(x', t_{k+1}))   order 2, 2 calls
    rk4     classical Runge-Kutta (stages at t_k, t_k + h/2, t_k + h/2, t_k + h)  order 4, 4 calls

and :func:`integrate_adaptive`, an adaptive step size (Dormand-Prince by default) through
``torchdiffeq``.

The end point t = 1. The exact field of a finite support with sigma_min = 0 is singular at
t = 1 (sigma_1 = 0: the velocity divides by it), and :func:`nwflow.velocity` refuses t = 1
there. Euler never evaluates the field at t1, so ``t1 = 1`` is fine with it: its last step
from t = 1 - h lands on the posterior mean (the nearest support point once h is small).
Heun and RK4 evaluate at t_{k+1}; either stop short (``t1 = 1 - 1e-3``) or pass
``final_euler=True``, which takes the last step with Euler so the field is never asked for
its value at t1. A regular field (a network, or sigma_min > 0) needs neither.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nwflow._checks import (
    check_callable,
    check_choice,
    check_float_tensor,
    check_instance,
    check_positive_int,
    check_positive_real,
    check_probability,
)
from nwflow._progress import progress_bar

__all__ = ["integrate", "integrate_adaptive", "METHODS", "ADAPTIVE_METHODS"]

# The type of every velocity field in the library: (x (B, *S), t) -> (B, *S). Defined here,
# where the solvers take it; the modules that pass fields around import it.
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Butcher-free step functions: each returns the increment x_{k+1} - x_k.


def _euler(f: VelocityFn, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h * f(x, t)


def _heun(f: VelocityFn, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k1 = f(x, t)
    k2 = f(x + h * k1, t + h)
    return 0.5 * h * (k1 + k2)


def _rk4(f: VelocityFn, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


METHODS: dict[str, Callable[..., torch.Tensor]] = {"euler": _euler, "heun": _heun, "rk4": _rk4}
# torchdiffeq's adaptive-step solvers (its fixed-step ones are covered by ``integrate``).
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _check_times(t0: object, t1: object) -> tuple[float, float]:
    t0, t1 = check_probability(t0, "t0"), check_probability(t1, "t1")  # t = 0 noise, t = 1 data
    if t0 == t1:
        raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
    return t0, t1


def integrate(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    steps: int = 100,
    method: str = "euler",
    return_trajectory: bool = False,
    progress: bool = False,
    final_euler: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Solve dx/dt = velocity_fn(x, t) from x(t0) = x0 to t1 with a fixed step.

    .. math::

        t_k = t_0 + k h, \quad h = \frac{t_1 - t_0}{\text{steps}}, \qquad
        \text{euler:}\ x_{k+1} = x_k + h\, u(x_k, t_k),

        \text{heun:}\ x_{k+1} = x_k + \frac{h}{2}\big(u(x_k, t_k)
        + u(x_k + h\, u(x_k, t_k), t_{k+1})\big),

        \text{rk4:}\ x_{k+1} = x_k + \frac{h}{6}(k_1 + 2 k_2 + 2 k_3 + k_4), \quad
        k_1 = u(x_k, t_k),\ k_2 = u(x_k + \tfrac{h}{2} k_1, t_k + \tfrac{h}{2}),\
        k_3 = u(x_k + \tfrac{h}{2} k_2, t_k + \tfrac{h}{2}),\ k_4 = u(x_k + h k_3, t_{k+1})

    - ``velocity_fn(x, t)``: x of shape (B, *S), t a 0-d tensor of x's dtype and device;
      returns (B, *S). E.g. ``field.velocity`` with ``field = nwflow.EmpiricalField(support)``
      built once (``nwflow.velocity`` would rebuild it at every step), or a network.
    - ``x0``: (B, *S) start points (noise when t0 = 0).
    - ``t0``, ``t1``: numbers in [0, 1], t1 < t0 integrates backwards (data to noise).
    - ``steps``: number of steps (positive int); ``method``: "euler", "heun" or "rk4".
    - ``final_euler``: take the last step with Euler, so the field is never evaluated at
      t1 (for fields singular there, see the module docstring).
    - ``progress``: a tqdm progress bar over the steps.

    Returns x(t1) (B, *S), or with ``return_trajectory=True`` the tuple
    (x(t1), trajectory (steps + 1, B, *S) including x0, times (steps + 1,)).
    The grid is formed in float64 and cast, so fp32 and fp64 runs see the same times.
    Chapter 4.
    """
    check_callable(velocity_fn, "velocity_fn")
    x = check_float_tensor(x0, "x0")
    t0, t1 = _check_times(t0, t1)
    steps = check_positive_int(steps, "steps")
    check_choice(method, "method", sorted(METHODS))
    step = METHODS[method]
    times64 = torch.linspace(t0, t1, int(steps) + 1, dtype=torch.float64)
    times = times64.to(device=x.device, dtype=x.dtype)
    trajectory = [x] if return_trajectory else None

    for k in progress_bar(range(int(steps)), enabled=progress, desc=f"{method} ({steps} steps)", leave=False):
        t = times[k]
        h = (times64[k + 1] - times64[k]).to(device=x.device, dtype=x.dtype)
        last = k == int(steps) - 1
        x = x + (_euler if (final_euler and last) else step)(velocity_fn, x, t, h)
        if trajectory is not None:
            trajectory.append(x)
    if trajectory is None:
        return x
    return x, torch.stack(trajectory), times


def integrate_adaptive(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    return_trajectory: bool = False,
    times: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Solve dx/dt = velocity_fn(x, t) with an adaptive step (``torchdiffeq.odeint``).

    .. math:: x(t_1) = x_0 + \int_{t_0}^{t_1} u(x(s), s)\, ds, \qquad
        \|e_k\| \le \text{atol} + \text{rtol}\, |x_k| \ \text{for every accepted step}

    The step size is chosen so the local error estimate e_k stays below atol + rtol |x|.
    Dormand-Prince ("dopri5", the default) evaluates the field at the end of each
    accepted step, so for the exact field with sigma_min = 0 stop short of 1
    (``t1 = 1 - 1e-3``). Steps end on the recording grid, so the field is only evaluated
    at times between t0 and t1.

    - ``velocity_fn(x, t)``: as in :func:`integrate` (x (B, *S), t a 0-d tensor); ``x0`` (B, *S).
    - ``times``: optional increasing (or decreasing) 1-d grid from t0 to t1 at which to
      record the solution; default [t0, t1].

    Returns x(t1), or with ``return_trajectory=True`` (x(t1), trajectory (len(times), B, *S), times).
    Chapter 4.
    """
    import torchdiffeq

    check_callable(velocity_fn, "velocity_fn")
    check_choice(method, "method", ADAPTIVE_METHODS)
    x = check_float_tensor(x0, "x0")
    t0, t1 = _check_times(t0, t1)
    rtol, atol = check_positive_real(rtol, "rtol"), check_positive_real(atol, "atol")
    if times is None:
        grid = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    else:
        check_instance(times, "times", torch.Tensor, "a torch.Tensor")
        if times.dim() != 1 or times.numel() < 2:
            raise ValueError(f"times must have shape (K,) with K >= 2, got shape {tuple(times.shape)}")
        grid = times.to(device=x.device, dtype=x.dtype)
        d = torch.diff(grid)
        if not (bool((d > 0).all()) or bool((d < 0).all())):
            raise ValueError("times must be strictly monotonic")
        if abs(float(grid[0]) - t0) > 1e-12 or abs(float(grid[-1]) - t1) > 1e-12:
            raise ValueError(f"times must run from t0 = {t0} to t1 = {t1}, got "
                             f"{float(grid[0])} ... {float(grid[-1])}")
    # torchdiffeq's adaptive steps may overshoot the last requested time and interpolate
    # back; "step_t" makes every step stop on the grid, so the field is never evaluated
    # outside [t0, t1] (beyond t1 = 0.999 lies the singular t = 1, or t > 1).
    trajectory = torchdiffeq.odeint(lambda t, y: velocity_fn(y, t), x, grid,
                                    rtol=rtol, atol=atol, method=method, options={"step_t": grid})
    if return_trajectory:
        return trajectory[-1], trajectory, grid
    return trajectory[-1]
