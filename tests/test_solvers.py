"""nwflow.solvers: fixed-step and adaptive ODE integration."""

import math

import pytest
import torch

import nwflow
from nwflow.solvers import integrate, integrate_adaptive


def _linear(x, t):
    """dx/dt = a(t) x with a(t) = 1 + cos(3t): x(t) = x(t0) exp(A(t) - A(t0)), A(t) = t + sin(3t) / 3."""
    return (1.0 + torch.cos(3.0 * t)) * x


def _exact(x0, t0, t1):
    A = lambda t: t + math.sin(3.0 * t) / 3.0  # noqa: E731
    return x0 * math.exp(A(t1) - A(t0))


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_order_of_convergence(method, order):
    x0 = torch.tensor([[1.0, -0.5, 2.0]], dtype=torch.float64)
    errors = []
    for steps in (8, 16, 32, 64):
        x1 = integrate(_linear, x0, 0.0, 1.0, steps=steps, method=method)
        errors.append(float((x1 - _exact(x0, 0.0, 1.0)).abs().max()))
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:], strict=True)]
    # Halving the step divides the error by 2^order (asymptotically).
    assert abs(math.log2(ratios[-1]) - order) < 0.15, (errors, ratios)
    assert all(r > 2 ** order * 0.75 for r in ratios), ratios


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_backward_integration_inverts_forward(method):
    x0 = torch.randn(4, 2, dtype=torch.float64)
    x1 = integrate(_linear, x0, 0.2, 0.9, steps=200, method=method)
    back = integrate(_linear, x1, 0.9, 0.2, steps=200, method=method)
    tol = {"euler": 1e-2, "heun": 1e-5, "rk4": 1e-10}[method]
    torch.testing.assert_close(back, x0, rtol=tol, atol=tol)


def test_trajectory_shapes_and_time_argument():
    seen = []

    def field(x, t):
        seen.append((t.dim(), t.dtype, t.device))
        return -x

    x0 = torch.randn(5, 3, 4, 4)
    x1, traj, times = integrate(field, x0, 0.0, 0.5, steps=10, method="rk4", return_trajectory=True)
    assert traj.shape == (11, 5, 3, 4, 4) and times.shape == (11,)
    assert times.dtype == x0.dtype
    torch.testing.assert_close(times, torch.linspace(0.0, 0.5, 11))
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x1)
    assert len(seen) == 40 and set(seen) == {(0, torch.float32, x0.device)}
    torch.testing.assert_close(x1, x0 * math.exp(-0.5), rtol=1e-5, atol=1e-6)


def test_progress_bar(capsys):
    x = integrate(lambda x, t: x, torch.ones(2, 1, dtype=torch.float64), steps=5, progress=True)
    assert float(x[0, 0]) == pytest.approx(1.2 ** 5)
    assert "euler (5 steps)" in capsys.readouterr().err
    integrate(lambda x, t: x, torch.ones(2, 1, dtype=torch.float64), steps=5)
    assert capsys.readouterr().err == ""


def test_exact_field_lands_on_support_points():
    """From noise, the exact field (sigma_min = 0) carries every sample onto a support point."""
    g = torch.Generator().manual_seed(0)
    support = torch.randn(30, 2, generator=g, dtype=torch.float64)
    x0 = torch.randn(64, 2, generator=g, dtype=torch.float64)
    field = nwflow.EmpiricalField(support)
    for method, kwargs in [("euler", {}), ("heun", {"final_euler": True}), ("rk4", {"final_euler": True})]:
        x1 = integrate(field.velocity, x0, 0.0, 1.0, steps=200, method=method, **kwargs)
        nearest = torch.cdist(x1, support).min(dim=1).values
        assert float(nearest.max()) < 1e-6, method
    # The samples are not all the same point: several support points are reached.
    assert torch.cdist(x1, support).argmin(dim=1).unique().numel() > 5


def test_singular_end_point_is_refused_without_final_euler():
    support = torch.randn(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="t = 1 with sigma_min = 0"):
        integrate(nwflow.EmpiricalField(support).velocity, torch.randn(3, 2, dtype=torch.float64),
                  steps=10, method="heun")


def test_adaptive_matches_solution():
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    x1 = integrate_adaptive(_linear, x0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x1, _exact(x0, 0.0, 1.0), rtol=1e-7, atol=1e-7)
    grid = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    xe, traj, times = integrate_adaptive(_linear, x0, 0.0, 1.0, times=grid, return_trajectory=True,
                                         rtol=1e-9, atol=1e-9)
    assert traj.shape == (6, 1, 2) and torch.equal(times, grid) and torch.equal(traj[-1], xe)
    for k, t in enumerate(grid.tolist()):
        torch.testing.assert_close(traj[k], _exact(x0, 0.0, t), rtol=1e-7, atol=1e-7)
    loose = integrate_adaptive(_linear, x0, 0.0, 1.0, rtol=1e-3, atol=1e-3)
    assert float((loose - _exact(x0, 0.0, 1.0)).abs().max()) > float((x1 - _exact(x0, 0.0, 1.0)).abs().max())


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
@pytest.mark.parametrize(("t0", "t1"), [(0.0, 0.3), (0.0, 0.999), (0.999, 0.0)])
def test_adaptive_never_evaluates_outside_the_interval(method, t0, t1):
    # A stiff field makes the controller take long trial steps; none may pass t1.
    seen = []

    def field(x, t):
        seen.append(float(t))
        return -5.0 * x

    x0 = torch.ones(3, 2, dtype=torch.float64)
    out = integrate_adaptive(field, x0, t0, t1, rtol=1e-3, atol=1e-3, method=method)
    lo, hi = min(t0, t1), max(t0, t1)
    assert lo - 1e-12 <= min(seen) and max(seen) <= hi + 1e-12, (min(seen), max(seen))
    torch.testing.assert_close(out, x0 * math.exp(-5.0 * (t1 - t0)), rtol=1e-2, atol=1e-2)


def test_bad_arguments():
    x0 = torch.zeros(2, 2)
    f = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="^method must be one of"):
        integrate(f, x0, method="midpoint")
    with pytest.raises(ValueError, match="^steps must be a positive int"):
        integrate(f, x0, steps=0)
    with pytest.raises(TypeError, match="^steps must be an int, got float"):
        integrate(f, x0, steps=2.5)
    with pytest.raises(ValueError, match=r"^t0 must be a real number in \[0, 1\], got -0.1"):
        integrate(f, x0, t0=-0.1)
    with pytest.raises(ValueError, match=r"^t1 must be a real number in \[0, 1\], got 1.5"):
        integrate(f, x0, t1=1.5)
    with pytest.raises(ValueError, match="^t0 and t1 must differ"):
        integrate(f, x0, t0=0.5, t1=0.5)
    with pytest.raises(TypeError, match="^x0 must be a floating-point"):
        integrate(f, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="^x0 contains NaN"):
        integrate(f, torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="^velocity_fn must be callable"):
        integrate(None, x0)
    with pytest.raises(ValueError, match="^method must be one of"):
        integrate_adaptive(f, x0, 0.0, 0.5, method="rk5")
    with pytest.raises(ValueError, match="^rtol must be a positive real number, got 0.0"):
        integrate_adaptive(f, x0, 0.0, 0.5, rtol=0.0)
    with pytest.raises(ValueError, match="^times must run from t0"):
        integrate_adaptive(f, x0, 0.0, 0.5, times=torch.tensor([0.0, 0.4]))
    with pytest.raises(ValueError, match="^times must be strictly monotonic"):
        integrate_adaptive(f, x0, 0.0, 0.5, times=torch.tensor([0.0, 0.6, 0.5]))
