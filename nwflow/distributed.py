r"""The closed-form field of a support sharded over torch.distributed ranks.

Each rank holds one shard X_r of the support; the queries (x, t) are the same on every rank.
The softmax over the whole support is the combination of the ranks' streamed passes, the
online log-sum-exp of :mod:`nwflow._stream` taken once more across ranks:

.. math::

    M = \max_r M_r, \qquad Z = \sum_r Z_r e^{M_r - M}, \qquad
    m = \frac{1}{Z} \sum_r Z_r e^{M_r - M} m_r,

one all-reduce of the maxima (MAX) and one of the rescaled sums (SUM). Everything else is
:class:`nwflow.EmpiricalField`'s: every rank uses one common centre c and the whole support's
bounds in the logit error estimate, each row's candidates are the best of all ranks', the
exact float64 refinement receives its candidate points from the ranks that hold them, and a
float64 pass is the ranks' float64 passes combined, so every accuracy decision is taken on the
same combined numbers on every rank and all ranks take the same branches. The result equals one
field over the concatenated support to the same tolerance.

Transport is torch.distributed's own (gloo on CPU, NCCL on CUDA). A dead peer ends a call with
torch.distributed's error after the process group's ``timeout`` (set it when initialising, e.g.
``init_process_group("gloo", timeout=datetime.timedelta(seconds=60))``), not a hang. Run with
``torchrun --nproc_per_node=2 script.py`` (see ``benchmarks/sharded.py``). Planned Part III
(performance) of the book.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nwflow import _accuracy
from nwflow._checks import (
    check_optional_positive_int,
    check_positive_int,
    check_sigma_min,
    check_support_layout,
)
from nwflow._precision import DEFAULT_CHUNK_BYTES, WIDE
from nwflow._stream import Accumulated
from nwflow.empirical import EmpiricalField

__all__ = ["ShardedField"]


class ShardedField(EmpiricalField):
    r"""The field of a support split over the ranks of a process group.

    .. math:: u(x, t) = \frac{m(x, t) - (1 - \sigma_{\min}) x}{\sigma_t}, \quad
        m(x, t) = \sum_{r} \sum_{j \in X_r} w_j(x, t)\, x^{(j)}

    ``ShardedField(local_support, group=None, sigma_min=0.0, chunk_size=None)``: ``local_support``
    (n_r, *S), this rank's shard (shards may differ in size, not in trailing shape, dtype, device
    type or ``sigma_min``: a mismatch raises a ValueError on every rank naming the ranks).
    ``velocity``, ``posterior_mean``, ``score`` (B, *S) and ``effective_neighbours`` (B,) take
    the same ``x`` (B, *S) and ``t`` on every rank and return the whole support's result on every
    rank; all ranks must make the same calls in the same order (they are collective).
    ``posterior_weights`` over a sharded support is not provided. The online log-sum-exp it
    extends across ranks: chapter 3 (its performance: planned Part III).
    """

    _local = False  # the carried screen and the covered-first pass need the whole support: not across ranks

    def __init__(self, local_support: torch.Tensor, group: dist.ProcessGroup | None = None,
                 sigma_min: float = 0.0, chunk_size: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedField needs an initialised torch.distributed process group: call "
                               "torch.distributed.init_process_group('gloo' or 'nccl', ...) on every rank")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        meta = None
        try:
            check_support_layout(local_support, "local_support")
            check_optional_positive_int(chunk_size, "chunk_size")
            check_positive_int(chunk_bytes, "chunk_bytes")
            meta = {"trailing shape": tuple(local_support.shape[1:]), "dtype": str(local_support.dtype),
                    "sigma_min": check_sigma_min(sigma_min), "device type": local_support.device.type}
            error = None
        except (TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._agree(error, meta)
        counts = self._all_objects(len(local_support))
        self._offset, self._n_total = sum(counts[:self.rank]), sum(counts)
        try:  # the local checks of the values (NaN, overflow) must fail on every rank alike
            super().__init__(local_support, sigma_min, chunk_size, chunk_bytes)
            error = None
        except ValueError as exc:
            error = f"ValueError: {exc}"
        self._agree(error, None)
        # The whole support's bounds, for the logit error estimate every rank applies alike.
        bounds = torch.tensor([self._centred_max2, self._raw_max], dtype=WIDE, device=self.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
        self._centred_max2, self._raw_max = float(bounds[0]), float(bounds[1])

    def _all_objects(self, obj: object) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _agree(self, error: str | None, meta: dict | None) -> None:
        """Raise the same ValueError on every rank when any rank's shard is faulty or the shards
        disagree on their layout."""
        reports = self._all_objects((error, meta))
        faults = [f"rank {r}: {e}" for r, (e, _) in enumerate(reports) if e is not None]
        if faults:
            raise ValueError("ShardedField: " + "; ".join(faults))
        metas = [m for _, m in reports]
        for key in metas[0] or {}:
            if len({repr(m[key]) for m in metas}) > 1:
                values = ", ".join(f"rank {r}: {m[key]}" for r, m in enumerate(metas))
                raise ValueError(f"ShardedField: the shards disagree on their {key} ({values})")

    @property
    def n(self) -> int:
        """Number of support points over all ranks."""
        return self._n_total

    def _sample_moments(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The shards' sample sums added up, so that every rank picks the same centre."""
        total, squares, count = super()._sample_moments()
        sums = torch.cat([total, squares[None], torch.tensor([count], dtype=WIDE, device=self.device)])
        dist.all_reduce(sums, group=self.group)
        return sums[:-2], sums[-2], int(sums[-1])

    def _combine(self, acc: Accumulated) -> Accumulated:
        """The ranks' passes as one: maxima by MAX, rescaled sums by SUM, candidates by gathering."""
        if acc.row_max.numel() == 0:  # an empty batch is empty on every rank: nothing to combine
            return acc
        row_max = acc.row_max.to(WIDE)
        top = row_max.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        weight = acc.total.to(WIDE) * torch.exp(row_max - top)             # Z_r e^{M_r - M}
        parts = {"total": weight}
        for name in ("mean", "factor_mean", "scalar"):
            value = getattr(acc, name)
            if value is not None:
                parts[name] = value.to(WIDE) * (weight[:, None] if value.dim() == 2 else weight)
        if acc.square is not None:
            parts["square"] = acc.square.to(WIDE) * weight.square()
        widths = [p.shape[1] if p.dim() == 2 else 1 for p in parts.values()]
        flat = torch.cat([p.reshape(len(weight), w) for p, w in zip(parts.values(), widths, strict=True)], 1)
        dist.all_reduce(flat, group=self.group)
        split = flat.split(widths, dim=1)
        sums = {name: part.reshape(p.shape) for (name, p), part in zip(parts.items(), split, strict=True)}
        total = sums["total"]
        out = {name: (sums[name] / (total[:, None] if sums[name].dim() == 2 else total)).to(self.dtype)
               for name in ("mean", "factor_mean", "scalar") if name in sums}
        if "square" in sums:
            out["square"] = (sums["square"] / total.square()).to(self.dtype)
        top_logits, top_index = self._best_candidates(acc)
        return Accumulated(row_max=top.to(self.dtype), total=total.to(self.dtype), top_logits=top_logits,
                           top_index=top_index, **out)

    def _best_candidates(self, acc: Accumulated) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Each row's K largest logits over all ranks, with their global support indices."""
        if acc.top_logits is None:
            return None, None
        B, K = acc.top_logits.shape[0], _accuracy.CANDIDATES
        logits = torch.full((B, K), -torch.inf, dtype=acc.top_logits.dtype, device=self.device)
        index = torch.zeros((B, K), dtype=torch.long, device=self.device)
        logits[:, :acc.top_logits.shape[1]] = acc.top_logits
        index[:, :acc.top_index.shape[1]] = acc.top_index + self._offset
        all_logits = [torch.empty_like(logits) for _ in range(self.world_size)]
        all_index = [torch.empty_like(index) for _ in range(self.world_size)]
        dist.all_gather(all_logits, logits, group=self.group)
        dist.all_gather(all_index, index, group=self.group)
        # Padding (-inf) sorts last, and at most min(K, n) entries are kept: never chosen.
        best, j = torch.topk(torch.cat(all_logits, 1), min(K, self._n_total), dim=1)
        return best, torch.cat(all_index, 1).gather(1, j)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Support points of the global (r, k) indices, from the ranks that hold them."""
        local = index - self._offset
        mine = (local >= 0) & (local < len(self.support))
        out = torch.zeros(*index.shape, self.support.shape[1], dtype=WIDE, device=self.device)
        out[mine] = self.support[local[mine]].to(WIDE)
        dist.all_reduce(out, group=self.group)
        return out

    def posterior_weights(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Not provided for a sharded support (a (B, n) block over all ranks)."""
        raise NotImplementedError("ShardedField does not form (B, n) posterior weights over the ranks: use "
                                  "effective_neighbours, or an EmpiricalField over a gathered support")
