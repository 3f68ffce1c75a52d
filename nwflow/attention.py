r"""The exact flow-matching velocity as one Gaussian-kernel attention head.

Book: Part I, chapter 3 (kernel smoothing = attention).

Expanding the posterior logit of support point j,

    -||x - t x^(j)||^2 / (2 sigma_t^2)
        = <t x / sigma_t^2, x^(j)> - (t^2 / (2 sigma_t^2)) ||x^(j)||^2 - ||x||^2 / (2 sigma_t^2),

the last term does not depend on j, and a softmax over j is unchanged when the same
number is added to every logit: it cancels. What is left is a dot product
<q(x, t), k_j> of

    query  q(x, t) = [ t x / sigma_t^2 ,  -t^2 / (2 sigma_t^2) ]    (D + 1 numbers, depends on x and t)
    key    k_j     = [ x^(j)           ,  ||x^(j)||^2          ]    (D + 1 numbers, fixed: cached)
    value  v_j     = x^(j)

so softmax(q K^T) V with scale 1 is the posterior mean m(x, t) and
u = (m - (1 - sigma_min) x) / sigma_t the velocity: one attention head whose keys and
values are the training set, and whose only t-dependence sits in the query.

This module computes the whole (B, n) attention matrix at once (it is the picture the
book draws) with a plain softmax. For large n, or for the last digits in fp32, use
:class:`nwflow.EmpiricalField`: it streams the same computation over chunks of the
support and recomputes, in float64, the rows whose matrix-product logits (of size
~ 1 / sigma_t^2) carry too much rounding. In fp32 the two agree to about 1e-6 where the
logits are modest (t <= 0.5 on unit-scale data); nearer t = 1 this head's error grows
like eps |logits|. In fp64 they agree to 1e-12.
"""

from __future__ import annotations

import torch
from torch import nn

from nwflow._checks import check_query, check_sigma_min, check_support, check_time
from nwflow._precision import WIDE, compute_dtype, exact_matmul
from nwflow.path import sigma

__all__ = ["GaussianKernelAttention"]


class GaussianKernelAttention(nn.Module):
    r"""One attention head that is exactly the empirical flow-matching field.

    ``GaussianKernelAttention(support, sigma_min=0.0)``

    - ``support``: (n, *S) floating tensor; flattened to (n, D) internally (images stay
      (C, H, W) on the outside). Half precision is computed in float32.
    - ``sigma_min``: the path's final noise, in [0, 1).

    Buffers: ``keys`` (n, D + 1) = [x^(j), ||x^(j)||^2]; the values are the first D
    columns of the keys (a view, so the support is stored once). Both move with
    ``.to(device)`` and are saved in ``state_dict``.

    ``forward(x, t)`` returns the velocity u(x, t) with the shape of ``x`` (B, *S);
    ``t`` is a number, a 0-d tensor or a (B,) tensor in [0, 1] (t = 1 is refused when
    sigma_min = 0). Softmax and products run in full fp32/fp64 precision (no TF32).
    Chapter 3, eq. (attention).
    """

    keys: torch.Tensor

    def __init__(self, support: torch.Tensor, sigma_min: float = 0.0) -> None:
        super().__init__()
        check_support(support, "support")
        self.sigma_min = check_sigma_min(sigma_min)
        self.sample_shape = tuple(support.shape[1:])
        self.input_dtype = support.dtype
        flat = support.reshape(support.shape[0], -1).to(compute_dtype(support.dtype))
        with exact_matmul():
            norms = torch.linalg.vector_norm(flat, dim=1).square()
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("support values are too large: their squared norms overflow")
        self.register_buffer("keys", torch.cat([flat, norms[:, None]], dim=1))

    @property
    def values(self) -> torch.Tensor:
        """The values v_j = x^(j), (n, D): the first D columns of the keys."""
        return self.keys[:, :-1]

    @property
    def n(self) -> int:
        """Number of support points (keys)."""
        return self.keys.shape[0]

    def extra_repr(self) -> str:
        return f"n={self.n}, shape={self.sample_shape}, sigma_min={self.sigma_min}"

    def _inputs(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_query(x, self.sample_shape, self.input_dtype, self.keys.device, "x")
        # Coefficients in the wide dtype, cast once: fp32 and fp64 see the same t.
        tt = check_time(t, batch=x.shape[0], dtype=WIDE, device=self.keys.device, name="t",
                        sigma_min=self.sigma_min)
        return x.reshape(x.shape[0], self.keys.shape[1] - 1).to(self.keys.dtype), tt

    def _query(self, xf: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        s2 = sigma(tt, self.sigma_min).square()
        scale = (tt / s2).to(xf.dtype)[:, None]
        last = (-tt.square() / (2.0 * s2)).to(xf.dtype)[:, None]
        return torch.cat([xf * scale, last], dim=1)

    def query(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The query q(x, t) = [t x / sigma_t^2, -t^2 / (2 sigma_t^2)]; (B, D + 1)."""
        xf, tt = self._inputs(x, t)
        return self._query(xf, tt)

    def attention_logits(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Logits <q(x, t), k_j>, (B, n): the posterior logits up to a per-row constant."""
        xf, tt = self._inputs(x, t)
        with exact_matmul():
            return self._query(xf, tt) @ self.keys.T

    def posterior_weights(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Attention weights softmax_j <q, k_j> = posterior weights w_j(x, t); (B, n), rows sum to 1."""
        return torch.softmax(self.attention_logits(x, t), dim=1).to(self.input_dtype)

    def _mean_and_weights(self, xf: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._query(xf, tt) @ self.keys.T
        # Not nwflow._stream.softmax_mean: that one works in place, which autograd cannot
        # record, and the head also returns the weights themselves.
        # Softmax with the normalisation after the product: exp(l - max) V / sum exp(l - max)
        # rounds once per output instead of once per weight. The shift is a constant of
        # the row (softmax ignores it), so it is detached; the ops stay out of place when
        # autograd records them, so the head can be differentiated in x, t and the keys.
        shift = logits.detach().amax(dim=1, keepdim=True)
        if torch.is_grad_enabled() and logits.requires_grad:
            p = (logits - shift).exp()
        else:
            p = logits.sub_(shift).exp_()
        total = p.sum(dim=1, keepdim=True)
        return (p @ self.values) / total, p / total

    def posterior_mean(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Attention output softmax(q K^T) V = m(x, t) = E[x1 | x_t = x]; shape of x."""
        xf, tt = self._inputs(x, t)
        with exact_matmul():
            m, _ = self._mean_and_weights(xf, tt)
        return m.reshape(x.shape).to(self.input_dtype)

    def forward(
        self, x: torch.Tensor, t: float | torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity u(x, t) = (softmax(q K^T) V - (1 - sigma_min) x) / sigma_t; shape of x.

        With ``return_weights=True`` also the attention weights (B, n).
        """
        xf, tt = self._inputs(x, t)
        with exact_matmul():
            m, w = self._mean_and_weights(xf, tt)
            inv_sigma = (1.0 / sigma(tt, self.sigma_min)).to(xf.dtype)[:, None]
            u = (m - (1.0 - self.sigma_min) * xf) * inv_sigma
        u = u.reshape(x.shape).to(self.input_dtype)
        return (u, w.to(self.input_dtype)) if return_weights else u
