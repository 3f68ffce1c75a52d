r"""The closed-form (empirical) flow-matching field of a finite support set.

Book: Part I, chapter 2 (derivation) and chapter 3 (kernel smoothing = attention).

For a support {x^(1..n)} and the Gaussian path x_t = sigma_t x0 + t x1 the posterior
over which support point generated x = x_t is

    w_j(x, t) = softmax_j( -||x - t x^(j)||^2 / (2 sigma_t^2) )                  (posterior)
              = softmax_j( (t <x, x^(j)> - t^2 ||x^(j)||^2 / 2) / sigma_t^2 )      (||x||^2 cancels)

and from it

    m(x, t) = sum_j w_j x^(j)                       posterior mean  E[x1 | x_t = x]
    u(x, t) = (m - (1 - sigma_min) x) / sigma_t     velocity
    s(x, t) = (t m - x) / sigma_t^2                 score  grad_x log p_t(x)
    n_eff   = 1 / sum_j w_j^2                       effective number of neighbours.

How it is computed (the exactness and memory guarantees the tests check):

- Two matrix products per chunk of the support: logits = q @ X_c^T and the mean
  P @ X_c; never a (B, n, D) difference tensor.
- The support is streamed in chunks with an online log-sum-exp (running max, rescaled
  running sums), so the result does not depend on the chunk size and memory is
  O(B D + B chunk). When the whole (B, n) logit block fits the budget there is one chunk.
- Centring. ||x - t x^(j)|| = ||(x - t c) - t (x^(j) - c)|| for any c, so the logits use
  the query y = x - t c and the centred key norms ||x^(j) - c||^2 with c near the support
  mean: the weights are unchanged and the numbers summed are smaller when the data sit
  away from the origin.
- Exact refinement. Logits scale like 1 / sigma_t^2, and their rounding error in the
  expanded (matrix-product) form is about eps |t <y, x^(j)>| / sigma_t^2: near t = 1 that is
  many units, enough to reweigh two nearly equidistant support points. There, though,
  the weight sits on a handful of points. The pass therefore keeps each row's K = 64
  largest logits; when every other logit lies so far below the maximum (beyond twice the
  error bound plus log n + log(1/eps)) that its weight is below eps at any rounding, the
  row is recomputed from the candidates alone in float64 with explicit differences
  ||x - t x^(j)||^2, which carry no cancellation.
- Float64 fallback. Where the weights stay spread over many points, the streamed error
  is about (logit error) x (weighted spread of the support) / |result|. The logit error
  is bounded a priori; where that bound is not small enough, the actual rounding is
  measured on the row's top candidates (against float64), and only an fp32 row whose
  estimate still exceeds 5e-5 is recomputed by a float64 pass over the support (rare:
  low-dimensional data with soft weights; none on CIFAR-10 in the tests).
  Everywhere else the streamed result is already accurate.
- The per-row coefficients t / sigma_t^2, t^2 / (2 sigma_t^2), 1 / sigma_t are formed in
  float64 from ``t`` and only then cast, so an fp32 run sees the same t as an fp64 one.
- TF32 (and any reduced-precision fp32 matmul) is switched off inside the computation.
- Gradients in x. The streamed pass works in place, so autograd does not record it;
  instead posterior_mean, velocity and score carry their exact vector-Jacobian product.
  Differentiating the softmax gives dm/dx = (t / sigma_t^2) Cov_w(X), the posterior
  covariance of the support, so for an upstream gradient g the backward pass is one more
  float64 pass over the support computing Cov_w(X) g = sum_j w_j (x^(j) - m) <x^(j) - m, g>.
  (Gradients in t or in the support are not provided: use
  :class:`nwflow.attention.GaussianKernelAttention`, which autograd records.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nwflow._checks import check_query, check_sigma_min, check_support_layout, check_time
from nwflow._precision import DEFAULT_CHUNK_BYTES, WIDE, WIDE_BYTES, compute_dtype, exact_matmul

__all__ = [
    "EmpiricalField",
    "posterior_weights",
    "posterior_mean",
    "velocity",
    "score",
    "effective_neighbours",
]

# Candidates per row kept for the exact refinement, and the float64 work-space per block.
CANDIDATES = 64
# Work-space of the key-norm pass on the CPU: small enough to stay in cache.
_CACHE_BYTES = 4 * 2**20
# Safety factor on the rounding-error estimate of a logit (a product of two vectors and
# one subtraction: a few units of eps times the magnitudes involved).
_ERROR_FACTOR = 4.0
# Rows whose logit error bound is below this many eps are accurate as streamed.
_REFINE_FROM = 16.0
# A row of an fp32 result whose estimated relative error exceeds this is recomputed in float64.
_FALLBACK_TOL = 5e-5
# Logits whose rounding is measured before a float64 fallback, and the margin put on the
# largest error seen among them (the bound _error_bound caps the result).
_OBSERVED = 8
_OBSERVED_SAFETY = 8.0


@dataclass
class _Pass:
    """What one streamed pass over the support returns, per row of the query batch."""

    mean: torch.Tensor | None         # (B, D) posterior mean, compute dtype
    neff: torch.Tensor | None         # (B,) effective number of neighbours
    spread: torch.Tensor | None       # (B,) sum_j w_j ||x^(j) - c||^2, for the error estimate
    row_max: torch.Tensor             # (B,) largest logit
    cand_logits: torch.Tensor | None  # (B, K) the K largest logits, descending
    cand_index: torch.Tensor | None   # (B, K) their support indices


@dataclass
class _Exact:
    """Rows recomputed in the wide dtype (float64)."""

    rows: torch.Tensor                # (r,) row indices into the batch
    mean: torch.Tensor                # (r, D) posterior mean
    neff: torch.Tensor                # (r,) effective number of neighbours
    index: torch.Tensor | None = None    # (r, k) candidate support indices (refined rows)
    weights: torch.Tensor | None = None  # (r, k) their exact weights; the rest are below eps


def _detached(x: object) -> object:
    # The exact pass runs outside autograd; a non-tensor goes on to the input checks.
    return x.detach() if isinstance(x, torch.Tensor) else x


class _ExactOutput(torch.autograd.Function):
    """An output y = alpha m(x, t) - beta x of the field (mean, velocity or score) with its
    exact gradient in x: x_bar = (t / sigma^2) Cov_w(X) (alpha y_bar) - beta y_bar."""

    @staticmethod
    def forward(ctx, xf, y, m, field, tt, alpha, beta):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.save_for_backward(xf, m, tt, alpha, beta)
        ctx.field = field
        return y

    @staticmethod
    def backward(ctx, y_bar):  # noqa: ANN001, ANN205
        xf, m, tt, alpha, beta = ctx.saved_tensors
        field = ctx.field
        g = y_bar.to(field.wide) * alpha[:, None]
        cov_g = field._covariance_product(xf, tt, m, g)
        s2 = field._sigma(tt).square()
        x_bar = (tt / s2)[:, None] * cov_g - beta[:, None] * y_bar.to(field.wide)
        return x_bar.to(xf.dtype), None, None, None, None, None, None


class EmpiricalField:
    r"""The closed-form field of one support set, with its centre and key norms cached.

    ``EmpiricalField(support, sigma_min=0.0, chunk_size=None)``

    - ``support``: (n, *S) floating tensor (images stay (C, H, W)); flattened internally
      to (n, D). Kept by reference, not copied, when it is contiguous fp32/fp64.
    - ``sigma_min``: the path's final noise, in [0, 1).
    - ``chunk_size``: support points per streamed chunk; ``None`` picks one chunk when
      the (B, n) logits fit in ``chunk_bytes`` and streams otherwise. Results do not
      depend on it.

    Methods take ``x`` of shape (B, *S) and ``t`` (a number, 0-d or (B,) tensor in
    [0, 1]) and mirror the module functions: :meth:`posterior_weights` (B, n),
    :meth:`posterior_mean` (B, *S), :meth:`velocity` (B, *S), :meth:`score` (B, *S),
    :meth:`effective_neighbours` (B,).
    """

    def __init__(
        self,
        support: torch.Tensor,
        sigma_min: float = 0.0,
        chunk_size: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        check_support_layout(support)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.sigma_min = check_sigma_min(sigma_min)
        self.sample_shape = tuple(support.shape[1:])
        self.input_dtype = support.dtype
        self.dtype = compute_dtype(support.dtype)
        self.wide = WIDE
        self.device = support.device
        # The field carries no gradient into the support (see _differentiable): keep the flag only.
        self._support_requires_grad = support.requires_grad
        self.support = support.detach().reshape(support.shape[0], -1).to(self.dtype)
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        self._eps = torch.finfo(self.dtype).eps
        with exact_matmul():
            self.center, self.key_norms = self._centre_and_norms()
        centred_max2 = float(self.key_norms.max())
        # A NaN/inf entry makes every centred norm non-finite (through the mean); this names
        # it without allocating an (n, D) mask up front.
        if not math.isfinite(centred_max2) and not bool(torch.isfinite(self.support).all()):
            raise ValueError("support contains NaN or inf")
        # ||x^(j)|| <= ||x^(j) - c|| + ||c||: the size of the raw keys, for the error bound.
        self._raw_max = math.sqrt(centred_max2) + float(torch.linalg.vector_norm(self.center))
        if not (math.isfinite(self._raw_max) and 4.0 * self._raw_max**2 < torch.finfo(self.dtype).max):
            raise ValueError(f"support values are too large for {self.dtype}: their squared norms overflow")
        self._centred_max2 = centred_max2
        self._center_wide = self.center.to(self.wide)

    def _support_rows(self) -> int:
        """Support rows per block of the wide-dtype work-space."""
        return max(1, WIDE_BYTES // (self.support.shape[1] * 8))

    def _centre_and_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A centre c (D,) and the centred squared norms ||x^(j) - c||^2 (n,).

        Any c leaves the weights unchanged; it only has to sit near the data so the numbers
        summed stay small. c is the mean of at most 1024 support points spread evenly through
        the set (a strided view: no pass over the whole support). The norms take the
        differences explicitly (no cancellation), block by block: a small work-space,
        cache-sized on the CPU.
        """
        X, n, D = self.support, self.support.shape[0], self.support.shape[1]
        center = X[::max(1, -(-n // 1024))].mean(dim=0)
        budget = WIDE_BYTES if self.device.type != "cpu" else _CACHE_BYTES
        rows = max(1, budget // (D * self.support.element_size()))
        norms = torch.empty(n, dtype=self.dtype, device=self.device)
        for s in range(0, n, rows):
            norms[s:s + rows] = torch.linalg.vector_norm(X[s:s + rows] - center, dim=1).square_()
        return center, norms

    @property
    def n(self) -> int:
        """Number of support points."""
        return self.support.shape[0]

    def __repr__(self) -> str:
        return (f"EmpiricalField(n={self.n}, shape={self.sample_shape}, sigma_min={self.sigma_min}, "
                f"dtype={self.dtype}, device={self.device})")

    # -- input handling -------------------------------------------------------------
    def _query(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_query(x, self.sample_shape, self.input_dtype, self.device, "x")
        tt = check_time(t, batch=x.shape[0], dtype=self.wide, device=self.device, name="t",
                        sigma_min=self.sigma_min)
        return x.reshape(x.shape[0], self.support.shape[1]).to(self.dtype), tt

    def _sigma(self, tt: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.sigma_min) * tt

    def _chunk(self, batch: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_column = max(batch, 1) * self.support.element_size()
        return max(1, min(self.n, self.chunk_bytes // per_column))

    # -- the streamed pass in the compute dtype ---------------------------------------
    def _scaled_query(self, xf: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q = t (x - t c) / sigma^2 (B, D) and a = t^2 / (2 sigma^2) (B,)."""
        s2 = self._sigma(tt).square()
        y = xf - tt.to(self.dtype)[:, None] * self.center
        q = y.mul_((tt / s2).to(self.dtype)[:, None])
        a = (tt.square() / (2.0 * s2)).to(self.dtype)
        return q, a

    def _logits(self, q: torch.Tensor, a: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Logits q @ X_c^T - a ||X_c - c||^2 of one chunk, (B, c), computed in place.

        The product is formed as (X_c @ q^T)^T, a transposed view of a (c, B) block: with the
        support as the row-major left operand, CPU BLAS runs it ~1.5x faster than q @ X_c^T
        (measured: 77 ms against 121 ms at c = 20,000, D = 3,072, B = 64), and the mean's
        product p @ X_c is as fast from this layout.
        """
        logits = (self.support[start:stop] @ q.T).T
        return logits.addr_(a, self.key_norms[start:stop], alpha=-1.0)

    def _error_bound(self, q: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Bound on the rounding error of each row's logits in the compute dtype, (B,) wide.

        |<q, x^(j)>| <= ||q|| max_j ||x^(j)||, and a ||x^(j) - c||^2 <= a max_j ||x^(j) - c||^2;
        each is rounded to a few eps of its size.
        """
        q_norm = torch.linalg.vector_norm(q, dim=1).to(self.wide)
        return _ERROR_FACTOR * self._eps * (q_norm * self._raw_max + a.to(self.wide) * self._centred_max2)

    def _stream(self, q: torch.Tensor, a: torch.Tensor, want_mean: bool, want_neff: bool,
                track: bool, want_spread: bool = False) -> _Pass:
        """One pass over the support with an online log-sum-exp.

        With ``track`` it also keeps each row's K largest logits; with ``want_spread`` the
        weighted spread sum_j w_j ||x^(j) - c||^2 (one matrix-vector product per chunk).
        """
        B = q.shape[0]
        chunk = self._chunk(B)
        zeros = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        run_max = torch.full((B,), -torch.inf, dtype=self.dtype, device=self.device)
        run_sum = zeros(B)
        run_sq = zeros(B) if want_neff else None
        run_num = zeros(B, self.support.shape[1]) if want_mean else None
        run_spread = zeros(B) if want_spread and want_mean else None
        cand_val = cand_idx = None
        for start in range(0, self.n, chunk):
            stop = min(start + chunk, self.n)
            p = self._logits(q, a, start, stop)
            if track:
                v, i = torch.topk(p, min(CANDIDATES, stop - start), dim=1)
                i += start
                if cand_val is not None:
                    v, j = torch.topk(torch.cat([cand_val, v], 1), min(CANDIDATES, stop), dim=1)
                    i = torch.cat([cand_idx, i], 1).gather(1, j)
                cand_val, cand_idx = v, i
            new_max = torch.maximum(run_max, p.amax(dim=1))
            # exp(old_max - new_max) rescales what was summed so far; the first chunk
            # has old_max = -inf, which gives 0 times an empty sum.
            scale = torch.exp(run_max - new_max)
            p.sub_(new_max[:, None]).exp_()                # p_j = exp(l_j - max)
            run_sum.mul_(scale).add_(p.sum(dim=1))
            if run_sq is not None:
                run_sq.mul_(scale.square()).add_(p.square().sum(dim=1))
            if run_num is not None:
                run_num.mul_(scale[:, None]).addmm_(p, self.support[start:stop])
            if run_spread is not None:
                run_spread.mul_(scale).add_(p @ self.key_norms[start:stop])
            run_max = new_max
        return _Pass(
            mean=run_num.div_(run_sum[:, None]) if run_num is not None else None,
            neff=run_sum.square().div_(run_sq) if run_sq is not None else None,
            spread=run_spread.div_(run_sum) if run_spread is not None else None,
            row_max=run_max, cand_logits=cand_val, cand_index=cand_idx,
        )

    # -- exact recomputation of the rows that need it ----------------------------------
    def _covered(self, error: torch.Tensor, result: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows whose weight sits on their candidates, and how many candidates each needs.

        A logit outside the candidates is at most the K-th largest; with a true gap of
        2 x error + log(n) + log(1/eps) below the maximum their total weight is below eps.
        """
        margin = 2.0 * error + math.log(self.n) + math.log(1.0 / self._eps) + 2.0
        cut = (result.row_max.to(self.wide) - margin)[:, None]
        inside = (result.cand_logits.to(self.wide) >= cut).sum(dim=1)
        k = result.cand_logits.shape[1]
        covered = inside < k if k < self.n else torch.ones_like(inside, dtype=torch.bool)
        covered &= error > _REFINE_FROM * self._eps
        return covered, inside

    def _from_candidates(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor,
                         index: torch.Tensor) -> _Exact:
        """Exact weights and mean of ``rows`` from their candidates alone, in the wide dtype.

        Explicit differences ||x - t x^(j)||^2: no ||x||^2 - 2<x, X> + ||X||^2 cancellation.
        """
        k, D = index.shape[1], self.support.shape[1]
        block = max(1, WIDE_BYTES // (k * D * 8))
        weights, means = [], []
        for s in range(0, rows.numel(), block):
            r, idx = rows[s:s + block], index[s:s + block]
            Xc = self.support[idx.reshape(-1)].reshape(r.numel(), k, D).to(self.wide)
            t = tt[r]
            d2 = (xf[r].to(self.wide)[:, None, :] - t[:, None, None] * Xc).square_().sum(dim=2)
            w = torch.softmax(-d2 / (2.0 * self._sigma(t).square()[:, None]), dim=1)
            weights.append(w)
            means.append(torch.bmm(w[:, None, :], Xc)[:, 0])
        w = torch.cat(weights)
        return _Exact(rows, torch.cat(means), 1.0 / w.square().sum(dim=1), index, w)

    def _wide_pass(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor,
                   keep_logits: bool = False) -> tuple[_Exact, torch.Tensor | None]:
        """The whole streamed computation for ``rows`` in the wide dtype (float64).

        For rows whose weights are spread over many points and whose compute-dtype
        result might miss the accuracy target; the support is widened block by block.
        """
        x, t = xf[rows].to(self.wide), tt[rows]
        s2 = self._sigma(t).square()
        q = (x - t[:, None] * self._center_wide) * (t / s2)[:, None]
        a = t.square() / (2.0 * s2)
        r, D = rows.numel(), self.support.shape[1]
        run_max = torch.full((r,), -torch.inf, dtype=self.wide, device=self.device)
        run_sum = torch.zeros(r, dtype=self.wide, device=self.device)
        run_sq = torch.zeros_like(run_sum)
        run_num = torch.zeros(r, D, dtype=self.wide, device=self.device)
        kept = []
        step = max(1, min(self._support_rows(), self.chunk_bytes // (8 * max(r, 1))))
        for start in range(0, self.n, step):
            Xw = self.support[start:start + step].to(self.wide)
            p = (q @ Xw.T).addr_(a, torch.linalg.vector_norm(Xw - self._center_wide, dim=1).square(),
                                 alpha=-1.0)
            if keep_logits:
                kept.append(p.clone())
            new_max = torch.maximum(run_max, p.amax(dim=1))
            scale = torch.exp(run_max - new_max)
            p.sub_(new_max[:, None]).exp_()
            run_sum.mul_(scale).add_(p.sum(dim=1))
            run_sq.mul_(scale.square()).add_(p.square().sum(dim=1))
            run_num.mul_(scale[:, None]).addmm_(p, Xw)
            run_max = new_max
        exact = _Exact(rows, run_num / run_sum[:, None], run_sum.square() / run_sq)
        return exact, (torch.cat(kept, dim=1) if keep_logits else None)

    def _covariance_product(self, xf: torch.Tensor, tt: torch.Tensor, m: torch.Tensor,
                            g: torch.Tensor) -> torch.Tensor:
        """Cov_w(X) g = sum_j w_j (x^(j) - m) <x^(j) - m, g> per row, (B, D) in float64.

        One streamed pass in the wide dtype. ``m`` is the forward result; centring on it
        rather than on the float64 mean changes the product only at second order in their
        difference (Cov = E[(X - m')(X - m')^T] - (m - m')(m - m')^T).
        """
        W = self.wide
        x, mw = xf.to(W), m.to(W)
        s2 = self._sigma(tt).square()
        q = (x - tt[:, None] * self._center_wide) * (tt / s2)[:, None]
        a = tt.square() / (2.0 * s2)
        B, D = x.shape
        run_max = torch.full((B,), -torch.inf, dtype=W, device=self.device)
        run_sum = torch.zeros(B, dtype=W, device=self.device)
        run_num = torch.zeros(B, D, dtype=W, device=self.device)
        mg = (mw * g).sum(dim=1)
        step = max(1, min(self._support_rows(), self.chunk_bytes // (8 * max(B, 1))))
        for start in range(0, self.n, step):
            Xw = self.support[start:start + step].to(W)
            p = (q @ Xw.T).addr_(a, torch.linalg.vector_norm(Xw - self._center_wide, dim=1).square(),
                                 alpha=-1.0)
            new_max = torch.maximum(run_max, p.amax(dim=1))
            scale = torch.exp(run_max - new_max)
            p.sub_(new_max[:, None]).exp_()
            run_sum.mul_(scale).add_(p.sum(dim=1))
            # p_j <x^(j) - m, g>, then sum_j of that times (x^(j) - m).
            pg = p.mul_((g @ Xw.T).sub_(mg[:, None]))
            run_num.mul_(scale[:, None]).addmm_(pg, Xw).sub_(pg.sum(dim=1)[:, None] * mw)
            run_max = new_max
        return run_num / run_sum[:, None]

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

    def _with_gradient(self, x: torch.Tensor, xf: torch.Tensor, tt: torch.Tensor, y: torch.Tensor,
                       m: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """y (B, D) connected to x for autograd, with the exact vector-Jacobian product."""
        xg = x.reshape(x.shape[0], -1).to(self.dtype)
        return _ExactOutput.apply(xg, y, m.detach(), self, tt, alpha, beta)

    def _solve(self, xf: torch.Tensor, tt: torch.Tensor, kind: str) -> tuple[_Pass, list[_Exact]]:
        """The streamed pass plus the rows recomputed exactly, for ``kind`` in
        {"mean", "velocity", "score", "neff"} (which decides the accuracy test)."""
        q, a = self._scaled_query(xf, tt)
        error = self._error_bound(q, a)
        # Candidates are tracked once logits can be off by more than a few eps; the
        # fallback test runs on every fp32 result (its cost: one matrix-vector product).
        track = bool((error > _REFINE_FROM * self._eps).any())
        check = self.wide != self.dtype and (kind != "neff" or track)
        result = self._stream(q, a, want_mean=kind != "neff", want_neff=kind == "neff", track=track,
                              want_spread=check and kind != "neff")
        exact = []
        covered = torch.zeros_like(error, dtype=torch.bool)
        if track:
            covered, inside = self._covered(error, result)
            rows = covered.nonzero().squeeze(1)
            if rows.numel():
                k = int(inside[rows].max())
                exact.append(self._from_candidates(xf, tt, rows, result.cand_index[rows, :k]))
        if check:
            rel = self._relative_error(xf, tt, error, result, kind)
            rows = (~covered & (rel > _FALLBACK_TOL)).nonzero().squeeze(1)
            if rows.numel() and track:
                # The bound assumes every logit is off by the worst case; measure the
                # actual rounding on the row's top candidates before paying for float64.
                observed = self._observed_error(xf, tt, rows, result)
                error = error.clone()
                error[rows] = torch.minimum(error[rows], _OBSERVED_SAFETY * observed)
                rel = self._relative_error(xf, tt, error, result, kind)
                rows = (~covered & (rel > _FALLBACK_TOL)).nonzero().squeeze(1)
            if rows.numel():
                exact.append(self._wide_pass(xf, tt, rows)[0])
        return result, exact

    def _observed_error(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor,
                        result: _Pass) -> torch.Tensor:
        """Largest rounding error of the compute-dtype logits of ``rows`` on their top
        candidates, (r,) wide: the streamed logits against the same logits in float64.

        The streamed logits are l_j = (t <y, x^(j)> - t^2 ||x^(j) - c||^2 / 2) / sigma^2 with
        y = x - t c, that is (||y||^2 - ||y - t (x^(j) - c)||^2) / (2 sigma^2) + t <y, c> / sigma^2;
        the differences are taken explicitly in float64.
        """
        k, D = min(_OBSERVED, result.cand_index.shape[1]), self.support.shape[1]
        idx = result.cand_index[rows, :k]
        Xc = self.support[idx.reshape(-1)].reshape(rows.numel(), k, D).to(self.wide) - self._center_wide
        t = tt[rows]
        y = xf[rows].to(self.wide) - t[:, None] * self._center_wide
        z2 = (y[:, None, :] - t[:, None, None] * Xc).square_().sum(dim=2)
        s2 = self._sigma(t).square()[:, None]
        shift = t * (y @ self._center_wide)
        exact = ((y.square().sum(dim=1) + 2.0 * shift)[:, None] - z2) / (2.0 * s2)
        return (result.cand_logits[rows, :k].to(self.wide) - exact).abs().amax(dim=1)

    def _relative_error(self, xf: torch.Tensor, tt: torch.Tensor, error: torch.Tensor, result: _Pass,
                        kind: str) -> torch.Tensor:
        """Estimated relative error (B,) of the streamed result for ``kind``.

        Logit errors delta_j (|delta_j| <= ``error``) move the mean by
        sum_j w_j delta_j (x^(j) - m): at most error x sd, sd the weighted standard deviation
        of the support. (They need not average out: near a point where the velocity
        vanishes, correlated errors over a cluster were seen to.) The mean and the final
        subtraction add a few eps of the magnitudes involved.
        """
        if kind == "neff":
            return 2.0 * error
        W = self.wide
        m, x, t = result.mean.to(W), xf.to(W), tt
        mc = m - self._center_wide
        sd = (result.spread.to(W) - mc.square().sum(dim=1)).clamp_min(0.0).sqrt()
        m_norm, x_norm = m.norm(dim=1), x.norm(dim=1)
        dm = error * sd + _ERROR_FACTOR * self._eps * (m_norm + sd)
        if kind == "mean":
            return dm / m_norm
        if kind == "velocity":
            c = 1.0 - self.sigma_min
            return (dm + self._eps * (m_norm + c * x_norm)) / (m - c * x).norm(dim=1)
        return (t * dm + self._eps * (t * m_norm + x_norm)) / (t[:, None] * m - x).norm(dim=1)

    def _out(self, v: torch.Tensor, batch: int) -> torch.Tensor:
        return v.reshape((batch,) + self.sample_shape).to(self.input_dtype)

    # -- public methods -------------------------------------------------------------
    def posterior_weights(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """w_j(x, t) = softmax_j(-||x - t x^(j)||^2 / (2 sigma_t^2)); (B, n), rows sum to 1."""
        xf, tt = self._query(x, t)
        with exact_matmul():
            q, a = self._scaled_query(xf, tt)
            chunk = self._chunk(xf.shape[0])
            logits = torch.cat([self._logits(q, a, s, min(s + chunk, self.n))
                                for s in range(0, self.n, chunk)], dim=1)
            error = self._error_bound(q, a)
            covered = None
            if bool((error > _REFINE_FROM * self._eps).any()):
                v, i = torch.topk(logits, min(CANDIDATES, self.n), dim=1)
                top = _Pass(mean=None, neff=None, spread=None, row_max=v[:, 0], cand_logits=v, cand_index=i)
                covered, inside = self._covered(error, top)
            w = torch.softmax(logits, dim=1)
            if covered is not None:
                rows = covered.nonzero().squeeze(1)
                if rows.numel():
                    ref = self._from_candidates(xf, tt, rows, i[rows, :int(inside[rows].max())])
                    # Non-candidates keep their weights, below eps of the row in total.
                    w[rows[:, None], ref.index] = ref.weights.to(self.dtype)
                # The total-variation error of a row's weights is up to 2 x error: no averaging.
                rows = (~covered & (2.0 * error > _FALLBACK_TOL)).nonzero().squeeze(1)
                if rows.numel() and self.wide != self.dtype:
                    _, wide_logits = self._wide_pass(xf, tt, rows, keep_logits=True)
                    w[rows] = torch.softmax(wide_logits, dim=1).to(self.dtype)
        return w.to(self.input_dtype)

    def posterior_mean(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """m(x, t) = sum_j w_j x^(j) = E[x1 | x_t = x]; shape of x."""
        grad = self._differentiable(x, t)
        xf, tt = self._query(_detached(x), t)
        with exact_matmul():
            result, exact = self._solve(xf, tt, "mean")
            m = result.mean
            for e in exact:
                m[e.rows] = e.mean.to(self.dtype)
            if grad:
                one = torch.ones_like(tt)
                m = self._with_gradient(x, xf, tt, m, m, one, torch.zeros_like(tt))
        return self._out(m, xf.shape[0])

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """u(x, t) = (m(x, t) - (1 - sigma_min) x) / sigma_t; shape of x."""
        grad = self._differentiable(x, t)
        xf, tt = self._query(_detached(x), t)
        c = 1.0 - self.sigma_min
        with exact_matmul():
            result, exact = self._solve(xf, tt, "velocity")
            m = result.mean.clone() if grad else None
            u = result.mean.sub_(c * xf).mul_((1.0 / self._sigma(tt)).to(self.dtype)[:, None])
            for e in exact:
                # m - (1 - sigma_min) x cancels as t -> 1 (m -> x): take it in the wide dtype.
                xr = xf[e.rows].to(self.wide)
                u[e.rows] = ((e.mean - c * xr) / self._sigma(tt[e.rows])[:, None]).to(self.dtype)
                if m is not None:
                    m[e.rows] = e.mean.to(self.dtype)
            if m is not None:
                inv_sigma = 1.0 / self._sigma(tt)
                u = self._with_gradient(x, xf, tt, u, m, inv_sigma, c * inv_sigma)
        return self._out(u, xf.shape[0])

    def score(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = (t m(x, t) - x) / sigma_t^2; shape of x."""
        grad = self._differentiable(x, t)
        xf, tt = self._query(_detached(x), t)
        with exact_matmul():
            result, exact = self._solve(xf, tt, "score")
            m = result.mean.clone() if grad else None
            inv_s2 = (1.0 / self._sigma(tt).square()).to(self.dtype)[:, None]
            sc = result.mean.mul_(tt.to(self.dtype)[:, None]).sub_(xf).mul_(inv_s2)
            for e in exact:
                xr, tr = xf[e.rows].to(self.wide), tt[e.rows]
                sc[e.rows] = ((tr[:, None] * e.mean - xr) / self._sigma(tr).square()[:, None]
                              ).to(self.dtype)
                if m is not None:
                    m[e.rows] = e.mean.to(self.dtype)
            if m is not None:
                inv_s2 = 1.0 / self._sigma(tt).square()
                sc = self._with_gradient(x, xf, tt, sc, m, tt * inv_s2, inv_s2)
        return self._out(sc, xf.shape[0])

    def effective_neighbours(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """n_eff(x, t) = 1 / sum_j w_j^2, between 1 (one neighbour) and n (uniform); (B,)."""
        xf, tt = self._query(x, t)
        with exact_matmul():
            result, exact = self._solve(xf, tt, "neff")
            neff = result.neff
            for e in exact:
                neff[e.rows] = e.neff.to(self.dtype)
        return neff.to(self.input_dtype)


def _field(support: torch.Tensor, sigma_min: float, chunk_size: int | None) -> EmpiricalField:
    return EmpiricalField(support, sigma_min=sigma_min, chunk_size=chunk_size)


def posterior_weights(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                      sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """Posterior weights w_j(x, t) = softmax_j(-||x - t x^(j)||^2 / (2 sigma_t^2)).

    Shapes: ``x`` (B, *S), ``support`` (n, *S), ``t`` a number, 0-d or (B,). Returns (B, n)
    with rows summing to 1. Chapter 2, eq. (posterior).
    """
    return _field(support, sigma_min, chunk_size).posterior_weights(x, t)


def posterior_mean(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                   sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """Posterior mean m(x, t) = sum_j w_j(x, t) x^(j) = E[x1 | x_t = x].

    At t = 0 it is the support mean; as t -> 1 (sigma_min = 0) the nearest support point.
    Shapes: ``x`` (B, *S), ``support`` (n, *S). Returns (B, *S). Chapter 2.
    """
    return _field(support, sigma_min, chunk_size).posterior_mean(x, t)


def velocity(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
             sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """The exact flow-matching velocity u(x, t) = (m(x, t) - (1 - sigma_min) x) / sigma_t.

    Equivalently a Nadaraya-Watson smoother at x / t with bandwidth h(t) = sigma_t / t
    (chapter 3). Shapes: ``x`` (B, *S), ``support`` (n, *S). Returns (B, *S). Chapter 2.
    """
    return _field(support, sigma_min, chunk_size).velocity(x, t)


def score(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
          sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """Score of the marginal path, grad_x log p_t(x) = (t m(x, t) - x) / sigma_t^2 (Tweedie).

    Shapes: ``x`` (B, *S), ``support`` (n, *S). Returns (B, *S). Chapter 2.
    """
    return _field(support, sigma_min, chunk_size).score(x, t)


def effective_neighbours(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor,
                         sigma_min: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """Effective number of neighbours n_eff = 1 / sum_j w_j^2 (Kish); (B,). Chapter 3."""
    return _field(support, sigma_min, chunk_size).effective_neighbours(x, t)
