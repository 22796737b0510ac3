"""Faults on one rank only (2 gloo processes): no rank hangs, every rank raises the same error (or
skips the step alike under a GradScaler), nothing changes, and training goes on.

Rank 1 alone gets a NaN or inf loss, a finite loss with a NaN/inf gradient (on the trunk, or on its
own head only), a loss that reaches no shared parameter, a detached or non-scalar loss, or a
Nash-MTL solver that fails (at its first iteration, or later, which used to return other weights
than rank 0's). Every fault is injected into a model that already took a step, under DDP and
without a DDP wrapper, for an exact Gram method (MGDA, loop engine), a loss weighting (uncertainty
weights) and Nash-MTL (cvxpy); then within an accumulation window, on a ``recompute_every`` reuse
step and under a GradScaler. After every faulted call the parameters, ``.grad``, and
``opt.state_dict()`` (the inner optimizer's and the wrapper's) must be unchanged on both ranks; at the
end each run must equal, bit for bit, the same run without the faulted calls.

Before gradbalance's checkpoints (``gradbalance.distributed.Sync``) a loss reaching no shared
parameter, or a Nash-MTL solver failing, on one rank left the other waiting until the process
group's timeout; Nash-MTL failing at a later iteration on one rank let the ranks' parameters drift
apart silently; and a NaN gradient on a task-specific parameter only (single process too) was written
to ``.grad`` by the exact path without an error.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradbalance as gb
from tests.dist_helpers import WORLD, init_group, run_ranks, save_result
from tests.helpers import MultiTaskNet, make_batch

K, N = 3, 16
NAN, INF = float("nan"), float("inf")
SECONDS = 10.0  # a faulted call must fail well inside the 20 s process-group timeout


# ----------------------------------------------------------------------------- the faults (rank 1 only)
def nan_loss(model, z, losses):
    losses[1] = losses[1] * NAN


def inf_loss(model, z, losses):
    losses[1] = losses[1] + INF


def sqrt_at_zero(model, z, losses):  # finite loss; d sqrt(u)/du = inf at u = 0, times du/dz = 0: NaN
    losses[1] = losses[1] + torch.sqrt(z.sum() * 0)


def inf_hook(model, z, losses):  # a hook that writes inf into the gradient reaching the trunk
    t = z * 1.0
    t.register_hook(lambda g: torch.full_like(g, INF))
    losses[1] = losses[1] + (t * 0).sum()


def nan_head_grad(model, z, losses):  # finite loss; NaN in the gradient of task 1's own head only
    losses[1] = losses[1] + torch.sqrt(model.heads[1].weight.sum() * 0)


def unreached(model, z, losses):  # requires grad, but reaches no shared parameter
    losses[1] = model.heads[1].weight.pow(2).sum()


def detached(model, z, losses):
    losses[1] = losses[1].detach()


def non_scalar(model, z, losses):
    losses[1] = losses[1].expand(3)


FAULTS = {
    # name: (fault, the error every rank raises, what its message says)
    "nan_loss": (nan_loss, "NonFiniteError", "['task1'] is NaN or inf"),
    "inf_loss": (inf_loss, "NonFiniteError", "['task1'] is NaN or inf"),
    "sqrt_at_zero": (sqrt_at_zero, "NonFiniteError", "contains NaN or inf"),
    "inf_hook": (inf_hook, "NonFiniteError", "contains NaN or inf"),
    "nan_head_grad": (nan_head_grad, "NonFiniteError", "contains NaN or inf"),
    "unreached": (unreached, "RankMismatchError", "rank 1 could not prepare this call: ValueError: loss 'task1' "
                                                  "does not reach any shared parameter"),
    "detached": (detached, "RankMismatchError", "rank 1 could not prepare this call: ValueError: loss 'task1' "
                                                "does not require grad"),
    "non_scalar": (non_scalar, "RankMismatchError", "rank 1 could not prepare this call: ValueError: loss 'task1' "
                                                    "is not a scalar"),
}
NASH_FAULTS = {
    "solver_fails_first": ("RankMismatchError", "rank 1 raised RuntimeError: Nash-MTL: the CLARABEL solver failed "
                                                "on the first iteration"),
    "solver_fails_later": ("RankMismatchError", "the balancing method did not give the same result on every rank"),
}
METHODS = ("mgda", "uw", "nash_mtl")
MODES = ("ddp", "plain")


class _FailingSolve:
    """Wraps Nash-MTL's cvxpy problem (as tests/test_nash_mtl.py replaces it): solve number ``when``
    raises ``cvxpy.error.SolverError``; with ``when == 2`` the first solve's point is doubled
    (feasible, not converged), so that the loop goes on to the failing second iteration and this
    rank returns the first iterate, not rank 0's converged weights."""

    def __init__(self, problem, a, when):
        self.problem, self.a, self.when, self.calls = problem, a, when, 0

    @property
    def status(self):
        return self.problem.status

    def solve(self, **kwargs):
        import cvxpy as cp

        self.calls += 1
        if self.calls == self.when:
            raise cp.error.SolverError("injected")
        out = self.problem.solve(**kwargs)
        if self.when == 2:
            self.a.value = 2.0 * self.a.value
        return out


def failing_solver(method, when):
    real = method._problem

    def problem(k):
        prob, a, *rest = real(k)
        return (_FailingSolve(prob, a, when), a, *rest)

    method._problem = problem  # an instance attribute: removed again by del method._problem


# ----------------------------------------------------------------------------- one rank's runs
def build(mode, method, **options):
    model = MultiTaskNet(K, seed=0)
    net = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.01), method, shared_params=model.trunk,
                         **options)
    return model, net, opt


def losses_of(net, rank, seed):
    x, y = make_batch(K, n=N, seed=seed)
    half = N // WORLD
    z, outs = net(x[rank * half:(rank + 1) * half])
    target = y[rank * half:(rank + 1) * half]
    return z, [((o - target[:, i]) ** 2).mean() * (i + 1) for i, o in enumerate(outs)]


def clone(tree):
    if isinstance(tree, dict):
        return {key: clone(v) for key, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone(v) for v in tree)
    return tree.clone() if torch.is_tensor(tree) else tree


def same(a, b):
    """Bit-identical nested state (tensors by torch.equal, NaN equal to NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b or (a != a and b != b)


def state(model, opt):
    return clone(({n: p for n, p in model.named_parameters()},
                  {n: p.grad for n, p in model.named_parameters()}, opt.state_dict()))


def attempt(model, opt, call):
    """(error type, message, seconds, state unchanged) of ``call()``, which must raise."""
    before = state(model, opt)
    t0 = time.perf_counter()
    try:
        call()
        kind, message = None, ""
    except Exception as err:  # noqa: BLE001 - recorded for the tests to compare across ranks
        kind, message = type(err).__name__, str(err)
    return kind, message, time.perf_counter() - t0, same(before, state(model, opt))


def faulted_call(name, rank, model, net, opt, seed):
    """``opt.backward`` of a batch where rank 1 gets fault ``name`` (FAULTS, or a NASH_FAULTS solver)."""

    def call():
        z, losses = losses_of(net, rank, seed)
        if rank == 1 and name in FAULTS:
            FAULTS[name][0](model, z, losses)
        elif rank == 1:
            failing_solver(opt.method, 1 if name == "solver_fails_first" else 2)
        try:
            opt.backward(losses, features=z)
        finally:
            opt.method.__dict__.pop("_problem", None)

    return call


def good_step(net, opt, rank, seed, micro=1, scaler=None):
    for m in range(micro):
        z, losses = losses_of(net, rank, 100 * seed + m)
        opt.backward(losses, features=z, scaler=scaler)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def every_fault(rank, mode, method, res):
    """One good step, every fault (each call must change nothing), one good step; and the run
    without the faults."""
    model, net, opt = build(mode, method)
    good_step(net, opt, rank, 0)
    for name in FAULTS:
        res[(mode, method, name)] = attempt(model, opt, faulted_call(name, rank, model, net, opt, 1))
    for name in NASH_FAULTS if method == "nash_mtl" else ():
        res[(mode, method, name)] = attempt(model, opt, faulted_call(name, rank, model, net, opt, 1))
    good_step(net, opt, rank, 1)
    res[(mode, method, "final")] = params(model)
    ref, ref_net, ref_opt = build(mode, method)
    for seed in (0, 1):
        good_step(ref_net, ref_opt, rank, seed)
    res[(mode, method, "reference")] = params(ref)


def in_a_window(rank, res):
    """The second call of an accumulation window fails; the window goes on with a good call."""
    runs = {}
    for faulty in (True, False):
        model, net, opt = build("ddp", "mgda")
        good_step(net, opt, rank, 0, micro=2)
        z, losses = losses_of(net, rank, 100)
        opt.backward(losses, features=z)
        if faulty:
            for name in ("sqrt_at_zero", "unreached"):
                res[("window", name)] = attempt(model, opt, faulted_call(name, rank, model, net, opt, 101))
        z, losses = losses_of(net, rank, 101)
        opt.backward(losses, features=z)
        opt.step()
        runs[faulty] = params(model)
    res[("window", "final")], res[("window", "reference")] = runs[True], runs[False]


def on_a_reuse_step(rank, res):
    """recompute_every=2: step 1 reuses step 0's weights (one weighted backward, no method)."""
    runs = {}
    for faulty in (True, False):
        model, net, opt = build("plain", "mgda", recompute_every=2)
        good_step(net, opt, rank, 0)
        if faulty:
            for name in ("sqrt_at_zero", "unreached", "nan_head_grad"):
                res[("reuse", name)] = attempt(model, opt, faulted_call(name, rank, model, net, opt, 1))
        good_step(net, opt, rank, 1)
        runs[faulty] = params(model)
    res[("reuse", "final")], res[("reuse", "reference")] = runs[True], runs[False]


def under_a_scaler(rank, res):
    """A GradScaler turns a NaN/inf loss or gradient into a skipped step, on every rank alike."""
    model, net, opt = build("ddp", "mgda")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    good_step(net, opt, rank, 0, scaler=scaler)
    for name in ("nan_loss", "sqrt_at_zero", "nan_head_grad"):
        before = clone((params(model), opt.state_dict()))
        z, losses = losses_of(net, rank, 1)
        if rank == 1:
            FAULTS[name][0](model, z, losses)
        info = opt.backward(losses, features=z, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        res[("scaler", name)] = (info.engine, same(before, (params(model), opt.state_dict())), scaler.get_scale())
    good_step(net, opt, rank, 1, scaler=scaler)
    res[("scaler", "final")] = params(model)


def on_every_rank(rank, res):
    """The same fault on every rank: each raises the error one process would raise."""
    model, net, opt = build("plain", "nash_mtl")
    good_step(net, opt, rank, 0)

    def both_non_scalar():
        z, losses = losses_of(net, rank, 1)
        non_scalar(model, z, losses)
        opt.backward(losses, features=z)

    def both_solvers_fail():
        z, losses = losses_of(net, rank, 1)
        failing_solver(opt.method, 1)
        try:
            opt.backward(losses, features=z)
        finally:
            del opt.method._problem

    res[("every rank", "non_scalar")] = attempt(model, opt, both_non_scalar)
    res[("every rank", "solver_fails_first")] = attempt(model, opt, both_solvers_fail)


def _worker(rank, port, path):
    init_group(rank, port, timeout_s=20)
    res: dict = {}
    for mode in MODES:
        for method in METHODS:
            every_fault(rank, mode, method, res)
    in_a_window(rank, res)
    on_a_reuse_step(rank, res)
    under_a_scaler(rank, res)
    on_every_rank(rank, res)
    dist.barrier()
    save_result(path, rank, res)


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_worker, hard_timeout=240)


# ----------------------------------------------------------------------------- the tests
def assert_same_clear_error(runs, key, kind, text):
    (t0, m0, s0, unchanged0), (t1, m1, s1, unchanged1) = runs[0][key], runs[1][key]
    assert t0 == t1 == kind, (m0, m1)
    assert m0 == m1  # the same message on every rank
    assert text in m0, m0
    assert max(s0, s1) < SECONDS  # no rank waited for the process group's timeout
    assert unchanged0 and unchanged1  # parameters, .grad, opt.state_dict() (inner and gradbalance)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_on_one_rank_raises_the_same_error_on_every_rank_and_changes_nothing(runs, mode, method, fault):
    _, kind, text = FAULTS[fault]
    assert_same_clear_error(runs, (mode, method, fault), kind, text)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", list(NASH_FAULTS))
def test_nash_mtl_solver_failing_on_one_rank(runs, mode, fault):
    kind, text = NASH_FAULTS[fault]
    assert_same_clear_error(runs, (mode, "nash_mtl", fault), kind, text)
    if fault == "solver_fails_later":  # rank 1 returned its first iterate: other weights, named per rank
        message = runs[0][(mode, "nash_mtl", fault)][1]
        assert "rank 0 got weights" in message and "rank 1 got weights" in message


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_training_goes_on_as_if_the_faulted_calls_never_happened(runs, mode, method):
    for r in range(WORLD):
        assert_identical(runs[r][(mode, method, "final")], runs[r][(mode, method, "reference")])
    assert_identical(runs[0][(mode, method, "final")], runs[1][(mode, method, "final")])


@pytest.mark.parametrize("where", ["window", "reuse"])
def test_faults_within_an_accumulation_window_and_on_a_reuse_step(runs, where):
    expected = {"sqrt_at_zero": "NonFiniteError", "unreached": "RankMismatchError", "nan_head_grad": "NonFiniteError"}
    names = [key[1] for key in runs[0] if key[0] == where and key[1] in expected]
    assert len(names) == (2 if where == "window" else 3)
    for name in names:
        assert_same_clear_error(runs, (where, name), expected[name], FAULTS[name][2])
    for r in range(WORLD):  # the window kept its first call; the reuse step its cached weights
        assert_identical(runs[r][(where, "final")], runs[r][(where, "reference")])
    assert_identical(runs[0][(where, "final")], runs[1][(where, "final")])


@pytest.mark.parametrize("fault", ["nan_loss", "sqrt_at_zero", "nan_head_grad"])
def test_under_a_grad_scaler_every_rank_skips_the_step(runs, fault):
    (engine0, unchanged0, scale0), (engine1, unchanged1, scale1) = (runs[r][("scaler", fault)] for r in range(WORLD))
    assert engine0 == engine1 == "skipped"
    assert unchanged0 and unchanged1  # parameters, optimizer and method state after scaler.step(opt)
    assert scale0 == scale1 < 2.0**10  # both scalers saw the overflow and lowered the scale alike
    assert_identical(runs[0][("scaler", "final")], runs[1][("scaler", "final")])


def test_the_same_fault_on_every_rank_raises_the_error_of_one_process(runs):
    assert_same_clear_error(runs, ("every rank", "non_scalar"), "ValueError", "loss 'task1' is not a scalar")
    assert_same_clear_error(runs, ("every rank", "solver_fails_first"), "RuntimeError",
                            "Nash-MTL: the CLARABEL solver failed on the first iteration")


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("method", ["mgda", "pcgrad"])
def test_a_nan_gradient_on_a_task_specific_parameter_only_raises_in_one_process_too(method, engine):
    """The exact path checked the shared gradients (their Gram matrix) only: a NaN in a head's
    gradient alone was written to .grad without an error."""
    model = MultiTaskNet(K, seed=0)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.01), method, shared_params=model.trunk,
                         engine=engine)
    good_step(model, opt, 0, 0)
    before = state(model, opt)
    z, losses = losses_of(model, 0, 1)
    nan_head_grad(model, z, losses)
    with pytest.raises(gb.NonFiniteError, match="contains NaN or inf"):
        opt.backward(losses, features=z)
    assert same(before, state(model, opt))
    z, losses = losses_of(model, 0, 1)
    opt.backward(losses, features=z)  # and the next call goes on
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
