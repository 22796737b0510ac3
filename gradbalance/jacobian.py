"""Per-task gradients: the only module of gradbalance that talks to autograd.

Three ways to get the ``k`` task gradients ``g_i = dL_i/dtheta`` on the shared parameters:

* ``"loop"``: ``k`` calls of :func:`torch.autograd.grad` with ``retain_graph=True``, each of
  which also yields that task's gradients on the task-specific parameters.
* ``"batched"``: :func:`torch.func.vmap` over :func:`torch.autograd.grad` on the graph the
  user's forward already built (no second forward, no ``functional_call``), in chunks of
  ``chunk_size`` tasks. Given the shared representation ``z`` (``features=``), the task
  gradients ``dL_i/dz`` are first taken through the heads only (cheap), then one batched
  vector-Jacobian product pushes them all through the trunk; without features the batched
  call pushes ``eye(k)`` through the stacked losses (which also runs every head ``k`` times).
  ``torch.func.vmap`` has batching rules for the backward of convolution, batch norm, pooling,
  layer norm, GELU/SiLU, embedding, ...; an op without one (e.g. the CPU flash-attention
  backward) is run one task at a time by functorch for that op only, and the rest stays
  batched: the engine records those ops in :attr:`TaskGradients.fallback`. A graph built by
  ``torch.compile`` cannot be vmapped (PyTorch refuses to call a compiled backward inside
  ``vmap``): it is detected before anything runs and the loop is used instead
  (:attr:`TaskGradients.note`).
* representation gradients ``dL_i/dz`` alone (MGDA-UB and the other representation modes).

A shared parameter that a loss reaches other than through ``z`` (a shared layer applied after
``z``, a shared scale, a weight tied between the trunk and a head) gets its whole gradient in
both engines: the batched engine collects, in the head passes, each task's gradient on the
shared parameters used after ``z``; if such a parameter is also used before ``z`` (tied), the
head passes would run the whole trunk, so the batched call starts from the stacked losses.

Everything stays on the parameters' device and dtype; nothing here synchronises with the host
(except ``chunk_size="auto"`` on CUDA, which reads the allocator's counters once per step).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AUTO_CHUNK_FRACTION",
    "AUTO_CHUNK_MAX",
    "TaskGradients",
    "auto_chunk",
    "backward_passes",
    "compiled_graph",
    "describe",
    "FeaturePasses",
    "feature_gradients",
    "feature_passes",
    "finish_through_features",
    "flatten",
    "graph_leaves",
    "memory_budget",
    "reached_parameters",
    "task_gradients",
    "weighted_gradients",
]

#: Share of the device's free memory that ``chunk_size="auto"`` lets one batched call use.
AUTO_CHUNK_FRACTION = 0.5

#: Most tasks ``chunk_size="auto"`` puts in one batched call, whatever the memory allows. Measured
#: on an H200 (benchmarks/results/gpu.md, exact MGDA, x a plain step): 10 tasks in one call beat
#: the loop on a ResNet-18 (5.67x vs 6.45x) and a ViT (5.19x vs 5.40x), while 40 in one call lost
#: to it on the ResNet-18 (33.1x vs 24.0x, with 10x the plain step's memory against 1.2x).
AUTO_CHUNK_MAX = 10


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
        fallback: the ops that lacked a ``vmap`` batching rule and were run one task at a time
            inside the batched call (empty when none did; the result is exact either way).
        note: why the engine differs from the one asked for, or took a detour (``""`` if not):
            ``"compiled graph"`` (loop instead of batched) or ``"shared parameter after
            features"`` (batched from the stacked losses instead of from ``features``).
        chunk: tasks per batched call that ran (``None`` for the loop).
        touched: per shared parameter, whether autograd gave any task a gradient for it
            (``False``: no loss reaches it, and its column of ``shared`` is zeros); ``None``
            where unknown.
    """

    shared: Tensor
    heads: list[list[Tensor | None]]
    reached: list[bool] | None
    engine: str
    fallback: tuple[str, ...] = ()
    note: str = ""
    chunk: int | None = None
    touched: list[bool] | None = None


def describe(tg: TaskGradients) -> tuple[str, dict[str, object]]:
    """The ``StepInfo.engine`` label of ``tg`` and the extras that go with it.

    The label is the engine that ran, followed in brackets by the ops that ``vmap`` ran per task
    (``"batched (fallback: op, ...)"``) and by :attr:`TaskGradients.note`; the extras hold the
    same facts as separate keys (``vmap_fallback``, ``engine_note``, ``chunk_size``).
    """
    parts: list[str] = []
    extras: dict[str, object] = {}
    if tg.fallback:
        parts.append(f"fallback: {', '.join(tg.fallback)}")
        extras["vmap_fallback"] = ", ".join(tg.fallback)
    if tg.note:
        parts.append(tg.note)
        extras["engine_note"] = tg.note
    if tg.chunk is not None:
        extras["chunk_size"] = tg.chunk
    return tg.engine + (f" ({'; '.join(parts)})" if parts else ""), extras


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


def _nodes(roots: Sequence[Tensor], stop: Tensor | None = None) -> Iterator[object]:
    """Every autograd node reachable from ``roots``, not going past ``stop``'s node."""
    barrier = None if stop is None else stop.grad_fn
    stack: list = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or (barrier is not None and fn is barrier):
            continue
        seen.add(fn)
        yield fn
        stack.extend(next_fn for next_fn, _ in fn.next_functions)


def graph_leaves(losses: Sequence[Tensor], stop: Tensor | None = None) -> list[Tensor]:
    """Every leaf tensor requiring grad that the graphs of ``losses`` reach, in first-seen
    order (a walk over ``grad_fn.next_functions``; nothing is computed).

    Args:
        losses: the roots of the walk.
        stop: a tensor whose node the walk does not go past (the leaves reached only through
            ``stop`` are left out); ``None`` to walk everything.
    """
    found: dict[int, Tensor] = {}
    for loss in losses:
        if loss.grad_fn is None and loss.requires_grad and loss is not stop:
            found.setdefault(id(loss), loss)
    for fn in _nodes(losses, stop):
        variable = getattr(fn, "variable", None)
        if variable is not None and variable is not stop:
            found.setdefault(id(variable), variable)
    return list(found.values())


def compiled_graph(roots: Sequence[Tensor], stop: Tensor | None = None) -> bool:
    """Whether the autograd graph of ``roots`` holds a ``torch.compile`` backward, which
    ``torch.func.vmap`` refuses to run (a walk over the graph; nothing is computed)."""
    return any(type(fn).__name__ == "CompiledFunctionBackward" for fn in _nodes(roots, stop))


def reached_parameters(loss: Tensor, params: Sequence[Tensor]) -> list[bool]:
    """Which of ``params`` the autograd graph of ``loss`` reaches."""
    leaves = {id(t) for t in graph_leaves([loss])}
    return [id(p) in leaves for p in params]


def _loop(
    losses: Sequence[Tensor], shared: Sequence[Tensor], heads: Sequence[Tensor], retain_graph: bool
) -> TaskGradients:
    params = list(shared) + list(heads)
    head_grads: list[list[Tensor | None]] = []
    reached: list[bool] = []
    k = len(losses)
    n = len(shared)
    if n == 0:
        raise ValueError("no shared parameters: the loop engine needs at least one")
    # Each task's gradients are copied once, straight into their row of a preallocated (k, P)
    # matrix (``cat(out=row)``): no per-task flat vector and no final ``stack``, so the extra
    # memory is the matrix plus one task's gradients, and one copy of each gradient.
    matrix = _matrix(k, shared)
    touched = [False] * n
    for i, loss in enumerate(losses):
        keep = retain_graph or i < k - 1
        grads = torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)
        reached.append(any(g is not None for g in grads[:n]))
        touched = [t or g is not None for t, g in zip(touched, grads[:n])]
        torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads[:n], shared)],
            out=matrix[i],
        )
        head_grads.append(list(grads[n:]))
        del grads
    return TaskGradients(matrix, head_grads, reached, "loop", touched=touched)


def _matrix(k: int, shared: Sequence[Tensor]) -> Tensor:
    """An empty ``(k, P)`` matrix in the promoted dtype of ``shared``, on their device."""
    dtype = shared[0].dtype
    for p in shared[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.empty(k, sum(p.numel() for p in shared), dtype=dtype, device=shared[0].device)


# ---------------------------------------------------------------------------- chunk_size="auto"
def auto_chunk(k: int, per_task_bytes: float, budget_bytes: float | None) -> int:
    """The largest number of tasks per batched call whose memory fits the budget.

    ``min(k, AUTO_CHUNK_MAX, floor(budget / per_task))``, at least 1 (one task at a time always
    runs: that is the loop's own memory); ``min(k, AUTO_CHUNK_MAX)`` when the budget is unknown
    (``None``) or a task costs nothing. The cap: :data:`AUTO_CHUNK_MAX`.
    """
    most = min(k, AUTO_CHUNK_MAX)
    if budget_bytes is None or per_task_bytes <= 0:
        return most
    return max(1, min(most, int(budget_bytes // per_task_bytes)))


def memory_budget(device: torch.device, fraction: float = AUTO_CHUNK_FRACTION) -> float | None:
    """Bytes one batched call may use: ``fraction`` of the memory free on ``device``.

    CUDA: the device's free memory (:func:`torch.cuda.mem_get_info`) plus what PyTorch's caching
    allocator holds reserved but unused. CPU: the physical memory the OS reports available
    (``os.sysconf("SC_AVPHYS_PAGES")``). ``None`` where it cannot be read (other devices).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return fraction * float(free + cached)
    if device.type == "cpu":
        try:
            return fraction * float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return None
    return None


def _cpu_task_bytes(inputs: Sequence[Tensor], cotangent: Tensor) -> float:
    """CPU estimate of one task's memory in a batched call (no allocator counters there): its
    gradient on ``inputs`` twice (the result and the copy into the matrix) plus its cotangent
    four times (the activation gradients in flight, measured at that size on MLP trunks)."""
    size = sum(p.numel() * p.element_size() for p in inputs)
    return 2.0 * size + 4.0 * cotangent.numel() * cotangent.element_size()


# ---------------------------------------------------------------------------- batched VJPs
def _fallback_op(message: str) -> str | None:
    """The op named by functorch's "no batching rule" warning, else ``None``."""
    marker = "batching rule for "
    if marker not in message:
        return None
    op = message.split(marker, 1)[1].split(". ", 1)[0].rstrip(".").strip()
    return op[len("aten::"):] if op.startswith("aten::") else op


def _vmap_vjp(outputs: Tensor, inputs: Sequence[Tensor], cotangents: Tensor, fallback: list[str]):
    """``vmap`` over ``autograd.grad(outputs, inputs, v)`` for the rows ``v`` of ``cotangents``.

    Returns the per-input ``(c, *shape)`` gradients (zeros where ``outputs`` does not reach an
    input) and, per input, whether it was reached; appends to ``fallback`` the ops functorch ran
    one row at a time (its "performance drop" warning, caught here and not re-emitted).
    """
    reached: list[bool] = []

    def vjp(v: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outputs, inputs, v, retain_graph=True, allow_unused=True)
        reached[:] = [g is not None for g in grads]  # the function runs once per call
        return tuple(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, inputs))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads = torch.func.vmap(vjp)(cotangents)
    for w in caught:
        op = _fallback_op(str(w.message))
        if op is None:  # not ours: re-emit
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif op not in fallback:
            fallback.append(op)
    return list(grads), reached


def _can_probe(device: torch.device) -> bool:
    """Whether the allocator of ``device`` counts its peak (CUDA), so a chunk can be measured."""
    return device.type == "cuda"


def _peak_probe(device: torch.device) -> tuple[int, int]:
    """What is allocated on ``device`` now, and the allocator's peak so far."""
    return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)


def _probed_bytes(device: torch.device, before: tuple[int, int]) -> tuple[float, bool]:
    """Bytes a batched call that just ran needed above what was allocated before it, from the
    allocator's peak counter, and whether that figure is exact. The peak is not reset (that
    would disturb the user's own measurements): if the call did not raise it, its own peak is
    at most the earlier one, which is taken instead (an upper bound, ``False``)."""
    allocated, peak_before = before
    peak = torch.cuda.max_memory_allocated(device)
    return float(max(peak, peak_before) - allocated), peak > peak_before


#: One task's measured bytes in a batched call, per (device, shapes) signature: a cache of
#: exact probes, so that later steps need no probe and a stale allocator peak cannot mislead.
_TASK_BYTES: dict[tuple, float] = {}


def _signature(device: torch.device, inputs: Sequence[Tensor], cotangents: Tensor) -> tuple:
    return (str(device), cotangents.dtype, tuple(cotangents.shape[1:]), tuple(tuple(p.shape) for p in inputs))


def _batched_rows(
    outputs: Tensor,
    shared: Sequence[Tensor],
    extra: Sequence[Tensor],
    cotangents: Tensor,
    chunk_size: int | str | None,
) -> tuple[Tensor, list[Tensor], list[bool], tuple[str, ...], int]:
    """Batched VJPs of ``outputs`` for every row of ``cotangents``, chunked.

    The gradients on ``shared`` are written into a preallocated ``(k, P)`` matrix chunk by chunk
    (no ``k x P`` temporary); those on ``extra`` (head parameters) are returned per parameter as
    ``(k, *shape)``. Returns the matrix, the extra gradients, per input (shared then extra)
    whether it was reached, the fallback ops, and the chunk size used.
    """
    k = cotangents.shape[0]
    inputs = list(shared) + list(extra)
    n = len(shared)
    matrix = _matrix(k, shared)
    fallback: list[str] = []
    reached = [False] * len(inputs)
    extra_parts: list[list[Tensor]] = [[] for _ in extra]
    device = shared[0].device
    start, step = 0, k if chunk_size is None else chunk_size
    probing = False
    if chunk_size == "auto":
        known = _TASK_BYTES.get(_signature(device, inputs, cotangents)) if _can_probe(device) else None
        if known is not None:
            step = auto_chunk(k, known, memory_budget(device))
        elif _can_probe(device):
            probing, step = True, 1  # one task first, measured; the rest in the largest chunks that fit
        else:
            step = auto_chunk(k, _cpu_task_bytes(inputs, cotangents[0]), memory_budget(device))
    used = int(step)
    while start < k:
        stop = min(k, start + int(step))
        probe = _peak_probe(device) if probing and start == 0 else None
        grads, hit = _vmap_vjp(outputs, inputs, cotangents[start:stop], fallback)
        reached = [a or b for a, b in zip(reached, hit)]
        torch.cat([g.reshape(stop - start, -1) for g in grads[:n]], dim=1, out=matrix[start:stop])
        for j, g in enumerate(grads[n:]):
            extra_parts[j].append(g)
        del grads
        if probe is not None:
            spent, exact = _probed_bytes(device, probe)
            per_task = spent / (stop - start)
            if exact:
                _TASK_BYTES[_signature(device, inputs, cotangents)] = per_task
            step = auto_chunk(k - stop, per_task, memory_budget(device)) if stop < k else step
            used = max(used, int(step))
        start = stop
    extra_grads = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in extra_parts]
    return matrix, extra_grads, reached, tuple(fallback), int(used)


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    heads: Sequence[Tensor] = (),
    *,
    engine: str = "loop",
    features: Tensor | None = None,
    chunk_size: int | str | None = None,
    retain_graph: bool = False,
) -> TaskGradients:
    """Per-task gradients on the shared parameters (flattened) and on the task-specific ones.

    Args:
        losses: ``k`` scalar losses.
        shared: the shared parameters; their per-task gradients form the ``(k, P)`` matrix.
        heads: task-specific parameters; each task's gradient on them is returned per task.
        engine: ``"loop"`` or ``"batched"`` (see the module docstring). ``"batched"`` on a graph
            built by ``torch.compile`` runs the loop (``note="compiled graph"``).
        features: the shared representation ``z`` that the heads read; with ``"batched"`` the
            trunk is traversed once by a batched VJP from ``z``. Shared parameters that a loss
            also reaches other than through ``z`` get their whole gradient (module docstring).
        chunk_size: at most this many tasks per batched call (bounds memory at about
            ``chunk_size`` times one task's backward); ``None`` for all at once; ``"auto"``: on
            CUDA, one task is run first and measured with the allocator's peak counter (once per
            model and batch shape: the figure is cached), and the rest go in the largest chunks
            whose memory fits :data:`AUTO_CHUNK_FRACTION` of the free memory
            (:func:`memory_budget`, :func:`auto_chunk`); on CPU the same budget against an
            estimate of a task's memory (twice its gradient plus four times its cotangent).
        retain_graph: keep the graph after the last pass (the loop frees it otherwise; the
            batched engine leaves it to the garbage collector).

    Returns:
        :class:`TaskGradients`.
    """
    if engine not in ("loop", "batched"):
        raise ValueError(f"engine must be 'loop' or 'batched', got {engine!r}")
    if chunk_size is not None and chunk_size != "auto" and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
    if engine == "loop":
        return _loop(losses, shared, heads, retain_graph)
    if not shared:
        raise ValueError("no shared parameters: the batched engine needs at least one")
    if compiled_graph(losses):
        return _with(_loop(losses, shared, heads, retain_graph), note="compiled graph")
    if features is None:
        return _from_losses(losses, shared, heads, chunk_size)
    # Shared parameters reached other than through z: their gradients come from the head passes
    # (when they are used after z only) or the whole batched call starts from the losses (when a
    # parameter is used both before and after z: the head passes would run the whole trunk).
    outside = {id(t) for t in graph_leaves(losses, stop=features)}
    after = [p for p in shared if id(p) in outside]
    if after:
        before = {id(t) for t in graph_leaves([features])}
        if any(id(p) in before for p in after):
            return _with(_from_losses(losses, shared, heads, chunk_size), note="shared parameter after features")
    k = len(losses)
    gz: list[Tensor] = []
    head_grads: list[list[Tensor | None]] = []
    on_z: list[bool] = []
    after_grads: list[tuple[Tensor | None, ...]] = []
    nh = len(heads)
    for loss in losses:  # through the heads only (the walk does not go past z)
        grads = torch.autograd.grad(loss, [features, *heads, *after], retain_graph=True, allow_unused=True)
        on_z.append(grads[0] is not None)
        gz.append(grads[0] if grads[0] is not None else torch.zeros_like(features))
        head_grads.append(list(grads[1 : 1 + nh]))
        after_grads.append(grads[1 + nh :])
    missing = [i for i, ok in enumerate(on_z) if not ok]
    if missing:
        raise ValueError(
            f"loss(es) {missing} do not depend on `features`: pass the representation tensor the "
            "heads actually read (with torch.compile of the whole model the returned features are "
            "a separate output; compile trunk and heads separately, or omit features=)"
        )
    matrix, _, reached_p, fallback, used = _batched_rows(features, shared, (), torch.stack(gz), chunk_size)
    if after:
        columns = _offsets(shared)
        where = {id(p): j for j, p in enumerate(shared)}
        for i, row in enumerate(after_grads):
            for p, g in zip(after, row):
                if g is not None:
                    a, b = columns[where[id(p)]]
                    matrix[i, a:b] += g.reshape(-1).to(matrix.dtype)
                    reached_p[where[id(p)]] = True
    reached = [True] * k if any(reached_p) else [False] * k
    return TaskGradients(matrix, head_grads, reached, "batched", fallback, chunk=used, touched=reached_p)


def _offsets(params: Sequence[Tensor]) -> list[tuple[int, int]]:
    out, start = [], 0
    for p in params:
        out.append((start, start + p.numel()))
        start += p.numel()
    return out


def _with(tg: TaskGradients, note: str) -> TaskGradients:
    tg.note = note
    return tg


def _from_losses(losses: Sequence[Tensor], shared: Sequence[Tensor], heads: Sequence[Tensor],
                 chunk_size: int | str | None) -> TaskGradients:
    """The batched engine without features: ``eye(k)`` pushed through the stacked losses."""
    k = len(losses)
    stacked = torch.stack(list(losses))
    eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
    matrix, head_rows, reached_p, fallback, used = _batched_rows(stacked, shared, heads, eye, chunk_size)
    n = len(shared)
    reached = None if any(reached_p[:n]) else [False] * k
    head_grads = [
        [head_rows[j][i] if reached_p[n + j] else None for j in range(len(heads))] for i in range(k)
    ]
    return TaskGradients(matrix, head_grads, reached, "batched", fallback, chunk=used, touched=reached_p[:n])


def feature_gradients(losses: Sequence[Tensor], features: Tensor) -> tuple[Tensor, list[bool]]:
    """``(k, numel(z))`` gradients of each loss with respect to the representation ``z``.

    The passes run through the heads only, so they cost far less than gradients on the trunk.
    Returns the matrix and, per task, whether the loss depends on ``features`` at all.
    """
    passes = feature_passes(losses, features)
    return passes.grads, passes.reached


@dataclass
class FeaturePasses:
    """The ``k`` passes of representation mode through the heads, and what finishing needs.

    Attributes:
        grads: ``(k, numel(z))`` gradients of each loss with respect to ``z`` (in ``z``'s dtype).
        reached: per task, whether the loss depends on ``z`` at all.
        features: ``z``.
        trunk: the parameters reached through ``z`` (all shared): they get the trunk VJP.
        side: the parameters reached other than through ``z`` (the heads, shared parameters used
            after ``z``), with each task's gradient on them in ``rows``.
        rows: ``rows[i][j]``: task ``i``'s gradient on ``side[j]`` (``None`` if not reached).
        shared_side: per entry of ``side``, whether it is a shared parameter.
        direct: whether :func:`finish_through_features` applies (``False`` when a parameter is
            reached both through ``z`` and around it, or a task-specific parameter sits before
            ``z``: then finish with one weighted backward of the losses instead).
    """

    grads: Tensor
    reached: list[bool]
    features: Tensor
    trunk: list[Tensor]
    side: list[Tensor]
    rows: list[tuple[Tensor | None, ...]]
    shared_side: list[bool]
    direct: bool


def feature_passes(losses: Sequence[Tensor], features: Tensor, params: Sequence[Tensor] = (),
                   shared: Sequence[Tensor] = ()) -> FeaturePasses:
    """The ``k`` gradients of the losses with respect to ``features``, one pass through the heads
    each, taking along each task's gradient on the parameters of ``params`` that the losses reach
    other than through ``features`` (the heads, shared parameters used after ``z``): with them,
    :func:`finish_through_features` applies the weights with one backward through the trunk only.

    Args:
        losses: ``k`` scalar losses.
        features: the representation ``z`` the heads read.
        params: every trainable parameter (empty: the passes take the ``z`` gradients only).
        shared: the shared ones among them.
    """
    trunk: list[Tensor] = []
    side: list[Tensor] = []
    direct = bool(params)
    if direct:
        around = {id(t) for t in graph_leaves(losses, stop=features)}
        through = {id(t) for t in graph_leaves([features])}
        shared_ids = {id(p) for p in shared}
        trunk = [p for p in params if id(p) in through]
        side = [p for p in params if id(p) in around]
        direct = not any(id(p) in through for p in side) and all(id(p) in shared_ids for p in trunk)
        if not direct:
            trunk, side = [], []
    k = len(losses)
    matrix = torch.empty(k, features.numel(), dtype=features.dtype, device=features.device)
    rows: list[tuple[Tensor | None, ...]] = []
    reached: list[bool] = []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, [features, *side], retain_graph=True, allow_unused=True)
        reached.append(grads[0] is not None)
        if grads[0] is None:
            matrix[i].zero_()
        else:
            matrix[i].copy_(grads[0].reshape(-1))
        rows.append(tuple(grads[1:]))
    shared_side = [id(p) in {id(q) for q in shared} for p in side]
    return FeaturePasses(matrix, reached, features, trunk, side, rows, shared_side, direct)


def finish_through_features(passes: FeaturePasses, weights: Tensor, head_weights: Tensor | None = None
                            ) -> tuple[list[Tensor], list[Tensor | None]]:
    """The gradients of ``sum_i w_i L_i`` from the passes: one backward through the trunk with the
    cotangent ``sum_i w_i dL_i/dz`` (the heads are not run again), and the passes' gradients on
    the other parameters combined with ``weights`` (shared) or ``head_weights`` (task-specific;
    ``None``: ``weights``). Frees the graph. Returns ``(params, grads)``: the trunk parameters
    then ``side``, with their gradients (``None`` where nothing reached a parameter)."""
    if not passes.direct:
        raise ValueError("finish_through_features needs FeaturePasses.direct")
    z = passes.features
    cotangent = (weights.to(passes.grads.dtype) @ passes.grads).view_as(z)
    trunk = list(torch.autograd.grad(z, passes.trunk, cotangent, allow_unused=True)) if passes.trunk else []
    hw = weights if head_weights is None else head_weights
    side: list[Tensor | None] = []
    for j, is_shared in enumerate(passes.shared_side):
        w = weights if is_shared else hw
        total = None
        for i, row in enumerate(passes.rows):
            g = row[j]
            if g is not None:
                term = g * w[i].to(g.dtype)
                total = term if total is None else total + term
        side.append(total)
    return [*passes.trunk, *passes.side], [*trunk, *side]


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
