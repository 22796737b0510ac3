"""Paths "representation" and "subset": task gradients on something small, then one backward.

* representation (``method.mode == "representation"``, e.g. MGDA-UB): the task gradients on the
  shared representation ``z`` (``features=``), through the heads only;
* subset (a method whose ``shared_subset`` is a strict subset of the shared parameters, e.g.
  GradNorm's last shared layer): the task gradients on that subset, by the loop.

Top to bottom: (1) the small task gradients, each loss must reach them; (2) unscale;
(3) rank-average (representation: the sum of the ranks' Grams ``/ R^2`` is the global batch's
Gram, since the rows of ``z`` are samples; subset: average ``[G_subset | losses]``);
(4) the window: representation sums the micro-batches' Grams (different samples are different
rows of the concatenated ``z``), subset sums the gradients (same coordinates); (5) the method's
weights (a direction cannot be applied here); (6) the gradients of ``sum_i w_i L_i`` on every
parameter (and the heads' own weights): in representation mode, when every parameter reached
through ``z`` is shared and none is reached both through and around it
(:attr:`jacobian.FeaturePasses.direct`), from the head passes and one backward through the trunk
only (:func:`jacobian.finish_through_features`: the heads are not run again); otherwise one
weighted backward of the losses; (7) average over the ranks; (8) NaN/inf check; (9) add to
``.grad``. As on the losses path, earlier calls of the window are not re-weighted.
"""

from __future__ import annotations

from torch import Tensor

from gradbalance import jacobian
from gradbalance.methods.base import Aggregation
from gradbalance.paths.context import StepContext, StepResult
from gradbalance.paths.grads import GradWrite, check_finite_grads, checked_gram, reweight_heads

__all__ = ["representation_step", "subset_step", "weighted_write"]


def _require_features(ctx: StepContext) -> Tensor:
    if ctx.features is None:
        raise ValueError(
            f"{ctx.label} runs in representation mode: pass the shared representation as "
            "opt.backward(losses, features=z)"
        )
    return ctx.features


def _check_reached(ctx: StepContext, reached: list[bool] | None, what: str) -> None:
    for name, ok in zip(ctx.names, reached or []):
        if not ok:
            raise ValueError(f"loss {name!r} does not depend on {what}")


def weighted_write(ctx: StepContext, agg: Aggregation, passes: jacobian.FeaturePasses | None = None) -> GradWrite:
    """Steps (6)-(9): the gradients of the weighted losses (from ``passes`` when they allow it,
    else one backward of the weighted losses), averaged, checked."""
    if agg.weights is None:
        raise ValueError(f"{ctx.label} returns a direction, which needs mode='exact'")
    hw = agg.head_weights
    if passes is not None and passes.direct:
        done, grads = jacobian.finish_through_features(passes, agg.weights, hw)
        found = {id(p): g for p, g in zip(done, grads)}
        out: list[Tensor | None] = [found.get(id(p)) for p in ctx.params]
    else:
        out = jacobian.weighted_gradients(ctx.values, agg.weights, ctx.params, retain_graph=hw is not None)
        if hw is not None and ctx.shared is not None:
            out = reweight_heads(ctx.values, ctx.params, out, ctx.shared, hw)
    out = ctx.reducer.mean_present(out, ctx.params)
    check_finite_grads(out, ctx.names)
    return GradWrite(ctx.params, out)


def representation_step(ctx: StepContext) -> StepResult:
    """Task gradients on ``features``; the method sees their Gram matrix."""
    features = _require_features(ctx)
    passes = jacobian.feature_passes(ctx.values, features, ctx.params, ctx.shared or ())
    grads, reached = passes.grads, passes.reached
    _check_reached(ctx, reached, "the features")
    grads = ctx.scaling.unscale(grads)
    gram, call = ctx.reducer.feature_gram(grads, ctx.call, ctx.method)
    losses = ctx.total(call)
    gram = ctx.window.add_gram(checked_gram(gram, ctx.names))
    agg = ctx.aggregate(losses, gram=gram, grads=grads)
    write = weighted_write(ctx, agg, passes)
    return StepResult(
        aggregation=agg, losses=losses, engine="representation", write=write,
        window=ctx.window.extended(losses, agg, gram=gram), gram=gram,
        weights_changed=ctx.window.weights_changed(write_weights(agg)),
    )


def subset_step(ctx: StepContext, subset: list[Tensor]) -> StepResult:
    """Task gradients on ``subset`` (the loop); the method sees the window's summed ones."""
    tg = jacobian.task_gradients(ctx.values, subset, engine="loop", retain_graph=True)
    _check_reached(ctx, tg.reached, "the chosen shared parameters")
    grads, call = ctx.reducer.mean_rows(ctx.scaling.unscale(tg.shared), ctx.call)
    losses = ctx.total(call)
    grads = ctx.window.add_grads(grads)  # same coordinates in every micro-batch: sum them
    gram = checked_gram((grads @ grads.T).double(), ctx.names)
    agg = ctx.aggregate(losses, gram=gram, grads=grads)
    write = weighted_write(ctx, agg)
    return StepResult(
        aggregation=agg, losses=losses, engine="loop", write=write,
        window=ctx.window.extended(losses, agg, grads=grads), gram=gram,
        weights_changed=ctx.window.weights_changed(write_weights(agg)),
    )


def write_weights(agg: Aggregation) -> Tensor:
    assert agg.weights is not None  # checked by weighted_write
    return agg.weights
