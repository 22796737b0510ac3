"""One balancing step: validate the losses, get task gradients, run the method, write ``.grad``.

:class:`Balancer` is the single implementation behind :class:`gradbalance.GradBalance` and
:func:`gradbalance.backward`. It keeps what must survive between calls: the method, the shared
parameters (explicit or inferred on the first step) and the *accumulation window*.

The accumulation window is everything between two optimizer steps. Every call of
:meth:`Balancer.backward` in a window adds its per-task losses (and, in exact mode, its per-task
gradients) to the window's totals, re-runs the method on the totals from the state of the last
committed step, and rewrites its contribution to ``.grad``. So ``n`` micro-batches followed by
one step give the update of one call on the concatenated batch; the cost is keeping the
``k x P`` task-gradient matrix between calls (``accumulation="exact"``, the default).
``accumulation="combine"`` combines each call on its own and just adds the results, like
calling ``backward`` per micro-batch would, and keeps nothing.

Errors are raised before anything is written: parameters, ``.grad``, optimizer state and method
state are left exactly as they were.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from gradbalance import jacobian
from gradbalance.info import StepInfo, gram_diagnostics
from gradbalance.methods.base import Aggregation, Method, TaskInputs, make_method

__all__ = ["Balancer", "Losses", "as_parameter_list"]

Losses = Sequence[Tensor] | Mapping[str, Tensor | None]
ENGINES = ("auto", "loop", "batched")
ACCUMULATIONS = ("exact", "combine")


def as_parameter_list(params: Any, what: str = "shared_params") -> list[Tensor]:
    """Accept an ``nn.Module`` (its ``shared_parameters()`` if it has one), or an iterable of tensors."""
    if isinstance(params, torch.nn.Module):
        getter = getattr(params, "shared_parameters", None)
        params = getter() if callable(getter) else params.parameters()
    if isinstance(params, Tensor):
        raise TypeError(f"{what} must be an iterable of tensors or an nn.Module, not a single tensor")
    out: list[Tensor] = []
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} must contain tensors, got {type(p).__name__}")
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


@dataclass
class _Window:
    """Totals of the current accumulation window (between two optimizer steps)."""

    names: tuple[str, ...]
    losses: Tensor
    grads: Tensor | None = None  # (k, P) exact-mode task gradients on the shared params
    heads: list[list[Tensor | None]] | None = None
    written: list[Tensor | None] | None = None  # what this window added to each param's .grad
    pending: Any = None
    calls: int = 0
    has_pending: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


class Balancer:
    """Stateful engine behind :class:`~gradbalance.GradBalance` (see the module docstring).

    Args:
        method: a registered name or a :class:`~gradbalance.methods.Method`.
        shared_params: the shared parameters, or ``None`` to infer them on the first step as
            the parameters that more than one loss reaches (with one loss: all it reaches).
        params: callable returning every trainable parameter (shared and task-specific).
        engine: ``"auto"``, ``"loop"`` or ``"batched"``.
        chunk_size: tasks per batched call (bounds the batched engine's memory).
        task_weights: static weights multiplied into the losses before the method sees them,
            a sequence of k numbers or a mapping from task name to weight (missing names: 1).
        accumulation: ``"exact"`` or ``"combine"`` (module docstring).
    """

    def __init__(
        self,
        method: str | Method,
        shared_params: Any,
        params: Any,
        *,
        engine: str = "auto",
        chunk_size: int | None = None,
        task_weights: Sequence[float] | Mapping[str, float] | None = None,
        accumulation: str = "exact",
    ) -> None:
        self.method = make_method(method)
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        if self.method.mode not in ("exact", "representation"):
            raise ValueError(f"method mode must be 'exact' or 'representation', got {self.method.mode!r}")
        self.engine = engine
        self.chunk_size = chunk_size
        self.accumulation = accumulation
        self.task_weights = task_weights
        self._params = params
        self._shared: list[Tensor] | None = (
            None if shared_params is None else as_parameter_list(shared_params)
        )
        if self._shared is not None and not self._shared:
            raise ValueError("shared_params is empty (or none of them requires grad)")
        self.inferred_shared = shared_params is None
        self.step_count = 0
        self._window: _Window | None = None
        self._use_loop = False  # set once the batched path has fallen back
        self._checked: tuple[str, ...] | None = None  # task set whose graph was checked

    # ------------------------------------------------------------------ parameters
    @property
    def shared_params(self) -> list[Tensor] | None:
        """The shared parameters (``None`` until inferred on the first step)."""
        return self._shared

    def _all_params(self) -> list[Tensor]:
        return as_parameter_list(self._params() if callable(self._params) else self._params, "params")

    def validate_shared(self, optimizer_params: list[Tensor]) -> None:
        if self._shared is None:
            return
        held = {id(p) for p in optimizer_params}
        missing = [tuple(p.shape) for p in self._shared if id(p) not in held]
        if missing:
            raise ValueError(
                f"{len(missing)} tensor(s) in shared_params are not held by the optimizer "
                f"(shapes {missing[:3]}); pass the optimizer every parameter it should update"
            )

    # ------------------------------------------------------------------ inputs
    def _prepare(self, losses: Losses) -> tuple[tuple[str, ...], list[Tensor]]:
        if isinstance(losses, Tensor):
            raise TypeError(
                "losses must be a list (or dict) of per-task scalar losses, not one tensor; "
                "balancing needs each task's loss separately"
            )
        if isinstance(losses, Mapping):
            items = [(str(k), v) for k, v in losses.items() if v is not None]
        elif isinstance(losses, Iterable):
            items = [(f"task{i}", v) for i, v in enumerate(losses)]
        else:
            raise TypeError(f"losses must be a list or dict of tensors, got {type(losses).__name__}")
        if not items:
            raise ValueError("losses is empty: pass one scalar loss per task")
        names, values = [], []
        for name, loss in items:
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss {name!r} is a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ValueError(
                    f"loss {name!r} is not a scalar (shape {tuple(loss.shape)}); reduce it "
                    "(e.g. .mean()) before passing it"
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"loss {name!r} does not require grad: it is not connected to any parameter"
                )
            names.append(name)
            values.append(loss.reshape(()))
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        values = self._apply_task_weights(tuple(names), values)
        detached = torch.stack([v.detach() for v in values])
        finite = torch.isfinite(detached)
        if not bool(finite.all()):
            bad = [names[i] for i in range(len(names)) if not bool(finite[i])]
            raise ValueError(f"loss of task(s) {bad} is NaN or inf: {detached.tolist()}")
        return tuple(names), values

    def _apply_task_weights(self, names: tuple[str, ...], values: list[Tensor]) -> list[Tensor]:
        tw = self.task_weights
        if tw is None:
            return values
        if isinstance(tw, Mapping):
            factors = [float(tw.get(n, 1.0)) for n in names]
        else:
            factors = [float(w) for w in tw]
            if len(factors) != len(values):
                raise ValueError(f"task_weights has {len(factors)} entries but got {len(values)} losses")
        return [v * f if f != 1.0 else v for v, f in zip(values, factors)]

    def _infer_shared(self, values: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        hits = [jacobian.reached_parameters(v, params) for v in values]
        counts = [sum(h[j] for h in hits) for j in range(len(params))]
        need = 2 if len(values) > 1 else 1
        shared = [p for p, c in zip(params, counts) if c >= need]
        if not shared:
            raise ValueError(
                "could not infer shared parameters: no parameter is reached by more than one "
                "loss. Pass shared_params explicitly (gradient-based methods need shared "
                "parameters; loss-weighting methods such as 'mean' or 'uw' do not)"
            )
        return shared

    def _check_reach(self, names: tuple[str, ...], values: list[Tensor], shared: list[Tensor]) -> None:
        """Graph walk: every loss must reach a shared parameter (once per task set)."""
        if self._checked == names:
            return
        for name, v in zip(names, values):
            if not any(jacobian.reached_parameters(v, shared)):
                raise ValueError(
                    f"loss {name!r} does not reach any shared parameter; check shared_params "
                    "or whether the loss was computed from detached tensors"
                )
        self._checked = names

    # ------------------------------------------------------------------ the step
    def backward(
        self,
        losses: Losses,
        *,
        features: Tensor | None = None,
        scaler: Any = None,
    ) -> StepInfo:
        """Compute, combine and write the gradients of one (micro-)batch; see the module doc."""
        names, values = self._prepare(losses)
        window = self._window
        if window is not None and window.names != names:
            raise ValueError(
                f"the tasks changed within an accumulation window ({list(window.names)} -> "
                f"{list(names)}); call step() or zero_grad() first"
            )
        if features is not None and not isinstance(features, Tensor):
            raise TypeError(f"features must be a tensor, got {type(features).__name__}")
        scale = 1.0
        if scaler is not None and scaler.is_enabled():
            # scaler.scale() also initialises the scaler's state on its first use
            values = list(scaler.scale(torch.stack(values)).unbind())
            scale = float(scaler.get_scale())
        params = self._all_params()
        method = self.method
        inputs_losses = torch.stack([v.detach() for v in values]).double() / scale
        if window is not None and self.accumulation == "exact":
            inputs_losses = inputs_losses + window.losses
        try:
            if method.requires == "losses":
                return self._loss_step(names, values, params, inputs_losses, scale)
            if self._shared is None:
                self._shared = self._infer_shared(values, params)
            shared = self._shared
            if method.mode == "representation":
                return self._subset_step(names, values, params, inputs_losses, scale, features, None)
            subset = method.shared_subset(shared)
            if [id(p) for p in subset] != [id(p) for p in shared]:
                return self._subset_step(names, values, params, inputs_losses, scale, None, subset)
            return self._exact_step(names, values, params, inputs_losses, scale, features)
        except _NonFinite as err:
            if scale == 1.0:
                raise
            # Under a GradScaler a non-finite gradient is an overflow, not an error: poison one
            # gradient so that scaler.step() skips the step (and with it the method's commit),
            # exactly as it would for a plain optimizer, and let scaler.update() lower the scale.
            target = (self._shared or params)[0]
            if target.grad is None:
                target.grad = torch.zeros_like(target)
            target.grad.view(-1)[0] = float("inf")
            return StepInfo(
                weights=None,
                losses=inputs_losses,
                grad_norms=None,
                cosine=None,
                engine="skipped",
                task_names=names,
                extras={"non_finite": str(err)},
            )

    # -- path 1: weights from losses and state only: one ordinary backward
    def _loss_step(self, names, values, params, losses, scale) -> StepInfo:
        if self._shared is not None:
            self._check_reach(names, values, self._shared)
        agg = self._aggregate(TaskInputs(losses=losses, task_names=names, step=self.step_count))
        weights = agg.weights
        # keep the graph when the heads need a second pass with their own weights
        retain = agg.head_weights is not None and self._shared is not None
        grads = jacobian.weighted_gradients(values, weights, params, retain_graph=retain)
        if agg.head_weights is not None and self._shared is not None:
            grads = self._reweight_heads(values, params, grads, agg.head_weights)
        self._check_finite(grads, names, scale)
        self._add_to_grad(params, grads)
        self._close(names, losses, agg, written=None)
        return self._info(names, losses, agg, None, "losses")

    # -- path 2: gradients on a subset (representation z, or a method-chosen layer), then one
    #    ordinary backward of the weighted losses
    def _subset_step(self, names, values, params, losses, scale, features, subset) -> StepInfo:
        if subset is None:
            if features is None:
                raise ValueError(
                    f"{type(self.method).__name__} runs in representation mode: pass the shared "
                    "representation as opt.backward(losses, features=z)"
                )
            grads, reached = jacobian.feature_gradients(values, features)
            what = "the features"
            engine = "representation"
        else:
            tg = jacobian.task_gradients(values, subset, engine="loop", retain_graph=True)
            grads, reached, what, engine = tg.shared, tg.reached, "the chosen shared parameters", "loop"
        for name, ok in zip(names, reached or []):
            if not ok:
                raise ValueError(f"loss {name!r} does not depend on {what}")
        grads = grads / scale
        gram = self._gram(grads, names)
        agg = self._aggregate(
            TaskInputs(losses=losses, gram=gram, grads=grads if self.method.requires == "grads" else None,
                       task_names=names, step=self.step_count)
        )
        if agg.weights is None:
            raise ValueError(f"{type(self.method).__name__} returns a direction, which needs mode='exact'")
        out = jacobian.weighted_gradients(values, agg.weights, params,
                                          retain_graph=agg.head_weights is not None)
        if agg.head_weights is not None:
            out = self._reweight_heads(values, params, out, agg.head_weights)
        self._check_finite(out, names, scale)
        self._add_to_grad(params, out)
        self._close(names, losses, agg, written=None)
        return self._info(names, losses, agg, gram, engine)

    # -- path 3: exact task gradients on the shared parameters
    def _exact_step(self, names, values, params, losses, scale, features) -> StepInfo:
        shared = self._shared
        shared_ids = {id(p) for p in shared}
        heads = [p for p in params if id(p) not in shared_ids]
        engine = self._pick_engine(features, shared)
        if engine == "batched":
            self._check_reach(names, values, shared)
        tg = jacobian.task_gradients(
            values, shared, heads, engine=engine, features=features, chunk_size=self.chunk_size
        )
        engine_name = tg.engine
        if tg.fallback:
            engine_name = f"batched (fallback: {', '.join(tg.fallback)})"
            if self.engine == "auto" or not self._use_loop:
                warnings.warn(
                    "gradbalance: the batched engine has no vmap batching rule for "
                    f"{', '.join(tg.fallback)}; this step was exact but slow, later steps use the "
                    "loop engine",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self._use_loop = True
        for name, ok in zip(names, tg.reached or []):
            if not ok:
                raise ValueError(
                    f"loss {name!r} does not reach any shared parameter; check shared_params"
                )
        grads = tg.shared if scale == 1.0 else tg.shared / scale
        head_grads = tg.heads
        if scale != 1.0:
            head_grads = [[None if g is None else g / scale for g in row] for row in head_grads]
        window = self._window
        if window is not None and self.accumulation == "exact" and window.grads is not None:
            grads = grads + window.grads
            head_grads = [
                [a if b is None else (b if a is None else a + b) for a, b in zip(ra, rb)]
                for ra, rb in zip(head_grads, window.heads)
            ]
        gram = self._gram(grads, names)
        agg = self._aggregate(
            TaskInputs(losses=losses, gram=gram, grads=grads if self.method.requires == "grads" else None,
                       task_names=names, step=self.step_count)
        )
        if agg.direction is not None:
            direction = agg.direction.to(grads.dtype)
        else:
            direction = agg.weights.to(grads.dtype) @ grads
        hw = agg.head_weights if agg.head_weights is not None else agg.weights
        new = jacobian.unflatten(direction, shared)
        head_out: list[Tensor | None] = []
        for j in range(len(heads)):
            total = None
            for i in range(len(names)):
                g = head_grads[i][j]
                if g is None:
                    continue
                term = g if hw is None else g * hw[i].to(g.dtype)
                total = term if total is None else total + term
            head_out.append(total)
        contribution = [g * scale if scale != 1.0 else g for g in new] + [
            None if g is None else (g * scale if scale != 1.0 else g) for g in head_out
        ]
        targets = list(shared) + heads
        previous = window.written if (window is not None and self.accumulation == "exact") else None
        self._write(targets, contribution, previous)
        self._close(names, losses, agg, written=contribution, grads=grads, heads=head_grads)
        return self._info(names, losses, agg, gram, engine_name)

    # ------------------------------------------------------------------ pieces
    def _pick_engine(self, features: Tensor | None, shared: list[Tensor]) -> str:
        if self.engine == "loop" or self._use_loop:
            return "loop"
        if self.engine == "batched":
            return "batched"
        # auto: the batched VJP pays off on accelerators where kernel launches dominate and the
        # representation is known; on CPU it measured no faster than the loop (docs/engines.md).
        if features is not None and shared[0].device.type != "cpu":
            return "batched"
        return "loop"

    def _gram(self, grads: Tensor, names: tuple[str, ...]) -> Tensor:
        gram = (grads @ grads.T).double()
        finite = torch.isfinite(gram.diagonal())
        if not bool(finite.all()):
            bad = [names[i] for i in range(len(names)) if not bool(finite[i])]
            raise _NonFinite(f"the gradient of task(s) {bad} contains NaN or inf")
        return gram

    def _aggregate(self, inputs: TaskInputs) -> Aggregation:
        agg = self.method.aggregate(inputs)
        if agg.weights is None and agg.direction is None:
            raise RuntimeError(f"{type(self.method).__name__} returned neither weights nor direction")
        return agg

    def _reweight_heads(self, values, params, grads, head_weights):
        shared_ids = {id(p) for p in self._shared}
        idx = [j for j, p in enumerate(params) if id(p) not in shared_ids]
        if not idx:
            return grads
        hg = jacobian.weighted_gradients(values, head_weights, [params[j] for j in idx])
        out = list(grads)
        for j, g in zip(idx, hg):
            out[j] = g
        return out

    @staticmethod
    def _check_finite(grads: list[Tensor | None], names, scale: float) -> None:
        present = [g for g in grads if g is not None]
        if not present:
            raise ValueError("the losses reach none of the optimizer's parameters")
        total = torch.stack([g.float().abs().sum() for g in present]).sum()
        if not bool(torch.isfinite(total)):
            raise _NonFinite(f"the combined gradient of tasks {list(names)} contains NaN or inf")

    @staticmethod
    def _add_to_grad(params: list[Tensor], grads: list[Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    @staticmethod
    def _write(params, new: list[Tensor | None], previous: list[Tensor | None] | None) -> None:
        for j, (p, g) in enumerate(zip(params, new)):
            old = None if previous is None else previous[j]
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

    def _close(self, names, losses, agg: Aggregation, written, grads=None, heads=None) -> None:
        """Record the window's totals and the pending method state (nothing before this line
        of a step changes any state)."""
        exact = self.accumulation == "exact"
        window = self._window if self._window is not None else _Window(names=names, losses=losses)
        window.losses = losses if exact else window.losses + losses
        if exact:
            window.grads = grads
            window.heads = heads
            window.written = written
        window.pending = agg.pending
        window.has_pending = True
        window.calls += 1
        self._window = window

    def _info(self, names, losses, agg: Aggregation, gram: Tensor | None, engine: str) -> StepInfo:
        norms = cosine = None
        if gram is not None:
            norms, cosine = gram_diagnostics(gram)
        weights = agg.weights.detach() if agg.weights is not None else None
        return StepInfo(
            weights=weights,
            losses=losses.detach(),
            grad_norms=norms,
            cosine=cosine,
            engine=engine,
            task_names=names,
            extras=dict(agg.extras),
        )

    # ------------------------------------------------------------------ window control
    def commit(self) -> None:
        """The optimizer stepped: apply the method's pending state and close the window."""
        window = self._window
        self._window = None
        if window is not None and window.has_pending:
            self.method.commit(window.pending)
            self.step_count += 1

    def discard(self) -> None:
        """Drop the current window without changing the method's state (``zero_grad``)."""
        self._window = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"format": 1, "step": self.step_count, "method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown gradbalance state format {state.get('format')!r}")
        self.method.load_state_dict(dict(state["method"]))
        self.step_count = int(state["step"])
        self._window = None


class _NonFinite(ValueError):
    """A NaN or inf in a task gradient (a ValueError; GradScaler turns it into a skipped step)."""
