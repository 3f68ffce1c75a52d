r"""The exact flow-matching velocity as one Gaussian-kernel attention head.

Book: Part I, chapter 3 (kernel smoothing = attention).

Expanding the posterior logit of support point j,

.. math::

    -\frac{\|x - t x^{(j)}\|^2}{2\sigma_t^2}
    = \Big\langle \frac{t x}{\sigma_t^2}, x^{(j)} \Big\rangle
    - \frac{t^2}{2\sigma_t^2} \|x^{(j)}\|^2 - \frac{\|x\|^2}{2\sigma_t^2},

the last term does not depend on j, and a softmax over j is unchanged when the same
number is added to every logit: it cancels. What is left is a dot product
<q(x, t), k_j> of the query (D + 1 numbers, depends on x and t), the key (D + 1 numbers,
fixed: cached) and the value

.. math::

    q(x, t) = \Big[\frac{t x}{\sigma_t^2},\ -\frac{t^2}{2\sigma_t^2}\Big], \qquad
    k_j = \big[x^{(j)},\ \|x^{(j)}\|^2\big], \qquad v_j = x^{(j)},

so softmax(q K^T) V with scale 1 is the posterior mean m(x, t) and
u = (m - (1 - sigma_min) x) / sigma_t the velocity: one attention head whose keys and
values are the training set, and whose only t-dependence sits in the query.

This module computes the whole (B, n) attention matrix at once (it is the picture the
book draws) and its kernel mean with the library's dense softmax-mean
(:func:`nwflow._stream.softmax_mean`, which autograd differentiates in x, t and the keys).
For large n, or for the last digits in fp32, use :class:`nwflow.EmpiricalField`: it
streams the same computation over chunks of the support and recomputes, in float64, the
rows whose matrix-product logits (of size ~ 1 / sigma_t^2) carry too much rounding. In
fp32 the two agree to about 1e-6 where the logits are modest (t <= 0.5 on unit-scale
data); nearer t = 1 this head's error grows like eps |logits|. In fp64 they agree to 1e-12.
"""

from __future__ import annotations

import torch
from torch import nn

from nwflow._checks import check_query, check_sigma_min, check_support
from nwflow._precision import WIDE, compute_dtype, exact_matmul
from nwflow._stream import softmax_mean
from nwflow.path import sigma, time_per_row

__all__ = ["GaussianKernelAttention"]


class GaussianKernelAttention(nn.Module):
    r"""One attention head that is exactly the empirical flow-matching field.

    .. math:: u(x, t) = \frac{\operatorname{softmax}(q(x, t) K^\top)\, V - (1 - \sigma_{\min})\, x}
        {\sigma_t}

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
        tt = time_per_row(t, x, sigma_min=self.sigma_min, dtype=WIDE)
        return x.reshape(x.shape[0], self.keys.shape[1] - 1).to(self.keys.dtype), tt

    def _query(self, xf: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        s2 = sigma(tt, self.sigma_min).square()
        scale = (tt / s2).to(xf.dtype)[:, None]
        last = (-tt.square() / (2.0 * s2)).to(xf.dtype)[:, None]
        return torch.cat([xf * scale, last], dim=1)

    def _logits(self, xf: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return self._query(xf, tt) @ self.keys.T

    def query(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""The query, (B, D + 1) for ``x`` (B, *S); ``t`` a number, 0-d or (B,). Chapter 3.

        .. math:: q(x, t) = \Big[\frac{t x}{\sigma_t^2},\ -\frac{t^2}{2\sigma_t^2}\Big]
        """
        xf, tt = self._inputs(x, t)
        return self._query(xf, tt)

    def attention_logits(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""The logits, (B, n) for ``x`` (B, *S): the posterior logits up to a per-row constant.

        .. math:: \langle q(x, t), k_j \rangle = -\frac{\|x - t x^{(j)}\|^2}{2\sigma_t^2}
            + \frac{\|x\|^2}{2\sigma_t^2}

        Chapter 3.
        """
        xf, tt = self._inputs(x, t)
        with exact_matmul():
            return self._logits(xf, tt)

    def posterior_weights(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""The attention weights = posterior weights, (B, n), rows summing to 1.

        .. math:: w_j(x, t) = \operatorname{softmax}_j \langle q(x, t), k_j \rangle

        Shapes: ``x`` (B, *S), ``t`` a number, 0-d or (B,). Chapter 3.
        """
        return torch.softmax(self.attention_logits(x, t), dim=1).to(self.input_dtype)

    def posterior_mean(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""The attention output = posterior mean, shape of ``x`` (B, *S). Chapter 3.

        .. math:: m(x, t) = \operatorname{softmax}(q K^\top)\, V = \sum_j w_j(x, t)\, x^{(j)}
            = E[x_1 \mid x_t = x]
        """
        xf, tt = self._inputs(x, t)
        with exact_matmul():
            m = softmax_mean(self._logits(xf, tt), self.values)
        return m.reshape(x.shape).to(self.input_dtype)

    def forward(
        self, x: torch.Tensor, t: float | torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        r"""The velocity, shape of ``x`` (B, *S); ``t`` a number, 0-d or (B,). Chapter 3.

        .. math:: u(x, t) = \frac{\operatorname{softmax}(q K^\top)\, V - (1 - \sigma_{\min})\, x}
            {\sigma_t}

        With ``return_weights=True`` also the attention weights (B, n).
        """
        xf, tt = self._inputs(x, t)
        with exact_matmul():
            logits = self._logits(xf, tt)
            m = softmax_mean(logits, self.values)
            inv_sigma = (1.0 / sigma(tt, self.sigma_min)).to(xf.dtype)[:, None]
            u = (m - (1.0 - self.sigma_min) * xf) * inv_sigma
        u = u.reshape(x.shape).to(self.input_dtype)
        if not return_weights:
            return u
        return u, torch.softmax(logits, dim=1).to(self.input_dtype)
