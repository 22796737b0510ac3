"""One balancing step: validate the losses, get task gradients, run the method, write ``.grad``.

:class:`Balancer` is the single implementation behind :class:`gradbalance.GradBalance` and
:func:`gradbalance.backward`. It keeps what must survive between calls: the method, the shared
parameters (explicit or inferred on the first step) and the *accumulation window*.

The accumulation window is everything between two optimizer steps. With
``accumulation="exact"`` (the default), every call of :meth:`Balancer.backward` in a window adds
its per-task losses to the window's totals and re-runs the method on them from the state of the
last committed step. On the exact path (task gradients on all shared parameters) it also adds
its per-task gradients to the window's totals and rewrites the window's contribution to
``.grad``, so ``n`` micro-batches followed by one step give the update of one call on the
concatenated batch; the cost is keeping the ``k x P`` task-gradient matrix between calls. On
the losses path, each call's gradient is weighted with the weights computed from the window's
totals so far and earlier calls are not re-weighted (exact when the weights do not depend on
the current losses); in representation mode and for a method's ``shared_subset``, each call is
weighted from its own gradients. ``accumulation="combine"`` combines each call on its own and
just adds the results, like calling ``backward`` per micro-batch would, and keeps nothing.

Errors are raised before anything is written: parameters, ``.grad``, optimizer state and method
state are left exactly as they were.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gradbalance import distributed as distributed_mod
from gradbalance import jacobian
from gradbalance.info import StepInfo, gram_diagnostics
from gradbalance.methods.base import Aggregation, Method, TaskInputs, make_method

__all__ = ["Balancer", "Losses", "as_parameter_list"]

Losses = Sequence[Tensor] | Mapping[str, Tensor | None]
ENGINES = ("auto", "loop", "batched")
ACCUMULATIONS = ("exact", "combine", "buffered")


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
    grads: Tensor | None = None  # (k, P) task gradients on the shared params (or the subset)
    gram: Tensor | None = None  # representation mode: the window's summed Gram matrix
    heads: list[list[Tensor | None]] | None = None
    written: list[Tensor | None] | None = None  # what this window added to each param's .grad
    pending: Any = None
    calls: int = 0
    has_pending: bool = False
    aggregation: Aggregation | None = None
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
        update_every: recompute the weights of a gradient-based method every this many steps
            and reuse them in between at the cost of one ordinary backward (``1``: every step).
        distributed: ``"auto"``, ``"off"``, ``"allreduce"``, ``"reduce_scatter"`` or
            ``"local_gram"``: how the per-task inputs are averaged across ranks
            (:mod:`gradbalance.distributed`).
        process_group: the ``torch.distributed`` group to average over (``None``: the default).
    """

    def __init__(
        self,
        method: str | Method,
        shared_params: Any,
        params: Any,
        *,
        engine: str = "auto",
        chunk_size: int | str | None = None,
        task_weights: Sequence[float] | Mapping[str, float] | None = None,
        accumulation: str = "exact",
        update_every: int = 1,
        distributed: str = "auto",
        process_group: Any = None,
    ) -> None:
        self.method = make_method(method)
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        self.update_every = update_every
        # (task names, weights, head weights) of the last committed step, for update_every > 1
        self._cached: tuple[tuple[str, ...], Tensor, Tensor | None] | None = None
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if chunk_size is not None and chunk_size != "auto" and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {ACCUMULATIONS}, got {accumulation!r}")
        if self.method.mode not in ("exact", "representation"):
            raise ValueError(f"method mode must be 'exact' or 'representation', got {self.method.mode!r}")
        distributed_mod.validate(distributed, self.method.requires)
        self.distributed = distributed
        self.process_group = process_group
        self.sync: distributed_mod.Sync | None = None
        self._sync_resolved = False
        self.engine = engine
        self.chunk_size = chunk_size
        self.accumulation = accumulation
        self._warned_inexact = False
        self._call_weights: Tensor | None = None  # the weights of the last backward call
        self.task_weights = task_weights
        self._params = params
        self._shared: list[Tensor] | None = (
            None if shared_params is None else as_parameter_list(shared_params)
        )
        if self._shared is not None and not self._shared and self.method.requires != "losses":
            # An empty shared set is meaningful only for loss-weighting methods (e.g. a
            # gradbalance.nn.SoftSharing model, whose tasks share no parameter at all).
            raise ValueError(
                f"shared_params is empty (or none of them requires grad), but "
                f"{type(self.method).__name__} (requires={self.method.requires!r}) combines the "
                "tasks' gradients on shared parameters, and there are none. Pass the parameters "
                "the tasks share; a model whose tasks share none (gradbalance.nn.SoftSharing, "
                "tied only by a penalty) can be balanced only by a loss-weighting method "
                "(requires='losses', e.g. 'mean' or 'uw')"
            )
        self.inferred_shared = shared_params is None
        self.step_count = 0
        self._window: _Window | None = None
        self._use_loop = False  # set once the batched path has fallen back
        self._checked: tuple[str, ...] | None = None  # task set whose graph was checked
        self._unnamed_k: int | None = None  # number of losses last passed as a list

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
    def _prepare(
        self, losses: Losses, check_finite: bool = True
    ) -> tuple[tuple[str, ...], list[Tensor]]:
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
        if check_finite:  # distributed: checked on the averaged losses, so every rank raises
            self._check_losses(tuple(names), torch.stack([v.detach() for v in values]))
        return tuple(names), values

    @staticmethod
    def _check_losses(names: tuple[str, ...], losses: Tensor) -> None:
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = [names[i] for i in range(len(names)) if not bool(finite[i])]
            raise ValueError(f"loss of task(s) {bad} is NaN or inf: {losses.tolist()}")

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
        """Every loss must reach a shared parameter (checked once per task set).

        A graph walk settles it for free in eager mode; where it finds nothing (compiled graphs
        hide their parameters inside one opaque node) one ``autograd.grad`` confirms it.
        """
        if self._checked == names:
            return
        for name, v in zip(names, values):
            if any(jacobian.reached_parameters(v, shared)):
                continue
            grads = torch.autograd.grad(v, shared, retain_graph=True, allow_unused=True)
            if all(g is None for g in grads):
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
        params = self._all_params()
        sync = self._resolve_sync(params)
        names, values = self._prepare(losses, check_finite=sync is None)
        if not isinstance(losses, Mapping):
            previous = self._unnamed_k
            if previous is not None and previous != len(values) and self.method.state_dict():
                raise ValueError(
                    f"got {len(values)} losses but {previous} at the previous step, and "
                    f"{type(self.method).__name__} keeps state between steps: pass losses as a "
                    "dict {name: loss or None} so that tasks are matched by name"
                )
            self._unnamed_k = len(values)
        window = self._window
        if window is not None and window.names != names:
            raise ValueError(
                f"the tasks changed within an accumulation window ({list(window.names)} -> "
                f"{list(names)}); call step() or zero_grad() first"
            )
        if features is not None and not isinstance(features, Tensor):
            raise TypeError(f"features must be a tensor, got {type(features).__name__}")
        scale = 1.0
        scaled = scaler is not None and scaler.is_enabled()
        if scaled:
            # Scale each loss on its own (a stacked tensor would route every task's backward
            # through every other task's graph); scale() also initialises the scaler's state.
            values = [scaler.scale(v) for v in values]
            scale = float(scaler.get_scale())
        method = self.method
        # this call's losses; ``prev``: the window's totals so far (exact accumulation)
        call = torch.stack([v.detach() for v in values]).double() / scale
        prev = window.losses if (window is not None and self._keeps_window) else None
        inputs_losses = call if prev is None else call + prev
        if sync is not None:
            sync.bytes_sent = 0
            sync.check(names, method, self.step_count, params)
        try:
            buffered = self.accumulation == "buffered"
            if buffered and sync is not None:
                raise ValueError("accumulation='buffered' is not supported with distributed training yet; "
                                 "use accumulation='exact'")
            if sync is not None and sync.fsdp:
                return self._fsdp_step(names, values, params, call, prev, scale)
            if method.requires == "losses" and not buffered:
                return self._loss_step(names, values, params, call, prev, scale)
            if self._reuse_weights(names):
                _, weights, head_weights = self._cached
                agg = Aggregation(weights=weights, head_weights=head_weights, extras={"reused": True})
                return self._loss_step(names, values, params, call, prev, scale, agg)
            if self._shared is None:
                self._shared = self._infer_shared(values, params)
            shared = self._shared
            if method.mode == "representation" and not buffered:
                return self._subset_step(names, values, params, call, prev, scale, features, None)
            subset = shared if method.mode == "representation" else method.shared_subset(shared)
            partial = [id(p) for p in subset] != [id(p) for p in shared]
            if partial and not buffered:
                return self._subset_step(names, values, params, call, prev, scale, None, subset)
            return self._exact_step(names, values, params, call, prev, scale, features,
                                    subset if partial else None)
        except _NonFinite as err:
            if not scaled:
                raise
            # Under a GradScaler a non-finite gradient is an overflow, not an error: poison one
            # gradient so that scaler.step() skips the step (and with it the method's commit),
            # exactly as it would for a plain optimizer, and let scaler.update() lower the scale.
            target = (self._shared or params)[0]
            if target.grad is None:
                target.grad = torch.zeros_like(target)
            poisoned = distributed_mod.local(target.grad).view(-1)  # an FSDP shard may be empty
            if poisoned.numel():
                poisoned[0] = float("inf")
            return StepInfo(
                weights=None,
                losses=inputs_losses,
                grad_norms=None,
                cosine=None,
                engine="skipped",
                task_names=names,
                extras={"non_finite": str(err)},
            )

    @staticmethod
    def _columns(shared: list[Tensor], subset: list[Tensor]) -> Tensor:
        """The columns of the flattened (k, P) task gradients that belong to ``subset``."""
        wanted, cols, start = {id(p) for p in subset}, [], 0
        for p in shared:
            if id(p) in wanted:
                cols.append(torch.arange(start, start + p.numel()))
            start += p.numel()
        return torch.cat(cols)

    @property
    def _keeps_window(self) -> bool:
        """Whether backward calls between two steps are combined on the window's totals."""
        return self.accumulation in ("exact", "buffered")

    def _check_window_weights(self, prev, weights: Tensor) -> None:
        """Warn (once) when a window's micro-batches get different weights.

        On the paths that apply weights with one backward per call (loss weightings,
        representation mode, a shared-parameter subset) each micro-batch's gradient is written
        with the weights of its own call; the window equals one big batch exactly when those
        weights do not change within it (e.g. weights from committed state: sum, mean, UW,
        DWA, RLW, GradNorm). Otherwise say so, never silently.
        """
        last, self._call_weights = self._call_weights, weights.detach()
        if prev is None or last is None or self._warned_inexact:
            return
        if last.shape == weights.shape and torch.equal(last, self._call_weights.to(last.device)):
            return
        self._warned_inexact = True
        warnings.warn(
            f"accumulation='exact': {type(self.method).__name__}'s weights changed within the "
            "accumulation window (they depend on the current losses or on this micro-batch's "
            "representation gradients), so the window is not exactly one big batch: each "
            "micro-batch is weighted from the window's totals so far. Pass "
            "accumulation='buffered' for an exact window (the k per-task gradients of every "
            "parameter, computed and kept on every step) or accumulation='combine' to choose "
            "the per-micro-batch combination explicitly. See the accumulation guide.",
            UserWarning, stacklevel=5,
        )

    # -- path 1: weights from losses and state only: one ordinary backward
    def _reuse_weights(self, names: tuple[str, ...]) -> bool:
        return (
            self.update_every > 1
            and self._cached is not None
            and self._cached[0] == names
            and self.step_count % self.update_every != 0
        )

    def _loss_step(self, names, values, params, call, prev, scale,
                   reused: Aggregation | None = None) -> StepInfo:
        sync = self.sync
        if self._shared:  # an explicitly empty shared set (no sharing) has nothing to reach
            self._check_reach(names, values, self._shared)
        losses = self._total(names, call if sync is None else sync.mean(call), prev)
        agg = reused or self._aggregate(
            TaskInputs(losses=losses, task_names=names, step=self.step_count)
        )
        weights = agg.weights
        self._check_window_weights(prev, weights)
        reweight = agg.head_weights is not None and self._shared is not None
        grads = jacobian.weighted_gradients(values, weights, params, retain_graph=reweight)
        if reweight:
            grads = self._reweight_heads(values, params, grads, agg.head_weights)
        if sync is not None:  # autograd.grad fired no DDP hook: average the result once, here
            grads = sync.mean_present(grads, params)
        self._check_finite(grads, names, scale)
        self._add_to_grad(params, grads)
        self._close(names, losses, agg, written=None, commit=reused is None)
        return self._info(names, losses, agg, None, "losses" if reused is None else "reused")

    # -- path 2: gradients on a subset (representation z, or a method-chosen layer), then one
    #    ordinary backward of the weighted losses
    def _subset_step(self, names, values, params, call, prev, scale, features, subset) -> StepInfo:
        if subset is None:
            if features is None:
                raise ValueError(
                    f"{type(self.method).__name__} runs in representation mode: pass the shared "
                    "representation as opt.backward(losses, features=z)"
                )
            passes = jacobian.feature_passes(values, features, params, self._shared or ())
            grads, reached = passes.grads, passes.reached
            what = "the features"
            engine = "representation"
        else:
            tg = jacobian.task_gradients(values, subset, engine="loop", retain_graph=True)
            grads, reached, what, engine = tg.shared, tg.reached, "the chosen shared parameters", "loop"
        for name, ok in zip(names, reached or []):
            if not ok:
                raise ValueError(f"loss {name!r} does not depend on {what}")
        if scale != 1.0:  # no (k, n) copy when there is no GradScaler
            grads = grads / scale
        sync, k = self.sync, len(names)
        window = self._window if self._keeps_window else None
        summed_gram = None
        if sync is None:
            losses = self._total(names, call, prev)
        elif subset is None:
            if self.method.requires == "grads":
                raise ValueError(
                    f"{type(self.method).__name__} needs the gradients on the features themselves, "
                    "which are split across ranks; distributed training supports representation "
                    "mode for methods with requires='gram' or 'losses'"
                )
            # rows of z are samples: the global batch's Gram is the sum of the local ones / R^2
            buf = sync.sum_(torch.cat([(grads @ grads.T).double().reshape(-1), call]))
            summed_gram = buf[: k * k].view(k, k) / sync.world**2
            losses = self._total(names, buf[k * k :] / sync.world, prev)
        else:
            buf = sync.mean(torch.cat([grads.reshape(-1), call.to(grads.dtype)]))
            grads = buf[:-k].view(k, -1)
            losses = self._total(names, buf[-k:].double(), prev)
        if subset is not None and window is not None and window.grads is not None:
            grads = grads + window.grads  # same coordinates in every micro-batch: sum them
        if summed_gram is not None:
            gram = self._checked_gram(summed_gram, names)
        else:
            gram = self._gram(grads, names)
        if subset is None and window is not None and window.gram is not None:
            # features of different samples occupy disjoint coordinates of the concatenated
            # batch, so the window's Gram matrix is the sum of the micro-batches' ones
            gram = gram + window.gram
        agg = self._aggregate(
            TaskInputs(losses=losses, gram=gram, grads=grads if self.method.requires == "grads" else None,
                       task_names=names, step=self.step_count)
        )
        if agg.weights is None:
            raise ValueError(f"{type(self.method).__name__} returns a direction, which needs mode='exact'")
        self._check_window_weights(prev, agg.weights)
        if subset is None and passes.direct:
            out = self._finish_through_features(passes, params, agg)
        else:
            out = jacobian.weighted_gradients(values, agg.weights, params,
                                              retain_graph=agg.head_weights is not None)
            if agg.head_weights is not None:
                out = self._reweight_heads(values, params, out, agg.head_weights)
        if sync is not None:
            out = sync.mean_present(out, params)
        self._check_finite(out, names, scale)
        self._add_to_grad(params, out)
        if subset is None:
            self._close(names, losses, agg, written=None, gram=gram)
        else:
            self._close(names, losses, agg, written=None, grads=grads)
        return self._info(names, losses, agg, gram, engine)

    # -- path 3: exact task gradients on the shared parameters
    def _exact_step(self, names, values, params, call, prev, scale, features, subset=None) -> StepInfo:
        """Task gradients on every shared parameter; the method sees their Gram matrix (or,
        with accumulation="buffered", that of the feature gradients in representation mode or
        of a method's ``shared_subset``), and the window keeps them all, so it is exact."""
        shared = self._shared
        feature_grads = None
        if self.method.mode == "representation":  # only reached with accumulation="buffered"
            if self.method.requires == "grads":
                raise ValueError(f"accumulation='buffered' supports representation-mode methods that "
                                 f"need the Gram matrix only, not {type(self.method).__name__}")
            if features is None:
                raise ValueError(
                    f"{type(self.method).__name__} runs in representation mode: pass the shared "
                    "representation as opt.backward(losses, features=z)"
                )
            feature_grads, _ = jacobian.feature_gradients(values, features)  # keeps the graph
        shared_ids = {id(p) for p in shared}
        heads = [p for p in params if id(p) not in shared_ids]
        engine = self._pick_engine(features, shared)
        if engine == "batched":
            self._check_reach(names, values, shared)
        tg = self._task_gradients(values, shared, heads, engine, features)
        engine_name, engine_extras = jacobian.describe(tg)
        for name, ok in zip(names, tg.reached or []):
            if not ok:
                raise ValueError(
                    f"loss {name!r} does not reach any shared parameter; check shared_params"
                )
        grads = tg.shared if scale == 1.0 else tg.shared / scale
        head_grads = tg.heads
        if scale != 1.0:
            head_grads = [[None if g is None else g / scale for g in row] for row in head_grads]
        sync, k, width = self.sync, len(names), grads.shape[1]
        strategy = None if sync is None else sync.strategy
        if strategy == "allreduce":  # one flat buffer: every task gradient and the losses
            buf = sync.mean(torch.cat([grads.reshape(-1), call.to(grads.dtype)]))
            grads, call = buf[:-k].view(k, width), buf[-k:].double()
        elif strategy == "reduce_scatter":  # keep P/R columns of the averaged gradients
            grads = sync.reduce_scatter_rows(grads)
        window = self._window
        if window is not None and self._keeps_window and window.grads is not None:
            grads = grads + window.grads
            head_grads = [
                [a if b is None else (b if a is None else a + b) for a, b in zip(ra, rb)]
                for ra, rb in zip(head_grads, window.heads)
            ]
        if strategy in ("reduce_scatter", "local_gram"):
            # reduce_scatter: sum of the shards' Grams = the exact Gram; local_gram: mean of the
            # ranks' own Grams (biased, documented). The losses ride in the same buffer.
            buf = sync.sum_(torch.cat([(grads @ grads.T).double().reshape(-1), call]))
            buf[k * k :] /= sync.world
            if strategy == "local_gram":
                buf[: k * k] /= sync.world
            gram = self._checked_gram(buf[: k * k].view(k, k), names)
            losses = self._total(names, buf[k * k :], prev)
        elif feature_grads is not None:  # accumulation="buffered", representation mode
            losses = self._total(names, call, prev)
            part = feature_grads.double() / scale
            gram = part @ part.T
            if window is not None and window.gram is not None:
                gram = gram + window.gram  # micro-batches hold disjoint rows of z
            gram = self._checked_gram(gram, names)
        elif subset is not None:  # accumulation="buffered", a method's shared_subset
            losses = self._total(names, call, prev)
            part = grads[:, self._columns(shared, subset)]  # already summed over the window
            gram = self._gram(part, names)
        else:
            losses = self._total(names, call, prev)
            gram = self._gram(grads, names)
        agg = self._aggregate(
            TaskInputs(losses=losses, gram=gram, grads=grads if self.method.requires == "grads" else None,
                       task_names=names, step=self.step_count)
        )
        if agg.direction is not None:
            if strategy in ("reduce_scatter", "local_gram"):
                raise ValueError(
                    f"{type(self.method).__name__} returned a direction, which needs the full task "
                    f"gradients: use distributed='allreduce', not {strategy!r}"
                )
            direction = agg.direction.to(grads.dtype)
        else:
            direction = agg.weights.to(grads.dtype) @ grads
        if strategy == "reduce_scatter":
            direction = sync.all_gather_columns(direction, width)
        hw = agg.head_weights if agg.head_weights is not None else agg.weights
        new: list[Tensor | None] = list(jacobian.unflatten(direction, shared))
        head_out = self._combine_heads(head_grads, hw, len(heads))
        if strategy == "local_gram":  # the local combination, averaged once
            out = sync.mean_present(new + head_out, shared + heads)
            new, head_out = out[: len(shared)], out[len(shared) :]
        elif sync is not None:  # head gradients stayed local: average their combination
            head_out = sync.mean_present(head_out, heads)
        contribution = [g * scale if scale != 1.0 else g for g in new] + [
            None if g is None else (g * scale if scale != 1.0 else g) for g in head_out
        ]
        targets = list(shared) + heads
        previous = window.written if (window is not None and self._keeps_window) else None
        self._write(targets, contribution, previous)
        self._close(names, losses, agg, written=contribution, grads=grads, heads=head_grads,
                    gram=gram if feature_grads is not None else None)
        return self._info(names, losses, agg, gram, engine_name, engine_extras)

    # -- path 4: FSDP2. autograd.grad cannot reach sharded parameters: k ordinary backward passes
    #    (FSDP reduce-scatters each), the local shards' Grams summed across ranks = the exact Gram
    def _fsdp_step(self, names, values, params, call, prev, scale) -> StepInfo:
        method, sync, k = self.method, self.sync, len(names)
        label = type(method).__name__
        if method.requires == "grads" or method.mode == "representation":
            what = "the full task gradients" if method.requires == "grads" else "features="
            raise ValueError(
                f"{label} needs {what}, which FSDP does not provide (parameters are sharded); "
                "under FSDP use a method with requires='gram' or 'losses', or use DDP"
            )
        if method.requires == "losses":
            losses = self._total(names, sync.mean(call), prev)
            agg = self._aggregate(TaskInputs(losses=losses, task_names=names, step=self.step_count))
            self._check_window_weights(prev, agg.weights)
            totals = [torch.stack(values).mul(agg.weights.to(values[0].dtype)).sum()]
            if agg.head_weights is not None:
                totals.append(torch.stack(values).mul(agg.head_weights.to(values[0].dtype)).sum())
            passes = jacobian.backward_passes(totals, params)
            grads = passes[0]
            if len(passes) > 1:  # the heads' own weights: from the second pass
                ids = {id(p) for p in (self._shared or params)}
                grads = [g if id(p) in ids else h for p, g, h in zip(params, grads, passes[1])]
            grads = self._mean_unsharded(grads, params)
            self._check_finite(grads, names, scale, sync)
            self._add_to_grad(params, grads)
            self._close(names, losses, agg, written=None)
            return self._info(names, losses, agg, None, "losses")
        if self._shared is None:
            raise ValueError(
                "under FSDP pass shared_params explicitly: the autograd graph holds unsharded "
                "copies of the parameters, so they cannot be inferred from it"
            )
        shared = self._shared
        if not all(distributed_mod.is_sharded(p) for p in shared):
            raise ValueError("under FSDP every shared parameter must be sharded by fully_shard")
        shared_ids = {id(p) for p in shared}
        heads = [p for p in params if id(p) not in shared_ids]
        n = len(shared)
        passes = jacobian.backward_passes(values, shared + heads)
        local = distributed_mod.local
        shards = [local(p) for p in shared]
        rows, head_grads = [], []
        for name, task in zip(names, passes):
            if all(g is None for g in task[:n]):
                raise ValueError(
                    f"loss {name!r} does not reach any shared parameter; check shared_params"
                )
            rows.append(jacobian.flatten([None if g is None else local(g) for g in task[:n]], shards))
            head_grads.append([None if g is None else local(g) / scale for g in task[n:]])
        grads = torch.stack(rows) / scale
        window = self._window
        if window is not None and self._keeps_window and window.grads is not None:
            grads = grads + window.grads
            head_grads = [
                [a if b is None else (b if a is None else a + b) for a, b in zip(ra, rb)]
                for ra, rb in zip(head_grads, window.heads)
            ]
        subset_ids = {id(p) for p in method.shared_subset(shared)}
        cols, offset = [], 0
        for p, shard in zip(shared, shards):
            size = shard.numel()
            if id(p) in subset_ids:
                cols.append(grads[:, offset : offset + size])
            offset += size
        sub = torch.cat(cols, dim=1) if len(cols) < n else grads
        buf = sync.sum_(torch.cat([(sub @ sub.T).double().reshape(-1), call]))
        gram = self._checked_gram(buf[: k * k].view(k, k), names)
        losses = self._total(names, buf[k * k :] / sync.world, prev)
        agg = self._aggregate(
            TaskInputs(losses=losses, gram=gram, task_names=names, step=self.step_count)
        )
        if agg.weights is None:
            raise ValueError(f"{label} returned a direction, which FSDP cannot apply")
        like = distributed_mod.like_param
        direction = agg.weights.to(grads.dtype) @ grads
        new = [like(g, p) for g, p in zip(jacobian.unflatten(direction, shards), shared)]
        hw = agg.head_weights if agg.head_weights is not None else agg.weights
        combined = self._combine_heads(head_grads, hw, len(heads))
        head_out = [None if g is None else like(g, p) for g, p in zip(combined, heads)]
        head_out = self._mean_unsharded(head_out, heads)
        contribution = [
            None if g is None else (g * scale if scale != 1.0 else g) for g in new + head_out
        ]
        previous = window.written if (window is not None and self._keeps_window) else None
        self._write(shared + heads, contribution, previous)
        self._close(names, losses, agg, written=contribution, grads=grads, heads=head_grads)
        return self._info(names, losses, agg, gram, "fsdp")

    # ------------------------------------------------------------------ pieces
    def _resolve_sync(self, params: list[Tensor]) -> distributed_mod.Sync | None:
        """Decide once, at the first step (the process group may be created after the wrapper)."""
        if not self._sync_resolved:
            self.sync = distributed_mod.resolve(
                self.distributed, self.process_group, self.method.requires, params
            )
            self._sync_resolved = True
        return self.sync

    def _total(self, names, call: Tensor, prev: Tensor | None) -> Tensor:
        """The window's losses after this call (``call`` already averaged across ranks)."""
        total = call if prev is None else call + prev
        if self.sync is not None:
            self._check_losses(names, total)
        return total

    def _mean_unsharded(self, grads: list[Tensor | None], params: list[Tensor]) -> list[Tensor | None]:
        """Under FSDP, average the gradients of parameters that FSDP does not manage."""
        idx = [j for j, p in enumerate(params) if not distributed_mod.is_sharded(p)]
        if not idx:
            return grads
        out = list(grads)
        reduced = self.sync.mean_present([grads[j] for j in idx], [params[j] for j in idx])
        for j, g in zip(idx, reduced):
            out[j] = g
        return out

    @staticmethod
    def _combine_heads(head_grads, hw: Tensor | None, n_heads: int) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for j in range(n_heads):
            total = None
            for i in range(len(head_grads)):
                g = head_grads[i][j]
                if g is None:
                    continue
                term = g if hw is None else g * hw[i].to(g.dtype)
                total = term if total is None else total + term
            out.append(total)
        return out

    def _pick_engine(self, features: Tensor | None, shared: list[Tensor]) -> str:
        if self.engine == "loop" or self._use_loop:
            return "loop"
        if self.engine == "batched":
            return "batched"
        # auto: the batched VJP (torch.func.vmap) pays off on accelerators, where kernel launches
        # dominate; on CPU it measured slower than the loop (docs/guide/engines.md). A compiled
        # graph is sent to the loop by jacobian.task_gradients itself, before anything runs.
        return "batched" if shared[0].device.type != "cpu" else "loop"

    def _task_gradients(self, values, shared, heads, engine: str, features) -> jacobian.TaskGradients:
        """The task gradients by ``engine``; the batched engine's chunk is ``"auto"`` when
        ``engine="auto"`` chose it and no ``chunk_size`` was given. If vmap raises (an op it
        cannot run at all, as opposed to one it runs per task), this step reruns with the loop
        (nothing was written yet), warns once, and later steps use the loop."""
        chunk: int | str | None = self.chunk_size
        if chunk is None and self.engine == "auto":
            chunk = "auto"
        try:
            return jacobian.task_gradients(values, shared, heads, engine=engine, features=features,
                                           chunk_size=chunk)
        except RuntimeError as err:
            if engine != "batched":
                raise
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            if not self._use_loop:
                warnings.warn(f"gradbalance: the batched engine failed ({reason}); this step and the "
                              "later ones use the loop engine", RuntimeWarning, stacklevel=5)
            self._use_loop = True
            tg = jacobian.task_gradients(values, shared, heads, engine="loop")
            tg.note = f"batched failed: {reason}"
            return tg

    def _gram(self, grads: Tensor, names: tuple[str, ...]) -> Tensor:
        return self._checked_gram((grads @ grads.T).double(), names)

    @staticmethod
    def _checked_gram(gram: Tensor, names: tuple[str, ...]) -> Tensor:
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

    @staticmethod
    def _finish_through_features(passes, params, agg: Aggregation) -> list[Tensor | None]:
        """Representation mode: the gradients of ``sum_i w_i L_i`` (heads: ``head_weights``) on
        ``params`` from the head passes and one backward through the trunk only (the heads are
        not run a second or third time)."""
        if agg.weights is None:
            raise ValueError("representation mode needs weights, not a direction")
        done, grads = jacobian.finish_through_features(passes, agg.weights, agg.head_weights)
        found = {id(p): g for p, g in zip(done, grads)}
        return [found.get(id(p)) for p in params]

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
    def _check_finite(grads: list[Tensor | None], names, scale: float, sync=None) -> None:
        present = [distributed_mod.local(g) for g in grads if g is not None]
        if not present:
            raise ValueError("the losses reach none of the optimizer's parameters")
        # sum of |g| (an extra pass over the gradients; for float32 without the |g| temporary)
        total = torch.stack([
            torch.linalg.vector_norm(g, 1) if g.dtype == torch.float32 else g.float().abs().sum()
            for g in present
        ]).sum()
        if sync is not None:  # FSDP shards: agree across ranks, so that every rank raises
            total = sync.sum_(total.reshape(1))
        if not bool(torch.isfinite(total).all()):
            raise _NonFinite(f"the combined gradient of tasks {list(names)} contains NaN or inf")

    @staticmethod
    def _add_to_grad(params: list[Tensor], grads: list[Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach()  # a fresh tensor from autograd.grad: no copy needed
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

    def _close(self, names, losses, agg: Aggregation, written, grads=None, heads=None,
               commit: bool = True, gram: Tensor | None = None) -> None:
        """Record the window's totals and the pending method state (nothing before this line
        of a step changes any state)."""
        exact = self._keeps_window
        window = self._window if self._window is not None else _Window(names=names, losses=losses)
        window.losses = losses  # in "combine" mode only the current call's losses matter
        if exact:
            window.grads = grads
            window.heads = heads
            window.written = written
            window.gram = gram
        window.pending = agg.pending
        window.has_pending = commit
        window.aggregation = agg
        window.calls += 1
        self._window = window

    def _info(self, names, losses, agg: Aggregation, gram: Tensor | None, engine: str,
              engine_extras: dict[str, Any] | None = None) -> StepInfo:
        norms = cosine = None
        if gram is not None:
            norms, cosine = gram_diagnostics(gram)
        weights = agg.weights.detach() if agg.weights is not None else None
        extras = dict(agg.extras)
        extras.update(engine_extras or {})
        if self.sync is not None:
            extras["distributed"] = self.sync.strategy + (" (fsdp)" if self.sync.fsdp else "")
            extras["comm_bytes"] = self.sync.bytes_sent
        return StepInfo(
            weights=weights,
            losses=losses.detach(),
            grad_norms=norms,
            cosine=cosine,
            engine=engine,
            task_names=names,
            extras=extras,
        )

    # ------------------------------------------------------------------ window control
    def commit(self) -> None:
        """The optimizer stepped: apply the method's pending state and close the window."""
        window = self._window
        self._window = None
        if window is None:
            return
        if window.has_pending:
            self.method.commit(window.pending)
            agg = window.aggregation
            if self.update_every > 1 and agg is not None and agg.weights is not None:
                hw = None if agg.head_weights is None else agg.head_weights.detach().clone()
                self._cached = (window.names, agg.weights.detach().clone(), hw)
        self.step_count += 1

    def discard(self) -> None:
        """Drop the current window without changing the method's state (``zero_grad``)."""
        self._window = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": 1,
            "step": self.step_count,
            "method": self.method.state_dict(),
        }
        if self._cached is not None:
            names, weights, head_weights = self._cached
            state["reuse"] = {"tasks": list(names), "weights": weights.clone()}
            if head_weights is not None:
                state["reuse"]["head_weights"] = head_weights.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != 1:
            raise ValueError(f"unknown gradbalance state format {state.get('format')!r}")
        self.method.load_state_dict(dict(state["method"]))
        self.step_count = int(state["step"])
        self._window = None
        reuse = state.get("reuse")
        self._cached = None
        if reuse is not None:
            self._cached = (tuple(reuse["tasks"]), reuse["weights"].clone(),
                            reuse.get("head_weights"))


class _NonFinite(ValueError):
    """A NaN or inf in a task gradient (a ValueError; GradScaler turns it into a skipped step)."""
