"""Per-step diagnostics returned by :meth:`GradBalance.backward` and :func:`gradbalance.backward`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["StepInfo", "gram_diagnostics"]


def gram_diagnostics(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task gradient norms and the cosine matrix, both read off the Gram matrix.

    Args:
        gram: ``(k, k)`` Gram matrix ``M = G G^T`` of the task gradients.

    Returns:
        ``(norms, cosine)``: ``norms[i] = sqrt(M_ii)`` and ``cosine[i, j] = M_ij / (norms_i norms_j)``,
        with ``cosine = 0`` wherever a norm is zero (``cosine[i, i] = 1`` for non-zero gradients).
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cosine = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), 0.0)
    return norms, cosine.clamp(-1.0, 1.0)


@dataclass
class StepInfo:
    """What one balancing step did.

    Attributes:
        weights: ``(k,)`` weights applied to the task gradients on the shared parameters (for
            methods that return an explicit direction, the coefficients of that direction in the
            task gradients when the method reports them, else ``None``); ``None`` on a step
            skipped for a ``GradScaler`` overflow.
        losses: ``(k,)`` detached per-task loss values, unscaled, after the static
            ``task_weights``; with ``accumulation="exact"``, summed over the calls of the
            current accumulation window.
        grad_norms: ``(k,)`` norms of the per-task gradients the method saw (on the shared
            parameters, or on the features in representation mode); ``None`` for methods that
            need no per-task gradients (computing them would cost k backward passes).
        cosine: ``(k, k)`` cosine similarities of those gradients, or ``None`` as above.
        engine: which path produced the gradients: ``"loop"`` or ``"batched"`` (task gradients
            on the shared parameters; ``" (fallback: ...)"`` is appended when ops without a
            ``vmap`` batching rule ran per task inside the batched call, and the engine reads
            ``"loop (compiled graph)"`` when the batched engine met a ``torch.compile`` graph;
            details in ``extras``: ``vmap_fallback``, ``engine_note``, ``chunk_size``; a method's
            ``shared_subset`` also reports ``"loop"``), ``"representation"`` (task gradients on
            ``features``), ``"gram"`` (``engine="gram"``: the Gram matrix only, then one weighted
            backward), ``"losses"`` (no per-task gradients: one weighted backward), ``"reused"``
            (``recompute_every > 1``: the last computed weights, one weighted backward),
            ``"fsdp"`` (FSDP2: one backward per task on the sharded parameters), or ``"skipped"``
            when a ``GradScaler`` overflow made the step a no-op (the reason is in
            ``extras["non_finite"]``).
        task_names: the task names, in the order of ``weights``.
        extras: method-specific values (solver status, number of projections, ...). With
            ``recompute_every > 1``, ``extras["reused"]`` is ``1`` on a reused step and ``0`` on
            a computing step (the same convention as Nash-MTL's own ``update_every``); under
            ``torch.distributed``, ``"distributed"`` (the strategy) and ``"comm_bytes"``.
        head_weights: ``(k,)`` weights applied to the task gradients on the task-specific
            parameters (the heads: every parameter outside ``shared_params``) when they differ
            from ``weights`` by the method's rule, e.g. Nash-MTL's unclipped ``a_i`` (``weights``
            holds the clipped ones), MGDA's and UPGrad's ones, DB-MTL's ``1 / L_i``, and all ones
            for a method that returns only a direction. ``None`` when the heads got exactly
            ``weights`` (every loss-weighting method, and any method while the wrapper does not
            know the shared parameters, so every parameter gets ``weights``), and on a skipped
            step. What the heads got is therefore always
            ``info.weights if info.head_weights is None else info.head_weights``
            (:meth:`effective_head_weights`).

    Example:
        >>> import torch, gradbalance as gb
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> info = gb.backward({"a": w.sum() ** 2, "b": (w[0] - 2) ** 2}, [w], method="mean")
        >>> info.task_names, info.engine
        (('a', 'b'), 'losses')
        >>> info.weights
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> info.to_dict()
        {'engine': 'losses', 'loss/a': 0.0, 'weight/a': 0.5, 'loss/b': 1.0, 'weight/b': 0.5}
    """

    weights: Tensor | None
    losses: Tensor
    grad_norms: Tensor | None
    cosine: Tensor | None
    engine: str
    task_names: tuple[str, ...]
    extras: dict[str, Any] = field(default_factory=dict)
    head_weights: Tensor | None = None

    def effective_head_weights(self) -> Tensor | None:
        """The ``(k,)`` weights the heads' gradients were scaled by: ``head_weights`` when set,
        else ``weights`` (``None`` only on a skipped step, or for a method that reports neither)."""
        return self.head_weights if self.head_weights is not None else self.weights

    def to_dict(self, cosines: Literal["summary", "matrix"] = "summary") -> dict[str, float | str]:
        """Flatten into ``{name: scalar}`` for loggers (TensorBoard, W&B, CSV).

        Keys: ``weight/<task>``, ``head_weight/<task>`` (only when :attr:`head_weights` is set),
        ``loss/<task>``, ``grad_norm/<task>``, ``cosine/mean`` and ``cosine/min`` (over distinct
        pairs), ``conflicts`` (pairs with negative cosine), ``engine``, and every scalar in
        ``extras`` as ``extras/<key>``.

        Args:
            cosines: ``"summary"`` (default): the cosine keys above only. ``"matrix"``: also
                every distinct pair, ``cosine/<task i>/<task j>`` for ``i < j`` in task order
                (the matrix is symmetric with ones on the diagonal, so this is all of it).

        Raises:
            ValueError: ``cosines`` is neither ``"summary"`` nor ``"matrix"``.
        """
        if cosines not in ("summary", "matrix"):
            raise ValueError(f"cosines must be 'summary' or 'matrix', got {cosines!r}")
        out: dict[str, float | str] = {"engine": self.engine}
        for i, name in enumerate(self.task_names):
            out[f"loss/{name}"] = float(self.losses[i])
            if self.weights is not None:
                out[f"weight/{name}"] = float(self.weights[i])
            if self.head_weights is not None:
                out[f"head_weight/{name}"] = float(self.head_weights[i])
            if self.grad_norms is not None:
                out[f"grad_norm/{name}"] = float(self.grad_norms[i])
        k = len(self.task_names)
        if self.cosine is not None and k > 1:
            iu = torch.triu_indices(k, k, offset=1)
            pairs = self.cosine[iu[0], iu[1]]
            out["cosine/mean"] = float(pairs.mean())
            out["cosine/min"] = float(pairs.min())
            out["conflicts"] = float((pairs < 0).sum())
            if cosines == "matrix":
                names = self.task_names
                for i, j, c in zip(iu[0].tolist(), iu[1].tolist(), pairs.tolist()):
                    out[f"cosine/{names[i]}/{names[j]}"] = float(c)
        for key, value in self.extras.items():
            if isinstance(value, (int, float, bool, str)):
                out[f"extras/{key}"] = value if isinstance(value, str) else float(value)
            elif isinstance(value, Tensor) and value.numel() == 1:
                out[f"extras/{key}"] = float(value)
        return out
