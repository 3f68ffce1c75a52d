"""nwflow.path: the Gaussian OT path, checked against formulas re-derived here."""

import math

import pytest
import torch

import nwflow
from nwflow.path import (
    bandwidth,
    conditional_target,
    conditional_velocity,
    expand_like,
    sample_xt,
    sigma,
    time_per_row,
)


@pytest.mark.parametrize("sigma_min", [0.0, 0.01, 0.5])
def test_sigma_and_bandwidth(sigma_min):
    for t in [0.0, 0.25, 0.5, 0.999, 1.0]:
        assert sigma(t, sigma_min) == pytest.approx(1 - t + sigma_min * t, abs=1e-15)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(sigma(t, sigma_min), 1 - t + sigma_min * t)
    h = bandwidth(t, sigma_min)
    assert math.isinf(float(h[0])) and bandwidth(0.0, sigma_min) == math.inf
    torch.testing.assert_close(h[1:], (1 - t[1:] + sigma_min * t[1:]) / t[1:])
    assert float(h[-1]) == pytest.approx(sigma_min)  # h(1) = sigma_min: nearest neighbour at 0
    assert bool((h[1:-1] > h[2:]).all())  # strictly decreasing in t
    assert bandwidth(0.5, sigma_min) == pytest.approx(float(h[5]))


def test_sample_xt_endpoints_and_marginal_moments():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    x1 = torch.full((20000, 3), 2.0, dtype=torch.float64)
    assert torch.equal(sample_xt(x0, x1, 0.0), x0)
    assert torch.equal(sample_xt(x0, x1, 1.0), x1)
    torch.testing.assert_close(sample_xt(x0, x1, 1.0, sigma_min=0.1), 0.1 * x0 + x1)
    xt = sample_xt(x0, x1, 0.6, sigma_min=0.05)
    s = 1 - 0.95 * 0.6
    # mean t x1, standard deviation sigma_t: 5-sigma sampling tolerances
    assert float((xt.mean(0) - 1.2).abs().max()) < 5 * s / math.sqrt(20000)
    assert float((xt.std(0) - s).abs().max()) < 5 * s / math.sqrt(2 * 20000)


def test_per_row_time_and_shapes():
    x0, x1 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([0.0, 0.2, 0.7, 1.0])
    xt = sample_xt(x0, x1, t)
    assert xt.shape == x0.shape
    for i in range(4):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * x1[i])
    assert torch.equal(sample_xt(x0, x1, torch.tensor(0.2)), sample_xt(x0, x1, 0.2))


def test_conditional_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g,
                                                                               dtype=torch.float64)
    for sm in [0.0, 0.1]:
        t = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
        xt = sample_xt(x0, x1, t.expand(5), sigma_min=sm)
        # d x_t / dt by autograd, one output coordinate at a time
        dxdt = torch.stack([torch.autograd.grad(xt[:, k].sum(), t, retain_graph=True)[0] for k in range(4)])
        # sum over rows of d/dt: compare with the summed conditional velocity
        torch.testing.assert_close(dxdt, conditional_velocity(x0, x1, sm).sum(0))
        torch.testing.assert_close(conditional_velocity(x0, x1, sm), x1 - (1 - sm) * x0)


@pytest.mark.parametrize("sigma_min", [0.0, 0.05])
def test_conditional_target_on_the_path(sigma_min):
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g,
                                                                               dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.4, 0.6, 0.9, 0.99], dtype=torch.float64)
    xt = sample_xt(x0, x1, t, sigma_min)
    target = conditional_target(xt, x1, t, sigma_min)
    torch.testing.assert_close(target, conditional_velocity(x0, x1, sigma_min))
    # With one support point the exact field is this conditional target.
    for i in range(6):
        u = nwflow.velocity(xt[i:i + 1], float(t[i]), x1[i:i + 1], sigma_min=sigma_min)
        torch.testing.assert_close(u[0], target[i])


def test_bad_input():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"^sigma_min must be a real number in \[0, 1\), got"):
        sigma(0.5, -0.1)
    with pytest.raises(ValueError, match=r"^sigma_min must be a real number in \[0, 1\), got"):
        bandwidth(0.5, 1.0)
    with pytest.raises(TypeError, match="^sigma_min must be a real number"):
        sample_xt(x, x, 0.5, sigma_min=None)
    with pytest.raises(ValueError, match="^x0 and x1 must have the same shape"):
        sample_xt(x, torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match="^x0 and x1 must have the same shape"):
        conditional_velocity(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="^x and x1 must have the same shape"):
        conditional_target(x, torch.zeros(3, 3), 0.5)
    with pytest.raises(ValueError, match=r"^t must be in \[0, 1\], got values in"):
        sample_xt(x, x, 1.5)
    with pytest.raises(ValueError, match=r"^t must be a number, a 0-d tensor or a \(3,\) tensor .*\(2,\)$"):
        sample_xt(x, x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="^t = 1 with sigma_min = 0"):
        conditional_target(x, x, 1.0)
    with pytest.raises(TypeError, match="^t must be a number or a tensor"):
        sample_xt(x, x, None)


def test_time_per_row_and_expand_like():
    x = torch.zeros(4, 3, 2, dtype=torch.float64)
    for t in (0.25, torch.tensor(0.25), torch.full((4,), 0.25)):
        tt = time_per_row(t, x)
        assert tt.shape == (4,) and tt.dtype == torch.float64 and bool((tt == 0.25).all())
    assert time_per_row(0.5, x, dtype=torch.float32).dtype == torch.float32
    assert expand_like(torch.arange(4.0), x).shape == (4, 1, 1)
    torch.testing.assert_close(expand_like(torch.arange(4.0), x) * torch.ones(4, 3, 2),
                               torch.arange(4.0)[:, None, None].expand(4, 3, 2))
    with pytest.raises(ValueError, match=r"^t must be a number, a 0-d tensor or a \(4,\) tensor .*\(3,\)$"):
        time_per_row(torch.zeros(3), x)
    with pytest.raises(ValueError, match="singular"):
        time_per_row(1.0, x, sigma_min=0.0)
    assert float(time_per_row(1.0, x)[0]) == 1.0  # the path itself is defined at t = 1
