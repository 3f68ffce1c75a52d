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
- The per-row coefficients t / sigma_t^2, t^2 / (2 sigma_t^2), 1 / sigma_t are formed in
  float64 from ``t`` and only then cast, so an fp32 run sees the same t as an fp64 one.
- TF32 (and any reduced-precision fp32 matmul) is switched off inside the computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from nwflow._checks import check_float_tensor, check_sigma_min, check_time

__all__ = [
    "EmpiricalField",
    "posterior_weights",
    "posterior_mean",
    "velocity",
    "score",
    "effective_neighbours",
    "exact_matmul",
    "DEFAULT_CHUNK_BYTES",
]

# Budget for one (B, chunk) logit block. 256 MiB keeps the extra peak memory far below
# 1 GiB at n = 400,000 while leaving CIFAR-sized problems unchunked.
DEFAULT_CHUNK_BYTES = 256 * 2**20


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Full fp32 precision for matrix products inside the block (no TF32, no bf16 passes).

    The logits scale like 1 / sigma_t^2, so a 10-bit-mantissa product near t = 1 would
    scramble the weights. Restores the caller's settings on exit.
    """
    prev_precision = torch.get_float32_matmul_precision()
    prev_cuda = torch.backends.cuda.matmul.allow_tf32
    prev_cudnn = torch.backends.cudnn.allow_tf32
    try:
        if prev_precision != "highest":
            torch.set_float32_matmul_precision("highest")
        if prev_cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        if prev_cudnn:
            torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        if prev_precision != "highest":
            torch.set_float32_matmul_precision(prev_precision)
        if prev_cuda:
            torch.backends.cuda.matmul.allow_tf32 = prev_cuda
        if prev_cudnn:
            torch.backends.cudnn.allow_tf32 = prev_cudnn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in fp32: the logits need the range.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _squared_norms(X: torch.Tensor) -> torch.Tensor:
    # A reduction kernel: no (n, D) temporary, unlike (X * X).sum(1).
    return torch.linalg.vector_norm(X, dim=1).square()


class EmpiricalField:
    r"""The closed-form field of one support set, with its key norms cached.

    ``EmpiricalField(support, sigma_min=0.0, chunk_size=None)``

    - ``support``: (n, *S) floating tensor (images stay (C, H, W)); flattened internally
      to (n, D). Kept by reference, not copied, when it is contiguous.
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
        if not isinstance(support, torch.Tensor):
            raise TypeError(f"support must be a torch.Tensor, got {type(support).__name__}")
        if not torch.is_floating_point(support):
            raise TypeError(f"support must be a floating-point tensor, got dtype {support.dtype}")
        if support.dim() < 2:
            raise ValueError(
                f"support must have shape (n, *S) with at least 2 dimensions, got {tuple(support.shape)}"
            )
        if support.shape[0] == 0:
            raise ValueError("support is empty (n = 0): the field needs at least one point")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.sigma_min = check_sigma_min(sigma_min)
        self.sample_shape = tuple(support.shape[1:])
        self.input_dtype = support.dtype
        self.dtype = _compute_dtype(support.dtype)
        self.device = support.device
        self.support = support.reshape(support.shape[0], -1).to(self.dtype)
        self.chunk_size = chunk_size
        self.chunk_bytes = chunk_bytes
        with exact_matmul():
            self.key_norms = _squared_norms(self.support)  # ||x^(j)||^2, (n,)
        if not bool(torch.isfinite(self.key_norms).all()):
            check_float_tensor(support, "support")  # names NaN/inf precisely
            raise ValueError("support values are too large: their squared norms overflow")

    @property
    def n(self) -> int:
        """Number of support points."""
        return self.support.shape[0]

    def __repr__(self) -> str:
        return (f"EmpiricalField(n={self.n}, shape={self.sample_shape}, sigma_min={self.sigma_min}, "
                f"dtype={self.dtype}, device={self.device})")

    # -- input handling -------------------------------------------------------------
    def _query(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_float_tensor(x, "x")
        if x.dim() < 1 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.sample_shape))}) to match the "
                f"support's trailing shape {self.sample_shape}, got {tuple(x.shape)}"
            )
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the support is on {self.device}")
        if x.dtype != self.input_dtype:
            raise TypeError(f"x has dtype {x.dtype} but the support has dtype {self.input_dtype}")
        # The coefficients are formed in float64 (MPS has none: fp32 there).
        coef_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        tt = check_time(t, batch=x.shape[0], dtype=coef_dtype, device=self.device, name="t",
                        sigma_min=self.sigma_min)
        return x.reshape(x.shape[0], -1).to(self.dtype), tt

    def _sigma(self, tt: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.sigma_min) * tt

    def _chunk(self, batch: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_column = max(batch, 1) * self.support.element_size()
        return max(1, min(self.n, self.chunk_bytes // per_column))

    def _logits(self, q: torch.Tensor, a: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Logits q @ X_c^T - a ||X_c||^2 of one chunk, (B, c), computed in place."""
        logits = q @ self.support[start:stop].T
        return logits.addr_(a, self.key_norms[start:stop], alpha=-1.0)

    def _scaled_query(self, xf: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s2 = self._sigma(tt).square()
        q = xf * (tt / s2).to(self.dtype)[:, None]       # t x / sigma^2
        a = (tt.square() / (2.0 * s2)).to(self.dtype)    # t^2 / (2 sigma^2)
        return q, a

    def _stream(self, xf: torch.Tensor, tt: torch.Tensor, want_mean: bool, want_neff: bool):
        """One pass over the support with an online log-sum-exp.

        Returns (mean (B, D) or None, n_eff (B,) or None).
        """
        q, a = self._scaled_query(xf, tt)
        B = xf.shape[0]
        chunk = self._chunk(B)
        run_max = torch.full((B,), -torch.inf, dtype=self.dtype, device=self.device)
        run_sum = torch.zeros(B, dtype=self.dtype, device=self.device)
        run_sq = torch.zeros(B, dtype=self.dtype, device=self.device) if want_neff else None
        run_num = (torch.zeros(B, self.support.shape[1], dtype=self.dtype, device=self.device)
                   if want_mean else None)
        for start in range(0, self.n, chunk):
            stop = min(start + chunk, self.n)
            p = self._logits(q, a, start, stop)
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
            run_max = new_max
        mean = run_num / run_sum[:, None] if run_num is not None else None
        neff = run_sum.square() / run_sq if run_sq is not None else None
        return mean, neff

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
            w = torch.softmax(logits, dim=1)
        return w.to(self.input_dtype)

    def posterior_mean(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """m(x, t) = sum_j w_j x^(j) = E[x1 | x_t = x]; shape of x."""
        xf, tt = self._query(x, t)
        with exact_matmul():
            m, _ = self._stream(xf, tt, want_mean=True, want_neff=False)
        return self._out(m, xf.shape[0])

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """u(x, t) = (m(x, t) - (1 - sigma_min) x) / sigma_t; shape of x."""
        xf, tt = self._query(x, t)
        with exact_matmul():
            m, _ = self._stream(xf, tt, want_mean=True, want_neff=False)
            c = 1.0 - self.sigma_min
            u = (m - c * xf) * (1.0 / self._sigma(tt)).to(self.dtype)[:, None]
        return self._out(u, xf.shape[0])

    def score(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """grad_x log p_t(x) = (t m(x, t) - x) / sigma_t^2; shape of x."""
        xf, tt = self._query(x, t)
        with exact_matmul():
            m, _ = self._stream(xf, tt, want_mean=True, want_neff=False)
            s2 = self._sigma(tt).square()
            sc = (m * tt.to(self.dtype)[:, None] - xf) * (1.0 / s2).to(self.dtype)[:, None]
        return self._out(sc, xf.shape[0])

    def effective_neighbours(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """n_eff(x, t) = 1 / sum_j w_j^2, between 1 (one neighbour) and n (uniform); (B,)."""
        xf, tt = self._query(x, t)
        with exact_matmul():
            _, neff = self._stream(xf, tt, want_mean=False, want_neff=True)
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
