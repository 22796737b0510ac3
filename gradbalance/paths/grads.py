"""Small pure helpers the step paths share: Gram checks, head combinations, and ``.grad`` writes.

Nothing here keeps state. :class:`GradWrite` is the one object that changes ``.grad``: a path
builds it and the balancer applies it as the last act of a successful call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradbalance import distributed as distributed_mod
from gradbalance import jacobian
from gradbalance.errors import NonFiniteError

__all__ = ["GradWrite", "check_finite_grads", "checked_gram", "clip_shared", "columns", "combine_heads",
           "reweight_heads"]


def checked_gram(gram: Tensor, names: Sequence[str]) -> Tensor:
    """``gram`` itself, after checking that every task's squared norm is finite."""
    finite = torch.isfinite(gram.diagonal())
    if not bool(finite.all()):
        bad = [names[i] for i in range(len(names)) if not bool(finite[i])]
        raise NonFiniteError(
            f"the gradient of task(s) {bad} contains NaN or inf; check those losses for "
            "log/sqrt/division at 0 or lower the learning rate (with scaler=, the step is skipped)"
        )
    return gram


def check_finite_grads(grads: Sequence[Tensor | None], names: Sequence[str], reducer_sum=None) -> None:
    """Raise :class:`~gradbalance.NonFiniteError` when the combined gradient has NaN or inf.

    ``reducer_sum``: under FSDP, a function summing a 1-element tensor over the ranks, so that
    every rank raises together.
    """
    present = [distributed_mod.local(g) for g in grads if g is not None]
    if not present:
        raise ValueError("the losses reach none of the optimizer's parameters")
    total = _finite_probe(present)
    if reducer_sum is not None:
        total = reducer_sum(total.reshape(1))
    if not bool(torch.isfinite(total).all()):
        raise NonFiniteError(
            f"the combined gradient of tasks {list(names)} contains NaN or inf; check the losses "
            "for log/sqrt/division at 0 or lower the learning rate (with scaler=, the step is skipped)"
        )


def _finite_probe(grads: list[Tensor]) -> Tensor:
    """One number that is NaN or inf exactly when some entry of ``grads`` is.

    On an accelerator: the largest absolute entry, by ``torch._foreach_norm(., inf)`` (fused
    multi-tensor kernels, a few launches for all the parameters; a maximum cannot overflow). On
    CPU, where ``_foreach_norm`` runs one slow norm per tensor (measured on the 0.79 M-parameter
    benchmark MLP's gradients, one thread: 2.98 ms for the inf-norm, 1.98 ms for the 1-norm), the
    plain sum of each tensor (0.18-0.38 ms), accumulated in float32 (float64 for float64
    gradients, so that half precision cannot overflow at 65504): a NaN propagates through a sum,
    inf - inf is NaN, and only finite entries summing past ~3e38, which no usable gradient does,
    could raise a false alarm."""
    foreach = getattr(torch, "_foreach_norm", None)
    first = grads[0]
    if foreach is not None and first.device.type != "cpu" and all(
            g.device == first.device and g.dtype == first.dtype for g in grads):
        return torch.stack(foreach(grads, float("inf"))).sum()
    return torch.stack([g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32).double()
                        for g in grads]).sum()


def clip_shared(
    values: Sequence[Tensor], params: Sequence[Tensor], grads: list[Tensor | None], shared: Sequence[Tensor] | None,
    max_norm: float, scale: float, sum_across: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[Tensor | None], dict[str, float]]:
    """``Aggregation.max_norm``: ``clip_grad_norm_`` of this call's shared gradients.

    The shared parameters are ``shared`` when known, else those reached by two or more losses
    (inferred here without being stored). ``scale``: the GradScaler's factor (the norm compared
    with ``max_norm`` is the unscaled one). ``sum_across`` (FSDP): sums a tensor over the ranks,
    which each hold a shard of a sharded parameter's gradient and the whole (already averaged)
    gradient of an unsharded one. Returns the gradients and ``{"update_norm", "clip"}``.
    """
    if shared is None:
        hits = [jacobian.reached_parameters(v, params) for v in values]
        shared = [p for j, p in enumerate(params) if sum(h[j] for h in hits) >= min(2, len(values))]
    ids = {id(p) for p in shared}
    idx = [j for j, p in enumerate(params) if id(p) in ids and grads[j] is not None]
    if sum_across is not None:
        sharded = [j for j in idx if distributed_mod.is_sharded(params[j])]
        first = grads[idx[0]] if idx else None
        device = distributed_mod.local(first if first is not None else params[0]).device
        sq = torch.zeros(1, dtype=torch.float64, device=device)
        for j in sharded:
            sq += distributed_mod.local(_present(grads[j])).double().pow(2).sum()
        sq = sum_across(sq)  # a collective: every rank calls it
        for j in idx:
            if j not in sharded:
                sq += _present(grads[j]).double().pow(2).sum()
        norm = float(sq.sqrt()) / scale
    elif not idx:
        return grads, {}
    else:
        norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(_present(grads[j])) for j in idx]))) / scale
    factor = min(1.0, float(max_norm) / (norm + 1e-6))
    if factor < 1.0:
        grads = list(grads)
        for j in idx:
            grads[j] = _present(grads[j]) * factor
    return grads, {"update_norm": norm * factor, "clip": factor}


def _present(g: Tensor | None) -> Tensor:
    assert g is not None  # only indices of present gradients are passed
    return g


def columns(shared: Sequence[Tensor], subset: Sequence[Tensor]) -> Tensor:
    """The columns of the flattened ``(k, P)`` task gradients that belong to ``subset``."""
    wanted, cols, start = {id(p) for p in subset}, [], 0
    for p in shared:
        if id(p) in wanted:
            cols.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(cols)


def combine_heads(head_grads: list[list[Tensor | None]], weights: Tensor | None,
                  n_heads: int) -> list[Tensor | None]:
    """Per head parameter ``j``: ``sum_i weights[i] * head_grads[i][j]`` over the tasks reaching it
    (``weights=None``: plain sum)."""
    out: list[Tensor | None] = []
    for j in range(n_heads):
        total = None
        for i, row in enumerate(head_grads):
            g = row[j]
            if g is None:
                continue
            term = g if weights is None else g * weights[i].to(g.dtype)
            total = term if total is None else total + term
        out.append(total)
    return out


def reweight_heads(values: Sequence[Tensor], params: Sequence[Tensor], grads: list[Tensor | None],
                   shared: Sequence[Tensor], head_weights: Tensor) -> list[Tensor | None]:
    """Replace the task-specific parameters' gradients by those of ``sum_i head_weights[i] L_i``."""
    shared_ids = {id(p) for p in shared}
    idx = [j for j, p in enumerate(params) if id(p) not in shared_ids]
    if not idx:
        return grads
    hg = jacobian.weighted_gradients(values, head_weights, [params[j] for j in idx])
    out = list(grads)
    for j, g in zip(idx, hg):
        out[j] = g
    return out


@dataclass
class GradWrite:
    """What one call adds to ``.grad``.

    Attributes:
        params: the parameters written.
        grads: the gradient added to each (``None``: nothing).
        replaces: exact accumulation: what the window wrote before for each parameter, taken
            back out (``None``: a plain add, as ``loss.backward()`` does).
        rewrite: ``True`` on the exact paths: ``grads`` is kept by the window as its
            ``written``, so a fresh ``.grad`` is a copy, never the kept tensor itself.
    """

    params: list[Tensor]
    grads: list[Tensor | None]
    replaces: list[Tensor | None] | None = None
    rewrite: bool = False

    def apply(self) -> None:
        if not self.rewrite:
            for p, g in zip(self.params, self.grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach()  # a fresh tensor from autograd.grad: no copy needed
                else:
                    p.grad.add_(g)
            return
        for j, (p, g) in enumerate(zip(self.params, self.grads)):
            old = None if self.replaces is None else self.replaces[j]
            if g is None and old is None:
                continue
            if p.grad is None:
                p.grad = (g if g is not None else torch.zeros_like(p)).detach().clone()
                if old is not None:
                    p.grad.sub_(old)
                continue
            if old is not None:
                p.grad.sub_(old)
            if g is not None:
                p.grad.add_(g)
