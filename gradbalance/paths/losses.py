"""Path "losses" (and "reused"): weights from the losses and the method's state only.

Runs for methods with ``requires="losses"`` (any accumulation but ``"buffered"``), and for every
method on the steps where ``recompute_every > 1`` reuses the last weights. One ordinary backward
of ``sum_i w_i L_i`` (two when the heads have their own weights), whatever ``k`` is.

Top to bottom: (1) every loss reaches a shared parameter (a graph walk, every call; when the
shared parameters are inferred, which loss-only methods never need, nothing is checked);
(2) ``losses`` = window totals after this call (rank-averaged); (3) the method's weights (or the
reused ones); (4) the weighted backward; (5) the heads' own weights; (6) average the gradients
over the ranks; (7) NaN/inf check; (7b) the method's ``max_norm`` clip of the shared gradients
(FAMO's official code); (8) the write: added to ``.grad`` like ``loss.backward()``.
The window keeps only the loss totals: earlier calls are not re-weighted (exact when the weights
do not change within the window; otherwise the balancer warns once).
"""

from __future__ import annotations

from gradbalance import jacobian
from gradbalance.inputs import check_reach
from gradbalance.methods.base import Aggregation
from gradbalance.paths.context import StepContext, StepResult
from gradbalance.paths.grads import GradWrite, check_finite_grads, clip_shared, reweight_heads

__all__ = ["losses_step"]


def losses_step(ctx: StepContext, reused: Aggregation | None = None) -> StepResult:
    """One weighted backward; ``reused``: the cached weights of the last computing step."""
    blind = False
    if ctx.shared:  # an explicitly empty shared set (no sharing) has nothing to reach
        blind = check_reach(ctx.names, ctx.values, ctx.shared, walk_is_blind=ctx.walk_is_blind)
    losses = ctx.total(ctx.reducer.mean(ctx.call))
    agg = reused if reused is not None else ctx.aggregate(losses)
    weights = agg.weights
    assert weights is not None  # requires="losses" methods and the reuse cache hold weights
    reweight = agg.head_weights is not None and ctx.shared is not None
    grads = jacobian.weighted_gradients(ctx.values, weights, ctx.params, retain_graph=reweight)
    if reweight and agg.head_weights is not None and ctx.shared is not None:
        grads = reweight_heads(ctx.values, ctx.params, grads, ctx.shared, agg.head_weights)
    grads = ctx.reducer.mean_present(grads, ctx.params)  # autograd.grad fired no DDP hook
    check_finite_grads(grads, ctx.names)
    extras: dict[str, float] = {} if reused is None else {"reused": 1}
    if agg.max_norm is not None:  # the method asks for the official code's clip (FAMO)
        grads, clipped = clip_shared(ctx.values, ctx.params, grads, ctx.shared, agg.max_norm, ctx.scaling.factor)
        extras.update(clipped)
    return StepResult(
        aggregation=agg,
        losses=losses,
        engine="losses" if reused is None else "reused",
        write=GradWrite(ctx.params, grads),
        window=ctx.window.extended(losses, agg, commit=reused is None),
        walk_is_blind=blind,
        weights_changed=ctx.window.weights_changed(weights),
        extras=extras,
    )
