"""Tests for nwflow.models.preconditioned.PreconditionedVelocity.

The Gaussian skip is checked against an independent derivation: for x1 ~ N(mu, s^2) and
x0 ~ N(0, 1) per coordinate, E[x1 - x0 | x_t] is the Gaussian conditional mean computed from
the joint covariance of (x1 - x0, x_t), and the residual standard deviation from the Schur
complement; the network part is checked by a Monte Carlo regression.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nwflow.models import PreconditionedVelocity, VelocityMLP


class Zero(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


class Recorder(nn.Module):
    """Returns ones and records its inputs."""

    def forward(self, x, t):
        self.seen = (x.clone(), t.clone())
        return torch.ones_like(x)


def gaussian_velocity(x, t, mu, s):
    # Joint Gaussian of (v, x_t) with v = x1 - x0 and x_t = t x1 + (1 - t) x0, per coordinate.
    A = np.array([[1.0, -1.0], [t, 1.0 - t]])              # (v, x_t) = A (x1, x0)
    cov = A @ np.diag([s * s, 1.0]) @ A.T
    mean = A @ np.array([mu, 0.0])
    cond_mean = mean[0] + cov[0, 1] / cov[1, 1] * (x - mean[1])
    cond_std = np.sqrt(cov[0, 0] - cov[0, 1] ** 2 / cov[1, 1])
    return cond_mean, cond_std


@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (-0.2, 0.5), (1.5, 2.0)])
def test_zero_network_is_the_gaussian_field(mu, s):
    model = PreconditionedVelocity(Zero(), data_mean=mu, data_std=s)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)
    for t in (0.0, 0.3, 0.77, 1.0):
        out = model(x, t).numpy()[:, 0]
        want, _ = gaussian_velocity(x.numpy()[:, 0], t, mu, s)
        np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.4, 0.9, 1.0])
def test_network_part_has_the_residual_scale_and_unit_input(t):
    mu, s = 0.3, 0.6
    rec = Recorder()
    model = PreconditionedVelocity(rec, data_mean=mu, data_std=s)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    out = model(x, t)
    cond_mean, cond_std = gaussian_velocity(x.numpy(), t, mu, s)
    # The network's output (ones) enters scaled by the residual standard deviation.
    np.testing.assert_allclose(out.numpy(), cond_mean + cond_std, rtol=1e-12, atol=1e-12)
    # Its input is x - t mu over the standard deviation of x_t.
    sd_xt = np.sqrt(t * t * s * s + (1 - t) ** 2)
    np.testing.assert_allclose(rec.seen[0].numpy(), (x.numpy() - t * mu) / sd_xt, rtol=1e-12)
    assert torch.equal(rec.seen[1], torch.full((1,), float(t), dtype=torch.float64))


def test_gaussian_field_is_the_least_squares_fit_on_gaussian_data():
    # Monte Carlo: regressing x1 - x0 on x_t gives slope a(t) and residual std b(t).
    g = torch.Generator().manual_seed(0)
    mu, s, t, m = 0.4, 0.7, 0.6, 400_000
    x1 = mu + s * torch.randn(m, generator=g, dtype=torch.float64)
    x0 = torch.randn(m, generator=g, dtype=torch.float64)
    xt, v = t * x1 + (1 - t) * x0, x1 - x0
    model = PreconditionedVelocity(Zero(), data_mean=mu, data_std=s)
    resid = v - model(xt[:, None], t)[:, 0]
    a, b, _ = model.coefficients(torch.tensor(t, dtype=torch.float64))
    assert abs(float(resid.mean())) < 5 * float(b) / m**0.5
    assert abs(float((resid * (xt - xt.mean())).mean())) < 5 * float(b) * float(xt.std()) / m**0.5
    assert abs(float(resid.std()) - float(b)) < 0.01 * float(b)


def test_shapes_time_forms_and_training_step():
    torch.manual_seed(1)
    model = PreconditionedVelocity(VelocityMLP(12, hidden=16, depth=2), data_mean=0.1, data_std=0.5)
    x = torch.randn(4, 3, 2, 2)
    a = model(x, 0.25)
    torch.testing.assert_close(a, model(x, torch.full((4,), 0.25)), rtol=0, atol=0)
    assert a.shape == x.shape and torch.isfinite(model(x, 1.0)).all()
    loss = model(x, torch.rand(4)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs():
    with pytest.raises(TypeError, match="net"):
        PreconditionedVelocity(lambda x, t: x)
    with pytest.raises(ValueError, match="data_std"):
        PreconditionedVelocity(Zero(), data_std=0.0)
    with pytest.raises(ValueError, match="data_mean"):
        PreconditionedVelocity(Zero(), data_mean=float("nan"))
    with pytest.raises(ValueError, match="t must be"):
        PreconditionedVelocity(Zero())(torch.zeros(3, 2), torch.zeros(2))
