"""Path "gram" (``engine="gram"``, or ``"auto"`` when the ``k x P`` matrix would not fit): the
method's Gram matrix without ever forming the task gradients, then one weighted backward.

For methods with ``requires="gram"`` in ``mode="exact"`` on every shared parameter, single
process only. Top to bottom: (1) every loss reaches a shared parameter (graph walk);
(2) :func:`gradbalance.gram.gram_matrix` (unscaled by the GradScaler's factor squared);
(3) the method's weights (a direction cannot be applied: it needs the gradients);
(4) one backward of ``sum_i w_i L_i`` on every parameter (the heads' own weights by a second);
(5) NaN/inf check; (6) add to ``.grad``. The window keeps only the losses: a second call in an
``accumulation="exact"`` window is sent to the exact path by the balancer (and the Gram engine
switched off), since exactness needs the cross terms between the calls' gradients. If the Gram
engine raises (an op vmap cannot run), the call takes the exact path and the balancer switches
the Gram engine off for good once the call succeeds.
"""

from __future__ import annotations

from dataclasses import replace

from gradbalance import gram as gram_mod
from gradbalance.inputs import check_reach
from gradbalance.paths.context import StepContext, StepResult
from gradbalance.paths.exact import exact_step
from gradbalance.paths.grads import checked_gram
from gradbalance.paths.subset import weighted_write

__all__ = ["gram_step"]


def gram_step(ctx: StepContext) -> StepResult:
    shared = ctx.shared
    assert shared is not None  # the balancer infers it before choosing this path
    blind = check_reach(ctx.names, ctx.values, shared, walk_is_blind=ctx.walk_is_blind)
    try:
        result = gram_mod.gram_matrix(ctx.values, shared, features=ctx.features)
    except RuntimeError as err:  # an op vmap cannot run (e.g. a custom Function leaving torch)
        # nothing was written and the graph is intact: this call takes the exact path
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return replace(exact_step(ctx), gram_failed=reason)
    gram = checked_gram(ctx.scaling.unscale_gram(result.gram), ctx.names)
    losses = ctx.total(ctx.call)
    agg = ctx.aggregate(losses, gram=gram)
    if agg.weights is None:
        raise ValueError(f"{ctx.label} returned a direction, which engine='gram' cannot apply; use engine='loop'")
    return StepResult(
        aggregation=agg, losses=losses, engine="gram", write=weighted_write(ctx, agg),
        window=ctx.window.extended(losses, agg), gram=gram, walk_is_blind=blind,
    )
