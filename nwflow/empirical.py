r"""The closed-form (empirical) flow-matching field of a finite support set (chapters 2 and 3).

For a support {x^(1..n)} and the Gaussian path x_t = sigma_t x0 + t x1 the posterior over
which support point generated x = x_t, and everything the field returns, are

.. math::

    w_j(x, t) = \operatorname{softmax}_j\Big(-\frac{\|x - t x^{(j)}\|^2}{2\sigma_t^2}\Big),
    \qquad m(x, t) = \sum_j w_j x^{(j)},

    u = \frac{m - (1 - \sigma_{\min}) x}{\sigma_t}, \qquad
    s = \nabla_x \log p_t = \frac{t m - x}{\sigma_t^2}, \qquad n_{\rm eff} = \frac{1}{\sum_j w_j^2}.

Velocity, mean and score are one affine output y = (a m - b x) / c of the posterior mean.
How it is computed (what the tests check):

- Two matrix products per chunk of the support, never a (B, n, D) difference tensor; the
  chunks stream through the one online log-sum-exp (:mod:`nwflow._stream`), so results do not
  depend on the chunk size and memory is O(B D + B chunk).
- Centring: ||x - t x^(j)|| = ||(x - t c) - t (x^(j) - c)|| for any c near the support mean, and
  ||x - t c||^2 is constant in j, so l_j = (t <x - t c, x^(j)> - t^2 ||x^(j) - c||^2 / 2) / sigma_t^2:
  smaller numbers when the data sit away from the origin.
- Accuracy (:mod:`nwflow._accuracy`): rows whose weight provably sits on a few candidates are
  redone from them in float64; fp32 rows whose estimated error exceeds the tolerance get a
  float64 pass. Coefficients in float64, TF32 off (:mod:`nwflow._precision`).
- Gradients in x: dm/dx = (t / sigma_t^2) Cov_w(X), so the outputs carry their exact
  vector-Jacobian product (one float64 pass for Cov_w(X) g); for gradients in t or the support
  use :class:`nwflow.attention.GaussianKernelAttention`, which autograd records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nwflow import _accuracy, path
from nwflow._checks import (
    check_optional_positive_int,
    check_positive_int,
    check_query,
    check_sigma_min,
    check_support_layout,
)
from nwflow._precision import DEFAULT_CHUNK_BYTES, WIDE, WIDE_BYTES, chunk_rows, compute_dtype, exact_matmul
from nwflow._stream import Accumulated, Block, online_softmax

__all__ = ["EmpiricalField", "posterior_weights", "posterior_mean", "velocity", "score",
           "effective_neighbours"]

# (a, b, c) of an output y = (a m - b x) / c, as functions of the per-row t.
Scalar = float | torch.Tensor
Coefficients = Callable[[torch.Tensor], tuple[Scalar, Scalar, Scalar]]

# Work-space of the key-norm pass on the CPU: small enough to stay in cache.
_CACHE_BYTES = 4 * 2**20


@dataclass
class _Exact:
    """Rows recomputed in float64: their mean, n_eff and (refined rows) candidate weights."""

    rows: torch.Tensor                   # (r,) row indices into the batch
    mean: torch.Tensor                   # (r, D)
    neff: torch.Tensor                   # (r,)
    index: torch.Tensor | None = None    # (r, k) candidate support indices
    weights: torch.Tensor | None = None  # (r, k) their exact weights; the rest are below eps


class _ExactOutput(torch.autograd.Function):
    """y = alpha m(x, t) - beta x with its exact gradient in x:
    x_bar = (t / sigma_t^2) Cov_w(X) (alpha y_bar) - beta y_bar."""

    @staticmethod
    def forward(ctx, xf, y, m, field, tt, alpha, beta):
        ctx.save_for_backward(xf, m, tt, alpha, beta)
        ctx.field = field
        return y

    @staticmethod
    def backward(ctx, y_bar):
        xf, m, tt, alpha, beta = ctx.saved_tensors
        g = y_bar.to(WIDE)
        cov_g = ctx.field._covariance_product(xf, tt, m, g * alpha[:, None])
        x_bar = (tt / ctx.field._sigma(tt).square())[:, None] * cov_g - beta[:, None] * g
        return x_bar.to(xf.dtype), None, None, None, None, None, None


class EmpiricalField:
    r"""The closed-form field of one support set, with its centre and key norms cached.

    .. math:: u(x, t) = \frac{m(x, t) - (1 - \sigma_{\min}) x}{\sigma_t},
        \quad m(x, t) = \sum_j w_j(x, t)\, x^{(j)}

    ``EmpiricalField(support, sigma_min=0.0, chunk_size=None, chunk_bytes=DEFAULT_CHUNK_BYTES)``:
    ``support`` (n, *S) floating tensor (images stay (C, H, W), flattened internally; kept by
    reference when contiguous fp32/fp64); ``sigma_min`` in [0, 1); ``chunk_size`` support
    points per streamed chunk (``None``: one chunk when the (B, n) logits fit in
    ``chunk_bytes``). Results do not depend on the chunking. Methods take ``x`` (B, *S) and
    ``t`` (a number, 0-d or (B,) tensor in [0, 1]): :meth:`posterior_weights` (B, n),
    :meth:`posterior_mean`, :meth:`velocity`, :meth:`score` (B, *S),
    :meth:`effective_neighbours` (B,). Reuse one field along a trajectory:
    ``integrate(field.velocity, x0, ...)``. Chapters 2 and 3.
    """

    def __init__(self, support: torch.Tensor, sigma_min: float = 0.0, chunk_size: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        check_support_layout(support)
        chunk_size = check_optional_positive_int(chunk_size, "chunk_size")
        chunk_bytes = check_positive_int(chunk_bytes, "chunk_bytes")
        self.sigma_min = check_sigma_min(sigma_min)
        self.sample_shape = tuple(support.shape[1:])
        self.input_dtype = support.dtype
        self.dtype = compute_dtype(support.dtype)
        self.device = support.device
        # No gradient flows into the support (see _differentiable): keep the flag only.
        self._support_requires_grad = support.requires_grad
        self.support = support.detach().reshape(support.shape[0], -1).to(self.dtype)
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self._eps = torch.finfo(self.dtype).eps
        with exact_matmul():
            self.center, self.key_norms = self._centre_and_norms()
        self._centred_max2 = float(self.key_norms.max())
        # A NaN/inf entry makes every centred norm non-finite (through the mean): this names it
        # without an (n, D) mask up front.
        if not math.isfinite(self._centred_max2) and not bool(torch.isfinite(self.support).all()):
            raise ValueError("support contains NaN or inf")
        # ||x^(j)|| <= ||x^(j) - c|| + ||c||: the size of the raw keys, for the error bound.
        self._raw_max = math.sqrt(self._centred_max2) + float(torch.linalg.vector_norm(self.center))
        if not (math.isfinite(self._raw_max) and 4.0 * self._raw_max**2 < torch.finfo(self.dtype).max):
            raise ValueError(f"support values are too large for {self.dtype}: their squared norms overflow")
        self._center_wide = self.center.to(WIDE)

    def _centre(self) -> torch.Tensor:
        """A centre c (D,): the mean of at most 1024 support points spread evenly through the set
        (a strided view: no pass over the support). Any c leaves the weights unchanged."""
        return self.support[::max(1, -(-len(self.support) // 1024))].mean(dim=0)

    def _centre_and_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """c and ||x^(j) - c||^2 (n,), differences taken explicitly block by block in a small
        (cache-sized on the CPU) work-space."""
        X, center = self.support, self._centre()
        budget = WIDE_BYTES if self.device.type != "cpu" else _CACHE_BYTES
        rows = chunk_rows(budget, X.shape[1] * X.element_size())
        norms = torch.empty(len(X), dtype=self.dtype, device=self.device)
        for s in range(0, len(X), rows):
            norms[s:s + rows] = torch.linalg.vector_norm(X[s:s + rows] - center, dim=1).square_()
        return center, norms

    @property
    def n(self) -> int:
        """Number of support points (the whole support's: a sharded field's spans its ranks)."""
        return len(self.support)

    # -- what a sharded field (nwflow.distributed) does across ranks; nothing in one process --
    def _combine(self, acc: Accumulated) -> Accumulated:
        """The pass over the whole support from this process's pass over its part."""
        return acc

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Support points of the (r, k) indices, (r, k, D) float64."""
        return self.support[index.reshape(-1)].reshape(*index.shape, -1).to(WIDE)

    def __repr__(self) -> str:
        return (f"EmpiricalField(n={self.n}, shape={self.sample_shape}, sigma_min={self.sigma_min}, "
                f"dtype={self.dtype}, device={self.device})")

    # -- the logits ---------------------------------------------------------------------
    def _query(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_query(x, self.sample_shape, self.input_dtype, self.device, "x")
        tt = path.time_per_row(t, x, sigma_min=self.sigma_min, dtype=WIDE)
        return x.reshape(x.shape[0], self.support.shape[1]).to(self.dtype), tt

    def _sigma(self, tt: torch.Tensor) -> torch.Tensor:
        return path.sigma(tt, self.sigma_min)

    def _chunk(self, batch: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        row_bytes = max(batch, 1) * self.support.element_size()
        return min(len(self.support), chunk_rows(self.chunk_bytes, row_bytes))

    def _scaled_query(self, xf: torch.Tensor, tt: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """q = t (x - t c) / sigma_t^2 (B, D) and a = t^2 / (2 sigma_t^2) (B,) in ``dtype``."""
        s2 = self._sigma(tt).square()
        center = self._center_wide if dtype == WIDE else self.center
        y = xf.to(dtype) - tt.to(dtype)[:, None] * center
        return y.mul_((tt / s2).to(dtype)[:, None]), (tt.square() / (2.0 * s2)).to(dtype)

    @staticmethod
    def _logits(q: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """l_j = <q, x^(j)> - a ||x^(j) - c||^2 for a block of keys, (B, c).

        Formed as (X_c @ q^T)^T, a transposed view of a (c, B) block: with the support as the
        row-major left operand CPU BLAS runs ~1.5x faster than q @ X_c^T (77 ms against 121 ms at
        c = 20,000, D = 3,072, B = 64), and the mean's product p @ X_c is as fast from it.
        """
        return (keys @ q.T).T.addr_(a, norms, alpha=-1.0)

    def _blocks(self, q: torch.Tensor, a: torch.Tensor, values: bool, spread: bool) -> Iterator[Block]:
        """The support in chunks, in the compute dtype, with its cached key norms."""
        chunk = self._chunk(q.shape[0])
        for start in range(0, len(self.support), chunk):
            X, norms = self.support[start:start + chunk], self.key_norms[start:start + chunk]
            yield Block(self._logits(q, a, X, norms), X if values else None,
                        scalars=norms if spread else None, start=start)

    def _wide_blocks(self, q: torch.Tensor, a: torch.Tensor, g: torch.Tensor | None = None,
                     mg: torch.Tensor | None = None) -> Iterator[Block]:
        """The support widened to float64 block by block; with ``g`` the factor <x^(j), g> - <m, g>."""
        step = min(chunk_rows(WIDE_BYTES, 8 * self.support.shape[1]),
                   chunk_rows(self.chunk_bytes, 8 * q.shape[0]))
        for start in range(0, len(self.support), step):
            Xw = self.support[start:start + step].to(WIDE)
            norms = torch.linalg.vector_norm(Xw - self._center_wide, dim=1).square_()
            factor = None if g is None else (g @ Xw.T).sub_(mg[:, None])
            yield Block(self._logits(q, a, Xw, norms), Xw, factor=factor, start=start)

    # -- the accuracy policy: which rows are recomputed, and how ----------------------------
    def _from_candidates(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor,
                         index: torch.Tensor) -> _Exact:
        """Exact float64 weights and mean of ``rows`` from their candidates alone, in blocks."""
        k, D = index.shape[1], self.support.shape[1]
        block = chunk_rows(WIDE_BYTES, k * D * 8)
        parts = [_accuracy.refine(xf[r].to(WIDE), tt[r], self._gather(index[s:s + block]), self._sigma(tt[r]))
                 for s in range(0, rows.numel(), block) for r in [rows[s:s + block]]]
        mean, neff, w = (torch.cat(p) for p in zip(*parts, strict=True))
        return _Exact(rows, mean, neff, index, w)

    def _wide_pass(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor) -> _Exact:
        """The whole streamed computation for ``rows`` in float64 (weights spread too widely
        for the compute dtype to meet the tolerance)."""
        q, a = self._scaled_query(xf[rows], tt[rows], WIDE)
        acc = self._combine(online_softmax(self._wide_blocks(q, a), squares=True))
        return _Exact(rows, acc.mean, 1.0 / acc.square)

    def _observed_error(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor,
                        acc: Accumulated) -> torch.Tensor:
        """Largest rounding error of the streamed logits of ``rows`` on their top candidates (r,)."""
        top = acc.top_index[rows, :_accuracy.OBSERVED]
        return _accuracy.observed_error(acc.top_logits[rows, :top.shape[1]], xf[rows].to(WIDE), tt[rows],
                                        self._gather(top), self._center_wide, self._sigma(tt[rows]))

    def _solve(self, xf: torch.Tensor, tt: torch.Tensor, a: torch.Tensor | None = None,
               b: torch.Tensor | None = None) -> tuple[Accumulated, list[_Exact]]:
        """The streamed pass plus the rows recomputed in float64: for y = (a m - b x) / c when
        ``a`` and ``b`` are given, for n_eff otherwise (which decides the accuracy test)."""
        q, a_q = self._scaled_query(xf, tt, self.dtype)
        error = _accuracy.logit_error_bound(q, a_q, self._eps, self._raw_max, self._centred_max2)
        neff = a is None
        # Candidates are tracked once logits can be off by more than a few eps; the fallback test
        # runs on every fp32 result (its cost: one matrix-vector product).
        track = bool(_accuracy.tracks_candidates(error, self._eps).any())
        check = self.dtype != WIDE and (not neff or track)
        acc = self._combine(online_softmax(self._blocks(q, a_q, values=not neff, spread=check and not neff),
                                           squares=neff, top_k=_accuracy.CANDIDATES if track else 0))
        exact, covered = [], torch.zeros_like(error, dtype=torch.bool)
        if track:
            covered, inside = _accuracy.covered(error, acc.top_logits, self.n, self._eps)
            rows = covered.nonzero().squeeze(1)
            if rows.numel():
                index = acc.top_index[rows, :int(inside[rows].max())]
                exact.append(self._from_candidates(xf, tt, rows, index))
        if check:
            def too_large(error: torch.Tensor) -> torch.Tensor:
                rel = 2.0 * error if neff else _accuracy.relative_error(
                    error, self._eps, acc.mean.to(WIDE), xf.to(WIDE), acc.scalar.to(WIDE),
                    self._center_wide, a, b)
                return (~covered & (rel > _accuracy.FALLBACK_TOL)).nonzero().squeeze(1)

            rows = too_large(error)
            if rows.numel() and track:
                # The bound assumes every logit is off by the worst case: measure the actual
                # rounding on the row's top candidates before paying for float64.
                error = error.clone()
                observed = _accuracy.OBSERVED_SAFETY * self._observed_error(xf, tt, rows, acc)
                error[rows] = torch.minimum(error[rows], observed)
                rows = too_large(error)
            if rows.numel():
                exact.append(self._wide_pass(xf, tt, rows))
        return acc, exact

    # -- gradients in x --------------------------------------------------------------------
    def _covariance_product(self, xf: torch.Tensor, tt: torch.Tensor, m: torch.Tensor,
                            g: torch.Tensor) -> torch.Tensor:
        """Cov_w(X) g = sum_j w_j (x^(j) - m) <x^(j) - m, g> per row, (B, D) float64: one
        streamed float64 pass. Centring on the forward result ``m`` rather than the float64
        mean changes it only at second order in their difference."""
        mw = m.to(WIDE)
        q, a = self._scaled_query(xf, tt, WIDE)
        acc = self._combine(online_softmax(self._wide_blocks(q, a, g=g, mg=(mw * g).sum(dim=1))))
        return acc.mean - acc.factor_mean[:, None] * mw

    def _differentiable(self, x: torch.Tensor, t: float | torch.Tensor) -> bool:
        """Whether autograd needs this call's gradient in x (t and the support have none)."""
        if not torch.is_grad_enabled():
            return False
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError("t requires grad: EmpiricalField differentiates in x only; use "
                             "nwflow.attention.GaussianKernelAttention for gradients in t")
        if self._support_requires_grad:
            raise ValueError("support requires grad: EmpiricalField differentiates in x only; use "
                             "nwflow.attention.GaussianKernelAttention for gradients in the support")
        return isinstance(x, torch.Tensor) and x.requires_grad

    # -- outputs ---------------------------------------------------------------------------
    def _affine(self, x: torch.Tensor, t: float | torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
        r"""y = (a m(x, t) - b x) / c per row, for per-row (a, b, c) given as functions of t.

        Rows recomputed in float64 are combined in float64 (m - (1 - sigma_min) x cancels as
        t -> 1). With autograd on, y carries its exact vector-Jacobian product.
        """
        grad = self._differentiable(x, t)
        # The exact pass runs outside autograd; a non-tensor goes on to the input checks.
        xf, tt = self._query(x.detach() if isinstance(x, torch.Tensor) else x, t)
        a, b, c = (torch.as_tensor(v, dtype=WIDE, device=self.device).expand(tt.shape)
                   for v in coefficients(tt))
        with exact_matmul():
            acc, exact = self._solve(xf, tt, a, b)
            m, dt = acc.mean, self.dtype
            y = (m * a.to(dt)[:, None]).sub_(b.to(dt)[:, None] * xf).mul_((1.0 / c).to(dt)[:, None])
            for e in exact:
                r = e.rows
                y[r] = ((a[r, None] * e.mean - b[r, None] * xf[r].to(WIDE)) / c[r, None]).to(dt)
                m[r] = e.mean.to(dt)
            if grad:
                xg = x.reshape(x.shape[0], -1).to(dt)
                y = _ExactOutput.apply(xg, y, m, self, tt, a / c, b / c)
        return y.reshape((xf.shape[0],) + self.sample_shape).to(self.input_dtype)

    def posterior_mean(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""Posterior mean, shape of ``x`` (B, *S); ``t`` a number, 0-d or (B,). Chapter 2.

        .. math:: m(x, t) = \sum_j w_j(x, t)\, x^{(j)} = E[x_1 \mid x_t = x]
        """
        return self._affine(x, t, lambda t: (1.0, 0.0, 1.0))

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""The exact velocity, shape of ``x`` (B, *S); ``t`` a number, 0-d or (B,). Chapter 2.

        .. math:: u(x, t) = \frac{m(x, t) - (1 - \sigma_{\min})\, x}{\sigma_t}
        """
        return self._affine(x, t, lambda t: (1.0, 1.0 - self.sigma_min, self._sigma(t)))

    def score(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""Score (Tweedie), shape of ``x`` (B, *S); ``t`` a number, 0-d or (B,). Chapter 2.

        .. math:: \nabla_x \log p_t(x) = \frac{t\, m(x, t) - x}{\sigma_t^2}
        """
        return self._affine(x, t, lambda t: (t, 1.0, self._sigma(t).square()))

    def effective_neighbours(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""Effective number of neighbours, in [1, n], (B,) for ``x`` (B, *S). Chapter 3.

        .. math:: n_{\rm eff}(x, t) = 1 / \textstyle\sum_j w_j(x, t)^2
        """
        xf, tt = self._query(x, t)
        with exact_matmul():
            acc, exact = self._solve(xf, tt)
            neff = acc.square.reciprocal_()
            for e in exact:
                neff[e.rows] = e.neff.to(self.dtype)
        return neff.to(self.input_dtype)

    def posterior_weights(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        r"""Posterior weights, (B, n), rows summing to 1.

        .. math:: w_j(x, t) = \operatorname{softmax}_j\Big(-\frac{\|x - t x^{(j)}\|^2}{2 \sigma_t^2}\Big)

        The whole (B, n) block is formed. Rows whose weight sits on a few candidates get their
        exact float64 weights there (the rest are below eps in total); fp32 rows whose weights'
        total-variation error could exceed the tolerance are recomputed in float64.
        Shapes: ``x`` (B, *S), ``t`` a number, 0-d or (B,). Chapter 2.
        """
        xf, tt = self._query(x, t)
        with exact_matmul():
            q, a = self._scaled_query(xf, tt, self.dtype)
            logits = torch.cat([blk.logits for blk in self._blocks(q, a, values=False, spread=False)], dim=1)
            error = _accuracy.logit_error_bound(q, a, self._eps, self._raw_max, self._centred_max2)
            w = torch.softmax(logits, dim=1)
            if bool(_accuracy.tracks_candidates(error, self._eps).any()):
                top, index = torch.topk(logits, min(_accuracy.CANDIDATES, self.n), dim=1)
                covered, inside = _accuracy.covered(error, top, self.n, self._eps)
                rows = covered.nonzero().squeeze(1)
                if rows.numel():
                    ref = self._from_candidates(xf, tt, rows, index[rows, :int(inside[rows].max())])
                    w[rows[:, None], ref.index] = ref.weights.to(self.dtype)
                # A row's total-variation error is up to 2 x error: no averaging.
                rows = (~covered & (2.0 * error > _accuracy.FALLBACK_TOL)).nonzero().squeeze(1)
                if rows.numel() and self.dtype != WIDE:
                    qw, aw = self._scaled_query(xf[rows], tt[rows], WIDE)
                    wide = torch.cat([blk.logits for blk in self._wide_blocks(qw, aw)], dim=1)
                    w[rows] = torch.softmax(wide, dim=1).to(self.dtype)
        return w.to(self.input_dtype)


# -- the functional API: one field per call (along a trajectory, reuse one EmpiricalField) --
def _field(support: torch.Tensor, sigma_min: float, chunk_size: int | None) -> EmpiricalField:
    return EmpiricalField(support, sigma_min=sigma_min, chunk_size=chunk_size)


def posterior_weights(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                      sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    r"""Posterior weights, (B, n), rows summing to 1; ``x`` (B, *S), ``support`` (n, *S). Chapter 2.

    .. math:: w_j(x, t) = \operatorname{softmax}_j\Big(-\frac{\|x - t x^{(j)}\|^2}{2 \sigma_t^2}\Big)
    """
    return _field(support, sigma_min, chunk_size).posterior_weights(x, t)


def posterior_mean(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                   sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    r"""Posterior mean, (B, *S) for ``x`` (B, *S), ``support`` (n, *S): the support mean at t = 0,
    the nearest support point as t -> 1. Chapter 2.

    .. math:: m(x, t) = \sum_j w_j(x, t)\, x^{(j)} = E[x_1 \mid x_t = x]
    """
    return _field(support, sigma_min, chunk_size).posterior_mean(x, t)


def velocity(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
             sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    r"""The exact flow-matching velocity, (B, *S) for ``x`` (B, *S), ``support`` (n, *S): a
    Nadaraya-Watson smoother at x / t with bandwidth h(t) = sigma_t / t (chapter 3). Chapter 2.

    .. math:: u(x, t) = \frac{m(x, t) - (1 - \sigma_{\min})\, x}{\sigma_t}
    """
    return _field(support, sigma_min, chunk_size).velocity(x, t)


def score(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
          sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    r"""Score of the marginal path (Tweedie), (B, *S) for ``x`` (B, *S), ``support`` (n, *S). Chapter 2.

    .. math:: \nabla_x \log p_t(x) = \frac{t\, m(x, t) - x}{\sigma_t^2}
    """
    return _field(support, sigma_min, chunk_size).score(x, t)


def effective_neighbours(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                         sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    r"""Effective number of neighbours (Kish), (B,) for ``x`` (B, *S), ``support`` (n, *S). Chapter 3.

    .. math:: n_{\rm eff} = 1 / \textstyle\sum_j w_j^2
    """
    return _field(support, sigma_min, chunk_size).effective_neighbours(x, t)
