r"""The one streaming softmax: an online log-sum-exp over blocks of keys, with accumulators.

Book: Part I, chapter 3 (the streamed closed form and why per-chunk log-sum-exps must not
simply be added).

Every pass of the engine, and every dense kernel mean of the library, is this routine.
For logits l_j (B, n) delivered in blocks, with running maximum M and the sums rescaled by
exp(M_old - M_new) whenever the maximum grows, it returns for the weights
w_j = softmax_j(l_j):

.. math::

    Z = \sum_j e^{l_j - M}, \quad
    \bar v = \sum_j w_j f_j v_j, \quad
    \bar f = \sum_j w_j f_j, \quad
    S = \sum_j w_j^2, \quad
    \bar s = \sum_j w_j s_j,

with values v_j (n, D), optional per-pair factors f_j (B, n) (default 1) and per-key scalars
s_j (n,), plus each row's K largest logits and their indices. The result does not depend on
how the keys are split into blocks, and memory is that of one block.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["Block", "Accumulated", "online_softmax", "kept_softmax", "softmax_mean", "largest", "take_rows",
           "value_product"]

# value_product on the CPU: a product of at most _SPLIT_ROWS rows over more than 2 _SPLIT_KEYS keys
# is summed in batches of _SPLIT_KEYS keys.
_SPLIT_ROWS = 64
_SPLIT_KEYS = 4096
# The longest run of kept pairs that kept_softmax's sparse product sums in one sequence.
RUN = 64
# Keys per group in largest()'s first stage: k groups then hold 16 k keys, few beside n.
_GROUP = 16


@dataclass
class Block:
    """One block of keys: ``logits`` (B, c), consumed (overwritten) by the pass; ``values`` (c, D);
    ``factor`` (B, c) multiplying the weights in the value sum; ``scalars`` (c,); ``start``,
    the index of the block's first key (for the top-K indices)."""

    logits: torch.Tensor
    values: torch.Tensor | None = None
    factor: torch.Tensor | None = None
    scalars: torch.Tensor | None = None
    start: int = 0


@dataclass
class Accumulated:
    """What one pass returns per row: the normalised sums of :func:`online_softmax`."""

    row_max: torch.Tensor                   # (B,) largest logit M
    total: torch.Tensor                     # (B,) normaliser Z = sum_j e^{l_j - M}
    mean: torch.Tensor | None = None        # (B, D) sum_j w_j f_j v_j
    factor_mean: torch.Tensor | None = None  # (B,) sum_j w_j f_j (with a factor)
    square: torch.Tensor | None = None      # (B,) sum_j w_j^2
    scalar: torch.Tensor | None = None      # (B,) sum_j w_j s_j
    top_logits: torch.Tensor | None = None  # (B, K) the K largest logits, descending
    top_index: torch.Tensor | None = None   # (B, K) their key indices


def _rescaled(total: torch.Tensor | None, scale: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    # total * scale + add, in place after the first block (total is None before it).
    return add if total is None else total.mul_(scale).add_(add)


def take_rows(block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``block[rows]`` of a (B, n) block (r, n), in the block's layout. The engine's logits are a
    transposed view of an (n, B) tensor, where indexing rows gathers strided ones (210 ms for 253
    of 256 rows at n = 50,000 on two threads) and selecting columns of the (n, B) tensor reads it
    once (50 ms; 12 ms for 128 rows where indexing took 74)."""
    if not block.is_contiguous() and block.T.is_contiguous():
        return block.T.index_select(1, rows).T
    return block[rows]


def largest(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Each row's ``k`` largest logits, descending, and their indices: (r, k) each, the values
    of ``torch.topk(logits, k, dim=1)``; ``logits`` (r, n), k <= n.

    On a transposed block (an (n, r) tensor viewed as (r, n), the engine's layout) torch.topk
    walks strided rows: 109 ms for k = 8 of (256, 50,000) on two threads, 16 ms at r = 64. There
    it takes two stages: the maximum of each group of ``_GROUP`` consecutive keys (one read along
    the contiguous axis), the k groups with the largest maxima, then the k largest of their keys
    (10.5 ms and 1.9 ms). Exact: a key outside the chosen groups is at most its group's maximum,
    which is at most each of the k chosen maxima, so k keys inside are at least as large; ties may
    be broken differently from torch.topk. Keys past the last whole group are always candidates.
    Part III, chapter 9.
    """
    r, n = logits.shape
    groups = n // _GROUP
    if groups <= k or logits.is_contiguous() or not logits.T.is_contiguous():
        return torch.topk(logits, k, dim=1)
    ends = logits.T[:groups * _GROUP].view(groups, _GROUP, r).amax(dim=1).T      # (r, groups)
    chosen = torch.topk(ends, k, dim=1).indices
    index = (chosen[:, :, None] * _GROUP
             + torch.arange(_GROUP, device=logits.device)).reshape(r, k * _GROUP)
    if groups * _GROUP < n:
        index = torch.cat([index, torch.arange(groups * _GROUP, n, device=logits.device).expand(r, -1)], 1)
    values, at = torch.topk(logits.gather(1, index), k, dim=1)
    return values, index.gather(1, at)


def value_product(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    r"""p @ values, (B, D), for weights ``p`` (B, n) and values (n, D).

    .. math:: \bar v_b = \sum_k \sum_{j \in \text{batch } k} p_{bj} v_j

    On the CPU, for at most ``_SPLIT_ROWS`` rows and more than twice ``_SPLIT_KEYS`` keys, the
    keys are summed in batches of ``_SPLIT_KEYS`` (one ``bmm``, the batches' sums added after,
    and the keys past the last whole batch): MKL's kernel for few rows and a long sum ran 15-25%
    faster so (an AVX2 EPYC, two threads, D = 3,072: 40 ms where one product took 47 for 18 rows
    of 20,000 keys, 145-155 where it took 194 for 24 rows of 50,000), and the shorter sums are
    no less accurate. Any other shape: one product. Part III, chapter 9.
    """
    B, n = p.shape
    if p.device.type != "cpu" or B > _SPLIT_ROWS or n <= 2 * _SPLIT_KEYS:
        return p @ values
    k = n // _SPLIT_KEYS
    whole = k * _SPLIT_KEYS
    head = torch.bmm(p[:, :whole].reshape(B, k, _SPLIT_KEYS).transpose(0, 1),
                     values[:whole].reshape(k, _SPLIT_KEYS, values.shape[1])).sum(dim=0)
    return head.addmm_(p[:, whole:], values[whole:]) if whole < n else head


def online_softmax(blocks: Iterable[Block], squares: bool = False, top_k: int = 0) -> Accumulated:
    r"""Stream ``blocks`` of logits through one online log-sum-exp.

    .. math::

        M \leftarrow \max(M, \max_j l_j), \qquad
        A \leftarrow A\, e^{M_{\rm old} - M} + \sum_{j \in \text{block}} e^{l_j - M} a_j

    for every accumulator A (the normaliser, the value, factor, square and scalar sums), then
    each is divided by the normaliser. Shapes: each block's logits (*T, B, c), values
    (*T, c, D) (leading dimensions *T broadcast as in ``matmul``), factor (*T, B, c), scalars
    (c,); at least one block. With ``squares`` it also returns sum_j w_j^2 (n_eff = 1 / that);
    with ``top_k`` > 0 each row's ``top_k`` largest logits. Differentiable in the logits and
    values when no factor is given. Chapter 3.
    """
    run_max = total = num = fsum = sq = sc = top_v = top_i = None
    for block in blocks:
        p = block.logits
        if top_k:
            k = min(top_k, p.shape[-1])
            v, i = largest(p, k) if p.dim() == 2 else torch.topk(p, k, dim=-1)
            i += block.start
            if top_v is not None:
                merged = torch.cat([top_v, v], -1)
                v, j = torch.topk(merged, min(top_k, merged.shape[-1]), dim=-1)
                i = torch.cat([top_i, i], -1).gather(-1, j)
            top_v, top_i = v, i
        # The maximum is only a shift the softmax does not see: taken without autograd, so the
        # in-place pass below stays differentiable in the logits.
        block_max = p.detach().amax(dim=-1)
        new_max = block_max if run_max is None else torch.maximum(run_max, block_max)
        # exp(M_old - M_new) rescales what was summed so far.
        scale = None if run_max is None else torch.exp(run_max - new_max)
        p.sub_(new_max[..., None]).exp_()                       # e^{l_j - M}
        total = _rescaled(total, scale, p.sum(dim=-1))
        if squares:
            sq = _rescaled(sq, None if scale is None else scale.square(), p.square().sum(dim=-1))
        if block.scalars is not None:
            sc = _rescaled(sc, scale, p @ block.scalars)
        if block.values is not None:
            pw = p if block.factor is None else p.mul_(block.factor)
            if block.factor is not None:
                fsum = _rescaled(fsum, scale, pw.sum(dim=-1))
            if num is None:
                num = value_product(pw, block.values) if pw.dim() == 2 else pw @ block.values
            elif num.dim() == 2:  # the engine's case: one fused multiply-add
                num.mul_(scale[:, None]).addmm_(pw, block.values)
            else:
                num.mul_(scale[..., None]).add_(pw @ block.values)
        run_max = new_max
    if run_max is None:
        raise ValueError("blocks is empty: the softmax needs at least one key")
    return Accumulated(
        row_max=run_max, total=total,
        mean=None if num is None else num.div_(total[..., None]),
        factor_mean=None if fsum is None else fsum.div_(total),
        square=None if sq is None else sq.div_(total.square()),
        scalar=None if sc is None else sc.div_(total),
        top_logits=top_v, top_index=top_i,
    )


def softmax_mean(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    r"""The kernel mean of one dense block: softmax over the last axis, times the values.

    .. math:: m_{b} = \sum_j \operatorname{softmax}_j(l_{bj})\, v_j

    Shapes: ``logits`` (*T, B, n), ``values`` (*T, n, D) (e.g. one support set per task T);
    returns (*T, B, D) in the logits' dtype. The logits are not modified, and autograd
    differentiates through it (the attention head relies on that). For problems whose logits
    the caller has formed; the exact engine (:class:`nwflow.EmpiricalField`) streams large
    ones. Chapter 3.
    """
    if logits.dim() < 2 or values.dim() < 2 or logits.shape[-1] != values.shape[-2]:
        raise ValueError("logits (*T, B, n) and values (*T, n, D) must agree on n, got "
                         f"{tuple(logits.shape)} and {tuple(values.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has no keys (n = 0): the softmax needs at least one")
    return online_softmax([Block(logits.clone(), values.to(logits.dtype))]).mean


def kept_softmax(logits: torch.Tensor, keep: torch.Tensor, values: torch.Tensor,
                 scalars: torch.Tensor | None = None) -> Accumulated:
    r"""The sums of :func:`online_softmax` over each row's own kept keys K_b, as one sparse product.

    .. math::

        M_b = \max_{j \in K_b} l_{bj}, \quad Z_b = \sum_{j \in K_b} e^{l_{bj} - M_b}, \quad
        \bar v_b = \sum_{j \in K_b} w_{bj} v_j, \quad \bar s_b = \sum_{j \in K_b} w_{bj} s_j

    The weights are a CSR matrix with one entry per kept pair, so the value sum costs in
    proportion to the kept pairs rather than to B n (the dense product's cost): where each row
    keeps its own few per cent of the support, the rows share few keys and a product over their
    union would be nearly dense. A sparse product sums each of its rows in order, so a row's
    pairs are split into runs of at most ``RUN`` (one CSR row each) and the runs added after:
    no sum in the working precision is longer than RUN plus the number of runs (a row of 3,872
    CIFAR-10 keys summed in one run was 30 times further from float64 than the dense product).
    Z and the scalar sums are accumulated in float64. Shapes: ``logits`` (B, n), ``keep`` (B, n)
    bool with at least one key per row, ``values`` (n, D), ``scalars`` (n,). Not differentiable.
    Part III, chapter 9.
    """
    B, n = logits.shape
    device, wide = logits.device, torch.float64
    row, col = keep.nonzero(as_tuple=True)       # row-major: the order CSR stores
    picked = logits[row, col]
    row_max = logits.new_full((B,), -torch.inf).scatter_reduce_(0, row, picked, "amax")
    p = picked.sub_(row_max[row]).exp_()
    total = torch.zeros(B, dtype=wide, device=device).index_add_(0, row, p.to(wide))
    count = keep.sum(dim=1)
    runs = (count + RUN - 1) // RUN
    pair = torch.arange(row.numel(), device=device)
    run = (torch.cumsum(runs, 0) - runs)[row] + (pair - (torch.cumsum(count, 0) - count)[row]) // RUN
    crow = torch.zeros(int(runs.sum()) + 1, dtype=row.dtype, device=device)
    torch.cumsum(torch.bincount(run, minlength=crow.numel() - 1), 0, out=crow[1:])
    with warnings.catch_warnings():
        # torch flags CSR tensors as beta on construction; the one product used here is stable.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        weights = torch.sparse_csr_tensor(crow, col, p, size=(crow.numel() - 1, n), check_invariants=False)
    owner = torch.repeat_interleave(torch.arange(B, device=device), runs)
    mean = torch.zeros(B, values.shape[1], dtype=values.dtype, device=device)
    mean.index_add_(0, owner, weights @ values)
    scalar = None
    if scalars is not None:
        spread = p.to(wide) * scalars[col].to(wide)
        scalar = torch.zeros(B, dtype=wide, device=device).index_add_(0, row, spread)
        scalar = scalar.div_(total).to(logits.dtype)
    return Accumulated(row_max=row_max, total=total.to(logits.dtype),
                       mean=mean.div_(total.to(logits.dtype)[:, None]), scalar=scalar)
