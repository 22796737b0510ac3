"""Paths "exact" and "buffered": every task's gradient on every shared parameter.

* exact: methods with ``requires="gram"``/``"grads"`` in ``mode="exact"`` whose ``shared_subset``
  is all the shared parameters (MGDA, PCGrad, CAGrad, Nash-MTL, ...), any accumulation;
* buffered (``accumulation="buffered"``): every other method too (loss-only, representation,
  subset), so that the window keeps the per-task gradients of every parameter and is exact.

Top to bottom: (1) the engine (``"batched"`` checks the graph first; a batched call that raises is rerun
with the loop, and the balancer switches to the loop if the call succeeds);
(2) every loss must reach a shared parameter; (3) unscale; (4) share across ranks (allreduce:
average ``[G | losses]``; reduce_scatter: keep ``P/R`` columns; local_gram/single: nothing);
(5) add the window's task gradients (shared and heads); (6) the Gram matrix the method sees
(exact: of the kept gradients, summed over the ranks for reduce_scatter/local_gram; buffered:
of the features' gradients or of the subset's columns); (7) the method; (8) the shared direction
``w @ G`` (or the method's own direction; reduce_scatter all-gathers it); (9) the heads'
combination; (10) averaged over the ranks, then checked for NaN/inf (the Gram check of (6)
saw the shared parameters only); (11) scaled back and *rewritten*: the window's
previous contribution to ``.grad`` is replaced, so ``n`` calls give the update of one big batch.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from gradbalance import jacobian
from gradbalance.inputs import check_reach
from gradbalance.methods.base import Aggregation
from gradbalance.paths.context import StepContext, StepResult
from gradbalance.paths.grads import GradWrite, check_finite_grads, checked_gram, columns, combine_heads
from gradbalance.paths.window import HeadGrads

__all__ = ["buffered_step", "exact_step"]

# (context, window's task gradients, this call's losses) -> (gram, window losses, gram to keep)
GramRule = Callable[[StepContext, Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]


def _exact_gram(ctx: StepContext, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    gram, call = ctx.reducer.exact_gram(grads, call)
    losses = ctx.total(call)
    return checked_gram(gram, ctx.names), losses, None


def _task_gradients(ctx: StepContext, shared: list[Tensor], heads: list[Tensor]):
    """Steps (1)-(2): the task gradients. If the batched engine raises (an op vmap cannot run at
    all, as opposed to one it runs per task and records), this call reruns with the loop."""
    engine, blind, failed = ctx.engine, False, ""
    if engine == "batched":  # the loop reports reach itself; the batched call cannot tell
        blind = check_reach(ctx.names, ctx.values, shared, walk_is_blind=ctx.walk_is_blind)
    try:
        tg = jacobian.task_gradients(ctx.values, shared, heads, engine=engine, features=ctx.features,
                                     chunk_size=ctx.chunk_size)
    except RuntimeError as err:
        if engine != "batched":
            raise
        failed = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        tg = jacobian.task_gradients(ctx.values, shared, heads, engine="loop")
        tg.note = f"batched failed: {failed}"
    for name, ok in zip(ctx.names, tg.reached or []):
        if not ok:
            raise ValueError(f"loss {name!r} does not reach any shared parameter; check shared_params")
    return tg, blind, failed


def _run(ctx: StepContext, gram_rule: GramRule) -> StepResult:
    shared = ctx.shared
    assert shared is not None  # the balancer infers it before choosing this path
    heads = ctx.heads(shared)
    tg, blind, failed = _task_gradients(ctx, shared, heads)
    grads = ctx.scaling.unscale(tg.shared)
    head_grads: HeadGrads = ctx.scaling.unscale_rows(tg.heads)
    width = grads.shape[1]
    grads, call = ctx.reducer.share_task_grads(grads, ctx.call)
    grads = ctx.window.add_grads(grads)
    head_grads = ctx.window.add_heads(head_grads)
    gram, losses, kept_gram = gram_rule(ctx, grads, call)
    agg = ctx.aggregate(losses, gram=gram, grads=grads)
    direction = _direction(ctx, agg, grads)
    direction = ctx.reducer.gather_direction(direction, width)
    hw = agg.head_weights if agg.head_weights is not None else agg.weights
    new: list[Tensor | None] = list(jacobian.unflatten(direction, shared))
    head_out = combine_heads(head_grads, hw, len(heads))
    new, head_out = ctx.reducer.finish(new, head_out, shared, heads)
    if not ctx.reducer.distributed:
        new = _leave_unreached(new, tg.touched, ctx.window.written)
    if any(g is not None for g in head_out):  # the Gram check saw the shared part only (rank-averaged)
        check_finite_grads(head_out, ctx.names)
    contribution = ctx.scaling.rescale(new + head_out)
    engine, engine_extras = jacobian.describe(tg)
    return StepResult(
        aggregation=agg, losses=losses, engine=engine,
        write=GradWrite(shared + heads, contribution, replaces=ctx.window.written, rewrite=True),
        window=ctx.window.extended(losses, agg, grads=grads, heads=head_grads, written=contribution,
                                   gram=kept_gram),
        gram=gram, walk_is_blind=blind, batched_failed=failed, extras=dict(engine_extras),
    )


def _leave_unreached(new: list[Tensor | None], touched: list[bool] | None,
                     written: list[Tensor | None] | None) -> list[Tensor | None]:
    """No gradient for a shared parameter that no loss of the window reaches, as a plain
    ``loss.backward()`` leaves its ``.grad`` alone (so an optimizer skips it: no weight decay, no
    momentum step). Single process only: under distributed training another rank may reach it,
    and every rank writes the same (zero) gradient."""
    if touched is None:
        return new
    return [g if touched[j] or (written is not None and written[j] is not None) else None
            for j, g in enumerate(new)]


def _direction(ctx: StepContext, agg: Aggregation, grads: Tensor) -> Tensor:
    if agg.direction is not None:
        ctx.reducer.check_direction(ctx.label)
        return agg.direction.to(grads.dtype)
    assert agg.weights is not None  # ctx.aggregate refuses neither
    return agg.weights.to(grads.dtype) @ grads


def exact_step(ctx: StepContext) -> StepResult:
    """The method sees the Gram matrix (or the gradients) of the window's task gradients."""
    return _run(ctx, _exact_gram)


def buffered_step(ctx: StepContext, subset: list[Tensor] | None) -> StepResult:
    """``accumulation="buffered"``: the exact path's window, with the Gram matrix the method's
    mode asks for (single process only; the balancer refuses it under ``distributed``)."""
    if ctx.method.mode == "representation":
        return _run(ctx, _feature_gram_rule(ctx))
    if subset is not None:
        return _run(ctx, _subset_gram_rule(subset))
    return _run(ctx, _exact_gram)


def _feature_gram_rule(ctx: StepContext) -> GramRule:
    if ctx.method.requires == "grads":
        raise ValueError(f"accumulation='buffered' supports representation-mode methods that "
                         f"need the Gram matrix only, not {ctx.label}")
    if ctx.features is None:
        raise ValueError(
            f"{ctx.label} runs in representation mode: pass the shared representation as "
            "opt.backward(losses, features=z)"
        )
    feature_grads, _ = jacobian.feature_gradients(ctx.values, ctx.features)  # keeps the graph

    def rule(ctx: StepContext, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        losses = ctx.total(call)
        part = ctx.scaling.unscale(feature_grads.double())
        gram = ctx.window.add_gram(part @ part.T)  # micro-batches hold disjoint rows of z
        return checked_gram(gram, ctx.names), losses, gram

    return rule


def _subset_gram_rule(subset: list[Tensor]) -> GramRule:
    def rule(ctx: StepContext, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        losses = ctx.total(call)
        assert ctx.shared is not None
        part = grads[:, columns(ctx.shared, subset)]  # already summed over the window
        return checked_gram((part @ part.T).double(), ctx.names), losses, None

    return rule
