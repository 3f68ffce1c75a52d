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
- Centring: ||x - t x^(j)|| = ||(x - t c) - t (x^(j) - c)|| for any c, and ||x - t c||^2 is
  constant in j, so l_j = (t <x - t c, x^(j)> - t^2 ||x^(j) - c||^2 / 2) / sigma_t^2: with c near
  the support mean, smaller numbers when the data sit away from the origin; c = 0 for data whose
  mean is already near it (no differences to take).
- Accuracy (:mod:`nwflow._accuracy`): rows whose weight provably sits on a few candidates are
  redone from them in float64; an fp32 row whose estimated error exceeds the tolerance gets its
  64 largest terms weighed exactly and is tested again on its tail alone, and if it still fails
  is redone in float64 from the keys it keeps (at most ``REFINE_MAX``), else by a float64 pass.
  Coefficients in float64, TF32 off (:mod:`nwflow._precision`).
- Work skipped, exactly (Part III, chapter 9, section 4): when the logits fit in one block each
  row keeps only the keys the covering margin or its a-posteriori tail cut needs
  (:func:`nwflow._accuracy.kept_keys`: the rest weigh less than eps e^-2, or for a mean output
  move it by at most eps of its size), so collapsed rows
  skip the second product and the others share one product over the keys any of them keeps
  when those are few; a batch at t = 0 takes
  no pass; along a trajectory the carried screen answers collapsed rows from the previous call
  (once a row's floor covers the margin, without reading the support at all),
  and where half-precision products are fast a screen in bf16/fp16 with a rigorous rounding
  bound answers them before any float32 product (the class docstring).
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
from nwflow._precision import (
    DEFAULT_CHUNK_BYTES,
    ERROR_FACTOR,
    REDUCED,
    WIDE,
    WIDE_BYTES,
    chunk_rows,
    compute_dtype,
    exact_matmul,
    reduced_dtype,
)
from nwflow._reduced import ReducedKeys
from nwflow._stream import Accumulated, Block, kept_softmax, largest, online_softmax, take_rows

__all__ = ["EmpiricalField", "posterior_weights", "posterior_mean", "velocity", "score",
           "effective_neighbours"]

# (a, b, c) of an output y = (a m - b x) / c, as functions of the per-row t.
Scalar = float | torch.Tensor
Coefficients = Callable[[torch.Tensor], tuple[Scalar, Scalar, Scalar]]

# Work-space of the key-norm pass on the CPU: small enough to stay in cache. At n = 50,000,
# D = 3,072 (one thread) the pass takes 140 ms with 1 MiB blocks, 150 ms with 2 and 207 ms with 4.
_CACHE_BYTES = 2**20
# Data whose mean lies within this share of their rms radius are not centred (EmpiricalField._centre):
# the error bound grows by at most (1 + share)^2 = 1.13, too little to send rows to a slower path.
# Zero-mean data (standardised features, Gaussian noise: ~0.03) fall under it; CIFAR-10 in [-1, 1]
# (0.17, where the bound would grow by 1.37) stays centred.
_ORIGIN_SHARE = 1.0 / 16.0
# The second product runs over the kept keys alone when they are at most this share of the
# support (gathering them costs about three reads of their rows).
_SPARSE_FRACTION = 0.25
# A row sums over its own kept keys (one sparse product for all such rows) when they are at
# most this share of the support: at 64 rows, n = 20,000, D = 3,072 the sparse product costs a
# quarter of the dense one at 3% and more than it at 10% (each kept pair reads its key's row).
_PAIR_FRACTION = 1.0 / 32.0
# The tail cut runs on rows whose margin keeps at most this many times what would make them
# covered (it was seen to keep up to three times fewer keys than the margin).
_TAIL_CUT_REACH = 8
# The carried screen is on by default for supports of at least this many numbers (n D): below
# it a full pass costs little more than the screen's bookkeeping.
SCREEN_FROM = 2**22
# The logits' product on the CPU (EmpiricalField._logits): rows of a query block are padded to a
# multiple of _ROW_MULTIPLE and to at least _ROW_FLOOR, and the keys are taken _PRODUCT_KEYS at a
# time, each block's product written into one (n, B) output.
_ROW_MULTIPLE = 8
_ROW_FLOOR = 16
_PRODUCT_KEYS = 1024
# Along a trajectory the reduced-precision screen is not tried on a row whose previous call, at
# most _REDUCED_SKIP_REACH back along the path, kept more than _REDUCED_SKIP_FACTOR times the
# SCREEN_MAX keys the screen may keep, at the narrower float32 bound. On CIFAR-10 (n = 50,000,
# B = 64) such rows kept thousands of keys from t = 0 to about 0.25 and the screen answered none
# of them, while its product and selection cost 50-270 ms a step at B = 64-256. A speed rule
# only: a row not tried takes the full pass.
_REDUCED_SKIP_REACH = 0.1
_REDUCED_SKIP_FACTOR = 8
# Without a previous call the reduced-precision screen is first tried on this many rows (those
# nearest t = 1); where it answers none of them the rows at or below their t skip it. At t = 0.1
# (n = 20,000 / 50,000, D = 3,072, B = 64, an AVX-512 EPYC, two threads) the screen answered no
# row and cost 30-90 ms of a 180-500 ms call; its product for 8 rows reads the half-precision
# keys once, 8 / 21 ms (EmpiricalField._solve).
_PROBE_ROWS = 8
# In a call whose full pass runs anyway, the Gram-column screen is tried only when it could take
# at least this many rows off it: its read of the support (60-90 ms at n = 50,000, D = 3,072 on
# two threads) costs about as much as 32 columns of the logits' product (3 ms each at B = 64,
# 2 at B = 256), and a row it answers saves about its column (EmpiricalField._gram_worth_it).
_GRAM_WORTH = 32
# Cached Gram columns <x^(i), x^(j)> of the carried screen: at most this many bytes.
_GRAM_BYTES = 256 * 2**20


@dataclass
class _Exact:
    """Rows recomputed in float64: their mean, n_eff and (refined rows) candidate weights."""

    rows: torch.Tensor                   # (r,) row indices into the batch
    mean: torch.Tensor                   # (r, D)
    neff: torch.Tensor | None            # (r,); None where only the mean was asked for
    index: torch.Tensor | None = None    # (r, k) candidate support indices
    weights: torch.Tensor | None = None  # (r, k) their exact weights; the rest are below eps
    count: torch.Tensor | None = None    # (r,) how many of the k each row keeps (the rest pad)
    floor: torch.Tensor | None = None    # (r,) float64 bound below Gamma_i(x / t) off them, from index[:, 0]


@dataclass
class _Trail:
    """What one call of an output leaves for the next (the carried screen): per row of its batch
    the query, the mean as a combination of candidates, and where the inner products
    <x, x^(i)> with the whole support come from (screened rows: ``inner``; rows of the full
    pass: their streamed logits). Rows without candidates are not carried."""

    x: torch.Tensor                # (B, D) float64 queries
    t: torch.Tensor                # (B,) float64
    carried: torch.Tensor          # (B,) bool
    mean: torch.Tensor             # (B, D) float64 candidate means (carried rows)
    index: torch.Tensor            # (B, k) candidates (0 where padded)
    weights: torch.Tensor          # (B, k) their exact weights (0 where padded)
    error: torch.Tensor            # (B,) bound on |<x, x^(i)> - recovered inner product|
    inner_pos: torch.Tensor        # (B,) row of ``inner``, or -1
    inner: torch.Tensor | None     # (h, n) float64 <x, x^(i)>
    logit_pos: torch.Tensor        # (B,) row of ``logits``, or -1
    logits: torch.Tensor | None    # (r, n) streamed l = <q, x^(i)> - a ||x^(i) - c||^2 (compute dtype)
    a: torch.Tensor                # (B,) float64: the a of the streamed logits
    count: torch.Tensor            # (B,) how many of ``index`` each row keeps
    floor: torch.Tensor            # (B,) float64 bound below Gamma_i(x / t) off the candidates, or -inf
    ref: torch.Tensor              # (B,) the candidate b that Gamma is measured from
    screened: torch.Tensor         # (B,) bool: answered by a carried screen
    kept: torch.Tensor             # (B,) keys the row's pass kept at its slack, or -1 (not known)


@dataclass
class _Record:
    """The logits a pass hands to the next call's carried screen, in the streamed form
    l_j = <q, x^(j)> - a ||x^(j) - c||^2 (compute dtype), and a bound on each row's error."""

    logits: torch.Tensor  # (r, n): written into, or replaced by the pass's own block
    slack: torch.Tensor   # (r,) float64
    kept: torch.Tensor    # (r,) keys each row kept at that slack (kept_keys), or -1 (not counted)

    @classmethod
    def empty(cls, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> _Record:
        # Untouched until written: a record whose logits are replaced costs no memory traffic.
        return cls(torch.empty(rows, n, dtype=dtype, device=device),
                   torch.empty(rows, dtype=WIDE, device=device),
                   torch.full((rows,), -1, dtype=torch.long, device=device))


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

    ``EmpiricalField(support, sigma_min=0.0, chunk_size=None, chunk_bytes=DEFAULT_CHUNK_BYTES,
    screen=None, reduced_precision=None)``: ``support`` (n, *S) floating tensor (images stay
    (C, H, W), flattened internally; kept by reference when contiguous fp32/fp64); ``sigma_min``
    in [0, 1); ``chunk_size`` support points per streamed chunk (``None``: one chunk when the
    (B, n) logits fit in ``chunk_bytes``); ``screen`` the carried screen below (``None``: on for a
    support of at least ``SCREEN_FROM`` numbers n D, where it pays; ``True``/``False``: on/off);
    ``reduced_precision`` the reduced-precision screen below (``None``: on where a half-precision
    product is fast, :func:`nwflow._precision.reduced_dtype`, for a support of at least
    ``SCREEN_FROM`` numbers; ``False``: off; ``True``, ``torch.bfloat16`` or ``torch.float16``:
    on, in that dtype; it costs n D half numbers of memory). Results do not depend on the
    chunking, nor on either screen beyond the documented tolerance. Methods take ``x`` (B, *S) and
    ``t`` (a number, 0-d or (B,) tensor in [0, 1]): :meth:`posterior_weights` (B, n),
    :meth:`posterior_mean`, :meth:`velocity`, :meth:`score` (B, *S),
    :meth:`effective_neighbours` (B,). Reuse one field along a trajectory:
    ``integrate(field.velocity, x0, ...)``. Chapters 2 and 3.

    **The carried screen** (Part III, performance; measured in book/results/bench/trajectory_cpu.json:
    on CIFAR-10 it answers every row from t of about 0.4, with the floor screen below at 1/37
    (B = 64) to 1/29 (B = 256) of a full pass). Along a
    trajectory each query is, up to a small residual, a combination of the previous query x'
    and the previous mean m' = sum_k w'_k x^(k) (an Euler step x + h u is exactly that), and
    where the previous mean came from a few candidates its inner products with the support,
    sum_k w'_k <x^(i), x^(k)>, need only cached Gram columns. So for x = g_0 x' + g_1 m' + r
    (coefficients by least squares, the residual r formed explicitly)

    .. math::

        \langle x, x^{(i)}\rangle = g_0 \langle x', x^{(i)}\rangle
            + g_1 \textstyle\sum_k w'_k \langle x^{(k)}, x^{(i)}\rangle + \langle r, x^{(i)}\rangle,
        \qquad |\langle r, x^{(i)}\rangle| \le \|r\| \max_i \|x^{(i)}\|,

    which gives every logit l_i = (t / sigma_t^2)(<x, x^(i)> - t <c, x^(i)>) - t^2 ||x^(i) - c||^2
    / (2 sigma_t^2) to within a slack s = (t / sigma_t^2) E, where E adds |g_0| times the previous
    bound, |g_1| times the Gram columns' rounding (ERROR_FACTOR + 1) eps max||x^(i)||^2 and
    the mass of the candidate weights left out of the sum times max||x^(i)||^2, ||r||
    max||x^(i)|| and float64 rounding. A row whose slack is at most ``CARRY_SLACK`` keeps the
    keys within the covering margin of its largest approximate logit, or if those are too many
    the keys its tail cut needs (:func:`nwflow._accuracy.screened`: those left out weigh less
    than eps e^-2 in total at any rounding within s), and the kept ones, at most
    ``SCREEN_MAX``, get their exact float64 weights and mean (:func:`nwflow._accuracy.refine`).
    Every other row takes the full pass, whose logits are kept to start the next call's carry
    (their bound: :func:`nwflow._accuracy.logit_error_bound`). A first call, a new batch size or
    a query off the previous span costs one small least-squares fit per row.

    **The floor screen** (:meth:`_floor_screen`). A screened row also hands on one number: a lower
    bound F on Gamma_i(y) = ||y - x^(i)||^2 - ||y - x^(b)||^2 over the keys off its candidates (y =
    x / t, b its first candidate), from its logits' gap to the largest key left out, less twice the
    slack (:func:`nwflow._accuracy.candidate_floor`); so does a row the full pass answers from its
    candidates, from its logits and their a-priori bound, so that a row can go from the full pass
    straight to the floor screen. Gamma_i is affine in y and an Euler step moves y straight towards
    the mean, so the next call's F follows from the previous one, the step's direction and its
    residual alone (:func:`nwflow._accuracy.carried_floor`); where (t^2 / (2 sigma_t^2)) F covers
    the margin, the keys off the candidates weigh less than eps e^-2 and the candidates are weighed
    exactly, with no product against the support. Candidates whose exact gap to b exceeds the floor
    are dropped as the posterior sharpens. On CIFAR-10 (n = 50,000, B = 256, two threads) it
    answers every row from t of about 0.43, at 30-60 ms a step where the Gram-column screen took
    0.25-0.3 s. A row it cannot answer takes the full pass (it hands on no inner products).

    **The reduced-precision screen** (Part III, chapter 9, rule 3). Before the full pass, the
    logits of every row come from one product in bf16 or fp16 (queries and centred keys scaled
    by powers of two, accumulated in fp32), each within the a-priori bound of
    :func:`nwflow._reduced.logit_error`; a row whose kept keys at that slack are at most
    ``SCREEN_MAX`` is answered from them in float64, the others take the full pass. It runs on
    groups of rows whose (r, n) logits fit ``chunk_bytes``, and not when ``chunk_size`` is set
    below n. Its logits and their bound start the next call's carry like the full pass's. Along
    a trajectory it is not tried on rows the previous call found spread; a call with no previous
    call to go by tries it on the ``_PROBE_ROWS`` rows nearest t = 1 first and, where it answers
    none of them, not on the others (speed rules only).
    """

    # The whole support lives in this process (a sharded field's spans ranks): what the carried
    # screen and the covered-first pass need.
    _local = True

    def __init__(self, support: torch.Tensor, sigma_min: float = 0.0, chunk_size: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, screen: bool | None = None,
                 reduced_precision: bool | torch.dtype | None = None) -> None:
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
        self._centred = bool(self.center.any())
        if screen is not None and not isinstance(screen, bool):
            raise TypeError(f"screen must be None or a bool, got {type(screen).__name__}")
        self.screen = self.support.numel() >= SCREEN_FROM if screen is None else screen
        self.reduced_precision = self._reduced_choice(reduced_precision)
        self._reduced: ReducedKeys | None = None  # built on the screen's first use
        self._reduced_count = 0
        self._trail: _Trail | None = None
        self._scalars: tuple[torch.Tensor, torch.Tensor, float, float] | None = None
        self._gram: torch.Tensor | None = None
        self._mean: torch.Tensor | None = None  # the support's mean in float64 (t = 0), on first use
        self._slots: dict[int, int] = {}
        self._scratch: torch.Tensor | None = None  # _gather's float64 work-space

    def _reduced_choice(self, value: bool | torch.dtype | None) -> torch.dtype | None:
        """The half dtype of the reduced-precision screen, or None (off)."""
        # The bound needs D eps_32 well below 1 (fp32 sums of D products); images are far below.
        fits = self.support.shape[1] * torch.finfo(torch.float32).eps < 0.25
        if value is None:
            return reduced_dtype(self.device) if fits and self.support.numel() >= SCREEN_FROM else None
        if value is not False and not fits:
            raise ValueError(f"reduced_precision: samples of {self.support.shape[1]} numbers are too long "
                             "for a bounded fp32 accumulation (at most 2,000,000)")
        if isinstance(value, bool):
            return (reduced_dtype(self.device) or torch.bfloat16) if value else None
        if isinstance(value, torch.dtype):
            if value not in REDUCED:
                raise ValueError(f"reduced_precision must be torch.bfloat16 or torch.float16, got {value}")
            return value
        raise TypeError("reduced_precision must be None, a bool or torch.bfloat16/torch.float16, got "
                        f"{type(value).__name__}")

    def _sample_moments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sums of x and of ||x||^2 (as float64) over at most 1024 support points spread evenly
        through the set (a strided view: no pass over the support), and their count."""
        sample = self.support[::max(1, -(-len(self.support) // 1024))]
        # Summed in the compute dtype (a centre need only be near the mean) and widened after:
        # 2.5 ms at D = 3,072 where widening the sample first took 21 ms.
        squares = torch.linalg.vector_norm(sample, dim=1).to(WIDE).square().sum()
        return sample.sum(dim=0).to(WIDE), squares, len(sample)

    def _centre(self) -> torch.Tensor:
        """A centre c (D,): the sample mean of :meth:`_sample_moments`, or 0 where it lies within
        ``_ORIGIN_SHARE`` of the sample's rms radius. Any c leaves the weights unchanged; c = 0
        makes the key norms plain ||x^(j)||^2, with no differences to form, and costs the error
        bound at most a factor (1 + _ORIGIN_SHARE)^2."""
        total, squares, count = self._sample_moments()
        mean = total / max(count, 1)
        # E||x - mean||^2 = E||x||^2 - ||mean||^2: off the origin it may cancel to ~0 (or below),
        # which only confirms that such data are centred.
        mean2 = float(mean.square().sum())
        if mean2 <= _ORIGIN_SHARE**2 * (float(squares) / max(count, 1) - mean2):
            return torch.zeros_like(mean, dtype=self.dtype)
        return mean.to(self.dtype)

    def _centre_and_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """c and ||x^(j) - c||^2 (n,), differences taken explicitly block by block in a small
        (cache-sized on the CPU) work-space."""
        X, center = self.support, self._centre()
        if not bool(center.any()):
            # One read of the support (vector_norm forms no (n, D) temporary): half the time of
            # the blocked differences at n = 50,000, D = 3,072 (54 ms against 125 ms, 2 threads).
            return center, torch.linalg.vector_norm(X, dim=1).square_()
        budget = WIDE_BYTES if self.device.type != "cpu" else _CACHE_BYTES
        rows = chunk_rows(budget, X.shape[1] * X.element_size())
        norms = torch.empty(len(X), dtype=self.dtype, device=self.device)
        for s in range(0, len(X), rows):
            norms[s:s + rows] = torch.linalg.vector_norm(X[s:s + rows] - center, dim=1).square_()
        return center, norms

    @property
    def screened_rows(self) -> int:
        """How many rows of the last call the carried screen answered (0 before any call, and
        always with ``screen=False``)."""
        return 0 if self._trail is None else int(self._trail.screened.sum())

    @property
    def floor_rows(self) -> int:
        """How many of those the floor screen answered, reading no support point beyond their
        candidates (0 before any call)."""
        return 0 if self._trail is None else int((self._trail.screened & (self._trail.inner_pos < 0)).sum())

    @property
    def reduced_rows(self) -> int:
        """How many rows of the last pass the reduced-precision screen answered (0 when it is off)."""
        return self._reduced_count

    @property
    def n(self) -> int:
        """Number of support points (the whole support's: a sharded field's spans its ranks)."""
        return len(self.support)

    # -- what a sharded field (nwflow.distributed) does across ranks; nothing in one process --
    def _combine(self, acc: Accumulated) -> Accumulated:
        """The pass over the whole support from this process's pass over its part."""
        return acc

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Support points of the (r, k) indices, (r, k, D) float64, valid until the next gather.

        Up to ``2 WIDE_BYTES`` they land in a work-space kept across calls, widened in blocks
        that stay in cache: fresh (r, k, D) float32 and float64 copies cost more in first-touch
        page faults than in copying (87 ms against 22 ms for 29 x 128 rows of 3,072, one thread).
        """
        flat, D = index.reshape(-1), self.support.shape[1]
        if flat.numel() * D * 8 > 2 * WIDE_BYTES:
            return self.support[flat].reshape(*index.shape, D).to(WIDE)
        if self._scratch is None or self._scratch.numel() < flat.numel() * D:
            self._scratch = torch.empty(max(flat.numel() * D, WIDE_BYTES // 8), dtype=WIDE,
                                        device=self.device)
        out = self._scratch[:flat.numel() * D].view(flat.numel(), D)
        step = chunk_rows(_CACHE_BYTES, D * self.support.element_size())
        for s in range(0, flat.numel(), step):
            out[s:s + step] = self.support[flat[s:s + step]]
        return out.view(*index.shape, D)

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
        c = 20,000, D = 3,072, B = 64), and the mean's product p @ X_c is as fast from it; q^T
        made contiguous first saves another 16% at B = 256 (1.56 s against 1.86 s, n = 50,000).
        On the CPU, in float32, the product takes ``_PRODUCT_KEYS`` keys at a time (each block
        read from memory once and used from cache), and a block of rows is padded with zero
        rows to a multiple of ``_ROW_MULTIPLE`` and to at least ``_ROW_FLOOR``, its block copied
        out. Both follow MKL's timings on two threads, D = 3,072: on an AVX2 EPYC 1,024 keys at a
        time took 180 ms for B = 64, n = 50,000, where one product took 245 (71 against 103 at
        n = 20,000); 16 rows took 80 ms where 8 took 150; on a Xeon 63 rows took 195 ms where 64
        took 141. The rows a screen leaves come in any number.
        """
        rows, D = q.shape
        if q.dtype == WIDE or keys.device.type != "cpu":
            return (keys @ q.T.contiguous()).T.addr_(a, norms, alpha=-1.0)
        width = max(_ROW_FLOOR, rows + (-rows % _ROW_MULTIPLE))
        padded = (q if width == rows else torch.cat([q, q.new_zeros(width - rows, D)])).T.contiguous()
        product = torch.empty(len(keys), width, dtype=q.dtype, device=q.device)
        for s in range(0, len(keys), _PRODUCT_KEYS):
            torch.mm(keys[s:s + _PRODUCT_KEYS], padded, out=product[s:s + _PRODUCT_KEYS])
        if width > rows:
            product = product[:, :rows].contiguous()
        return product.T.addr_(a, norms, alpha=-1.0)

    def _blocks(self, q: torch.Tensor, a: torch.Tensor, values: bool, spread: bool,
                record: _Record | None = None) -> Iterator[Block]:
        """The support in chunks, in the compute dtype, with its cached key norms (the logits
        copied into ``record`` (B, n) before the pass consumes them, when given)."""
        chunk = self._chunk(q.shape[0])
        for start in range(0, len(self.support), chunk):
            X, norms = self.support[start:start + chunk], self.key_norms[start:start + chunk]
            logits = self._logits(q, a, X, norms)
            if record is not None:
                record.logits[:, start:start + chunk] = logits
            yield Block(logits, X if values else None, scalars=norms if spread else None, start=start)

    def _wide_blocks(self, q: torch.Tensor, a: torch.Tensor, g: torch.Tensor | None = None,
                     mg: torch.Tensor | None = None) -> Iterator[Block]:
        """The support widened to float64 block by block; with ``g`` the factor <x^(j), g> - <m, g>."""
        step = min(chunk_rows(WIDE_BYTES, 8 * self.support.shape[1]),
                   chunk_rows(self.chunk_bytes, 8 * q.shape[0]))
        # One work-space per pass (two when centred), each block widened into it: a fresh
        # block per step costs more in first-touch page faults than in copying.
        local = len(self.support)  # this process's part (a shard of the support under ShardedField)
        wide = torch.empty(min(step, local), self.support.shape[1], dtype=WIDE, device=self.device)
        diff = torch.empty_like(wide) if self._centred else None
        for start in range(0, local, step):
            Xw = wide[:min(step, local - start)].copy_(self.support[start:start + step])
            # c = 0 (data near the origin): no difference block to form and read.
            centred = Xw if diff is None else torch.sub(Xw, self._center_wide, out=diff[:len(Xw)])
            norms = torch.linalg.vector_norm(centred, dim=1).square_()
            factor = None if g is None else (g @ Xw.T).sub_(mg[:, None])
            yield Block(self._logits(q, a, Xw, norms), Xw, factor=factor, start=start)

    # -- the accuracy policy: which rows are recomputed, and how ----------------------------
    def _from_candidates(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor,
                         index: torch.Tensor, count: torch.Tensor | None = None) -> _Exact:
        """Exact float64 weights and mean of ``rows`` from their candidates alone, in blocks:
        with ``count`` (r,) each row's first ``count`` candidates of ``index`` (r, k), rows of like
        counts together (one row needing 128 candidates no longer pads a block of rows needing
        one), the returned index and weights zero-padded; without it all k."""
        D, r = self.support.shape[1], rows.numel()
        if count is None:
            block = chunk_rows(WIDE_BYTES, index.shape[1] * D * 8)
            spans = [(s, min(s + block, r), index.shape[1]) for s in range(0, r, block)]
            order = torch.arange(r, device=rows.device)
        else:
            order = torch.argsort(count)
            sizes = count[order].tolist()
            spans, s = [], 0
            while s < r:
                e = s + 1
                while e < r and (e + 1 - s) * sizes[e] * D * 8 <= WIDE_BYTES:
                    e += 1
                spans.append((s, e, sizes[e - 1]))
                s = e
        k_out = max(k for _, _, k in spans)
        mean = torch.empty(r, D, dtype=WIDE, device=self.device)
        neff = torch.empty(r, dtype=WIDE, device=self.device)
        weights = torch.zeros(r, k_out, dtype=WIDE, device=self.device)
        kept = torch.zeros(r, k_out, dtype=index.dtype, device=self.device)
        for s, e, k in spans:
            at, rr = order[s:e], rows[order[s:e]]
            idx = index[at, :k]
            mean[at], neff[at], weights[at, :k] = _accuracy.refine(xf[rr].to(WIDE), tt[rr], self._gather(idx),
                                                                   self._sigma(tt[rr]))
            kept[at, :k] = idx
        sizes = count if count is not None else torch.full((r,), index.shape[1], device=self.device)
        return _Exact(rows, mean, neff, kept, weights, sizes.to(torch.long))

    def _wide_pass(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor) -> _Exact:
        """The whole streamed computation for ``rows`` in float64 (weights spread too widely
        for the compute dtype to meet the tolerance)."""
        q, a = self._scaled_query(xf[rows], tt[rows], WIDE)
        acc = self._combine(online_softmax(self._wide_blocks(q, a), squares=True))
        return _Exact(rows, acc.mean, 1.0 / acc.square)

    def _top_candidates(self, xf: torch.Tensor, tt: torch.Tensor, rows: torch.Tensor, acc: Accumulated,
                        k: int, logits: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The streamed logits of the ``k`` largest candidates of ``rows`` (r, k), the same in
        float64 (r, k), and the candidates (r, k, D) float64: from the pass's top logits, or
        from the (B, n) ``logits`` block when it is given."""
        if logits is None:
            streamed, top = acc.top_logits[rows, :k], acc.top_index[rows, :k]
        else:
            # Most rows: the whole block's k largest (its two stages took 10-18 ms at B = 256,
            # n = 50,000, taking the rows out 39 ms), then the rows'; few rows: those taken out.
            if 4 * rows.numel() > logits.shape[0]:
                streamed, top = (v[rows] for v in largest(logits, min(k, self.n)))
            else:
                streamed, top = largest(take_rows(logits, rows), min(k, self.n))
        candidates = self._gather(top)
        exact = _accuracy.exact_logits(xf[rows].to(WIDE), tt[rows], candidates, self._center_wide,
                                       self._sigma(tt[rows]))
        return streamed.to(WIDE), exact, candidates

    def _uniform(self, batch: int, neff: bool) -> tuple[Accumulated, list[_Exact]]:
        """A batch at t = 0 (where every sampling run starts): the weights are uniform, so the
        mean is the support's mean (computed once, in float64) and n_eff = n; no pass."""
        if self._mean is None:
            rows = chunk_rows(WIDE_BYTES, self.support.shape[1] * 8)
            self._mean = sum(self.support[s:s + rows].to(WIDE).sum(dim=0)
                             for s in range(0, self.n, rows)) / self.n
        ones = torch.ones(batch, dtype=self.dtype, device=self.device)
        acc = Accumulated(row_max=torch.zeros_like(ones), total=ones,
                          mean=None if neff else torch.zeros(batch, self.support.shape[1], dtype=self.dtype,
                                                             device=self.device),
                          square=ones / self.n if neff else None)
        return acc, [_Exact(torch.arange(batch, device=self.device), self._mean.expand(batch, -1),
                            torch.full((batch,), float(self.n), dtype=WIDE, device=self.device))]

    def _covered_first(self, q: torch.Tensor, a: torch.Tensor, error: torch.Tensor, neff: bool,
                       spread: bool, record: _Record | None,
                       output: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[Accumulated, torch.Tensor, torch.Tensor, tuple | None, torch.Tensor]:
        """The pass of :meth:`_solve` when the (B, n) logits fit in one block: the covered rows
        are found from the logits first, and only the others are summed against the support.

        A covered row is redone from its candidates, so its streamed sums would be thrown away:
        skipping them saves the second matrix product (half the pass) for every row whose weight
        has collapsed. Their entries of the returned sums are placeholders (maximum 0, mean 0, n_eff 1).
        Every row's keys are those :func:`nwflow._accuracy.kept_keys` proves it needs (the
        covering margin, or for the mean the a-posteriori tail cut where it could make a row
        cheaper; what is left out weighs less than eps e^-2 of the row, below the fp32 rounding of
        the rest, or with ``output`` = (x, a, b) of a mean output y = (a m - b x) / c, moves y by at
        most eps ||y||, :meth:`_room`): a row that keeps at most ``SCREEN_MAX`` is covered; for the
        mean, a row that keeps at most ``_PAIR_FRACTION`` of the support is summed over its own
        keys, all such rows in one sparse product (:func:`nwflow._stream.kept_softmax`), and the
        rest share one
        product over the keys any of them keeps, gathered in blocks when those are at most
        ``_SPARSE_FRACTION`` of the support. (The sparse product of 64 rows keeping 1% / 3% of
        n = 20,000 points of D = 3,072 took 11-14 / 42-52 ms on two threads, against 180-200 ms
        for the dense product and 80 / 330 ms for the same sums over gathered copies of the keys.)
        Whether a row is covered follows from its count of kept keys, so only the covered rows'
        candidates are sorted out; the few rows whose top logits the accuracy policy later needs
        take them from the returned block.
        Returns the pass, the covered rows (B,), how many candidates each needs (B,), for the
        rows that keep at most ``REFINE_MAX`` keys (with ``spread``: the float32 results whose
        accuracy is tested) those rows (r,) and which keys they keep (r, n) (a row that fails
        the test is redone from them in float64 instead of by a float64 pass over the support),
        and the (B, n) logits, intact.
        """
        logits = self._logits(q, a, self.support, self.key_norms)
        if record is not None:
            # The block itself: the pass consumes copies and the block is returned intact (a
            # copy into the record's row-major buffer took 150 ms at B = 256, n = 50,000).
            record.logits = logits
        # Up to SCREEN_MAX candidates, not CANDIDATES: a row redone from up to that many is
        # carried, so the screen can answer it at the next step of a trajectory.
        K = min(_accuracy.SCREEN_MAX, self.n)
        # The cut is worth its passes only for rows it could make covered, or light enough for
        # the sparse product (kept_softmax): it keeps up to ~3x fewer keys than the margin, so
        # rows the margin gives more than 4x the light limit are left alone (at n = 50,000,
        # t = 0.1 a reach of 4x makes 15 of 64 rows light for 39 ms, 8x the same for 42 ms).
        light = int(self.n * _PAIR_FRACTION)
        room = None if output is None else self._room(logits, *output)
        keep, count = _accuracy.kept_keys(logits, error, self.n, self._eps, self.n if neff else K,
                                          max(_TAIL_CUT_REACH * K, 4 * light), room)
        covered = (count <= K) & _accuracy.tracks_candidates(error, self._eps)
        if record is not None:
            record.kept = count.to(torch.long)
        B, D = logits.shape[0], self.support.shape[1]
        rows = covered.nonzero().squeeze(1)
        # The kept keys are the row's count largest logits (both rules keep a top set), and one more:
        # the largest left out, which starts the floor screen (_accuracy.candidate_floor).
        k_cov = min(int(count[rows].max()) + 1 if rows.numel() else 1, self.n)
        top = logits.new_full((B, k_cov), -torch.inf)
        index = torch.zeros(B, k_cov, dtype=torch.long, device=self.device)
        if rows.numel():
            top[rows], index[rows] = largest(logits if rows.numel() == B else take_rows(logits, rows), k_cov)
        acc = Accumulated(row_max=logits.new_zeros(B), total=logits.new_ones(B),
                          mean=None if neff else logits.new_zeros(B, D),
                          square=logits.new_ones(B) if neff else None,
                          scalar=logits.new_zeros(B) if spread else None, top_logits=top, top_index=index)
        open_ = (~covered).nonzero().squeeze(1)
        if neff:
            if open_.numel():
                part = take_rows(logits, open_) if open_.numel() < B else logits.clone()
                self._store(acc, open_, online_softmax([Block(part, None)], squares=True))
            return acc, covered, count.where(covered, K), None, logits
        few = None
        if spread:
            small = (count[open_] <= _accuracy.REFINE_MAX).nonzero().squeeze(1)
            if small.numel():
                few = (open_[small], take_rows(keep, open_[small]))
        sparse = count[open_] <= light
        if bool(sparse.any()):
            rows = open_[sparse]
            self._store(acc, rows, kept_softmax(take_rows(logits, rows), take_rows(keep, rows),
                                                self.support, self.key_norms if spread else None))
            open_ = open_[~sparse]
        if open_.numel():
            # The keys any open row keeps, unless one row alone keeps too many for a gather.
            few_keys = int(count[open_].max()) <= self.n * _SPARSE_FRACTION
            keys = take_rows(keep, open_).any(dim=0).nonzero().squeeze(1) if few_keys else None
            # A copy: the pass consumes its logits, and the block is returned intact.
            part = take_rows(logits, open_) if open_.numel() < B else logits.clone()
            if keys is not None and keys.numel() <= self.n * _SPARSE_FRACTION:
                blocks = self._kept_blocks(part, keys, spread)
            else:
                blocks = [Block(part, self.support, scalars=self.key_norms if spread else None)]
            self._store(acc, open_, online_softmax(blocks))
        return acc, covered, count.where(covered, K), few, logits

    def _room(self, logits: torch.Tensor, xf: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """h = ||a x^(b) - b x|| / (2 a R) (B,) float64, with x^(b) the key of each row's largest
        logit and R = max_j ||x^(j) - c||: the tail cut's allowance for the output y = (a m - b x) / c
        (:func:`nwflow._accuracy.tail_cut`); 0 (the cut for the weights alone) where a = 0 or R = 0."""
        top = largest(logits, 1)[1][:, 0]
        aw, bw, R = a.to(WIDE), b.to(WIDE), math.sqrt(self._centred_max2)
        y = torch.linalg.vector_norm(aw[:, None] * self.support[top].to(WIDE) - bw[:, None] * xf.to(WIDE),
                                     dim=1)
        if R == 0.0:
            return torch.zeros_like(y)
        return torch.where(aw > 0, y / (2.0 * R * aw.clamp_min(torch.finfo(WIDE).tiny)), 0.0)

    @staticmethod
    def _store(acc: Accumulated, rows: torch.Tensor, part: Accumulated) -> None:
        """Write a pass over some ``rows`` (r,) into the batch's sums."""
        for name in ("row_max", "total", "mean", "square", "scalar"):
            value, into = getattr(part, name), getattr(acc, name)
            if value is not None and into is not None:
                into[rows] = value

    def _kept_blocks(self, logits: torch.Tensor, keys: torch.Tensor, spread: bool) -> Iterator[Block]:
        """The (r, n) ``logits`` and the support restricted to ``keys`` (u,), gathered in blocks of
        at most ``WIDE_BYTES`` of support rows (the gather copies them)."""
        step = chunk_rows(WIDE_BYTES, self.support.shape[1] * self.support.element_size())
        for s in range(0, keys.numel(), step):
            k = keys[s:s + step]
            yield Block(logits[:, k], self.support[k], scalars=self.key_norms[k] if spread else None)

    def _solve(self, xf: torch.Tensor, tt: torch.Tensor, a: torch.Tensor | None = None,
               b: torch.Tensor | None = None, record: _Record | None = None,
               reduce: torch.Tensor | None = None) -> tuple[Accumulated, list[_Exact]]:
        """The rows the reduced-precision screen answers, from their candidates in float64, and
        the others by :meth:`_solve_full`: for y = (a m - b x) / c when ``a`` and ``b`` are given,
        for n_eff otherwise; ``record`` receives each row's logits and their bound; ``reduce``
        (B,) bool, the rows the screen is tried on (None: the rows a probe of ``_PROBE_ROWS`` leaves)."""
        neff, B = a is None, xf.shape[0]
        self._reduced_count = 0
        if self._local and B and bool((tt == 0).all()):
            return self._uniform(B, neff)
        # The screen needs whole rows of logits: in groups of rows whose (r, n) block fits the
        # chunk budget, unless the caller fixed a smaller chunk of the support.
        group = chunk_rows(self.chunk_bytes, self.n * self.support.element_size())
        hits = []
        if (self.reduced_precision is not None and self._local and B
                and (self.chunk_size is None or self.chunk_size >= self.n)):
            tried = torch.arange(B, device=self.device) if reduce is None else reduce.nonzero().squeeze(1)
            if reduce is None and tried.numel() >= 2 * _PROBE_ROWS:
                # No previous call says which rows the screen can answer: try it first on the
                # rows nearest t = 1 (the most concentrated), and where it answers none of them
                # not on the others, which sit at or below their t (a speed rule: those take the
                # full pass).
                probe = torch.topk(tt, _PROBE_ROWS).indices
                hit = self._reduced_screen(xf[probe], tt[probe])
                left = torch.zeros(B, dtype=torch.bool, device=self.device)
                if hit is not None:
                    hits.append((probe[hit[0]], *hit[1:]))
                    left[:] = True
                    left[probe] = False
                tried = left.nonzero().squeeze(1)
            for s in range(0, tried.numel(), group):
                at = tried[s:s + group]
                hit = self._reduced_screen(xf[at], tt[at])
                if hit is not None:
                    hits.append((at[hit[0]], *hit[1:]))
        if not hits:
            return self._solve_full(xf, tt, a, b, record)
        rows, count, slack = (torch.cat([h[i] for h in hits]) for i in (0, 2, 4))
        k = max(h[1].shape[1] for h in hits)
        index = torch.cat([torch.nn.functional.pad(h[1], (0, k - h[1].shape[1])) for h in hits])
        logits = torch.cat([h[3] for h in hits]) if record is not None else None
        self._reduced_count = rows.numel()
        exact = [self._from_candidates(xf, tt, rows, index, count)]
        if record is not None:
            record.logits[rows], record.slack[rows], record.kept[rows] = logits, slack, count.to(torch.long)
        one = xf.new_ones(B)
        acc = Accumulated(row_max=xf.new_zeros(B), total=one, mean=None if neff else torch.zeros_like(xf),
                          square=one.clone() if neff else None)
        rest = torch.ones(B, dtype=torch.bool, device=self.device)
        rest[rows] = False
        rest = rest.nonzero().squeeze(1)
        if rest.numel():
            sub = None if record is None else _Record.empty(rest.numel(), self.n, self.dtype, self.device)
            part, part_exact = self._solve_full(xf[rest], tt[rest], None if neff else a[rest],
                                                None if neff else b[rest], sub)
            self._store(acc, rest, part)
            for e in part_exact:
                e.rows = rest[e.rows]
                exact.append(e)
            if sub is not None:
                record.logits[rest], record.slack[rest], record.kept[rest] = sub.logits, sub.slack, sub.kept
        return acc, exact

    def _reduced_keys(self) -> ReducedKeys:
        """The support's keys rounded for the reduced-precision screen (once per field)."""
        if self._reduced is None:
            budget = WIDE_BYTES if self.device.type != "cpu" else _CACHE_BYTES
            self._reduced = ReducedKeys.build(self.support, self.center, self._centred_max2,
                                              self.reduced_precision, budget)
        return self._reduced

    def _reduced_screen(self, xf: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Rows whose kept keys the reduced-precision screen finds (r,), those keys (r, k) and
        how many each keeps (r,), with their logits in the streamed form (r, n) and its bound (r,);
        None when no row is answered.

        One product in the half dtype gives every logit to within
        :func:`nwflow._reduced.logit_error`; a row keeps the keys
        :func:`nwflow._accuracy.kept_keys` proves it needs at that slack (those left out weigh
        less than eps e^-2 at any rounding within it), and if they are at most ``SCREEN_MAX``
        its exact weights and mean come from them in float64. Part III, chapter 9.
        """
        q, a = self._scaled_query(xf, tt, self.dtype)
        logits, slack, bound = self._reduced_logits(q, a)
        K = min(_accuracy.SCREEN_MAX, self.n)
        _, count = _accuracy.kept_keys(logits, slack, self.n, self._eps, K, _TAIL_CUT_REACH * K)
        rows = ((count <= K) & torch.isfinite(slack) & (tt > 0)).nonzero().squeeze(1)
        if not rows.numel():
            return None
        count = count[rows]
        part = logits[rows]
        index = torch.topk(part, int(count.max()), dim=1).indices
        # The streamed form <q, x^(j)> - a ||x^(j) - c||^2: add <q, c>, and its rounding to the bound.
        part.add_((q[rows].to(WIDE) @ self._center_wide).to(self.dtype)[:, None])
        return rows, index, count, part, bound[rows]

    def _reduced_logits(self, q: torch.Tensor, a: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The screen's logits (B, n), their bound and the streamed form's (:meth:`ReducedKeys.logits`)."""
        c_norm = float(torch.linalg.vector_norm(self._center_wide))
        return self._reduced_keys().logits(q, a, self.key_norms, c_norm)

    def _solve_full(self, xf: torch.Tensor, tt: torch.Tensor, a: torch.Tensor | None = None,
                    b: torch.Tensor | None = None, record: _Record | None = None
                    ) -> tuple[Accumulated, list[_Exact]]:
        """The streamed pass plus the rows recomputed in float64: for y = (a m - b x) / c when
        ``a`` and ``b`` are given, for n_eff otherwise (which decides the accuracy test);
        ``record`` receives the streamed logits and their bound."""
        neff = a is None
        q, a_q = self._scaled_query(xf, tt, self.dtype)
        error = _accuracy.logit_error_bound(q, a_q, self._eps, self._raw_max, self._centred_max2)
        if record is not None:
            record.slack.copy_(error)
        # Candidates are tracked once logits can be off by more than a few eps; the fallback test
        # runs on every fp32 result (its cost: one matrix-vector product).
        track = bool(_accuracy.tracks_candidates(error, self._eps).any())
        check = self.dtype != WIDE and (not neff or track)
        exact, covered, few, block = [], torch.zeros_like(error, dtype=torch.bool), None, None
        if track and self._local and q.shape[0] and self._chunk(q.shape[0]) >= self.n:
            acc, covered, inside, few, block = self._covered_first(q, a_q, error, neff, check and not neff,
                                                                   record, None if neff else (xf, a, b))
        else:
            blocks = self._blocks(q, a_q, values=not neff, spread=check and not neff, record=record)
            acc = self._combine(online_softmax(blocks, squares=neff,
                                               top_k=_accuracy.CANDIDATES if track else 0))
            if track:
                covered, inside = _accuracy.covered(error, acc.top_logits, self.n, self._eps)
        if track:
            rows = covered.nonzero().squeeze(1)
            if rows.numel():
                index = acc.top_index[rows, :int(inside[rows].max())]
                e = self._from_candidates(xf, tt, rows, index, inside[rows])
                # The pass's logits, within the a-priori bound, start the next call's floor screen.
                e.floor = _accuracy.candidate_floor(acc.top_logits[rows], inside[rows], error[rows],
                                                    tt[rows], self._sigma(tt[rows]), self.n)
                exact.append(e)
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
                streamed, exact_top, _ = self._top_candidates(xf, tt, rows, acc, _accuracy.OBSERVED, block)
                error = error.clone()
                observed = _accuracy.OBSERVED_SAFETY * _accuracy.observed_error(streamed, exact_top)
                error[rows] = torch.minimum(error[rows], observed)
                rows = too_large(error)
            if rows.numel() and track and not neff:
                # Weight on a few points with a long tail: the top candidates weighed exactly.
                streamed, exact_top, candidates = self._top_candidates(xf, tt, rows, acc,
                                                                       _accuracy.CANDIDATES, block)
                mean, tail = _accuracy.top_corrected(acc.total[rows].to(WIDE), acc.mean[rows].to(WIDE),
                                                     acc.row_max[rows].to(WIDE), streamed, exact_top,
                                                     candidates, error[rows], self._eps)
                rel = _accuracy.relative_error(error[rows] * tail.sqrt(), self._eps, mean, xf[rows].to(WIDE),
                                               acc.scalar[rows].to(WIDE), self._center_wide, a[rows], b[rows])
                good = rel <= _accuracy.FALLBACK_TOL
                if bool(good.any()):
                    exact.append(_Exact(rows[good], mean[good], None))
                    rows = rows[~good]
            if rows.numel() and few is not None:
                # Rows that keep few keys: those, weighed again in float64 (eq. of tail_cut()).
                hit = torch.isin(few[0], rows)
                if bool(hit.any()):
                    keep = few[1][hit]
                    count = keep.sum(dim=1)
                    index = torch.topk(keep.to(torch.int8), int(count.max()), dim=1).indices  # kept first
                    exact.append(self._from_candidates(xf, tt, few[0][hit], index, count))
                    rows = rows[~torch.isin(rows, few[0][hit])]
            if rows.numel():
                exact.append(self._wide_pass(xf, tt, rows))
        return acc, exact

    # -- the carried screen (Part III, performance; see the class docstring) -------------------
    def _wide_scalars(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """<c, x^(i)> and ||x^(i) - c||^2 (n,) in float64, with their largest sizes (once per field)."""
        if self._scalars is None:
            X, c = self.support, self._center_wide
            rows = chunk_rows(_CACHE_BYTES if self.device.type == "cpu" else WIDE_BYTES, X.shape[1] * 8)
            cx = torch.empty(len(X), dtype=WIDE, device=self.device)
            nc = torch.empty_like(cx)
            for s in range(0, len(X), rows):
                Xw = X[s:s + rows].to(WIDE)
                cx[s:s + rows] = Xw @ c
                nc[s:s + rows] = (Xw - c).square_().sum(dim=1)
            self._scalars = (cx, nc, float(cx.abs().max()), float(nc.max()))
        return self._scalars

    def _gram_slots(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of the Gram cache holding <x^(j), x^(i)> (n,) for the support indices ``keys``
        (u,), computed where missing (the caller checks they fit: :meth:`_gram_fits`)."""
        wanted = keys.tolist()
        missing = [j for j in wanted if j not in self._slots]
        if len(self._slots) + len(missing) > self._gram.shape[0]:
            self._slots, missing = {}, wanted
        if missing:
            base = len(self._slots)
            new = self.support[torch.tensor(missing, device=self.device)]
            # The support as the row-major left operand (as in _logits): ~1.5x faster on CPU.
            self._gram[base:base + len(missing)] = (self.support @ new.T.contiguous()).T
            self._slots.update((j, base + i) for i, j in enumerate(missing))
        return torch.tensor([self._slots[j] for j in wanted], device=self.device, dtype=torch.long)

    def _gram_fits(self, keys: torch.Tensor) -> bool:
        """Whether the Gram columns of ``keys`` fit in the cache (allocated on first use)."""
        if self._gram is None:
            cap = max(1, _GRAM_BYTES // (self.n * self.support.element_size()))
            self._gram = torch.empty(cap, self.n, dtype=self.dtype, device=self.device)
        return keys.numel() <= self._gram.shape[0]

    def _screen(self, xw: torch.Tensor, tt: torch.Tensor, done: torch.Tensor
                ) -> tuple[torch.Tensor, ...] | None:
        """Rows of this batch not ``done`` (B,) screened from the previous call's trail: (rows (h,),
        their inner products <x, x^(i)> (h, n) float64, the bound on those (h,), candidates (h, k),
        how many of them each row keeps (h,), the floor of :meth:`_floor_screen` they start (h,)),
        or None."""
        tr = self._trail
        if tr is None or tr.x.shape != xw.shape:
            return None
        s2 = self._sigma(tt).square()
        f, a_w = tt / s2, tt.square() / (2.0 * s2)
        # Rows the floor screen answered last time hand on no inner products.
        known = (tr.inner_pos >= 0) | (tr.logit_pos >= 0)
        rows = (tr.carried & known & ~done & (tt > 0) & torch.isfinite(f)).nonzero().squeeze(1)
        if not rows.numel():
            return None
        tiny, raw, raw2 = torch.finfo(WIDE).eps, self._raw_max, self._raw_max ** 2
        m_prev, x_prev = tr.mean[rows], tr.x[rows]
        gamma, rho = _accuracy.span_fit(xw[rows], torch.stack([x_prev, m_prev], dim=1))
        g0, g1 = gamma[:, 0].abs(), gamma[:, 1].abs()
        fr, w, index = f[rows], tr.weights[rows], tr.index[rows]
        # <x^(i), m'> from cached Gram columns (reused from step to step while the candidates
        # stay), only for weights whose omission could matter (the rest move it by at most their
        # mass times max ||x^(i)||^2, kept below 1/4 of a logit unit); when the columns do not
        # fit in the cache, as one product of the support with the h means, nothing left out.
        keep_w = w >= (0.25 / (fr * g1 * raw2 * w.shape[1]))[:, None]
        direct = not self._gram_fits(torch.unique(index[keep_w]))
        if direct:
            keep_w = w > 0
        left_out = (w * ~keep_w).sum(dim=1)
        if not direct:
            # and the candidates _shrink dropped from the trail: m' still holds them, the columns
            # summed do not (the weights kept sum to 1 less that mass; refine normalises them to 1)
            left_out += (1.0 - w.sum(dim=1)).clamp_(min=0.0)
        e_mean = raw2 * (left_out + (ERROR_FACTOR + 1.0) * self._eps + (w.shape[1] + 4) * tiny)
        error = (g0 * tr.error[rows] + g1 * e_mean + rho * raw
                 + 4.0 * tiny * raw * (g0 * x_prev.norm(dim=1) + g1 * m_prev.norm(dim=1)))
        go = fr * error <= _accuracy.CARRY_SLACK
        if not bool(go.any()):
            return None
        rows, gamma, error, keep_w, w, index = (v[go] for v in (rows, gamma, error, keep_w, w, index))
        cx, nc, cx_max, nc_max = self._wide_scalars()
        # g_0 <x', x^(i)>: screened rows kept theirs, rows of the full pass recover them from
        # their streamed logits.
        pos = tr.inner_pos[rows]
        own = pos >= 0
        if bool(own.all()):
            # The trail is read once: its products may be scaled in place when they line up.
            same = pos.numel() == tr.inner.shape[0] and bool((pos == torch.arange(pos.numel())).all())
            inner = (tr.inner if same else tr.inner[pos]).mul_(gamma[:, :1])
        else:
            inner = torch.empty(rows.numel(), self.n, dtype=WIDE, device=self.device)
            if bool(own.any()):
                inner[own] = tr.inner[pos[own]]
            r = rows[~own]
            t0 = tr.t[r][:, None]
            inner[~own] = ((tr.logits[tr.logit_pos[r]].to(WIDE) + tr.a[r][:, None] * self.key_norms.to(WIDE))
                            .mul_(self._sigma(t0).square() / t0).add_(t0 * cx))
            inner.mul_(gamma[:, :1])
        # + g_1 <m', x^(i)>
        if direct:
            # m' rounded to the compute dtype: within (ERROR_FACTOR + 1) eps max||x^(i)|| ||m'||,
            # inside e_mean's bound since ||m'|| <= max ||x^(i)||.
            inner.add_((self.support @ tr.mean[rows].to(self.dtype).T).T.to(WIDE).mul_(gamma[:, 1:]))
        else:
            # sum_k g_1 w'_k <x^(k), x^(i)> from the cached columns: each row has a few
            # candidates, so the k-th of every row that has one is added at once (a product
            # with the (h, u) weights would cost h u n).
            keys = torch.unique(index[keep_w])
            slots = self._gram_slots(keys) if keys.numel() else keys
            for j in range(keep_w.shape[1]):
                r = keep_w[:, j].nonzero().squeeze(1)
                if r.numel() == inner.shape[0]:  # in float64 (addcmul promotes the float32 columns)
                    column = slots[torch.searchsorted(keys, index[:, j].contiguous())]
                    inner.addcmul_(self._gram[column], (gamma[:, 1] * w[:, j])[:, None])
                elif r.numel():
                    column = slots[torch.searchsorted(keys, index[r, j].contiguous())]
                    inner[r] += self._gram[column].to(WIDE).mul_((gamma[r, 1] * w[r, j])[:, None])
        # l~_i = f (<x, x^(i)> - t <c, x^(i)>) - a ||x^(i) - c||^2, each within f E (+ float64 rounding)
        fr, ar, tr_ = f[rows], a_w[rows], tt[rows]
        logits = torch.mul(inner, fr[:, None]).addmm_(torch.stack([fr * tr_, ar], dim=1),
                                                       torch.stack([cx, nc]), alpha=-1.0)
        D = self.support.shape[1]
        slack = fr * error + 8.0 * D * tiny * (fr * (raw * xw[rows].norm(dim=1) + tr_ * cx_max) + ar * nc_max)
        count = _accuracy.screened(logits, slack, self.n, self._eps, _accuracy.SCREEN_MAX)
        ok = count <= _accuracy.SCREEN_MAX
        if not bool(ok.any()):
            return None
        if not bool(ok.all()):
            rows, inner, error, logits, count, slack = (v[ok] for v in (rows, inner, error, logits, count,
                                                                        slack))
        k = int(count.max())
        # The kept keys, and the largest logit left out: the floor of the next call's floor screen,
        # Gamma_i = (2 sigma_t^2 / t^2)(l_b - l_i) >= (2 sigma_t^2 / t^2)(l~_b - l~_next - 2 s).
        value, top = torch.topk(logits, min(k + 1, self.n), dim=1)
        floor = _accuracy.candidate_floor(value, count, slack, tt[rows], self._sigma(tt[rows]), self.n)
        return rows, inner, error, top[:, :k], count, floor

    def _gram_worth_it(self, done: torch.Tensor) -> bool:
        """Whether the Gram-column screen is tried on the rows not ``done`` (B,): when every such
        row is carried (it may spare the full pass), or when at least ``_GRAM_WORTH`` are. Its
        read of the support costs about as much as that many columns of the logits' product, and
        in a call whose full pass runs anyway for other rows a carried row it answers saves only
        its column: the pass answers a collapsed row from its candidates too (rule 1) and hands
        on its floor."""
        tr = self._trail
        if bool(done.all()) or tr is None or tr.x.shape[0] != done.shape[0]:
            return False
        carried = tr.carried & ~done
        return bool(carried.sum() >= _GRAM_WORTH) or bool((carried | done).all())

    def _floor_screen(self, xw: torch.Tensor, tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        r"""Rows of this batch whose previous candidates still provably hold all their weight,
        from one number per row: (rows (h,), their floors (h,)), or None.

        With y = x / t and b a candidate, l_i - l_b = -(t^2 / (2 sigma_t^2)) Gamma_i(y), where
        Gamma_i(y) = ||y - x^(i)||^2 - ||y - x^(b)||^2 is affine in y and Gamma_i(x^(b)) =
        ||x^(b) - x^(i)||^2 >= 0. Writing this call's y - x^(b) = mu (y' - x^(b)) + r (the previous
        call's y', mu in [0, 1] by least squares, r formed explicitly; an Euler step moves y
        straight towards the mean, so r is rounding once the mean sits on b):

        .. math::

            \min_{i \notin C} \Gamma_i(y) \ge \mu F' - 2 \|r\| \max_i \|x^{(i)} - x^{(b)}\| = F,

        for the previous floor F' over the keys off the candidates C. Where
        (t^2 / (2 sigma_t^2)) F reaches the covering margin log(n / eps) + 2, the keys off C weigh
        less than eps e^-2 in total and C is weighed exactly (no pass over the support). Along a
        trajectory the logit scale grows faster than mu shrinks F, so a row stays answered once
        collapsed. Part III, chapter 9."""
        tr = self._trail
        if tr is None or tr.x.shape != xw.shape:
            return None
        rows = (tr.carried & (tr.floor > 0) & (tt > 0) & (tr.t > 0)).nonzero().squeeze(1)
        if not rows.numel():
            return None
        t, t0 = tt[rows], tr.t[rows]
        xb = self.support[tr.ref[rows]].to(WIDE)
        v = tr.x[rows] / t0[:, None] - xb
        w = xw[rows] / t[:, None] - xb
        mu = ((w * v).sum(dim=1) / v.square().sum(dim=1)).nan_to_num_(0.0, 0.0, 0.0).clamp_(0.0, 1.0)
        rho = (w - mu[:, None] * v).norm(dim=1)
        reach = math.sqrt(self._wide_scalars()[3]) + (xb - self._center_wide).norm(dim=1)
        # float64 rounding of y, of the residual and of its norm: a few D eps of the vectors' sizes.
        tiny, D = torch.finfo(WIDE).eps, xw.shape[1]
        rounding = 16.0 * D * tiny * reach * (w.norm(dim=1) + v.norm(dim=1) + 2.0 * xb.norm(dim=1))
        floor = _accuracy.carried_floor(tr.floor[rows], mu, rho, reach, rounding)
        gap = t.square() / (2.0 * self._sigma(t).square()) * floor
        ok = (gap >= _accuracy.screen_margin(torch.zeros_like(gap), self.n, self._eps)).nonzero().squeeze(1)
        return (rows[ok], floor[ok]) if ok.numel() else None

    def _shrink(self, e: _Exact, xw: torch.Tensor, tt: torch.Tensor, floor: torch.Tensor) -> _Exact:
        """The screened rows of ``e`` with the candidates the next call's floor screen still needs:
        a candidate j whose exact gap to the first candidate b, l_b - l_j (from the float64
        weights, less their rounding), is at least the floor's (t^2 / (2 sigma_t^2)) F has
        Gamma_j >= F, so the floor (h,) holds without it. Along a trajectory the posterior
        sharpens, and a row keeps fewer candidates from call to call (each one is weighed again
        at every call)."""
        if e.index.shape[1] == 1:
            return e
        rows, tiny, D = e.rows, torch.finfo(WIDE).eps, xw.shape[1]
        t, s2 = tt[rows], self._sigma(tt[rows]).square()
        # l_b - l_j from the weights, within the rounding of the two float64 distances (relative
        # (D + 2) eps each, from explicit differences) and of the softmax; a weight that underflowed
        # is more than 743 nats below the largest, so at least 743 + log w_b below b.
        d_b = (xw[rows] - t[:, None] * self.support[e.index[:, 0]].to(WIDE)).square().sum(dim=1) / (2.0 * s2)
        w_b = e.weights[:, :1]
        gap = (w_b.log() - e.weights.log()).nan_to_num_(posinf=torch.inf)
        rounding = 4.0 * (D + 2) * tiny * (2.0 * d_b[:, None] + gap) + 16.0 * tiny
        low = torch.where(e.weights > 0, gap - rounding, 743.0 + w_b.log())
        needed = low < (t.square() / (2.0 * s2) * floor)[:, None]
        needed &= torch.arange(e.index.shape[1], device=self.device) < e.count[:, None]
        needed[:, 0] = True
        order = torch.argsort((~needed).to(torch.int8), dim=1, stable=True)
        k = int(needed.sum(dim=1).max())
        return _Exact(rows, e.mean, e.neff, e.index.gather(1, order)[:, :k],
                      e.weights.gather(1, order)[:, :k], needed.sum(dim=1))

    def _solve_screened(self, xf: torch.Tensor, tt: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                        ) -> tuple[torch.Tensor, list[_Exact]]:
        """The mean (B, D) and the rows recomputed in float64 for y = (a m - b x) / c: rows the
        carried screen reaches from their candidates, the others by :meth:`_solve`; leaves the
        trail for the next call."""
        B = xf.shape[0]
        if not (self.screen and self._local and B and self.n > 1):
            acc, exact = self._solve(xf, tt, a, b)
            return acc.mean, exact
        xw = xf.to(WIDE)
        exact, done = [], torch.zeros(B, dtype=torch.bool, device=self.device)
        floor = torch.full((B,), -torch.inf, dtype=WIDE, device=self.device)
        ref = torch.zeros(B, dtype=torch.long, device=self.device)
        first = self._floor_screen(xw, tt)
        if first is not None:
            rows, tr = first[0], self._trail
            e = self._from_candidates(xf, tt, rows, tr.index[rows], tr.count[rows])
            exact.append(self._shrink(e, xw, tt, first[1]))
            done[rows], floor[rows], ref[rows] = True, first[1], tr.ref[rows]
        hit = self._screen(xw, tt, done) if self._gram_worth_it(done) else None
        if hit is not None:
            e = self._from_candidates(xf, tt, hit[0], hit[3], hit[4])
            exact.append(self._shrink(e, xw, tt, hit[5]))
            done[hit[0]], floor[hit[0]], ref[hit[0]] = True, hit[5], hit[3][:, 0]
        rest = (~done).nonzero().squeeze(1)
        mean, record = torch.zeros_like(xf), None
        if rest.numel():
            part = rest.numel() < B
            xr, tr_, ar, br = (v[rest] for v in (xf, tt, a, b)) if part else (xf, tt, a, b)
            record = _Record.empty(rest.numel(), self.n, self.dtype, self.device)
            acc, rest_exact = self._solve(xr, tr_, ar, br, record=record,
                                          reduce=self._worth_reducing(tt, rest))
            if part:
                mean[rest] = acc.mean
            else:
                mean = acc.mean
            for e in rest_exact:
                e.rows = rest[e.rows]
                if e.floor is not None:
                    # Rows the pass found collapsed hand on a floor like the screened ones, so the
                    # next call's floor screen can answer them without a product.
                    floor[e.rows], ref[e.rows] = e.floor, e.index[:, 0]
                    if bool((e.floor > 0).all()):
                        e = self._shrink(e, xw, tt, e.floor)
                exact.append(e)
        self._trail = self._next_trail(xf, xw, tt, exact, hit, rest, record, floor, ref, done)
        return mean, exact

    def _worth_reducing(self, tt: torch.Tensor, rest: torch.Tensor) -> torch.Tensor | None:
        """Of the batch's ``rest`` rows (r,), those the reduced-precision screen is tried on (r,)
        bool, or None (all): not a row whose previous call, at most ``_REDUCED_SKIP_REACH`` back
        along the path, kept more than ``_REDUCED_SKIP_FACTOR`` times ``SCREEN_MAX`` keys (a
        speed rule; see the constants)."""
        tr = self._trail
        if self.reduced_precision is None or tr is None or tr.x.shape[0] != tt.shape[0]:
            return None
        spread = ((tr.kept[rest] > _REDUCED_SKIP_FACTOR * _accuracy.SCREEN_MAX)
                  & (tt[rest] - tr.t[rest] <= _REDUCED_SKIP_REACH))
        return ~spread

    def _next_trail(self, xf: torch.Tensor, xw: torch.Tensor, tt: torch.Tensor, exact: list[_Exact],
                    hit: tuple | None, rest: torch.Tensor, record: _Record | None, floor: torch.Tensor,
                    ref: torch.Tensor, screened: torch.Tensor) -> _Trail:
        """The trail of this call: its candidate means, the floors of the screened rows (B,) with
        the candidates they are measured from (B,), the keys each row of the pass kept (B,), and
        the bound on the inner products each carried row hands on (rows of the Gram screen:
        theirs; rows of the full pass: from their logits, within logit_error_bound / f plus the
        rounding of q; rows of the floor screen: none)."""
        B, dev = xw.shape[0], self.device
        refined = [e for e in exact if e.index is not None]
        k = max([e.index.shape[1] for e in refined], default=1)
        index = torch.zeros(B, k, dtype=torch.long, device=dev)
        weights = torch.zeros(B, k, dtype=WIDE, device=dev)
        mean = torch.zeros_like(xw)
        carried = torch.zeros(B, dtype=torch.bool, device=dev)
        count = torch.zeros(B, dtype=torch.long, device=dev)
        for e in refined:
            r, kk = e.rows, e.index.shape[1]
            index[r, :kk], weights[r, :kk], mean[r], carried[r] = e.index, e.weights, e.mean, True
            count[r] = e.count
        error = torch.zeros(B, dtype=WIDE, device=dev)
        inner_pos = torch.full((B,), -1, dtype=torch.long, device=dev)
        logit_pos = torch.full((B,), -1, dtype=torch.long, device=dev)
        a_rec = torch.zeros(B, dtype=WIDE, device=dev)
        if hit is not None:
            inner_pos[hit[0]] = torch.arange(hit[0].numel(), device=dev)
            error[hit[0]] = hit[2]
        if record is not None:
            _, a_q = self._scaled_query(xf[rest], tt[rest], self.dtype)
            delta = record.slack
            t = tt[rest]
            # q = fl(t (x - t c) / sigma^2): its rounding is relative to ||x - t c|| + t ||c||.
            size = (xw[rest] - t[:, None] * self._center_wide).norm(dim=1) + t * self._center_wide.norm()
            bound = (delta * self._sigma(t).square() / t
                     + ERROR_FACTOR * self._eps * size * self._raw_max)
            logit_pos[rest] = torch.arange(rest.numel(), device=dev)
            error[rest] = torch.where(t > 0, bound, torch.inf)
            a_rec[rest] = a_q.to(WIDE)
            carried[rest] &= t > 0
        inner = None if hit is None else hit[1]
        logits = None if record is None else record.logits
        kept = torch.full((B,), -1, dtype=torch.long, device=dev)
        if record is not None:
            kept[rest] = record.kept
        return _Trail(xw, tt, carried, mean, index, weights, error, inner_pos, inner, logit_pos, logits,
                      a_rec, count, floor, ref, screened, kept)

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
            m, exact = self._solve_screened(xf, tt, a, b)
            dt = self.dtype
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
    """The field of a one-off call: both screens off. No next call can use the carried screen's
    trail (recording the (B, n) logits for it would be pure cost), and no later call amortises
    the reduced-precision screen's half copy of the support: building it took longer than the
    screen saved (n = 20,000, D = 3,072, B = 64 on a 2-core Xeon with AMX: 455 ms a call at
    t = 0.1 and 288 ms at t = 0.5, against 204 and 176 ms for SDPA)."""
    return EmpiricalField(support, sigma_min=sigma_min, chunk_size=chunk_size, screen=False,
                          reduced_precision=False)


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
