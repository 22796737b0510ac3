"""Every registered method through the wrapper: a new method joins these tests by registering.

Checks, per method: it trains (finite weights, parameters move), it is deterministic, a resumed
run continues bit for bit, a GradScaler gives the unscaled step, an overflow leaves everything
unchanged, micro-batch accumulation equals one big batch, and the task order does not matter
where the method is order-invariant.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gradbalance as gb
from tests.helpers import MultiTaskNet, make_batch, snapshot, task_losses

K = 3
METHODS = sorted(gb.available_methods())


def _make(name: str, model: MultiTaskNet, lr: float = 0.05, opt_cls=torch.optim.Adam):
    return gb.GradBalance(opt_cls(model.parameters(), lr=lr), name, shared_params=model.trunk)


def _step(opt, model, x, y, scaler=None):
    opt.zero_grad()
    z, losses = task_losses(model, x, y)
    info = opt.backward(losses, features=z, scaler=scaler)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    return info


def _batches(n: int):
    return [make_batch(K, n=16, seed=s) for s in range(n)]


@pytest.mark.parametrize("name", METHODS)
def test_trains_and_reports(name):
    model = MultiTaskNet(K)
    before = [p.detach().clone() for p in model.parameters()]
    opt = _make(name, model)
    for x, y in _batches(3):
        info = _step(opt, model, x, y)
        assert info.losses.shape == (K,)
        if info.weights is not None:
            assert torch.isfinite(info.weights).all()
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert any(moved[: len(list(model.trunk.parameters()))]), "shared parameters did not move"
    assert opt.last_info is info
    assert isinstance(repr(opt.method), str)


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_and_resume_is_bit_identical(name):
    data = _batches(6)
    model = MultiTaskNet(K)
    opt = _make(name, model)
    for x, y in data[:3]:
        _step(opt, model, x, y)
    checkpoint = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict())}
    for x, y in data[3:]:
        _step(opt, model, x, y)

    resumed = MultiTaskNet(K, seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = _make(name, resumed)
    opt2.load_state_dict(checkpoint["opt"])
    for x, y in data[3:]:
        _step(opt2, resumed, x, y)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"{name}: resumed run differs"


@pytest.mark.parametrize("name", METHODS)
def test_grad_scaler_gives_the_unscaled_step(name):
    data = _batches(3)
    model, twin = MultiTaskNet(K), MultiTaskNet(K)
    opt, ref = _make(name, model, opt_cls=torch.optim.SGD), _make(name, twin, opt_cls=torch.optim.SGD)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    for x, y in data:
        a = _step(opt, model, x, y, scaler=scaler)
        b = _step(ref, twin, x, y)
        if a.weights is not None:
            torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-7)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_overflow_under_scaler_changes_nothing(name):
    model = MultiTaskNet(K)
    opt = _make(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = make_batch(K)
    _step(opt, model, x, y, scaler=scaler)  # Adam state and method state exist
    before = snapshot(model, opt)[0]
    method_state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    z, losses = task_losses(model, x, y)
    # a finite loss whose gradient is inf (sqrt at 0)
    losses[0] = losses[0] + torch.sqrt(model.trunk[0].weight.abs() * 0).sum()
    opt.backward(losses, features=z, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    after = snapshot(model, opt)[0]
    for n in before:
        assert torch.equal(before[n], after[n]), n
    _assert_nested_equal(method_state, opt.state_dict())


def _assert_nested_equal(a, b, close: bool = False):
    """Equal method states (bit for bit, or to float tolerance with ``close``)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_nested_equal(a[key], b[key], close)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_nested_equal(u, v, close)
    elif torch.is_tensor(a) and close:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def _exact_accumulation(name: str) -> bool:
    method = gb.methods.make_method(name)
    return method.mode == "exact" and not getattr(method, "loss_dependent", False)


def _accumulated_equals_big_batch(name: str, accumulation: str):
    """Two steps of 4 micro-batches against two steps of one big batch: parameters and state."""
    x, y = make_batch(K, n=32, seed=7)
    model, twin = MultiTaskNet(K), MultiTaskNet(K)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), name, shared_params=model.trunk,
                         accumulation=accumulation)
    ref = _make(name, twin, opt_cls=torch.optim.SGD)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            ref.zero_grad()
            z, losses = task_losses(twin, x, y)
            ref.backward(losses, features=z)
            ref.step()
            _accumulate(opt, model, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
    _assert_nested_equal(opt.method.state_dict(), ref.method.state_dict(), close=True)
    assert not [w for w in caught if "accumulation window" in str(w.message)]


@pytest.mark.parametrize("name", [m for m in METHODS if _exact_accumulation(m)])
def test_accumulation_equals_one_big_batch(name):
    _accumulated_equals_big_batch(name, "exact")


@pytest.mark.parametrize("name", METHODS)
def test_buffered_accumulation_equals_one_big_batch_for_every_method(name):
    """accumulation='buffered' keeps every parameter's per-task gradients: exact for all methods."""
    _accumulated_equals_big_batch(name, "buffered")


def _accumulate(opt, model, x, y, parts=4):
    opt.zero_grad()
    n = len(x) // parts
    for part in range(parts):
        sl = slice(n * part, n * part + n)
        z, losses = task_losses(model, x[sl], y[sl])
        opt.backward([loss / parts for loss in losses], features=z)
    opt.step()


@pytest.mark.parametrize("name", [m for m in METHODS if not _exact_accumulation(m)])
def test_inexact_accumulation_is_never_silent(name):
    """Representation mode and loss-dependent weightings: the window differs from the big batch; say so once."""
    x, y = make_batch(K, n=32, seed=7)
    model = MultiTaskNet(K)
    opt = _make(name, model, opt_cls=torch.optim.SGD)
    with pytest.warns(UserWarning, match="weights changed within the accumulation window") as caught:
        for _ in range(2):
            _accumulate(opt, model, x, y)
    assert len([w for w in caught if "accumulation window" in str(w.message)]) == 1
    other = MultiTaskNet(K)
    combine = gb.GradBalance(torch.optim.SGD(other.parameters(), lr=0.05), name, shared_params=other.trunk,
                             accumulation="combine")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*accumulation window.*")
        _accumulate(combine, other, x, y)


@pytest.mark.parametrize("name", [n for n in METHODS if gb.methods.make_method(n).requires != "losses"])
def test_direct_call_without_the_required_inputs_names_what_is_missing(name):
    """A method called directly (not through the optimizer) without the Gram matrix or gradients it
    needs raises a ValueError saying which input is missing, not an AttributeError deep inside."""
    from gradbalance.methods import TaskInputs, make_method

    method = make_method(name)
    with pytest.raises(ValueError, match=r"inputs\.gram|inputs\.grads|Gram"):
        method.aggregate(TaskInputs(losses=torch.tensor([1.0, 2.0], dtype=torch.float64)))
