"""Per-task gradients: the only module of gradbalance that talks to autograd.

Three ways to get the ``k`` task gradients ``g_i = dL_i/dtheta`` on the shared parameters:

* ``"loop"``: ``k`` calls of :func:`torch.autograd.grad` with ``retain_graph=True``, each of
  which also yields that task's gradients on the task-specific parameters.
* ``"batched"``: one call of :func:`torch.autograd.grad` with ``is_grads_batched=True`` (chunked
  by ``chunk_size`` tasks). Given the shared representation ``z`` (``features=``), the task
  gradients ``dL_i/dz`` are first taken through the heads only (cheap), and then a single
  batched vector-Jacobian product pushes all of them through the trunk; without features the
  batched call pushes ``eye(k)`` through the stacked losses. PyTorch runs ``is_grads_batched``
  on its legacy vmap, which lacks batching rules for some backward ops (cross-entropy, GELU,
  LayerNorm, ...) and then silently loops per task inside the call. We turn those silent
  fallbacks into a recorded one: the result of that call is still exact, but the engine
  reports ``fallback`` and the caller switches to the loop.
* representation gradients ``dL_i/dz`` alone (MGDA-UB and the other representation modes).

Everything stays on the parameters' device and dtype; nothing here synchronises with the host.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TaskGradients",
    "backward_passes",
    "feature_gradients",
    "flatten",
    "graph_leaves",
    "reached_parameters",
    "task_gradients",
    "weighted_gradients",
]


@dataclass
class TaskGradients:
    """Per-task gradients of one step.

    Attributes:
        shared: ``(k, P)`` task gradients on the shared parameters, flattened in parameter order
            (zeros where a task does not reach a parameter).
        heads: ``heads[i][j]`` is task ``i``'s gradient on task-specific parameter ``j``, or
            ``None`` when task ``i`` does not reach it.
        reached: per task, whether it reached any shared parameter; ``None`` where the path
            cannot tell without a host synchronisation (the caller checks the graph instead).
        engine: the path that ran (``"loop"`` or ``"batched"``).
        fallback: the ops that lacked a batching rule (empty when none did).
    """

    shared: Tensor
    heads: list[list[Tensor | None]]
    reached: list[bool] | None
    engine: str
    fallback: tuple[str, ...] = ()


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate flattened tensors, zero-filling ``None`` with the shape of ``like``."""
    return torch.cat(
        [
            (t if t is not None else torch.zeros_like(p)).reshape(-1)
            for t, p in zip(tensors, like)
        ]
    )


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, offset = [], 0
    for p in like:
        n = p.numel()
        out.append(vector[offset : offset + n].view_as(p))
        offset += n
    return out


def graph_leaves(losses: Sequence[Tensor]) -> list[Tensor]:
    """Every leaf tensor requiring grad that the graphs of ``losses`` reach, in first-seen
    order (a walk over ``grad_fn.next_functions``; nothing is computed)."""
    found: dict[int, Tensor] = {}
    for loss in losses:
        if loss.grad_fn is None and loss.requires_grad:
            found.setdefault(id(loss), loss)
    stack = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            found.setdefault(id(variable), variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return list(found.values())


def reached_parameters(loss: Tensor, params: Sequence[Tensor]) -> list[bool]:
    """Which of ``params`` the autograd graph of ``loss`` reaches."""
    leaves = {id(t) for t in graph_leaves([loss])}
    return [id(p) in leaves for p in params]


def _loop(
    losses: Sequence[Tensor], shared: Sequence[Tensor], heads: Sequence[Tensor], retain_graph: bool
) -> TaskGradients:
    params = list(shared) + list(heads)
    head_grads, reached = [], []
    n, k = len(shared), len(losses)
    if n == 0:
        raise ValueError("no shared parameters: the loop engine needs at least one")
    # Each task's gradients are copied once, straight into their row of a preallocated (k, P)
    # matrix (``cat(out=row)``): no per-task flat vector and no final ``stack``, so the extra
    # memory is the matrix plus one task's gradients, and one copy of each gradient.
    dtype = shared[0].dtype
    for p in shared[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    matrix = torch.empty(k, sum(p.numel() for p in shared), dtype=dtype, device=shared[0].device)
    for i, loss in enumerate(losses):
        keep = retain_graph or i < k - 1
        grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
        reached.append(any(g is not None for g in grads[:n]))
        torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads[:n], shared)],
            out=matrix[i],
        )
        head_grads.append(list(grads[n:]))
        del grads
    return TaskGradients(matrix, head_grads, reached, "loop")


def _batched_grad(
    outputs: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, chunk_size: int | None
) -> tuple[list[Tensor], list[bool], tuple[str, ...]]:
    """``is_grads_batched`` VJPs of ``outputs`` for every row of ``cotangents``, chunked.

    Returns the per-input ``(k, *shape)`` gradients, whether each input was reached, and the
    names of the ops for which the legacy vmap had to fall back to a per-task loop.
    """
    k = cotangents.shape[0]
    step = k if chunk_size is None else chunk_size
    pieces: list[list[Tensor | None]] = []
    fallback: list[str] = []
    previous = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for start in range(0, k, step):
                pieces.append(
                    list(
                        torch.autograd.grad(
                            outputs,
                            inputs,
                            grad_outputs=cotangents[start : start + step],
                            retain_graph=True,
                            allow_unused=True,
                            is_grads_batched=True,
                        )
                    )
                )
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(previous)
    for w in caught:
        text = str(w.message)
        if "batching rule" in text:
            op = text.split("batching rule for ")[-1].split(".")[0]
            if op not in fallback:
                fallback.append(op)
        else:  # not ours: re-emit
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    grads, reached = [], []
    for j, p in enumerate(inputs):
        parts = [chunk[j] for chunk in pieces]
        reached.append(any(part is not None for part in parts))
        sizes = [min(step, k - s) for s in range(0, k, step)]
        parts = [
            part if part is not None else p.new_zeros((size, *p.shape))
            for part, size in zip(parts, sizes)
        ]
        grads.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return grads, reached, tuple(fallback)


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    heads: Sequence[Tensor] = (),
    *,
    engine: str = "loop",
    features: Tensor | None = None,
    chunk_size: int | None = None,
    retain_graph: bool = False,
) -> TaskGradients:
    """Per-task gradients on the shared parameters (flattened) and on the task-specific ones.

    Args:
        losses: ``k`` scalar losses.
        shared: the shared parameters; their per-task gradients form the ``(k, P)`` matrix.
        heads: task-specific parameters; each task's gradient on them is returned per task.
        engine: ``"loop"`` or ``"batched"`` (see the module docstring).
        features: the shared representation ``z`` that every head reads; with ``"batched"`` the
            trunk is traversed once by a batched VJP from ``z``.
        chunk_size: at most this many tasks per batched call (bounds memory at
            ``chunk_size x P``); ``None`` for all at once.
        retain_graph: keep the graph after the last pass (the loop frees it otherwise).

    Returns:
        :class:`TaskGradients`.
    """
    if engine == "loop":
        return _loop(losses, shared, heads, retain_graph)
    if engine != "batched":
        raise ValueError(f"engine must be 'loop' or 'batched', got {engine!r}")
    k = len(losses)
    if features is None:
        stacked = torch.stack(list(losses))
        eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
        params = list(shared) + list(heads)
        grads, reached_p, fallback = _batched_grad(stacked, params, eye, chunk_size)
        n = len(shared)
        matrix = torch.cat([g.reshape(k, -1) for g in grads[:n]], dim=1)
        reached = None if any(reached_p[:n]) else [False] * k
        head_grads = [
            [grads[n + j][i] if reached_p[n + j] else None for j in range(len(heads))]
            for i in range(k)
        ]
        return TaskGradients(matrix, head_grads, reached, "batched", fallback)
    # Through the heads one task at a time (cheap), then one batched VJP through the trunk.
    gz, head_grads, on_z = [], [], []
    for loss in losses:
        grads = torch.autograd.grad(loss, [features, *heads], retain_graph=True, allow_unused=True)
        on_z.append(grads[0] is not None)
        gz.append(grads[0] if grads[0] is not None else torch.zeros_like(features))
        head_grads.append(list(grads[1:]))
    missing = [i for i, ok in enumerate(on_z) if not ok]
    if missing:
        raise ValueError(
            f"loss(es) {missing} do not depend on `features`: pass the representation tensor the "
            "heads actually read (with torch.compile of the whole model the returned features are "
            "a separate output; compile trunk and heads separately, or omit features=)"
        )
    grads, reached_p, fallback = _batched_grad(features, shared, torch.stack(gz), chunk_size)
    matrix = torch.cat([g.reshape(k, -1) for g in grads], dim=1)
    reached = [True] * k if any(reached_p) else [False] * k
    return TaskGradients(matrix, head_grads, reached, "batched", fallback)


def feature_gradients(losses: Sequence[Tensor], features: Tensor) -> tuple[Tensor, list[bool]]:
    """``(k, numel(z))`` gradients of each loss with respect to the representation ``z``.

    The passes run through the heads only, so they cost far less than gradients on the trunk.
    Returns the matrix and, per task, whether the loss depends on ``features`` at all.
    """
    rows, reached = [], []
    for loss in losses:
        (g,) = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
        reached.append(g is not None)
        rows.append((g if g is not None else torch.zeros_like(features)).reshape(-1))
    return torch.stack(rows), reached


def weighted_gradients(
    losses: Sequence[Tensor], weights: Tensor, params: Sequence[Tensor], retain_graph: bool = False
) -> list[Tensor | None]:
    """Gradients of ``sum_i weights[i] * losses[i]`` on ``params`` (one ordinary backward)."""
    total = torch.stack(list(losses)).mul(weights.to(losses[0].dtype)).sum()
    return list(
        torch.autograd.grad(total, list(params), retain_graph=retain_graph, allow_unused=True)
    )


def backward_passes(losses: Sequence[Tensor], params: Sequence[Tensor]) -> list[list[Tensor | None]]:
    """The ``.grad`` each of ``losses`` leaves on ``params``, by ordinary ``backward()`` passes.

    For FSDP2, whose sharded parameters :func:`torch.autograd.grad` cannot reach: each pass runs
    FSDP's hooks (so its gradients arrive reduce-scattered). The graph is kept until the last pass;
    the ``.grad`` that were there before are put back untouched.
    """
    params = list(params)
    saved = [p.grad for p in params]
    out: list[list[Tensor | None]] = []
    try:
        for p in params:
            p.grad = None
        for i, loss in enumerate(losses):
            loss.backward(retain_graph=i < len(losses) - 1)
            out.append([p.grad for p in params])
            for p in params:
                p.grad = None
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return out
