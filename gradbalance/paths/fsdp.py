"""Path "fsdp": FSDP2 (``fully_shard``), where ``autograd.grad`` cannot reach the sharded parameters.

Loss-only methods: one ordinary backward of ``sum_i w_i L_i`` (FSDP reduce-scatters it), two when
the heads have their own weights. Gram-based methods: ``k`` ordinary backward passes (FSDP
reduce-scatters each), every task's *local shard* kept, and the shards' ``k x k`` Grams summed over
the ranks (their sum is the exact Gram of the global gradients); the direction is combined shard
by shard. Methods that need the full gradients (``requires="grads"``) or ``features=`` raise.
The window works as on the exact path (task gradients summed, ``.grad`` rewritten).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradbalance import distributed as distributed_mod
from gradbalance import jacobian
from gradbalance.paths.context import StepContext, StepResult
from gradbalance.paths.grads import GradWrite, check_finite_grads, checked_gram, clip_shared, combine_heads

__all__ = ["fsdp_step"]


def _sync(ctx: StepContext) -> distributed_mod.Sync:
    sync = getattr(ctx.reducer, "sync", None)
    assert isinstance(sync, distributed_mod.Sync)  # the balancer picks this path under FSDP only
    return sync


def _mean_unsharded(ctx: StepContext, grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
    """Average the gradients of the parameters that FSDP does not manage."""
    idx = [j for j, p in enumerate(params) if not distributed_mod.is_sharded(p)]
    if not idx:
        return grads
    out = list(grads)
    reduced = ctx.reducer.mean_present([grads[j] for j in idx], [params[j] for j in idx])
    for j, g in zip(idx, reduced):
        out[j] = g
    return out


def fsdp_step(ctx: StepContext) -> StepResult:
    method = ctx.method
    ctx.reducer.flush()  # the call checkpoint, before FSDP's own collectives in the backward passes
    if method.requires == "grads" or method.mode == "representation":
        what = "the full task gradients" if method.requires == "grads" else "features="
        raise ValueError(
            f"{ctx.label} needs {what}, which FSDP does not provide (parameters are sharded); "
            "under FSDP use a method with requires='gram' or 'losses', or use DDP"
        )
    if method.requires == "losses":
        return _losses(ctx)
    return _gram(ctx)


def _losses(ctx: StepContext) -> StepResult:
    params, values = ctx.params, ctx.values
    losses = ctx.total(ctx.reducer.mean(ctx.call))
    agg = ctx.aggregate(losses)
    assert agg.weights is not None
    if agg.max_norm is not None and ctx.shared is None:
        raise ValueError(f"{ctx.label} clips the shared gradient (max_norm): under FSDP pass "
                         "shared_params explicitly (they cannot be inferred), or max_norm=None")
    totals = [torch.stack(values).mul(agg.weights.to(values[0].dtype)).sum()]
    if agg.head_weights is not None:
        totals.append(torch.stack(values).mul(agg.head_weights.to(values[0].dtype)).sum())
    passes = jacobian.backward_passes(totals, params)
    grads = passes[0]
    if len(passes) > 1:  # the heads' own weights: from the second pass
        ids = {id(p) for p in (ctx.shared or params)}
        grads = [g if id(p) in ids else h for p, g, h in zip(params, grads, passes[1])]
    grads = _mean_unsharded(ctx, grads, params)
    check_finite_grads(grads, ctx.names)
    extras: dict[str, float] = {}
    if agg.max_norm is not None:
        grads, extras = clip_shared(values, params, grads, ctx.shared, agg.max_norm, ctx.scaling.factor,
                                    sum_across=_sync(ctx).sum_)
    return StepResult(
        aggregation=agg, losses=losses, engine="losses", write=GradWrite(params, grads),
        window=ctx.window.extended(losses, agg), weights_changed=ctx.window.weights_changed(agg.weights),
        extras=extras,
    )


def _gram(ctx: StepContext) -> StepResult:
    sync, names, k = _sync(ctx), ctx.names, len(ctx.names)
    if ctx.shared is None:
        raise ValueError(
            "under FSDP pass shared_params explicitly: the autograd graph holds unsharded "
            "copies of the parameters, so they cannot be inferred from it"
        )
    shared = ctx.shared
    if not all(distributed_mod.is_sharded(p) for p in shared):
        raise ValueError("under FSDP every shared parameter must be sharded by fully_shard")
    heads = ctx.heads(shared)
    n = len(shared)
    passes = jacobian.backward_passes(ctx.values, shared + heads)
    local = distributed_mod.local
    shards = [local(p) for p in shared]
    rows, head_grads = [], []
    for name, task in zip(names, passes):
        if all(g is None for g in task[:n]):
            raise ValueError(f"loss {name!r} does not reach any shared parameter; check shared_params")
        rows.append(jacobian.flatten([None if g is None else local(g) for g in task[:n]], shards))
        head_grads.append([None if g is None else local(g) for g in task[n:]])
    grads = ctx.window.add_grads(ctx.scaling.unscale(torch.stack(rows)))
    head_grads = ctx.window.add_heads(ctx.scaling.unscale_rows(head_grads))
    subset_ids = {id(p) for p in ctx.method.shared_subset(shared)}
    cols, offset = [], 0
    for p, shard in zip(shared, shards):
        size = shard.numel()
        if id(p) in subset_ids:
            cols.append(grads[:, offset : offset + size])
        offset += size
    sub = torch.cat(cols, dim=1) if len(cols) < n else grads
    buf = sync.sum_(torch.cat([(sub @ sub.T).double().reshape(-1), ctx.call]))
    gram = checked_gram(buf[: k * k].view(k, k), names)
    losses = ctx.total(buf[k * k :] / sync.world)
    agg = ctx.aggregate(losses, gram=gram)
    if agg.weights is None:
        raise ValueError(f"{ctx.label} returned a direction, which FSDP cannot apply")
    like = distributed_mod.like_param
    direction = agg.weights.to(grads.dtype) @ grads
    new: list[Tensor | None] = [like(g, p) for g, p in zip(jacobian.unflatten(direction, shards), shared)]
    hw = agg.head_weights if agg.head_weights is not None else agg.weights
    combined = combine_heads(head_grads, hw, len(heads))
    head_out = [None if g is None else like(g, p) for g, p in zip(combined, heads)]
    head_out = _mean_unsharded(ctx, head_out, heads)
    contribution = ctx.scaling.rescale(new + head_out)
    return StepResult(
        aggregation=agg, losses=losses, engine="fsdp",
        write=GradWrite(shared + heads, contribution, replaces=ctx.window.written, rewrite=True),
        window=ctx.window.extended(losses, agg, grads=grads, heads=head_grads, written=contribution),
        gram=gram,
    )
