"""The Gram engine: ``M = G G^T`` of the ``k`` task gradients without the ``k x P`` matrix ``G``.

This is the second module of gradbalance that talks to autograd, next to
:mod:`gradbalance.jacobian` (which builds ``G`` itself). Methods with ``requires = "gram"`` need
only ``M`` and return weights ``w``; their update ``sum_i w_i g_i`` is what one ordinary backward of
``sum_i w_i L_i`` produces. So ``G`` never has to exist: this module computes ``M`` block by block
during ONE backward pass that is batched over the ``k`` tasks, and each block's ``k`` gradients are
freed as soon as their contribution to ``M`` is added.

How (the idea of torchjd's ``autogram`` engine, arXiv 2406.16232, Algorithm 3: accumulate the
Gramian from per-module pieces during the backward pass instead of forming the Jacobian; torchjd
does it with forward hooks installed before the forward pass, we do it on the graph the user has
already built):

* the ``k`` cotangents (``eye(k)`` over the stacked losses, or the ``k`` gradients ``dL_i/dz`` of
  the shared representation ``z`` when ``features=`` is given) are pushed through the graph by one
  ``torch.func.vmap`` of :func:`torch.autograd.grad` on the existing graph (no second forward).
  The ``dL_i/dz`` are handed to autograd by a scalar node above ``z`` that keeps no reference to
  them, so they are freed after the trunk's first node has used them;
* **gradient blocks**: a hook on every shared parameter receives that parameter's ``k``
  gradients (autograd has already summed the contributions of every use of the parameter, so
  weight tying is exact), adds ``g g^T`` to ``M`` and hands autograd a zero-strided tensor instead:
  nothing of size ``k x P`` is ever returned or kept;
* **activation blocks** (``nn.Linear`` weights, the per-layer cheaper form): the weight's
  gradient is never formed. A pre-hook on the layer's ``addmm`` node receives the ``k`` output
  gradients ``dY_i`` (``N x out``), and with the layer input ``X`` (``N x in``, saved by autograd
  for the backward anyway) ``<dY_i^T X, dY_j^T X> = <dY_i, (X X^T) dY_j>``: ``N x N`` products
  instead of ``out x in`` ones. :func:`linear_form` chooses per layer (rule in its docstring).

The hooks see the whole batch of ``k`` tasks behind the batched tensors that ``vmap`` hands them,
through functorch's accessors (``torch._C._functorch``, present since torch 2.0); where those are
missing they go through a :class:`torch.autograd.Function` with a ``vmap`` staticmethod (the public
way to leave ``vmap`` for one operation, as torchjd does; about ten times the per-hook overhead).
They are removed before :func:`gram_matrix` returns, also on error. The graph is kept (``retain_graph=True``) for
the weighted backward that follows.

Everything stays on the parameters' device; ``M`` is accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AUTO_BUDGET_BYTES",
    "GramResult",
    "batched_backward_bytes",
    "gram_matrix",
    "jacobian_bytes",
    "linear_form",
    "prefer_gram",
]

#: ``engine="auto"`` picks the Gram engine for a ``requires="gram"`` method when the ``k x P``
#: task-gradient matrix would take more than this many bytes (:func:`prefer_gram`).
AUTO_BUDGET_BYTES = 1 << 30

_FORMS = ("auto", "activations", "gradients")

try:  # functorch's accessors (torch >= 2.0): a hook reads all k tasks behind a batched tensor
    from torch._C._functorch import current_level as _current_level
    from torch._C._functorch import get_unwrapped as _get_unwrapped
    from torch._C._functorch import is_batchedtensor as _is_batched
    from torch._C._functorch import maybe_get_bdim as _get_bdim
    from torch._C._functorch import maybe_get_level as _get_level

    #: read the batch directly (about 10x cheaper per hook than a custom Function's vmap rule,
    #: which is the public route and the fallback where these accessors are missing)
    _UNWRAP = True
except ImportError:  # pragma: no cover - depends on the torch build
    _UNWRAP = False


@dataclass
class GramResult:
    """What :func:`gram_matrix` computed.

    Attributes:
        gram: ``(k, k)`` float64 Gram matrix ``M = G G^T`` of the task gradients on the shared
            parameters (``G`` itself is never formed).
        route: ``"features"`` (cotangents ``dL_i/dz`` pushed from the representation) or
            ``"losses"`` (``eye(k)`` pushed from the stacked losses).
        forms: how many parameter blocks were added in each form: ``{"gradients": n,
            "activations": m}`` (an activation block is one ``nn.Linear`` weight).
    """

    gram: Tensor
    route: str
    forms: dict[str, int] = field(default_factory=dict)


def jacobian_bytes(k: int, shared: Sequence[Tensor]) -> int:
    """Bytes of the ``k x P`` task-gradient matrix the loop and batched engines hold."""
    return k * sum(p.numel() * p.element_size() for p in shared)


def batched_backward_bytes(k: int, losses: Sequence[Tensor], shared: Sequence[Tensor]) -> int | None:
    """Estimate of the Gram engine's working set: two ``k x`` buffers of the largest gradient that
    flows into an inner node of the losses' graph (a layer's output and input gradients for all
    ``k`` tasks are alive together while its backward runs), plus ``k x`` the largest shared
    parameter whose block is taken from its gradients. ``None`` where the graph does not expose
    its nodes' input shapes."""
    nodes, incoming = _walk([loss.grad_fn for loss in losses])
    shared_ids = {id(p) for p in shared}
    largest = 0
    for node in nodes:
        if _leaf(node) is not None:
            continue
        leaves = [_leaf(c) for c, _ in node.next_functions if c is not None]
        # a node on a parameter's side (its transpose, a view, a cast) carries that parameter's
        # gradient, which the block term counts: skip inputs the size of a child parameter
        sizes = {t.numel() for t in leaves if t is not None} if leaves and None not in leaves else set()
        try:
            metadata = node._input_metadata
        except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
            return None
        for m in metadata:
            if math.prod(m.shape) in sizes:
                continue
            largest = max(largest, math.prod(m.shape) * torch.empty((), dtype=m.dtype).element_size())
    by_activation = {id(c[1]) for c in _linear_candidates(nodes, incoming, shared_ids)
                     if linear_form(c[3].shape[0], c[3].shape[1], c[1].shape[0], k) == "activations"}
    in_graph = {id(_leaf(n)) for n in nodes if _leaf(n) is not None}
    block = max((p.numel() * p.element_size() for p in shared
                 if id(p) in in_graph and id(p) not in by_activation), default=0)
    return 2 * k * largest + k * block


def prefer_gram(k: int, shared: Sequence[Tensor], losses: Sequence[Tensor] | None = None,
                budget: int | None = None) -> bool:
    """``engine="auto"``'s rule for ``requires="gram"`` methods.

    The Gram engine when the ``k x P`` matrix of the loop engine would exceed ``budget`` bytes
    (default :data:`AUTO_BUDGET_BYTES`, 1 GiB) AND, given the ``losses``, the Gram engine's own
    working set (:func:`batched_backward_bytes`) is smaller than that matrix. The second test
    keeps the loop for networks whose activations outweigh their parameters (convolutional
    trunks on large images and batches: there ``k`` copies of an activation cost more than ``k``
    copies of the parameters, as the ``conv`` rows of ``python -m benchmarks gram`` show).

    Below the budget the loop (or batched) engine stays the default: it supports every
    accumulation mode and distributed training, and at small ``k`` it measured faster.
    """
    matrix = jacobian_bytes(k, shared)
    if matrix <= (AUTO_BUDGET_BYTES if budget is None else budget):
        return False
    if losses is None:
        return True
    estimate = batched_backward_bytes(k, losses, shared)
    return estimate is None or estimate < matrix


def linear_form(rows: int, fan_in: int, fan_out: int, k: int) -> str:
    """Which form adds a ``Linear`` weight's block to ``M`` more cheaply.

    With ``X`` the layer input (``rows x fan_in``; ``rows`` = batch x sequence positions) and
    ``dY_i`` task ``i``'s output gradient (``rows x fan_out``), the block is ``<dY_i^T X, dY_j^T X>``:

    * ``"gradients"``: form the ``k`` weight gradients ``dY_i^T X`` (``k x fan_out x fan_in``
      numbers, ``2 k rows fan_out fan_in`` flops) and their Gram (``2 k^2 fan_out fan_in``);
    * ``"activations"``: ``K = X X^T`` (``rows^2`` numbers, ``2 rows^2 fan_in`` flops), then
      ``<dY_i, K dY_j>`` (``2 k rows^2 fan_out + 2 k^2 rows fan_out`` flops, at most
      ``k x rows x fan_out`` numbers: no more than the output gradients themselves).

    The rule takes the form with fewer estimated flops; in practice ``"activations"`` whenever
    ``rows`` is below ``fan_in`` (few rows against a wide layer: small batches, wide MLPs).

    Args:
        rows: number of rows of the layer input (batch size times any leading dimensions).
        fan_in: input features; fan_out: output features; k: number of tasks.

    Returns:
        ``"activations"`` or ``"gradients"``.
    """
    by_gradients = 2 * k * fan_out * fan_in * (rows + k)
    by_activations = 2 * rows * rows * (fan_in + k * fan_out) + 2 * k * k * rows * fan_out
    return "activations" if by_activations < by_gradients else "gradients"


# --------------------------------------------------------------------------- leaving vmap
class _Accumulator:
    """The running ``M`` and the count of blocks added (one per hook call)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.k = k
        self.calls: dict[int, int] = {}

    def add(self, key: int, contribution: Tensor) -> None:
        self.gram += contribution.to(torch.float64)
        self.calls[key] = self.calls.get(key, 0) + 1


def _compute_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _add_gradient_block(acc: _Accumulator, key: int, g: Tensor) -> None:
    """``g``: ``(k, *shape)``, the k gradients of one parameter."""
    flat = g.reshape(g.shape[0], -1).to(_compute_dtype(g))
    acc.add(key, flat @ flat.T)


def _add_activation_block(acc: _Accumulator, key: int, dy: Tensor, x: Tensor) -> None:
    """``dy``: ``(k, rows, out)``; ``x``: ``(rows, in)``: adds ``<dY_i, (X X^T) dY_j>``."""
    dtype = _compute_dtype(dy)
    dy, x = dy.to(dtype), x.to(dtype)
    kernel = x @ x.T
    k, rows, out = dy.shape
    # chunk the output columns so that the copies below add at most about half of dY's size
    step = max(1, math.ceil(out / 4)) if k * rows * out > (1 << 20) else out
    total = dy.new_zeros(k, k)
    for start in range(0, out, step):
        part = dy[:, :, start : start + step]  # (k, rows, c)
        c = part.shape[2]
        # one (rows x rows) @ (rows x k c) product rather than k small ones
        stacked = part.transpose(0, 1).reshape(rows, k * c)
        product = (kernel @ stacked).view(rows, k, c).transpose(0, 1)  # (k, rows, c): K dY_i
        total += stacked.view(rows, k, c).transpose(0, 1).reshape(k, -1) @ product.reshape(k, -1).T
        del stacked, product
    acc.add(key, total)


class _GradientTap(torch.autograd.Function):
    """Identity on one gradient; under ``vmap`` sees all ``k`` at once, adds their Gram to ``M``
    and returns a zero-strided zero tensor (so autograd keeps nothing of size ``k x P``)."""

    @staticmethod
    def forward(g: Tensor, acc: _Accumulator, key: int) -> Tensor:  # type: ignore[override]
        _add_gradient_block(acc, key, g.unsqueeze(0))  # one task (outside vmap)
        return g.new_zeros(()).expand(g.shape)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, g: Tensor, acc: _Accumulator, key: int) -> Any:
        dim = in_dims[0]
        g = g.movedim(dim, 0) if dim is not None else g.unsqueeze(0).expand(info.batch_size, *g.shape)
        _add_gradient_block(acc, key, g)
        return g.new_zeros(()).expand(g.shape), 0


class _ActivationTap(torch.autograd.Function):
    """Receives a ``Linear`` layer's output gradients (all ``k`` under ``vmap``) and adds the
    weight's block from them and the layer input ``x``; returns nothing autograd uses."""

    @staticmethod
    def forward(dy: Tensor, x: Tensor, acc: _Accumulator, key: int) -> Tensor:  # type: ignore[override]
        _add_activation_block(acc, key, dy.unsqueeze(0), x)
        return dy.new_zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: Any, dy: Tensor, x: Tensor, acc: _Accumulator, key: int) -> Any:
        dim = in_dims[0]
        dy = dy.movedim(dim, 0) if dim is not None else dy.unsqueeze(0).expand(info.batch_size, *dy.shape)
        _add_activation_block(acc, key, dy, x)
        return dy.new_zeros(()), None


def _all_tasks(t: Tensor, k: int) -> Tensor:
    """The ``(k, *shape)`` tensor behind ``t`` inside the engine's ``vmap`` (``t`` batched at the
    current level; an unbatched ``t`` is the same for every task)."""
    if _is_batched(t) and _get_level(t) == _current_level():
        return _get_unwrapped(t).movedim(_get_bdim(t), 0)
    return t.unsqueeze(0).expand(k, *t.shape)


def _gradient_hook(acc: _Accumulator, key: int) -> Any:
    def hook(g: Tensor) -> Tensor:
        if not _UNWRAP:
            return _GradientTap.apply(g, acc, key)
        _add_gradient_block(acc, key, _all_tasks(g, acc.k))
        # a zero-strided zero in place of the k gradients: autograd returns nothing of size k x P
        return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)

    return hook


def _activation_hook(acc: _Accumulator, key: int, x: Tensor) -> Any:
    def prehook(grad_outputs: tuple[Tensor, ...]) -> None:
        if not _UNWRAP:
            _ActivationTap.apply(grad_outputs[0], x, acc, key)
        else:
            _add_activation_block(acc, key, _all_tasks(grad_outputs[0], acc.k), x)

    return prehook


class _Holder:
    """Owns the ``k`` cotangents until the batched backward takes them (a plain object: ``vmap``
    would copy a list or dict, which are pytrees)."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor: Tensor | None = tensor

    def take(self) -> Tensor:
        tensor, self.tensor = self.tensor, None
        if tensor is None:
            raise RuntimeError("gram engine: the cotangents were taken twice")
        return tensor


class _Source(torch.autograd.Function):
    """A scalar node above ``z`` whose backward hands autograd the held cotangents as ``z``'s
    gradient and keeps no reference to them, so they are freed once the first node of the trunk
    has used them (held through the whole backward they would add one more ``k x`` activation-
    sized buffer at the peak). The batched cotangent of the node is the task index ``i``; its
    backward selects row ``i`` of the buffer (one copy, made while nothing else is alive)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, holder: _Holder) -> Tensor:  # type: ignore[override]
        ctx.holder = holder
        return z.new_zeros(())

    @staticmethod
    def backward(ctx: Any, index: Tensor) -> Any:  # type: ignore[override]
        buffer = ctx.holder.take()
        return buffer.index_select(0, index.reshape(1).long()).squeeze(0), None


# --------------------------------------------------------------------------- the graph
def _walk(roots: Sequence[Any], stop: Any = None) -> tuple[list[Any], dict[Any, int]]:
    """Every node reachable from ``roots`` (not descending into ``stop``) and the number of edges
    into each node."""
    incoming: dict[Any, int] = {}
    nodes, seen, stack = [], set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        if node is stop:
            continue
        for child, _ in node.next_functions:
            if child is None:
                continue
            incoming[child] = incoming.get(child, 0) + 1
            stack.append(child)
    return nodes, incoming


def _leaf(node: Any) -> Tensor | None:
    return getattr(node, "variable", None)


def _linear_candidates(nodes: list[Any], incoming: dict[Any, int], shared_ids: set[int]) -> list[tuple]:
    """``(addmm node, weight, bias, x)`` for every ``Linear`` whose weight (shared, used once) can
    take the activation form: ``addmm(bias, x, weight.t())`` with alpha = beta = 1."""
    out = []
    for node in nodes:
        if type(node).__name__ != "AddmmBackward0":
            continue
        try:
            if node._saved_alpha != 1 or node._saved_beta != 1:
                continue
            bias_fn, _ = node.next_functions[0]
            t_fn, _ = node.next_functions[2]
            if t_fn is None or type(t_fn).__name__ != "TBackward0" or incoming.get(t_fn, 0) != 1:
                continue
            w_fn = t_fn.next_functions[0][0]
            weight, bias = _leaf(w_fn), _leaf(bias_fn) if bias_fn is not None else None
            if weight is None or id(weight) not in shared_ids or incoming.get(w_fn, 0) != 1:
                continue
            if weight.dim() != 2:
                continue
            x = node._saved_mat1
        except (AttributeError, RuntimeError):  # a node layout this torch does not have
            continue
        out.append((node, weight, bias, x))
    return out


def _needed(root: Any, requested: set[int]) -> set[Any]:
    """The nodes from which a requested leaf (by ``id``) is reachable: autograd runs those only
    (an iterative post-order walk: each node is decided after all its children)."""
    needed: set[Any] = set()
    done: set[Any] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in done:
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in done)
            continue
        done.add(node)
        leaf = _leaf(node)
        if (leaf is not None and id(leaf) in requested) or any(c in needed for c in children):
            needed.add(node)
    return needed


# --------------------------------------------------------------------------- the engine
def _features_route(losses: Sequence[Tensor], features: Tensor | None, shared_ids: set[int]) -> bool:
    """Whether the cotangents can start at ``features``: every loss reaches it, and no shared
    parameter is reached from a loss without passing through it."""
    if features is None or features.grad_fn is None:
        return False
    z_fn = features.grad_fn
    for loss in losses:
        nodes, _ = _walk([loss.grad_fn], stop=z_fn)
        if z_fn not in nodes:
            return False
        for node in nodes:
            leaf = _leaf(node)
            if leaf is not None and id(leaf) in shared_ids:
                return False
    return True


def gram_matrix(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    *,
    features: Tensor | None = None,
    linear: str = "auto",
) -> GramResult:
    """``M = G G^T`` of the task gradients ``g_i = dL_i/dtheta`` on ``shared``, without ``G``.

    The graph is kept (the caller runs one backward of ``sum_i w_i L_i`` afterwards). A shared
    parameter that no loss reaches adds nothing (its gradients are zero, as in ``G``).

    Args:
        losses: ``k`` scalar losses.
        shared: the shared parameters (leaf tensors that require grad).
        features: the shared representation ``z`` every head reads: the ``k`` cotangents
            ``dL_i/dz`` are taken through the heads one task at a time (cheap) and pushed through
            the trunk together. Ignored (the route starts at the stacked losses) when some loss
            does not reach ``z`` or reaches a shared parameter around it.
        linear: ``"auto"`` (per layer by :func:`linear_form`), ``"activations"`` (every eligible
            ``Linear`` weight in the activation form) or ``"gradients"`` (every block from its
            gradients).

    Returns:
        :class:`GramResult`.

    Raises:
        ValueError: no losses or no shared parameters, or an unknown ``linear``.
    """
    if linear not in _FORMS:
        raise ValueError(f"linear must be one of {_FORMS}, got {linear!r}")
    losses, shared = list(losses), list(shared)
    if not losses:
        raise ValueError("losses is empty")
    if not shared:
        raise ValueError("no shared parameters: the Gram engine needs at least one")
    k = len(losses)
    shared_ids = {id(p) for p in shared}
    if _features_route(losses, features, shared_ids):
        assert features is not None
        # written row by row into one buffer (a list then a stack would hold the k gradients twice)
        cotangents = features.new_empty((k, *features.shape))
        for i, loss in enumerate(losses):
            (g,) = torch.autograd.grad(loss, features, retain_graph=True)
            cotangents[i].copy_(g)
            del g
        # the batched backward starts at a scalar node above z that hands autograd the buffer
        root = _Source.apply(features, _Holder(cotangents))
        cotangents = torch.arange(k, dtype=features.dtype, device=features.device)
        route = "features"
    else:
        root = torch.stack([v.reshape(()) for v in losses])
        cotangents = torch.eye(k, dtype=root.dtype, device=root.device)
        route = "losses"
    nodes, incoming = _walk([root.grad_fn])
    in_graph = {id(_leaf(n)): _leaf(n) for n in nodes if _leaf(n) is not None and id(_leaf(n)) in shared_ids}
    candidates = [] if linear == "gradients" else _linear_candidates(nodes, incoming, shared_ids)
    if linear == "auto":
        candidates = [c for c in candidates
                      if linear_form(c[3].shape[0], c[3].shape[1], c[1].shape[0], k) == "activations"]
    by_activation = {id(c[1]) for c in candidates}
    requested = [p for p in shared if id(p) in in_graph and id(p) not in by_activation]
    needed = _needed(root.grad_fn, {id(p) for p in requested})
    # an addmm node runs only if something below it is requested; else take its weight's gradients
    dropped = [c for c in candidates if c[0] not in needed]
    if dropped:
        candidates = [c for c in candidates if c[0] in needed]
        by_activation = {id(c[1]) for c in candidates}
        requested = [p for p in shared if id(p) in in_graph and id(p) not in by_activation]
    acc = _Accumulator(k, cotangents.device)
    handles = []
    try:
        for p in requested:
            handles.append(p.register_hook(_gradient_hook(acc, id(p))))
        for node, weight, _, x in candidates:
            handles.append(node.register_prehook(_activation_hook(acc, id(weight), x)))
        if requested:
            def vjp(v: Tensor) -> tuple[Tensor | None, ...]:
                return torch.autograd.grad(root, requested, v, retain_graph=True, allow_unused=True)

            torch.func.vmap(vjp)(cotangents)
    finally:
        for h in handles:
            h.remove()
    missing = [c for c in candidates if acc.calls.get(id(c[1]), 0) != 1]
    if missing:  # an internal guard: every activation block must be added exactly once
        raise RuntimeError(f"gram engine: {len(missing)} Linear block(s) were not reached once")
    gram = acc.gram
    gram = (gram + gram.T) / 2
    forms = {"gradients": len(requested), "activations": len(candidates)}
    return GramResult(gram=gram, route=route, forms=forms)
