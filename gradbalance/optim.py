"""``GradBalance``: a multi-task wrapper around any ``torch.optim`` optimizer, and ``backward``."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gradbalance import jacobian
from gradbalance.balancer import Balancer
from gradbalance.info import StepInfo
from gradbalance.inputs import Losses, as_parameter_list
from gradbalance.methods.base import Method, make_method
from gradbalance.options import Options

__all__ = ["GradBalance", "backward"]

_STATE_KEY = "gradbalance"


class GradBalance(torch.optim.Optimizer):
    """Wrap an optimizer so that it balances several task losses on shared parameters.

    ``opt.backward(losses)`` computes each task's gradient on the shared parameters, resolves
    them with ``method``, and writes the result into ``.grad`` (adding to what is there, like
    ``loss.backward()``); ``opt.step()`` then steps the wrapped optimizer. The wrapper is a real
    :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and ``defaults`` are the wrapped
    optimizer's own (not copies), so LR schedulers, ``torch.amp.GradScaler``, gradient clipping
    and checkpoints work unchanged; ``state_dict()`` adds the method's state under the key
    ``"gradbalance"``.

    Args:
        optimizer: any :class:`torch.optim.Optimizer` holding all the model's parameters.
        method: a registered name (see :func:`gradbalance.available_methods`) or a method object
            such as ``gb.methods.MGDA(solver="cvxpy")``. Default ``"mean"``.
        shared_params: the parameters every task shares: an iterable of tensors, or an
            ``nn.Module`` (its ``shared_parameters()`` when it has one, e.g.
            :class:`gradbalance.nn.HardSharing`, else all its parameters). Every other parameter
            of the optimizer is task-specific. ``None`` (default): inferred on the first step
            that needs it as the parameters reached by more than one loss (graph walk, no
            extra computation), then kept; read it back from :attr:`shared_params`.
        engine: how per-task gradients are computed: ``"loop"`` (k ``autograd.grad`` calls),
            ``"batched"`` (``torch.func.vmap`` over ``autograd.grad`` on the graph of your
            forward; an op without a batching rule runs per task inside it and is recorded in
            ``StepInfo``; a ``torch.compile`` graph takes the loop), ``"gram"`` (methods with
            ``requires="gram"``: their Gram matrix without the ``k x P`` task gradients, then one
            weighted backward; see the Gram engine guide), or ``"auto"`` (default: batched on an
            accelerator, the loop on CPU; see the engines guide; the Gram engine for Gram methods
            when the ``k x P`` matrix would exceed ``gradbalance.gram.AUTO_BUDGET_BYTES`` and its
            own estimated working set is smaller).
        chunk_size: at most this many tasks per batched call (bounds the batched call's memory);
            ``"auto"``: chosen from the device's free memory; ``None``: all tasks at once with
            ``engine="batched"``, ``"auto"`` when ``engine="auto"`` picks the batched engine.
        task_weights: static task weights applied to the losses before the method: a sequence
            of one positive number per task, or a dict ``{task name: weight}`` (missing names: 1).
            Every weight must be finite and > 0; a dict key that names no task of the first step
            raises.
        accumulation: ``"exact"`` (default: the losses, and for methods on the exact path the
            task gradients, are summed over the ``backward`` calls before one ``step`` and the
            method re-run on the totals, which gives the update of the concatenated batch for
            those methods; keeps the ``k x P`` task gradients until the step; for loss-only
            methods and for representation mode each call is written with the weights computed
            from the window's totals so far (the summed losses; representation mode: the window's
            summed Gram of the feature gradients) and earlier calls are not re-weighted, which is
            exact when the weights do not change within the window; a warning says so once when
            they do),
            ``"buffered"`` (exact for every method: the per-task gradients of every parameter
            are computed and kept on every step, at the exact engine's cost even for loss-only
            and representation-mode methods; not yet with ``distributed``) or ``"combine"``
            (each call combined on its own, results summed; nothing kept).
        recompute_every: for methods that need per-task gradients, recompute the weights every
            ``recompute_every`` optimizer steps and reuse the last ones in between, at the cost of
            one ordinary backward (``StepInfo.engine == "reused"``, ``extras["reused"] == 1``;
            the computing steps report ``extras["reused"] == 0``). Default 1 (every step).
            Methods that return a direction (GradDrop) have no weights to reuse: a warning says
            so and every step computes. Not Nash-MTL's own ``update_every``, which computes the
            Gram matrix on every step and only skips its solver in between.
        update_every: the old name of ``recompute_every`` (accepted, with a DeprecationWarning).
        distributed: multi-process training (see the distributed guide): ``"auto"`` (default:
            on when ``torch.distributed`` is initialised with more than one rank; exact, with
            ``"reduce_scatter"`` for Gram-based methods on NCCL and ``"allreduce"`` otherwise),
            ``"allreduce"`` (exact; all-reduce the ``k x P`` task gradients in one flat buffer),
            ``"reduce_scatter"`` (exact for Gram-based methods, about half the traffic),
            ``"local_gram"`` (approximate: the method sees the average of the ranks' local Gram
            matrices; traffic like plain DDP) or ``"off"`` (each rank balances its own batch).
            Per-task gradients never fire DDP's hooks, so no ``no_sync()`` is needed.
        process_group: the ``torch.distributed`` process group to average over (default group).

    The keyword arguments after ``shared_params`` are the fields of
    :class:`~gradbalance.options.Options`, validated there once.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``; an option of the wrong type
            (e.g. ``engine=1``, ``chunk_size=2.0``, ``recompute_every="3"``).
        ValueError: unknown method name (the message lists the valid ones), an option out of
            range (unknown engine, accumulation or strategy, ``chunk_size < 1``,
            ``recompute_every < 1``, a task weight that is not finite and > 0), empty shared
            parameters, or shared parameters the optimizer does not hold.

    Example:
        >>> import torch, gradbalance as gb
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))
        >>> params = list(trunk.parameters()) + list(heads.parameters())
        >>> opt = gb.GradBalance(torch.optim.SGD(params, lr=0.1), "mean", shared_params=trunk)
        >>> z = trunk(torch.randn(16, 4))
        >>> info = opt.backward([h(z).pow(2).mean() for h in heads])
        >>> opt.step()
        >>> info.weights
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        method: str | Method = "mean",
        shared_params: Any = None,
        *,
        engine: str = "auto",
        chunk_size: int | str | None = None,
        task_weights: Sequence[float] | Mapping[str, float] | None = None,
        accumulation: str = "exact",
        recompute_every: int = 1,
        distributed: str = "auto",
        process_group: Any = None,
        update_every: int | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer instance, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, GradBalance):
            raise TypeError("optimizer is already a GradBalance; wrap the inner optimizer once")
        self.optimizer = optimizer
        # Optimizer.__init__ would build param groups of its own; we only need its hook tables
        # and its step patching (so step hooks and profilers see this wrapper like any optimizer).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        options = Options.build(
            engine=engine, chunk_size=chunk_size, task_weights=task_weights, accumulation=accumulation,
            recompute_every=recompute_every, distributed=distributed, process_group=process_group,
            update_every=update_every,
        )
        self._balancer = Balancer(method, shared_params, self._optimizer_params, options)
        self._balancer.validate_shared(self._optimizer_params())
        self.last_info: StepInfo | None = None

    # -------------------------------------------------------------- torch.optim contract
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def method(self) -> Method:
        """The balancing method object (holds its own state)."""
        return self._balancer.method

    @property
    def shared_params(self) -> list[Tensor] | None:
        """The shared parameters (``None`` until inferred on the first step that needs them)."""
        return self._balancer.shared_params

    @property
    def options(self) -> Options:
        """The validated :class:`~gradbalance.options.Options` (engine, accumulation, ...)."""
        return self._balancer.options

    def _optimizer_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients (as the wrapped optimizer does) and drop an unfinished
        accumulation window without touching the method's state."""
        self._balancer.discard()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """Step the wrapped optimizer, then commit the method's state for this step.

        A ``closure`` is passed to the wrapped optimizer (it must itself call
        ``opt.backward(losses)``; the balancing of that call is what gets committed).
        """
        loss: Any
        if closure is not None:
            with torch.enable_grad():
                loss = self.optimizer.step(closure)
        else:
            loss = self.optimizer.step()
        self._balancer.commit()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's ``state_dict()`` plus ``"gradbalance"``: method state, step."""
        state = self.optimizer.state_dict()
        state[_STATE_KEY] = self._balancer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (a plain optimizer ``state_dict`` loads too, leaving the
        method's state as it is).

        The gradbalance part is validated first (format, the method's class, its state), then
        loaded, then the inner optimizer's; if any of them raises, nothing has changed. A
        checkpoint of another method class raises; one of the same class with other arguments
        loads with a warning.

        Raises:
            TypeError, ValueError: a malformed state or a checkpoint of another method; what
                the inner optimizer's ``load_state_dict`` raises.
        """
        state = dict(state_dict)
        ours = state.pop(_STATE_KEY, None)
        if ours is None:
            self.optimizer.load_state_dict(state)
            return
        before = self._balancer.snapshot()
        self._balancer.load_state_dict(ours)  # validates everything before loading anything
        try:
            self.optimizer.load_state_dict(state)
        except Exception:
            self._balancer.restore(before)
            raise

    def __repr__(self) -> str:
        return f"GradBalance({self.method!r}, engine={self._balancer.engine!r}, optimizer={self.optimizer!r})"

    # -------------------------------------------------------------- balancing
    def backward(
        self,
        losses: Losses,
        *,
        features: Tensor | None = None,
        scaler: Any = None,
    ) -> StepInfo:
        """Balance the task losses and write the combined gradient into ``.grad``.

        On any error nothing is changed: parameters, ``.grad``, the optimizer's and the method's
        state, and the wrapper's own bookkeeping (window, inferred shared parameters, engine).

        Args:
            losses: one scalar loss per task: a list, or a dict ``{name: loss}`` (``None``
                values mark tasks absent from this batch).
            features: the shared representation ``z`` every head reads (the trunk's output).
                Enables the batched engine's fast route and is required by methods in
                representation mode (MGDA-UB).
            scaler: a ``torch.amp.GradScaler``; the losses are scaled for the backward passes
                and the task gradients unscaled before the method sees them. Then call
                ``scaler.step(opt)`` and ``scaler.update()`` as usual; an overflow (a NaN/inf
                loss or task gradient) skips the step and leaves the method's state unchanged.

        Returns:
            :class:`~gradbalance.StepInfo` (also kept as :attr:`last_info`).

        Raises:
            TypeError: losses not a list/dict of tensors, or ``features`` not a tensor.
            ValueError: empty losses, a non-scalar or detached loss, duplicate task
                names, a ``task_weights`` name that matches no task (first step) or a list of
                weights of another length, a loss that reaches no shared parameter (or, in
                representation mode, does not depend on ``features``), ``features`` outside the
                losses' graph, a representation-mode method called without ``features``, tasks
                that differ from the earlier calls of the current accumulation window, a
                changing number of unnamed tasks for a method with per-task state.
            NonFiniteError: a NaN/inf loss or task gradient, without an active scaler (a
                ``ValueError``; with one it is an overflow: ``engine == "skipped"``).
            RankMismatchError: under ``torch.distributed``, the ranks disagree, or a rank raised
                alone (a ``ValueError``): every rank raises it, naming the ranks (see the
                distributed guide). An error raised alike on every rank is raised as it is.
        """
        info = self._balancer.backward(losses, features=features, scaler=scaler)
        self.last_info = info
        return info


# The functional API's step count, per method object (see ``backward``); entries go with the method.
_FUNCTIONAL_STEPS: dict[int, int] = {}


def _functional_step(method: Method) -> int:
    return _FUNCTIONAL_STEPS.get(id(method), 0)


def _set_functional_step(method: Method, step: int) -> None:
    key = id(method)
    if key not in _FUNCTIONAL_STEPS:
        try:  # forget the count with the method (an id may be reused after that)
            weakref.finalize(method, _FUNCTIONAL_STEPS.pop, key, None)
        except TypeError:  # a method class with __slots__ and no __weakref__: keep the entry
            pass
    _FUNCTIONAL_STEPS[key] = step


def backward(
    losses: Losses,
    shared_params: Any,
    method: str | Method = "mean",
    *,
    params: Any = None,
    features: Tensor | None = None,
    step: int | None = None,
    engine: str = "auto",
    chunk_size: int | str | None = None,
    task_weights: Sequence[float] | Mapping[str, float] | None = None,
    distributed: str = "auto",
    process_group: Any = None,
) -> StepInfo:
    """Balance ``losses`` and add the result to ``.grad``, without an optimizer wrapper.

    The functional twin of :meth:`GradBalance.backward` for hand-written training loops. The
    method's state (if any) is committed at once, so pass the same method object every step:
    the step count that methods read (Nash-MTL's ``update_every``, STCH's ``warmup_steps``,
    DWA's epoch window) is kept per method object and advanced by one per call, exactly as the
    wrapper advances it per optimizer step. A method given by name is a new object each call,
    so it always starts at step 0 unless ``step=`` says otherwise.

    The argument order follows :func:`torch.autograd.grad` (what to differentiate, then with
    respect to what), with ``method`` third because it has a default; the wrapper's order
    ``GradBalance(optimizer, method, shared_params)`` puts ``shared_params`` last because it
    is optional there (inferred). Passing ``method=`` and ``shared_params=`` by keyword reads
    the same in both.

    Args:
        losses: one scalar loss per task (list or dict).
        shared_params: the shared parameters (iterable or ``nn.Module``); ``None``: inferred
            from the graph as the parameters more than one loss reaches.
        method: a registered name or a method object.
        params: every parameter to write gradients into; default: every leaf tensor that
            requires grad and that the losses reach.
        features: the shared representation ``z`` every head reads, as for
            :meth:`GradBalance.backward`.
        step: the optimizer step this call belongs to (e.g. after resuming from a checkpoint);
            ``None``: the method object's own count (0 at its first call). Later calls go on
            from ``step + 1``.
        engine: ``"auto"``, ``"loop"``, ``"batched"`` or ``"gram"``, as for :class:`GradBalance` (a
            field of :class:`~gradbalance.Options`).
        chunk_size: as for :class:`GradBalance`.
        task_weights: as for :class:`GradBalance`.
        distributed: as for :class:`GradBalance` (every call checks that the ranks agree, as the
            wrapper's first step does).
        process_group: as for :class:`GradBalance`.

    Returns:
        :class:`~gradbalance.StepInfo`.

    Raises:
        TypeError, ValueError: as :meth:`GradBalance.backward`; nothing is changed (nor the
            method's step count). Unlike the wrapper there is no ``scaler=`` and no
            accumulation window: each call is combined on its own (``accumulation="combine"``).

    Example:
        >>> import torch, gradbalance as gb
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> info = gb.backward([w.sum() ** 2, (w[0] - 2) ** 2], [w], method="sum")
        >>> w.grad
        tensor([-2.,  0.])
    """
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise TypeError(f"step must be an int or None, got {type(step).__name__}")
    if step is not None and step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    options = Options(engine=engine, chunk_size=chunk_size, task_weights=task_weights, accumulation="combine",
                      distributed=distributed, process_group=process_group)
    if params is None:
        values = list(losses.values()) if isinstance(losses, Mapping) else list(losses)
        params = jacobian.graph_leaves([v for v in values if isinstance(v, Tensor)])
    method_obj = make_method(method)
    balancer = Balancer(method_obj, shared_params, as_parameter_list(params, "params"), options)
    balancer.step_count = _functional_step(method_obj) if step is None else step
    info = balancer.backward(losses, features=features)
    balancer.commit()
    _set_functional_step(method_obj, balancer.step_count)
    return info
