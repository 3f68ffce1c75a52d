r"""A velocity network preconditioned by the exact velocity of a Gaussian fit of the data.

Used by chapter 6 (Empirical Flow Matching) to train small networks on images on a CPU.

For data x1 ~ N(mu, s^2 I) (per-coordinate mean mu and standard deviation s, the "data
scale") and x0 ~ N(0, I), the Gaussian OT path x_t = (1 - t) x0 + t x1 is Gaussian with
per-coordinate variance v(t) = t^2 s^2 + (1 - t)^2, and the exact velocity is the linear
regression of x1 - x0 on x_t:

    u_G(x, t) = mu + a(t) (x - t mu),     a(t) = (t s^2 - (1 - t)) / v(t).

The residual x1 - x0 - u_G(x_t, t) has per-coordinate standard deviation s / sqrt(v(t))
(a short calculation: (1 + s^2) v(t) - (t s^2 - (1 - t))^2 = s^2 v(t)). So the
parametrisation

    v_theta(x, t) = u_G(x, t) + b(t) F_theta((x - t mu) / sqrt(v(t)), t),   b(t) = s / sqrt(v(t)),

hands the network F an input and a target of unit scale at every t, and gets the part of the
field that is linear in x (which a plain MLP learns slowly, its Jacobian growing like
1 / (1 - t) near t = 1) for free. This is the EDM preconditioning of Karras et al. (2022)
written for the flow-matching velocity; a, b and 1 / sqrt(v) are bounded on [0, 1], so it
is safe up to t = 1. With F = 0 the model is the Gaussian field itself.
"""

from __future__ import annotations

import torch
from torch import nn

from nwflow._checks import check_instance, check_positive_real, check_real, check_time

__all__ = ["PreconditionedVelocity"]


class PreconditionedVelocity(nn.Module):
    """v_theta(x, t) = u_G(x, t) + b(t) F((x - t mu) / sqrt(v(t)), t) (module docstring).

    ``PreconditionedVelocity(net, data_mean=0.0, data_std=1.0)``: ``net(x, t)`` maps
    (B, *S) and t (B,) to (B, *S) (e.g. :class:`nwflow.models.VelocityMLP`);
    ``data_mean`` mu and ``data_std`` s > 0 are numbers (one value for every coordinate),
    e.g. the training set's mean and standard deviation. ``forward(x, t)`` takes t as a
    number, a 0-d tensor or a (B,) tensor in [0, 1]. Chapter 6.
    """

    def __init__(self, net: nn.Module, data_mean: float = 0.0, data_std: float = 1.0) -> None:
        super().__init__()
        self.net = check_instance(net, "net", nn.Module, "a torch.nn.Module")
        self.data_mean = check_real(data_mean, "data_mean")
        self.data_std = check_positive_real(data_std, "data_std")

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a(t), b(t), 1 / sqrt(v(t))) for a tensor of times."""
        s2 = self.data_std**2
        v = t.square() * s2 + (1 - t).square()
        return (t * s2 - (1 - t)) / v, self.data_std / v.sqrt(), v.rsqrt()

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        tt = check_time(t, x.shape[0], x.dtype, x.device, values=False)  # as in VelocityMLP.forward
        a, b, c_in = (c.reshape((-1,) + (1,) * (x.dim() - 1)) for c in self.coefficients(tt))
        centred = x - tt.reshape(a.shape) * self.data_mean
        return self.data_mean + a * centred + b * self.net(c_in * centred, tt)
