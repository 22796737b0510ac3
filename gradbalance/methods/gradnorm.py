"""GradNorm, implemented from the paper (there is no official code)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance.methods.adam import adam_update
from gradbalance.methods.base import Aggregation, Method, TaskInputs, check_number, register, require_gram, state_keys

__all__ = ["GradNorm", "last_shared_layer"]

OPTIMIZERS = ("adam", "sgd")
_KINK = 1e-12  # |G_i - target_i| below this (relative) counts as 0: the subgradient at the kink


def last_shared_layer(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> int | None:
    """Index of GradNorm's default ``W``: the shared weight nearest the losses in the graph.

    A breadth-first walk of the losses' autograd graphs (``grad_fn.next_functions``; nothing
    is computed) gives every shared parameter its distance to the nearest loss, in graph
    nodes. ``W`` is the nearest shared tensor with 2 or more dimensions (a weight matrix or a
    convolution kernel; biases and norm scales are skipped unless no shared tensor has 2
    dimensions); among equally near ones, the largest. So on a residual block whose output
    is ``conv2(...) + shortcut(x)`` both the 3x3 ``conv2`` and the 1x1 shortcut conv are one
    ``add`` away from the heads, and ``conv2`` (more weights: the main path) is chosen, where
    "the last registered 2-D parameter" would pick the shortcut conv registered after it.

    Returns:
        The index into ``shared``, or ``None`` if the graphs reach none of them (e.g. compiled
        graphs that hide their parameters).
    """
    wanted = {id(p): i for i, p in enumerate(shared)}
    depth: dict[int, int] = {}
    frontier = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
    seen: set = set()
    level = 0
    while frontier and len(depth) < len(wanted):
        nxt: list = []
        for fn in frontier:
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)
            if variable is not None and id(variable) in wanted:
                depth.setdefault(wanted[id(variable)], level)
            nxt.extend(next_fn for next_fn, _ in fn.next_functions)
        frontier, level = nxt, level + 1
    if not depth:
        return None
    matrices = [i for i in depth if shared[i].dim() >= 2] or list(depth)
    return min(matrices, key=lambda i: (depth[i], -shared[i].numel(), -i))


@register("gradnorm", "GradNorm (Chen et al. 2018): learned weights that balance gradient norms")
class GradNorm(Method):
    """Gradient Normalization (GradNorm): task weights learned to equalise training rates.

    With learned weights ``w`` (``w_i(0) = 1``, ``sum_i w_i = k``), ``n_i = ||grad_W L_i||`` on a
    shared tensor ``W``, ``G_i = w_i n_i``, ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))``:

    ``L_grad = sum_i |G_i - const(mean_j(G_j) * r_i^alpha)|``,
    ``dL_grad / dw_i = sign(G_i - target_i) * n_i`` (closed form: the target is a constant and
    ``G_i`` is linear in ``w_i``, so no second-order backward is needed and none leaks into
    the network). The model is updated with ``sum_i w_i L_i`` using the CURRENT ``w``; ``w`` is
    then stepped by the method's own optimizer (no weight decay), clamped at 0 and renormalised
    to sum to ``k`` when the wrapped optimizer steps.

    Args:
        alpha: asymmetry ``alpha >= 0`` (default 1.5, the paper's NYUv2 value; 0 equalises the
            norms).
        lr: learning rate ``> 0`` of the weights' optimizer (default 0.025, the paper's).
        layer: which shared tensor is ``W``: ``None`` (default) for the last shared layer
            before the heads, found from the autograd graph on the first step: the shared
            weight (2 or more dimensions) nearest the losses, the largest among equally near
            ones (:func:`last_shared_layer`; on a ResNet trunk the last main-path conv, not the
            1x1 shortcut conv). Without a graph (a direct call of :meth:`shared_subset`
            without losses, FSDP) the last shared tensor with 2 or more dimensions. Or an int
            index into the shared parameters, or the tensor itself.
        optimizer: ``"adam"`` (default; betas 0.9/0.999, eps 1e-8) or ``"sgd"``.

    Task-specific parameters: head ``i`` gets ``w_i`` times its task's gradient (the gradient
    of ``sum_i w_i L_i``, as in the paper).

    State, per task name: ``w``, ``L(0)`` (the task's first loss), the optimizer's moments and
    step. Tasks missing from a step (``None`` in a dict of losses) keep their state: the step
    is taken among the tasks present (``L_grad`` over them), and their weights are renormalised
    to the share of ``sum(w)`` they held, so absent tasks' weights do not move. A new task starts
    at ``w = 1`` with its first loss as ``L(0)``.

    Cost: task gradients on ``W`` only (k passes through the part of the graph above ``W``),
    then one backward of ``sum_i w_i L_i``. ``extras`` reports ``"layer"`` (which tensor) and
    ``"grad_loss"`` (``L_grad``).

    Deviations: the paper fixes only the sum of ``w``; we also clamp ``w >= 0`` before the
    renormalisation so that no task gets a negative weight (then L_grad pushes it back up).
    The paper does not name the weights' optimizer; Adam makes its step independent of the
    scale of the gradient norms. Where ``|G_i - target_i|`` is within ``1e-12`` (relative) of 0
    we take the subgradient 0, so identical tasks keep ``w = 1`` despite rounding.
    With gradient accumulation ``L_i`` is the window's summed loss (keep the window fixed).

    Example:
        >>> import torch
        >>> from gradbalance.methods import GradNorm, TaskInputs
        >>> m = GradNorm()
        >>> x = TaskInputs(losses=torch.tensor([1.0, 1.0], dtype=torch.float64),
        ...                gram=torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)))
        >>> agg = m.aggregate(x); m.commit(agg.pending)
        >>> agg.weights, m.weights  # the task with the larger gradient norm loses weight
        (tensor([1., 1.], dtype=torch.float64), tensor([1.0250, 0.9750], dtype=torch.float64))

    References:
        Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient Normalization
        for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, Algorithm 1.
    """

    requires = "gram"

    # state, set by load_state_dict (a fresh method loads {})
    _tasks: list[str]
    _w: Tensor
    _l0: Tensor
    _m: Tensor
    _v: Tensor
    _t: Tensor

    def __init__(self, alpha: float = 1.5, lr: float = 0.025, layer: int | Tensor | None = None,
                 optimizer: str = "adam") -> None:
        alpha, lr = check_number("alpha", alpha, minimum=0.0), check_number("lr", lr, positive=True)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, Tensor))):
            raise TypeError(f"layer must be None, an int or a tensor, got {type(layer).__name__}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.alpha, self.lr, self.layer, self.optimizer = float(alpha), float(lr), layer, optimizer
        self.layer_used = ""
        self._layer_cache: tuple[tuple[int, ...], int] | None = None
        self.load_state_dict({})

    def hyperparameters(self) -> dict[str, Any]:
        layer = self.layer if not isinstance(self.layer, Tensor) else f"<tensor {tuple(self.layer.shape)}>"
        return {"alpha": self.alpha, "lr": self.lr, "layer": layer, "optimizer": self.optimizer}

    @property
    def weights(self) -> Tensor:
        """The current weights, one per task seen, in :attr:`tasks` order (empty before the first step)."""
        return self._w.clone()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names the state is kept for, in first-seen order."""
        return tuple(self._tasks)

    def choose_subset(self, shared: list[Tensor], losses: Sequence[Tensor]) -> list[Tensor]:
        return self.shared_subset(shared, losses)

    def shared_subset(self, shared: list[Tensor], losses: Sequence[Tensor] | None = None) -> list[Tensor]:
        """``[W]``: the tensor named by ``layer``, or the default layer (class docstring)."""
        if self.layer is None:
            idx = self._default_layer(shared, losses)
        elif isinstance(self.layer, int):
            if not -len(shared) <= self.layer < len(shared):
                raise ValueError(f"layer={self.layer} is out of range for {len(shared)} shared tensors")
            idx = self.layer % len(shared)
        else:
            found = [i for i, p in enumerate(shared) if p is self.layer]
            if not found:
                raise ValueError("layer must be one of the shared parameters")
            idx = found[0]
        self.layer_used = f"shared[{idx}] {tuple(shared[idx].shape)}"
        return [shared[idx]]

    def _default_layer(self, shared: list[Tensor], losses: Sequence[Tensor] | None) -> int:
        """The last shared layer before the heads: see :func:`last_shared_layer` (cached per
        shared set: the walk runs on the first step only)."""
        key = tuple(id(p) for p in shared)
        if self._layer_cache is not None and self._layer_cache[0] == key:
            return self._layer_cache[1]
        idx = last_shared_layer(losses, shared) if losses is not None else None
        if idx is None:  # no graph (a direct call, FSDP) or a graph hiding its parameters
            return max((i for i, p in enumerate(shared) if p.dim() >= 2), default=len(shared) - 1)
        self._layer_cache = (key, idx)
        return idx

    def aggregate(self, inputs: TaskInputs) -> Aggregation:
        names = state_keys(inputs, self._tasks, "GradNorm")
        losses = inputs.losses.detach().double()
        known = [self._tasks.index(n) if n in self._tasks else -1 for n in names]
        is_new = torch.tensor([i < 0 for i in known], device=losses.device)
        rows = torch.tensor([max(i, 0) for i in known])
        w = torch.where(is_new, torch.ones_like(losses), self._w[rows].to(losses.device)) if self._tasks \
            else torch.ones_like(losses)
        l0 = torch.where(is_new, losses, self._l0[rows].to(losses.device)) if self._tasks else losses
        if bool((l0 <= 0).any()):
            raise ValueError(f"GradNorm needs positive losses (ratios to L(0)), got L(0) = {l0.tolist()}")
        norms = require_gram(inputs, "GradNorm").diagonal().double().clamp_min(0).sqrt()
        ratio = losses / l0
        mean = ratio.mean()  # all losses 0 (a perfect fit): every rate is equal
        r = ratio / mean if bool(mean > 0) else torch.ones_like(ratio)
        g = w * norms
        target = g.mean() * r.pow(self.alpha)
        diff = g - target
        diff = torch.where(diff.abs() <= _KINK * target.abs().max(), torch.zeros_like(diff), diff)
        grad = torch.sign(diff) * norms
        return Aggregation(
            weights=w.clone(),
            extras={"layer": self.layer_used, "grad_loss": float(diff.abs().sum()),
                    "inverse_rate": r},
            pending={"tasks": names, "grad": grad.cpu(), "losses": losses.cpu()},
        )

    def commit(self, pending: dict[str, Any]) -> None:
        """Step the weights of the tasks present; absent tasks keep their weight and moments.

        The present tasks' weights are renormalised to the share of the total they held before
        the step (``k`` when every task is present), so ``sum(w)`` stays the number of tasks seen.
        """
        names, grad = pending["tasks"], pending["grad"]
        new = [n for n in names if n not in self._tasks]
        if new:
            zeros = torch.zeros(len(new), dtype=torch.float64)
            losses = dict(zip(names, pending["losses"].tolist()))
            self._tasks = self._tasks + new
            self._w = torch.cat([self._w, torch.ones(len(new), dtype=torch.float64)])
            self._l0 = torch.cat([self._l0, torch.tensor([losses[n] for n in new], dtype=torch.float64)])
            self._m, self._v = torch.cat([self._m, zeros]), torch.cat([self._v, zeros])
            self._t = torch.cat([self._t, torch.zeros(len(new), dtype=torch.int64)])
        index = torch.tensor([self._tasks.index(n) for n in names])
        absent = torch.ones(len(self._tasks), dtype=torch.bool)
        absent[index] = False
        share = len(self._tasks) - float(self._w[absent].sum())
        self._t[index] += 1
        if self.optimizer == "sgd":
            w = self._w[index] - self.lr * grad
        else:
            # Adam with eps after the bias correction (Adam paper's Algorithm 1: no official code)
            w, m, v = adam_update(self._w[index], grad, self._m[index], self._v[index],
                                  self._t[index].double(), lr=self.lr, eps_placement="kingma")
            self._m[index], self._v[index] = m, v
        w = w.clamp_min(0.0)
        self._w = self._w.clone()
        self._w[index] = w * (share / w.sum()) if bool(w.sum() > 0) else torch.full_like(w, share / len(w))

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self._tasks), "w": self._w.clone(), "l0": self._l0.clone(),
                "m": self._m.clone(), "v": self._v.clone(), "t": self._t.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:  # a fresh method
            empty = torch.zeros(0, dtype=torch.float64)
            self._tasks = []
            self._w, self._l0, self._m, self._v = empty, empty, empty, empty
            self._t = torch.zeros(0, dtype=torch.int64)
            return
        keys = {"tasks", "w", "l0", "m", "v", "t"}
        if set(state) != keys:
            raise ValueError(f"GradNorm state needs keys {sorted(keys)}; got {sorted(state)}")
        sizes = {state[key].numel() for key in ("w", "l0", "m", "v", "t")} | {len(state["tasks"])}
        if len(sizes) != 1:
            raise ValueError("GradNorm state: tasks, w, l0, m, v, t must have one entry per task")
        self._tasks = list(state["tasks"])
        self._w, self._l0 = state["w"].double().clone(), state["l0"].double().clone()
        self._m, self._v = state["m"].double().clone(), state["v"].double().clone()
        self._t = state["t"].long().clone()
