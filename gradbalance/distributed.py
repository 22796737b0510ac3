"""Multi-process training (DDP, FSDP2): the only module of gradbalance that calls ``torch.distributed``.

The :class:`~gradbalance.balancer.Balancer` computes each task's gradient with
:func:`torch.autograd.grad`, which fires none of DDP's hooks: DDP's reducer never runs, so nothing
is all-reduced twice and no ``no_sync()`` is needed. Instead the balancer averages what the method
needs across ranks *before* the method sees it, with the collectives below, in flat buffers:

``"allreduce"`` (exact, every method)
    one all-reduce of ``[G (k x P) | losses (k)]``, then one of the combined task-specific
    gradients. Per-rank traffic ``~ 2kP`` (ring).
``"reduce_scatter"`` (exact, methods with ``requires="gram"``; the default for them on NCCL)
    reduce-scatter ``G`` (each rank keeps ``P/R`` columns of the averaged gradients), all-reduce the
    ``k x k`` Grams of the shards (their sum is the Gram of the global gradients) with the losses,
    combine the shard with the weights and all-gather the direction. Traffic ``~ (k + 1) P``.
``"local_gram"`` (approximate, ``requires="gram"``)
    the method sees the *average of the ranks' local Grams* (biased: it adds the between-rank
    variance of the gradients to the Gram); the combined gradient is then averaged. Traffic ``~ 2P``,
    like plain DDP.

Losses-only methods all-reduce the ``k`` losses, then the one combined gradient (``2P``, like DDP).
Representation-mode methods all-reduce the ``k x k`` Gram of ``dL_i/dz``: the rows of ``z`` are
samples, so the sum of the local Grams divided by ``R^2`` *is* the Gram of the global batch.

Under FSDP2 (``fully_shard``; parameters are ``DTensor`` shards) :func:`torch.autograd.grad`
cannot reach the sharded parameters, so the balancer runs ``k`` ordinary backward passes (FSDP
reduce-scatters each one), keeps every task's local shard, and all-reduces the shards' ``k x k``
Grams: exact for losses- and Gram-based methods; methods that need the full gradients raise.

Conventions: every rank passes the same task names, losses are batch *means* and every rank holds
the same number of samples (DDP's own assumption), so the global loss is the mean of the ranks'.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from gradbalance.errors import RankMismatchError
from gradbalance.inputs import check_finite_losses
from gradbalance.paths.reduce import Local, Reducer

__all__ = ["STRATEGIES", "AllReduce", "DistributedReducer", "LocalGram", "ReduceScatter", "RankMismatchError", "Sync",
           "call_fingerprint", "make_reducer", "resolve"]

STRATEGIES = ("auto", "off", "allreduce", "reduce_scatter", "local_gram")



def _collective(new: str, old: str) -> Any:
    """torch 2.13 renamed some collectives (the old names warn); older torch has only the old."""
    return getattr(dist, new, None) or getattr(dist, old)


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter shard)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor``; any other tensor as it is."""
    return cast(Any, t).to_local() if is_sharded(t) else t


def like_param(values: Tensor, param: Tensor) -> Tensor:
    """Wrap a local gradient shard as a gradient of ``param`` (a ``DTensor`` for FSDP2 params)."""
    if not is_sharded(param):
        return values.view_as(param)
    cls, dparam = _dtensor_type(), cast(Any, param)
    shard = dparam.to_local()
    return cls.from_local(values.view_as(shard), dparam.device_mesh, dparam.placements,
                          run_check=False, shape=param.shape, stride=param.stride())


def validate(strategy: str, requires: str) -> None:
    """Raise the clear errors of a bad ``distributed=`` choice (before any step)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in ("reduce_scatter", "local_gram") and requires == "grads":
        raise ValueError(
            f"distributed={strategy!r} works on the Gram matrix only, but the method needs the task "
            "gradients themselves (requires='grads'); use distributed='allreduce' or 'auto'"
        )


def resolve(strategy: str, group: Any, requires: str, params: Sequence[Tensor]) -> Sync | None:
    """The :class:`Sync` of a balancer, or ``None`` for single-process training.

    ``"auto"``: on when ``torch.distributed`` is initialised with more than one rank in ``group``;
    then ``"reduce_scatter"`` for Gram-based methods on NCCL, ``"allreduce"`` otherwise (gloo's
    reduce-scatter measured slower than its all-reduce of the whole ``k x P`` buffer, at 30k and
    at 2M parameters: benchmarks/ddp_multidigits.py).
    """
    validate(strategy, requires)
    if strategy == "off":
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if strategy == "auto":
            return None
        raise ValueError(f"distributed={strategy!r} needs torch.distributed.init_process_group() first")
    world = dist.get_world_size(group)
    if strategy == "auto":
        if world == 1:
            return None
        nccl = str(dist.get_backend(group)).lower() == "nccl"
        strategy = "reduce_scatter" if requires == "gram" and nccl else "allreduce"
    fsdp = any(is_sharded(p) for p in params)
    return Sync(strategy, group, world, fsdp)


def _digest(obj: Any) -> str:
    """A hash of nested tensors / numbers / strings (state dicts, parameters)."""
    h = hashlib.sha1()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            t = local(x).detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(f"K{key!r}".encode())
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            h.update(f"V{x!r}".encode())

    feed(obj)
    return h.hexdigest()


def _crc(t: Tensor | None) -> int:
    """A CRC-32 of a small tensor's float64 bytes (0 for ``None``): the method checkpoint's row."""
    if t is None:
        return 0
    return zlib.crc32(t.detach().double().cpu().contiguous().numpy().tobytes())



#: what :func:`call_fingerprint` describes, in order (the columns of the table ``Sync.agree`` gathers)
FINGERPRINT_FIELDS = ("tasks (names, and which are None)", "call within the accumulation window",
                      "optimizer step")


def call_fingerprint(losses: Any, call: int, step: int) -> tuple[int, int, int]:
    """A few integers that every rank must share for one ``backward`` call: a CRC-32 of the task
    names with which of them are ``None`` (dict losses) or of the number of losses (a list), the
    call's index within the accumulation window, and the optimizer step."""
    if isinstance(losses, Mapping):
        text = repr([(str(name), value is None) for name, value in losses.items()])
    else:
        try:
            text = f"list of {len(losses)}"
        except TypeError:
            text = type(losses).__name__
    return zlib.crc32(text.encode()), int(call), int(step)


class Sync:
    """The collectives of one balancer (see the module docstring).

    Attributes:
        strategy: ``"allreduce"``, ``"reduce_scatter"`` or ``"local_gram"``.
        group: the process group (``None``: the default group).
        world: number of ranks in ``group``.
        fsdp: the optimizer holds FSDP2 (``DTensor``) parameters.
        bytes_sent: bytes this rank sends in the current call's data collectives (ring algorithms: an
            all-reduce of ``n`` bytes sends ``2 (R-1)/R n``, a reduce-scatter or all-gather
            ``(R-1)/R n``); the checkpoints' few int64 are not counted.

    **Checkpoints.** A rank that raises on its own while the others wait in a collective leaves them
    waiting until the process group's timeout. So every call has two small all-gathers that every
    rank joins whether it failed or not: the *call checkpoint* (:meth:`agree`: same call on every
    rank) and, when the method runs, the *method checkpoint* (:meth:`settle`: the method did not
    raise and returned the same weights everywhere). Each is armed first (:meth:`open_call`,
    :meth:`expect_method`) and run lazily by the next collective of the call (:meth:`flush`), so a
    rank that raises before that collective joins the armed checkpoint with its error instead
    (:meth:`fail`), and every rank raises the same error. No collective is added to a call that
    succeeds: the two checkpoints are its only control traffic.
    """

    def __init__(self, strategy: str, group: Any, world: int, fsdp: bool) -> None:
        self.strategy = strategy
        self.group = group
        self.world = world
        self.fsdp = fsdp
        self.bytes_sent = 0
        self.checked = False
        self._pending: Callable[[BaseException | None], None] | None = None
        self._first: tuple[Sequence[str], Any, int, Sequence[Tensor]] | None = None
        self._aggregation: Any = None
        self._device: Any = None

    def _count(self, t: Tensor, factor: float) -> None:
        self.bytes_sent += int(factor * (self.world - 1) / self.world * t.numel() * t.element_size())

    # ------------------------------------------------------------------ collectives
    def sum_(self, flat: Tensor) -> Tensor:
        """All-reduce (sum) ``flat`` in place and return it."""
        self.flush()
        self._count(flat, 2.0)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        return flat

    def mean(self, flat: Tensor) -> Tensor:
        """The average of ``flat`` over the ranks (a new tensor)."""
        return self.sum_(flat.clone()).div_(self.world)

    def reduce_scatter_rows(self, grads: Tensor) -> Tensor:
        """``(k, P)`` -> this rank's ``(k, ceil(P/R))`` columns of the rank-average (zero-padded)."""
        k, p = grads.shape
        chunk = -(-p // self.world)
        padded = torch.nn.functional.pad(grads, (0, chunk * self.world - p))
        send = padded.view(k, self.world, chunk).transpose(0, 1).contiguous().view(-1)
        out = send.new_empty(k * chunk)
        self.flush()
        self._count(send, 1.0)
        _collective("reduce_scatter_single", "reduce_scatter_tensor")(out, send, op=dist.ReduceOp.SUM, group=self.group)
        return out.view(k, chunk).div_(self.world)

    def all_gather_columns(self, shard: Tensor, p: int) -> Tensor:
        """Inverse layout of :meth:`reduce_scatter_rows` for one row: ``(chunk,)`` -> ``(P,)``."""
        out = shard.new_empty(shard.numel() * self.world)
        self.flush()
        self._count(out, 1.0)
        _collective("all_gather_single", "all_gather_into_tensor")(out, shard.contiguous(), group=self.group)
        return out[:p]

    def mean_present(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
        """Average a list of per-parameter gradients (``None`` = not reached) in one flat buffer.

        A gradient absent on some ranks counts as zero there; absent on every rank it stays
        ``None`` (like DDP with ``find_unused_parameters``). A presence flag per tensor rides along.
        """
        if not params:
            return []
        ref = next((g for g in grads if g is not None), None)
        dtype = ref.dtype if ref is not None else params[0].dtype
        device = ref.device if ref is not None else params[0].device
        parts = [
            local(g).to(dtype).reshape(-1) if g is not None
            else torch.zeros(local(p).numel(), dtype=dtype, device=device)
            for g, p in zip(grads, params)
        ]
        flags = torch.tensor([g is not None for g in grads], dtype=dtype, device=device)
        flat = self.sum_(torch.cat(parts + [flags]))
        out: list[Tensor | None] = []
        offset = 0
        present = flat[-len(params):].tolist()  # one host sync
        for j, (part, p) in enumerate(zip(parts, params)):
            n = part.numel()
            if present[j] == 0.0:
                out.append(None)
            else:
                out.append(like_param(flat[offset : offset + n].div(self.world), p))
            offset += n
        return out

    # ------------------------------------------------------------------ checkpoints
    def open_call(self, fingerprint: Sequence[int], device: Any) -> None:
        """Start a call: arm the call checkpoint (:meth:`agree`, then the first-step :meth:`check`)."""
        self.bytes_sent = 0
        self._first = None
        self._device = device

        def call_checkpoint(error: BaseException | None) -> None:
            self.agree(fingerprint, error, device)
            if self._first is not None:
                self.check(*self._first)

        self._pending = call_checkpoint

    def begin(self, names: Sequence[str], method: Any, step: int, params: Sequence[Tensor]) -> None:
        """The call's tasks are known: until the first-step :meth:`check` has passed, the call
        checkpoint runs it too."""
        if not self.checked:
            self._first = (names, method, step, params)

    def expect_method(self) -> None:
        """Before the method runs: arm the method checkpoint (:meth:`settle`), which the next
        collective, or :meth:`fail` if this rank raises first, runs."""
        self.flush()  # every path averages something before its method: a no-op in practice
        self._aggregation = None
        self._pending = lambda error: self.settle(self._aggregation, error, self._device)

    def method_done(self, aggregation: Any) -> None:
        """The method returned ``aggregation`` on this rank (compared at the method checkpoint)."""
        self._aggregation = aggregation

    def flush(self) -> None:
        """Run the armed checkpoint, if any (every rank reaches it at the same collective)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending(None)

    def fail(self, error: BaseException) -> None:
        """This rank raised ``error``: join the armed checkpoint with it, so that every rank raises
        (the same :class:`RankMismatchError`, or ``error`` itself when every rank raised it alike).
        Without an armed checkpoint the error came after a collective that every rank passed with the
        same data (a NaN check on averaged values): every rank raises it anyway, nothing to join."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending(error)

    def _gather_rows(
        self, row: Sequence[int], error: BaseException | None, device: Any, detail: Callable[[], str],
    ) -> tuple[Tensor, list[int], list[Any]] | None:
        """One all-gather of ``row`` and a failure flag. ``None`` when every rank succeeded with the
        same row; else the table, the failed ranks and every rank's error or ``detail()`` (one more,
        object all-gather, on this error path only). Every rank sees the same table, so every rank
        takes the same branch."""
        mine = torch.tensor([*row, int(error is not None)], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        table = torch.stack(every).cpu()
        if not bool(table[:, -1].any()) and bool((table == table[0]).all()):
            return None
        failed = [r for r in range(self.world) if int(table[r, -1])]
        texts: list[Any] = [None] * self.world
        text = detail() if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(texts, text, group=self.group)
        if error is not None and len(failed) == self.world and len(set(texts)) == 1 and bool(
                (table == table[0]).all()):
            raise error  # every rank failed alike: the error one process would raise
        return table, failed, texts

    def agree(self, fingerprint: Sequence[int], error: BaseException | None, device: Any) -> None:
        """The call checkpoint: make sure every rank makes the same call, before its data collectives.

        One all-gather of ``len(fingerprint) + 1`` int64 per rank (the fingerprint of
        :func:`call_fingerprint` and whether this rank failed before its first collective of the
        call: 32 bytes at the default). When the rows differ, or some ranks failed, every rank raises
        :class:`RankMismatchError` with the same message (a rank that failed chains its own error),
        instead of one rank raising while the others wait in a collective until the process group
        times out, or of a collective of mismatched sizes aborting a rank. When every rank failed
        with the same message, each raises its own error (as one process would).
        """
        gathered = self._gather_rows(fingerprint, error, device, lambda: "")
        if gathered is None:
            return
        table, failed, messages = gathered
        lines = [f"rank {r} could not prepare this call: {messages[r]}" for r in failed]
        for column, field_name in enumerate(FINGERPRINT_FIELDS):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                groups: dict[int, list[int]] = {}
                for r, v in enumerate(values):
                    groups.setdefault(v, []).append(r)
                lines.append(f"ranks differ in {field_name}: " + "; ".join(
                    f"ranks {ranks} have {v}" for v, ranks in groups.items()))
        message = (
            "gradbalance: the ranks did not make the same backward call, so no rank went on (the step "
            "would not be the global batch's, or the collectives would not match):\n  " + "\n  ".join(lines)
            + "\nEvery rank must pass the same tasks (a task None on one rank must be None on all), call "
            "backward() the same number of times between optimizer steps, and step together."
        )
        raise RankMismatchError(message) from error

    def settle(self, aggregation: Any, error: BaseException | None, device: Any) -> None:
        """The method checkpoint: the method raised on no rank and gave the same weights on every rank.

        The method sees the same averaged inputs everywhere, but a solver can still fail on one rank
        only (or a random draw bypass the method's generator); then that rank would raise alone (the
        others hang in their next collective) or the ranks would take different steps. One all-gather
        of 3 int64 per rank: a CRC-32 of the weights and of the head weights, and a failure flag.
        Every rank raises the same :class:`RankMismatchError` when they differ; nothing is written.
        """
        weights = None if aggregation is None else aggregation.weights
        head_weights = None if aggregation is None else aggregation.head_weights
        row = (_crc(weights), _crc(head_weights))

        def detail() -> str:
            if weights is None:
                return "a direction (no weights)"
            hw = "" if head_weights is None else f", head weights {head_weights.tolist()}"
            return f"weights {weights.tolist()}{hw}"

        gathered = self._gather_rows(row, error, device, detail)
        if gathered is None:
            return
        _, failed, texts = gathered
        lines = [f"rank {r} " + ("raised " if r in failed else "got ") + str(texts[r]) for r in range(self.world)]
        raise RankMismatchError(
            "gradbalance: the balancing method did not give the same result on every rank, so no rank "
            "went on (the ranks' parameters would drift apart):\n  " + "\n  ".join(lines)
            + "\nIt saw the same rank-averaged inputs everywhere: a solver that failed on some ranks "
            "only, or randomness outside the method's own generator. Nothing was written; the next "
            "call can go on."
        ) from error

    # ------------------------------------------------------------------ first step
    def check(self, names: Sequence[str], method: Any, step: int, params: Sequence[Tensor]) -> None:
        """Once: every rank must have the same tasks, method state, step count and (unless FSDP
        shards them) parameters; raise the same ValueError on every rank otherwise."""
        if self.checked:
            return
        mine = {
            "tasks": list(names),
            "method": _digest(method.state_dict()),  # not repr(): it may name a rank's device
            "step": int(step),
            "strategy": self.strategy,
        }
        if not self.fsdp:
            mine["parameters"] = _digest(list(params))
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine, group=self.group)
        bad = sorted({key for other in every for key in mine if other[key] != every[0][key]})
        if bad:
            raise RankMismatchError(
                f"gradbalance: ranks disagree on {bad} at the first step; every rank must pass the "
                "same tasks, build the method with the same arguments and seed, and start from the "
                "same parameters (DDP broadcasts them from rank 0; without DDP, broadcast them)"
            )
        self.checked = True


# ---------------------------------------------------------------------------- reducers
class DistributedReducer(Reducer):
    """The collectives every strategy shares (see :mod:`gradbalance.paths.reduce` for the map).

    Subclasses differ on the exact path only: how the ``k x P`` task gradients are shared.
    """

    distributed = True

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.fsdp = sync.fsdp

    def open_call(self, fingerprint: Sequence[int], device: Any) -> None:
        self.sync.open_call(fingerprint, device)

    def begin(self, names: Sequence[str], method: Any, step: int, params: Sequence[Tensor]) -> None:
        self.sync.begin(names, method, step, params)

    def expect_method(self) -> None:
        self.sync.expect_method()

    def method_done(self, aggregation: Any) -> None:
        self.sync.method_done(aggregation)

    def flush(self) -> None:
        self.sync.flush()

    def fail(self, error: BaseException) -> None:
        self.sync.fail(error)

    def check_call(self, names: Sequence[str], call: Tensor) -> None:
        """Nothing yet: the averaged losses are checked, so that every rank raises together."""

    def check_total(self, names: Sequence[str], total: Tensor) -> None:
        check_finite_losses(names, total)

    def mean(self, call: Tensor) -> Tensor:
        return self.sync.mean(call)

    def mean_present(self, grads: list[Tensor | None], params: Sequence[Tensor]) -> list[Tensor | None]:
        return self.sync.mean_present(grads, params)

    def feature_gram(self, grads: Tensor, call: Tensor, method: Any) -> tuple[Tensor, Tensor]:
        if method.requires == "grads":
            raise ValueError(
                f"{type(method).__name__} needs the gradients on the features themselves, which are "
                "split across ranks; distributed training supports representation mode for methods "
                "with requires='gram' or 'losses'"
            )
        k = call.numel()
        # rows of z are samples: the global batch's Gram is the sum of the local ones / R^2
        buf = self.sync.sum_(torch.cat([(grads @ grads.T).double().reshape(-1), call]))
        return buf[: k * k].view(k, k) / self.sync.world**2, buf[k * k :] / self.sync.world

    def mean_rows(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        k = call.numel()
        buf = self.sync.mean(torch.cat([grads.reshape(-1), call.to(grads.dtype)]))
        return buf[:-k].view(k, -1), buf[-k:].double()

    def finish(
        self, new: list[Tensor | None], head_out: list[Tensor | None], shared: Sequence[Tensor],
        heads: Sequence[Tensor],
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        # the head gradients stayed local: average their combination once
        return new, self.sync.mean_present(head_out, heads)

    def extras(self) -> dict[str, Any]:
        return {
            "distributed": self.sync.strategy + (" (fsdp)" if self.sync.fsdp else ""),
            "comm_bytes": self.sync.bytes_sent,
        }


class AllReduce(DistributedReducer):
    """``"allreduce"``: one flat buffer of every task gradient and the losses, averaged."""

    def share_task_grads(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        k, width = grads.shape
        buf = self.sync.mean(torch.cat([grads.reshape(-1), call.to(grads.dtype)]))
        return buf[:-k].view(k, width), buf[-k:].double()


class _SummedGram(DistributedReducer):
    """The strategies whose method sees a Gram summed over the ranks (no full ``G`` anywhere)."""

    gram_divisor_power = 0

    def exact_gram(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        k = call.numel()
        buf = self.sync.sum_(torch.cat([(grads @ grads.T).double().reshape(-1), call]))
        buf[k * k :] /= self.sync.world
        if self.gram_divisor_power:
            buf[: k * k] /= self.sync.world**self.gram_divisor_power
        return buf[: k * k].view(k, k), buf[k * k :]

    def check_direction(self, method_name: str) -> None:
        raise ValueError(
            f"{method_name} returned a direction, which needs the full task gradients: use "
            f"distributed='allreduce', not {self.sync.strategy!r}"
        )


class ReduceScatter(_SummedGram):
    """``"reduce_scatter"``: each rank keeps ``P/R`` columns of the averaged gradients; the sum
    of the shards' Grams is the exact Gram; the direction is all-gathered."""

    def share_task_grads(self, grads: Tensor, call: Tensor) -> tuple[Tensor, Tensor]:
        return self.sync.reduce_scatter_rows(grads), call

    def gather_direction(self, direction: Tensor, width: int) -> Tensor:
        return self.sync.all_gather_columns(direction, width)


class LocalGram(_SummedGram):
    """``"local_gram"``: the mean of the ranks' own Grams (biased, documented); the local
    combination is averaged once, shared and heads together."""

    gram_divisor_power = 1

    def finish(
        self, new: list[Tensor | None], head_out: list[Tensor | None], shared: Sequence[Tensor],
        heads: Sequence[Tensor],
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        out = self.sync.mean_present(new + head_out, list(shared) + list(heads))
        return out[: len(shared)], out[len(shared) :]


_REDUCERS: dict[str, type[DistributedReducer]] = {
    "allreduce": AllReduce,
    "reduce_scatter": ReduceScatter,
    "local_gram": LocalGram,
}


def make_reducer(strategy: str, group: Any, requires: str, params: Sequence[Tensor]) -> Reducer:
    """The reducer of a balancer: :class:`~gradbalance.paths.reduce.Local` for single-process
    training, else the strategy's (see :func:`resolve`)."""
    sync = resolve(strategy, group, requires, params)
    if sync is None:
        return Local()
    return _REDUCERS[sync.strategy](sync)
