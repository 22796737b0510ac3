"""The coordinator of one balancing step: :class:`Balancer`, behind :class:`gradbalance.GradBalance`
and :func:`gradbalance.backward`.

It keeps what must survive between calls (the method, the shared parameters, the accumulation
window, the reuse cache, the engine switch) and does four things per call, in this order:

1. **prepare** (:mod:`gradbalance.inputs`): names and scalar losses, static task weights, the
   features and window checks, the GradScaler's scaling (:class:`~gradbalance.paths.context.Scaling`);
2. **choose a path** (:meth:`Balancer._choose`, first match wins):

   ========================================================  =========================================
   condition                                                 path (module under ``gradbalance.paths``)
   ========================================================  =========================================
   ``accumulation="buffered"`` under ``distributed``         ``ValueError`` (not supported yet)
   FSDP2 parameters                                          ``fsdp.fsdp_step``
   ``method.requires == "losses"``, not buffered             ``losses.losses_step``
   ``recompute_every > 1`` on a reuse step                   ``losses.losses_step(reused=...)``
   (infer the shared parameters if not given)
   ``mode="representation"``, not buffered                   ``subset.representation_step``
   strict ``shared_subset``, not buffered                    ``subset.subset_step``
   ``engine="gram"`` (or ``"auto"`` over the memory budget)  ``gramian.gram_step``
   ``accumulation="buffered"``                               ``exact.buffered_step``
   otherwise                                                 ``exact.exact_step``
   ========================================================  =========================================

3. **run it** on one :class:`~gradbalance.paths.context.StepContext`; the path computes into
   locals and returns a :class:`~gradbalance.paths.context.StepResult` without changing anything;
4. **commit** (:meth:`Balancer._commit_call`): write ``.grad``, store the new window, and keep the
   inferred shared parameters, the reach check, the engine switch and the list length; then the
   warnings. An error anywhere before step 4 leaves everything as it was.

The other axes never add a branch inside a path: the **accumulation** mode only decides which
window a path is given (the carried one for ``"exact"``/``"buffered"``, an empty one for
``"combine"``); **distributed** training only decides the reducer
(:class:`~gradbalance.paths.reduce.Local`, a no-op, or a strategy of :mod:`gradbalance.distributed`);
a **GradScaler** only changes :class:`~gradbalance.paths.context.Scaling`'s factor, and turns a
:class:`~gradbalance.errors.NonFiniteError` into a skipped step here.

The accumulation window is everything between two optimizer steps. With ``"exact"`` (the
default) every call adds its losses to the window's totals and runs the method on them from the
state of the last committed step. On the exact and FSDP paths it also adds its task gradients to
the window's and rewrites the window's contribution to ``.grad``: ``n`` micro-batches and one step
give the update of one call on the concatenated batch. On the losses, representation and subset
paths each call is written with its own call's weights, computed from the window's totals so far
(losses; representation: the window's summed Gram of the feature gradients; subset: the summed
subset gradients); earlier calls are not re-weighted, which is exact when the weights do not
change within the window, and the balancer warns once when they do. ``"buffered"`` takes the
exact path for every method. ``"combine"`` combines each call on its own and keeps nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from gradbalance import distributed as distributed_mod
from gradbalance import gram as gram_mod
from gradbalance.errors import NonFiniteError
from gradbalance.info import StepInfo
from gradbalance.inputs import (
    Losses,
    all_task_names,
    apply_task_weights,
    as_parameter_list,
    check_features,
    check_task_weight_names,
    infer_shared,
    prepare_losses,
    single_task_shared,
)
from gradbalance.methods.base import Aggregation, Method, make_method
from gradbalance.options import Options
from gradbalance.paths.context import Scaling, StepContext, StepResult
from gradbalance.paths.exact import buffered_step, exact_step
from gradbalance.paths.fsdp import fsdp_step
from gradbalance.paths.gramian import gram_step
from gradbalance.paths.losses import losses_step
from gradbalance.paths.reduce import Reducer
from gradbalance.paths.subset import representation_step, subset_step
from gradbalance.paths.window import Window, weights_changed_warning

__all__ = ["Balancer", "Losses", "as_parameter_list"]

STATE_FORMAT = 1


class Balancer:
    """Stateful coordinator behind :class:`~gradbalance.GradBalance` (see the module docstring).

    Args:
        method: a registered name or a :class:`~gradbalance.methods.Method`.
        shared_params: the shared parameters, or ``None`` to infer them on the first step that
            needs them, as the parameters that more than one loss reaches (one loss: all it reaches).
        params: every trainable parameter (shared and task-specific), or a callable returning them.
        options: the :class:`~gradbalance.options.Options` (engine, chunk size, task weights,
            accumulation ``"exact"``/``"buffered"``/``"combine"``, ``recompute_every``,
            distributed strategy and process group).

    Raises:
        ValueError: a method mode other than ``"exact"``/``"representation"``, a distributed
            strategy the method cannot use, or an empty shared set for a gradient-based method.
    """

    def __init__(self, method: str | Method, shared_params: Any, params: Any,
                 options: Options | None = None) -> None:
        self.method = make_method(method)
        self.options = options if options is not None else Options()
        if self.method.mode not in ("exact", "representation"):
            raise ValueError(f"method mode must be 'exact' or 'representation', got {self.method.mode!r}")
        distributed_mod.validate(self.options.distributed, self.method.requires)
        if self.options.engine == "gram":
            _check_gram_engine(self.method, self.options.accumulation)
        self._params = params
        self._shared: list[Tensor] | None = None if shared_params is None else as_parameter_list(shared_params)
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
        self._reducer: Reducer | None = None  # resolved at the first call (the group may come later)
        self._window: Window | None = None
        # (task names, weights, head weights) of the last committed step, for recompute_every > 1
        self._cached: tuple[tuple[str, ...], Tensor, Tensor | None] | None = None
        self._use_loop = False  # set once a batched call raised (and the call succeeded with the loop)
        self._gram_off = False  # engine="gram" met a second call of an exact window (loop from then on)
        self._blind_walk: tuple[str, ...] | None = None  # tasks whose reach only autograd.grad saw
        self._unnamed_k: int | None = None  # number of losses last passed as a list
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ read-only views
    @property
    def shared_params(self) -> list[Tensor] | None:
        """The shared parameters (``None`` until inferred on the first step that needs them)."""
        return self._shared

    @property
    def engine(self) -> str:
        return self.options.engine

    @property
    def accumulation(self) -> str:
        return self.options.accumulation

    @property
    def recompute_every(self) -> int:
        return self.options.recompute_every

    update_every = recompute_every  # the old name

    @property
    def sync(self) -> distributed_mod.Sync | None:
        """The collectives in use (``None`` in single-process training or before the first call)."""
        return getattr(self._reducer, "sync", None)

    def _all_params(self) -> list[Tensor]:
        return as_parameter_list(self._params() if callable(self._params) else self._params, "params")

    def validate_shared(self, optimizer_params: list[Tensor]) -> None:
        """Raise when a shared parameter is not held by the optimizer."""
        if self._shared is None:
            return
        held = {id(p) for p in optimizer_params}
        missing = [tuple(p.shape) for p in self._shared if id(p) not in held]
        if missing:
            raise ValueError(
                f"{len(missing)} tensor(s) in shared_params are not held by the optimizer "
                f"(shapes {missing[:3]}); pass the optimizer every parameter it should update"
            )

    def _resolve_reducer(self, params: list[Tensor]) -> Reducer:
        if self._reducer is None:
            o = self.options
            self._reducer = distributed_mod.make_reducer(o.distributed, o.process_group, self.method.requires, params)
        return self._reducer

    # ------------------------------------------------------------------ one call
    def backward(self, losses: Losses, *, features: Tensor | None = None, scaler: Any = None) -> StepInfo:
        """Compute, combine and write the gradients of one (micro-)batch; see the module doc.

        Distributed: a rank that raises while the others wait in a collective would leave them
        waiting until the process group's timeout. So every exception raised before the call's
        checkpoints have run (the ranks agree on the call; the method raised nowhere and gave the
        same weights everywhere; see :class:`gradbalance.distributed.Sync`) joins them, and every
        rank raises the same error; later errors come from checks of rank-averaged values, which
        every rank raises alike.
        """
        with _autocast_off():  # the balancing arithmetic runs in the parameters' dtype
            params = self._all_params()
            reducer = self._resolve_reducer(params)
            window = self._window
            reducer.open_call(
                distributed_mod.call_fingerprint(losses, 0 if window is None else window.calls, self.step_count),
                distributed_mod.local(params[0]).device if params else None,
            )
            ctx: StepContext | None = None
            try:
                ctx, unnamed_k, overflow = self._prepare(losses, features, scaler, params, reducer)  # 1.
                if overflow is None:
                    result = self._choose(ctx)(ctx)  # 2. and 3.
                reducer.flush()  # a checkpoint that no collective of this call has run yet
            except Exception as err:
                try:
                    reducer.fail(err)  # distributed: every rank raises together (single process: no-op)
                except NonFiniteError:
                    pass  # every rank raised this NaN/inf error alike: handled below as in one process
                if not isinstance(err, NonFiniteError) or ctx is None or not ctx.scaling.active:
                    raise
                overflow = err
            if overflow is not None:
                return self._overflow(ctx, overflow)
            return self._commit_call(ctx, result, unnamed_k)  # 4.

    def _prepare(
        self, losses: Losses, features: Tensor | None, scaler: Any, params: list[Tensor], reducer: Reducer,
    ) -> tuple[StepContext, int | None, NonFiniteError | None]:
        """Step 1: every check that needs no gradient, then the step's context (changes nothing
        but the GradScaler's lazily initialised state, as ``scaler.scale`` always does). A NaN/inf
        loss under an active GradScaler is returned as an overflow instead of raised."""
        window = self._window
        scaling = Scaling(scaler)
        names, values, lonely, unnamed_k, overflow = self._check_call(losses, features, scaling)
        values = scaling.scale_losses(values)
        call = torch.stack([v.detach() for v in values]).double() / scaling.factor
        carried = window if (window is not None and self.options.keeps_window) else Window.empty(names)
        reducer.begin(names, self.method, self.step_count, params)
        ctx = StepContext(
            method=self.method, names=names, values=values, params=params, shared=self._shared, call=call,
            window=carried, step=self.step_count, scaling=scaling, reducer=reducer, features=features,
            chunk_size=self._chunk_size(), walk_is_blind=self._blind_walk == names, lonely_shared=lonely,
        )
        return ctx, unnamed_k, overflow

    def _overflow(self, ctx: StepContext, err: NonFiniteError) -> StepInfo:
        """A NaN/inf gradient under a GradScaler: a skipped step, as plain AMP makes it."""
        Scaling.poison((ctx.shared or ctx.params)[0])
        return StepInfo(weights=None, losses=ctx.window.total(ctx.call), grad_norms=None, cosine=None,
                        engine="skipped", task_names=ctx.names, extras={"non_finite": str(err)})

    def _check_call(
        self, losses: Losses, features: Tensor | None, scaling: Scaling
    ) -> tuple[tuple[str, ...], list[Tensor], list[Tensor], int | None, NonFiniteError | None]:
        """The checks of this call on its own and against the previous ones (changes nothing):
        names and losses, task weights, NaN/inf losses (an overflow under an active scaler), the
        list length, the window's tasks, the features; on the first call, the shared parameters
        that one task alone reaches."""
        names, values = prepare_losses(losses)
        lonely: list[Tensor] = []
        if self.step_count == 0 and self._window is None:  # the first call: cheap one-off checks
            check_task_weight_names(self.options.task_weights, all_task_names(losses))
            if not self.inferred_shared and self._shared and "lonely" not in self._warned:
                lonely = single_task_shared(values, self._shared)
        values = apply_task_weights(self.options.task_weights, names, values)
        overflow = None
        try:
            assert self._reducer is not None
            self._reducer.check_call(names, torch.stack([v.detach() for v in values]))
        except NonFiniteError as err:
            if not scaling.active:
                raise
            overflow = err
        unnamed_k = self._check_list_length(losses, len(values))
        window = self._window
        if window is not None and window.names != names:
            raise ValueError(
                f"the tasks changed within an accumulation window ({list(window.names)} -> "
                f"{list(names)}); call step() or zero_grad() first"
            )
        check_features(features)
        return names, values, lonely, unnamed_k, overflow

    def _check_list_length(self, losses: Losses, k: int) -> int | None:
        """Unnamed losses must keep their number for a method with per-task state."""
        if isinstance(losses, Mapping):
            return self._unnamed_k
        previous = self._unnamed_k
        if previous is not None and previous != k and self.method.state_dict():
            raise ValueError(
                f"got {k} losses but {previous} at the previous step, and "
                f"{type(self.method).__name__} keeps state between steps: pass losses as a "
                "dict {name: loss or None} so that tasks are matched by name"
            )
        return k

    def _choose(self, ctx: StepContext) -> Callable[[StepContext], StepResult]:
        """The path for this call (the table of the module docstring); completes ``ctx``."""
        method, buffered = self.method, self.options.accumulation == "buffered"
        if buffered and ctx.reducer.distributed:
            raise ValueError("accumulation='buffered' is not supported with distributed training yet; "
                             "use accumulation='exact'")
        if ctx.reducer.fsdp:
            return fsdp_step
        if method.requires == "losses" and not buffered:
            return losses_step
        reused = self._reusable(ctx.names)
        if reused is not None:
            return lambda c: losses_step(c, reused)
        if ctx.shared is None:
            ctx.shared = infer_shared(ctx.values, ctx.params)
        shared = ctx.shared
        ctx.engine = self._pick_engine(ctx.features, shared)
        if method.mode == "representation" and not buffered:
            return representation_step
        subset = shared if method.mode == "representation" else method.choose_subset(shared, ctx.values)
        partial = [id(p) for p in subset] != [id(p) for p in shared]
        if partial and not buffered:
            return lambda c: subset_step(c, subset)
        if not partial and self._use_gram(ctx):
            return gram_step
        if buffered:
            return lambda c: buffered_step(c, subset if partial else None)
        return exact_step

    def _reusable(self, names: tuple[str, ...]) -> Aggregation | None:
        """The cached weights, on a step that ``recompute_every`` says to skip."""
        cached, every = self._cached, self.options.recompute_every
        if every > 1 and cached is not None and cached[0] == names and self.step_count % every != 0:
            return Aggregation(weights=cached[1], head_weights=cached[2])
        return None

    def _pick_engine(self, features: Tensor | None, shared: list[Tensor]) -> str:
        engine = self.options.engine
        if engine in ("loop", "gram") or self._use_loop:
            return "loop"
        if engine == "batched":
            return "batched"
        # auto: the batched VJP (torch.func.vmap) pays off on accelerators, where kernel launches
        # dominate; on CPU it measured slower than the loop (docs/guide/engines.md). A compiled
        # graph is sent to the loop by jacobian.task_gradients itself, before anything runs.
        return "batched" if shared[0].device.type != "cpu" else "loop"

    def _chunk_size(self) -> int | str | None:
        """The batched engine's chunk: ``"auto"`` when ``engine="auto"`` and none was given."""
        chunk = self.options.chunk_size
        return "auto" if chunk is None and self.options.engine == "auto" else chunk

    def _use_gram(self, ctx: StepContext) -> bool:
        """Whether this step of a requires="gram" method on every shared parameter runs the Gram
        engine: engine="gram", or engine="auto" when the k x P matrix would exceed
        ``gram.AUTO_BUDGET_BYTES``. A second call in an accumulation="exact" window cannot be
        exact without the first call's task gradients: ``ctx.gram_off`` (the loop from then on)."""
        method, engine = self.method, self.options.engine
        if self._gram_off or method.requires != "gram" or method.mode != "exact":
            return False
        if self.options.accumulation == "buffered" or self._use_loop:
            return False
        assert ctx.shared is not None
        if engine == "auto":
            if ctx.reducer.distributed or not gram_mod.prefer_gram(len(ctx.names), ctx.shared, ctx.values):
                return False
        elif engine != "gram":
            return False
        if ctx.reducer.distributed:
            raise ValueError(
                "engine='gram' does not support distributed training: the global batch's Gram matrix "
                "needs the cross-rank terms of the task gradients, which it never forms. Use "
                "engine='loop' (distributed='reduce_scatter' communicates about (k+1)P numbers, "
                "exact) or distributed='off'"
            )
        window = self._window
        if window is not None and self.options.keeps_window and window.calls > 0:
            ctx.gram_off = True
            return False
        return True

    def _commit_call(self, ctx: StepContext, result: StepResult, unnamed_k: int | None) -> StepInfo:
        """The only place where a call changes anything (after everything has succeeded)."""
        result.write.apply()
        base = self._window if self._window is not None else Window.empty(ctx.names)
        self._window = base.continued(result.window, self.options.keeps_window)
        self._shared = ctx.shared
        self._unnamed_k = unnamed_k
        if result.walk_is_blind:
            self._blind_walk = ctx.names
        if result.batched_failed and not self._use_loop:
            self._use_loop = True
            warnings.warn(f"gradbalance: the batched engine failed ({result.batched_failed}); this step and "
                          "the later ones use the loop engine", RuntimeWarning, stacklevel=4)
        if ctx.gram_off and not self._gram_off:
            self._gram_off = True
            warnings.warn(
                "engine='gram' with accumulation='exact': a second backward call before step() needs "
                "the cross terms between the calls' task gradients, which the Gram engine does not "
                "keep. So this window is not exactly one big batch (its first call was combined on its "
                "own); from the next step on the loop engine runs, exact. Pass accumulation='combine' "
                "to keep the Gram engine with per-call combination.",
                UserWarning, stacklevel=4,
            )
        if result.gram_failed and not self._gram_off:
            self._gram_off = True  # this call took the loop (nothing was written before it)
            warnings.warn(f"engine='gram' could not batch the backward over the tasks ({result.gram_failed}); "
                          "this and later steps use the loop engine", RuntimeWarning, stacklevel=4)
        if result.weights_changed and self.options.keeps_window:
            self._warn_once("inexact", weights_changed_warning, type(self.method).__name__)
        if ctx.lonely_shared:
            self._warn_once("lonely", _lonely_shared, ctx.lonely_shared, len(self._shared or ()))
        if self.options.recompute_every > 1 and result.aggregation.weights is None:
            self._warn_once("direction", _direction_not_reused, type(self.method).__name__,
                            self.options.recompute_every)
        info = result.info(ctx.names, ctx.reducer, shared_known=ctx.shared is not None)
        if self.options.recompute_every > 1:
            info.extras.setdefault("reused", 0)
        return info

    def _warn_once(self, key: str, warn: Callable[..., None], *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warn(*args)

    # ------------------------------------------------------------------ window control
    def commit(self) -> None:
        """The optimizer stepped: apply the method's pending state and close the window."""
        window = self._window
        self._window = None
        if window is None:
            return
        agg = window.aggregation
        if window.commit and agg is not None:
            self.method.commit(agg.pending)
            if self.options.recompute_every > 1 and agg.weights is not None:
                hw = None if agg.head_weights is None else agg.head_weights.detach().clone()
                self._cached = (window.names, agg.weights.detach().clone(), hw)
        self.step_count += 1

    def discard(self) -> None:
        """Drop the current window without changing the method's state (``zero_grad``)."""
        self._window = None

    # ------------------------------------------------------------------ checkpoints
    def _method_args(self) -> dict[str, str]:
        return {key: repr(value) for key, value in self.method.hyperparameters().items()}

    def state_dict(self) -> dict[str, Any]:
        """The step count, the method (class, arguments, state) and the reuse cache."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "method_class": type(self.method).__name__,
            "method_args": self._method_args(),
            "method": self.method.state_dict(),
        }
        if self._cached is not None:
            names, weights, head_weights = self._cached
            state["reuse"] = {"tasks": list(names), "weights": weights.clone()}
            if head_weights is not None:
                state["reuse"]["head_weights"] = head_weights.clone()
        return state

    def validate_state(self, state: Any) -> None:
        """Every check :meth:`load_state_dict` makes that needs no loading (changes nothing).

        Raises:
            TypeError: ``state`` is not a mapping.
            ValueError: unknown format, missing or malformed keys, or a checkpoint of another
                method class (checkpoints written before the class was recorded are accepted).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"the gradbalance state must be a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown gradbalance state format {state.get('format')!r} (expected {STATE_FORMAT})")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"gradbalance state: 'step' must be an int >= 0, got {step!r}")
        if not isinstance(state.get("method"), Mapping):
            raise ValueError("gradbalance state: 'method' (the method's state dict) is missing")
        saved = state.get("method_class")
        if saved is not None and saved != type(self.method).__name__:
            args = ", ".join(f"{k}={v}" for k, v in dict(state.get("method_args") or {}).items())
            raise ValueError(
                f"this checkpoint was saved by {saved}({args}), but this optimizer balances with "
                f"{self.method!r}: build it with the checkpoint's method to resume, or load only the "
                "inner optimizer's state with opt.optimizer.load_state_dict(...)"
            )
        reuse = state.get("reuse")
        if reuse is not None and not (
            isinstance(reuse, Mapping) and isinstance(reuse.get("weights"), Tensor)
            and all(isinstance(t, str) for t in reuse.get("tasks", [None]))
        ):
            raise ValueError("gradbalance state: malformed 'reuse' entry (expected tasks and weights)")

    def snapshot(self) -> tuple[Any, ...]:
        """Everything :meth:`load_state_dict` changes, for :meth:`restore`."""
        return (self.method.state_dict(), self.step_count, self._window, self._cached)

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        method_state, self.step_count, self._window, self._cached = snapshot
        self.method.load_state_dict(method_state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Validate ``state`` completely, then load it; on any error nothing has changed."""
        self.validate_state(state)
        saved_args = state.get("method_args")
        before = self.snapshot()
        try:
            self.method.load_state_dict(dict(state["method"]))
        except Exception:
            self.restore(before)
            raise
        self.step_count = int(state["step"])
        self._window = None
        reuse = state.get("reuse")
        self._cached = None
        if reuse is not None:
            self._cached = (tuple(reuse["tasks"]), reuse["weights"].clone(), reuse.get("head_weights"))
        if saved_args is not None and dict(saved_args) != self._method_args():
            warnings.warn(
                f"the checkpoint's {type(self.method).__name__} had arguments {dict(saved_args)}; this "
                f"one has {self._method_args()}: its state was loaded, the new arguments apply from now on",
                UserWarning, stacklevel=3,
            )


def _check_gram_engine(method: Method, accumulation: str) -> None:
    """engine="gram" needs a method that reads only the Gram matrix (it never forms the gradients)."""
    if method.requires == "grads":
        raise ValueError(
            f"engine='gram' computes only the Gram matrix of the task gradients, but "
            f"{type(method).__name__} needs the gradients themselves (requires='grads'); use "
            "engine='loop' or 'batched'"
        )
    if accumulation == "buffered":
        raise ValueError("accumulation='buffered' keeps the k x P task gradients, which engine='gram' "
                         "never forms; use accumulation='exact' or 'combine' with engine='gram'")


def _autocast_off() -> contextlib.ExitStack:
    """Leave every active autocast region for the duration of a call.

    Lightning's ``precision="bf16-mixed"`` runs ``training_step`` (and so ``opt.backward``) under
    ``torch.autocast``: the losses' graph keeps the autocast dtypes it was built with, but the
    balancing arithmetic (Gram matrices, ``w @ G``, the combined gradients) must not be
    downcast, and ``.grad`` must be written in the parameters' dtype.
    """
    stack = contextlib.ExitStack()
    for device in _AUTOCAST_DEVICES:
        try:
            enabled = torch.is_autocast_enabled(device)
        except (TypeError, RuntimeError):  # an older torch or an unknown device type
            continue
        if enabled:
            stack.enter_context(torch.autocast(device_type=device, enabled=False))
    return stack


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _lonely_shared(lonely: list[Tensor], total: int) -> None:
    shapes = [tuple(p.shape) for p in lonely[:3]]
    warnings.warn(
        f"{len(lonely)} of the {total} shared parameters are reached by one task only (shapes "
        f"{shapes}{', ...' if len(lonely) > 3 else ''}): they look task-specific. With "
        "shared_params=model every head counts as shared and is combined like the trunk; pass "
        "only the shared part (e.g. shared_params=model.trunk), or give the model a "
        "shared_parameters() method. Ignore this if a task was absent from this first batch.",
        UserWarning, stacklevel=6,
    )


def _direction_not_reused(method_name: str, every: int) -> None:
    warnings.warn(
        f"recompute_every={every} has no effect for {method_name}: it returns a direction, not task "
        "weights, so there is nothing to reuse and every step computes the task gradients",
        UserWarning, stacklevel=6,
    )
