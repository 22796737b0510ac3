"""Ranks that do not make the same call raise the same clear error on every rank, within seconds.

Two gloo processes with a 20 s process-group timeout: before the check, these cases hung until the
timeout (30 min by default), aborted one rank in a mismatched collective, or let the ranks' parameters
drift apart silently. Each case runs after one good step, so the first-step check has already passed.
"""

from __future__ import annotations

import time

import pytest
import torch

import gradbalance as gb
from gradbalance import RankMismatchError
from tests.dist_helpers import WORLD, init_group, run_ranks, save_result
from tests.helpers import MultiTaskNet, make_batch, task_losses

K, N = 3, 16
METHODS = ("mean", "uw", "mgda")


def _setup(name, rank):
    model = MultiTaskNet(K, seed=0)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), name, shared_params=model.trunk)
    return model, opt


def _losses(model, rank, step):
    x, y = make_batch(K, n=N, seed=step)
    half = N // WORLD
    z, losses = task_losses(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
    return z, losses


def _good_step(model, opt, rank, as_dict):
    z, losses = _losses(model, rank, 0)
    opt.backward({f"t{i}": v for i, v in enumerate(losses)} if as_dict else losses, features=z)
    opt.step()
    opt.zero_grad()


def _attempt(fn):
    """(error type, message, seconds) of ``fn()``; ``None`` type when it returned."""
    t0 = time.perf_counter()
    try:
        fn()
        return None, "", time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 - recorded for the test to inspect
        return type(err).__name__, str(err), time.perf_counter() - t0


def _worker(rank, port, path):
    init_group(rank, port, timeout_s=20)
    res = {}
    for name in METHODS:
        # a task is None on rank 1 only (dict losses)
        model, opt = _setup(name, rank)
        _good_step(model, opt, rank, as_dict=True)
        before = [p.detach().clone() for p in model.parameters()]

        def missing_task(model=model, opt=opt):
            z, losses = _losses(model, rank, 1)
            named = {f"t{i}": v for i, v in enumerate(losses)}
            if rank == 1:
                named["t2"] = None
            opt.backward(named, features=z)

        res[("none", name)] = _attempt(missing_task)
        res[("none-grads", name)] = [p.grad for p in model.parameters()]
        res[("none-params", name)] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        # rank 1 passes a shorter list
        model, opt = _setup(name, rank)
        _good_step(model, opt, rank, as_dict=False)

        def shorter(model=model, opt=opt):
            z, losses = _losses(model, rank, 1)
            opt.backward(losses[:2] if rank == 1 else losses, features=z)

        res[("short", name)] = _attempt(shorter)
        # rank 0 calls backward twice before step(), rank 1 once
        model, opt = _setup(name, rank)
        _good_step(model, opt, rank, as_dict=False)

        def twice(model=model, opt=opt):
            for step in (1, 2):
                for _ in range(2 if rank == 0 else 1):
                    z, losses = _losses(model, rank, step)
                    opt.backward(losses, features=z)
                opt.step()
                opt.zero_grad()

        res[("twice", name)] = _attempt(twice)
        # the same calls on both ranks keep working after all of this (nothing is left half-done)
        model, opt = _setup(name, rank)
        _good_step(model, opt, rank, as_dict=True)
        res[("ok", name)] = _attempt(lambda model=model, opt=opt: _good_step(model, opt, rank, as_dict=True))
    save_result(path, rank, res)


@pytest.fixture(scope="module")
def runs():
    return run_ranks(_worker, hard_timeout=180)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("case, what", [
    ("none", "tasks (names, and which are None)"),
    ("short", "tasks (names, and which are None)"),
    ("twice", "call within the accumulation window"),
])
def test_every_rank_raises_the_same_error_at_once(runs, name, case, what):
    (t0, m0, s0), (t1, m1, s1) = runs[0][(case, name)], runs[1][(case, name)]
    assert t0 == t1 == RankMismatchError.__name__, (m0, m1)
    assert m0 == m1  # the same message on every rank
    assert what in m0
    assert max(s0, s1) < 10  # well inside the 20 s process-group timeout: no rank waited for it


@pytest.mark.parametrize("name", METHODS)
def test_a_refused_call_writes_nothing(runs, name):
    for r in range(WORLD):
        assert all(g is None for g in runs[r][("none-grads", name)])
        assert runs[r][("none-params", name)]


def test_the_failing_rank_is_named_with_its_own_error(runs):
    # uw with a shorter list: rank 1 alone fails to prepare the call ("got 2 losses but 3")
    message = runs[0][("short", "uw")][1]
    assert "rank 1 could not prepare this call" in message and "got 2 losses but 3" in message


@pytest.mark.parametrize("name", METHODS)
def test_agreeing_ranks_train_on(runs, name):
    assert runs[0][("ok", name)][0] is None and runs[1][("ok", name)][0] is None
