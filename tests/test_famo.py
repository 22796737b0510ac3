"""FAMO: weights sum to 1, the logit update (softmax Jacobian + Adam), the delayed update, state."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import FAMO, TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses
from tests.modern_checks import check_deterministic, check_one_step, check_resume_bit_identical


def _step(method, losses):
    agg = method.aggregate(TaskInputs(losses=torch.as_tensor(losses, dtype=torch.float64)))
    method.commit(agg.pending)
    return agg


def test_weights_formula_and_sum_to_one():
    method = FAMO(min_losses=[0.1, 0.0, 0.5])
    for losses in ([1.0, 2.0, 3.0], [0.8, 1.5, 2.0], [0.5, 1.4, 0.9]):
        agg = _step(method, losses)
        xi = agg.extras["logits"]
        z = torch.softmax(xi, 0)
        gap = torch.tensor(losses, dtype=torch.float64) - torch.tensor(
            [0.1, 0.0, 0.5], dtype=torch.float64
        )
        c = (z / gap).sum()
        torch.testing.assert_close(agg.weights, z / (c * gap))
        torch.testing.assert_close(agg.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_logits_follow_torch_adam_on_the_softmax_jacobian():
    lr, wd = 0.1, 0.01
    seq = [[1.0, 2.0, 4.0], [0.9, 1.5, 3.9], [0.85, 1.0, 3.0], [0.7, 0.9, 2.9], [0.69, 0.5, 2.0]]
    method = FAMO(lr=lr, gamma=wd)
    xi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([xi], lr=lr, weight_decay=wd)
    prev = None
    for losses in seq:
        cur = torch.tensor(losses, dtype=torch.float64)
        if prev is not None:
            delta = prev.log() - cur.log()
            (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
            xi.grad = grad
            adam.step()
        agg = _step(method, losses)
        torch.testing.assert_close(agg.extras["logits"], xi.detach(), rtol=1e-12, atol=1e-14)
        prev = cur
    assert method.state_dict()["adam_steps"] == len(seq) - 1


def test_task_whose_loss_fell_least_gains_weight():
    method = FAMO()
    losses = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    rates = torch.tensor([0.9, 0.97, 0.8], dtype=torch.float64)  # task 1 falls least, task 2 most
    for _ in range(20):
        agg = _step(method, losses)
        losses = losses * rates
    z = torch.softmax(agg.extras["logits"], 0)
    assert z[1] > z[0] > z[2]
    assert z[1] > 1 / 3 > z[2]


def test_first_step_uses_uniform_logits_and_aggregate_is_pure():
    method = FAMO()
    a = method.aggregate(TaskInputs(losses=torch.tensor([2.0, 4.0], dtype=torch.float64)))
    torch.testing.assert_close(a.weights, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert method.state_dict()["logits"].numel() == 0  # nothing committed by aggregate
    method.commit(a.pending)
    b = method.aggregate(TaskInputs(losses=torch.tensor([1.0, 4.0], dtype=torch.float64)))
    c = method.aggregate(TaskInputs(losses=torch.tensor([1.0, 4.0], dtype=torch.float64)))
    assert torch.equal(b.weights, c.weights)
    assert torch.equal(method.state_dict()["logits"], torch.zeros(2, dtype=torch.float64))


def test_uses_no_per_task_gradients_and_skipped_steps_do_not_update():
    k = 3
    model = MultiTaskNet(k)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.05), "famo", shared_params=model.trunk
    )
    x, y = make_batch(k)
    info = opt.backward(task_losses(model, x, y)[1])
    assert info.engine == "losses" and info.grad_norms is None
    opt.zero_grad()  # the step was abandoned: nothing committed
    assert opt._balancer.method.state_dict()["prev_losses"].numel() == 0
    for _ in range(3):
        opt.zero_grad()
        opt.backward(task_losses(model, x, y)[1])
        opt.step()
    state = opt._balancer.method.state_dict()
    assert state["adam_steps"] == 2 and state["prev_losses"].shape == (3,)


def test_validation():
    with pytest.raises(ValueError, match="lr"):
        FAMO(lr=0)
    with pytest.raises(ValueError, match="gamma must be >= 0, got -1"):
        FAMO(gamma=-1)
    with pytest.raises(TypeError, match="lr must be a number"):
        FAMO(lr=True)
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            FAMO(max_norm=bad)
    with pytest.raises(TypeError, match="max_norm"):
        FAMO(max_norm="1")
    with pytest.warns(FutureWarning, match="gamma"):
        assert FAMO(weight_decay=0.5).gamma == 0.5
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(min_losses=[])
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        FAMO(min_losses=0.5).aggregate(
            TaskInputs(losses=torch.tensor([1.0, 0.5], dtype=torch.float64))
        )
    with pytest.raises(ValueError, match="2 entries but got 3"):
        FAMO(min_losses=[0.0, 0.0]).aggregate(TaskInputs(losses=torch.ones(3, dtype=torch.float64)))
    method = FAMO()
    _step(method, [1.0, 2.0])
    with pytest.raises(ValueError, match="2 tasks but this step has 3"):
        _step(method, [1.0, 2.0, 3.0])
    assert repr(FAMO()) == "FAMO(lr=0.025, gamma=0.001, min_losses=0.0, max_norm=1.0)"


def test_end_to_end_step_and_heads():
    _, info = check_one_step("famo")
    torch.testing.assert_close(info.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_determinism_and_resume():
    check_deterministic(FAMO)
    check_resume_bit_identical(FAMO)


def test_invariant_to_task_order():
    seq = [[1.0, 2.0, 4.0], [0.9, 1.9, 3.0], [0.8, 1.0, 2.9]]
    perm = [2, 0, 1]
    a, b = FAMO(), FAMO()
    for losses in seq:
        wa = _step(a, losses).weights
        wb = _step(b, [losses[p] for p in perm]).weights
        torch.testing.assert_close(wb, wa[perm], rtol=1e-12, atol=0)


# ----------------------------------------------------------------- the official code, ported
class _OfficialFAMO:
    """A port of Cranial-XIX/FAMO ``famo.py`` (class FAMO, lines 10-70) for the comparison:
    ``get_weighted_loss`` (lines 28-34), ``update`` (lines 36-45) and ``backward`` with the
    clip of the shared parameters after the backward (lines 66-69)."""

    def __init__(self, n_tasks, gamma, w_lr, max_norm):
        self.min_losses = torch.zeros(n_tasks, dtype=torch.float64)
        self.w = torch.zeros(n_tasks, dtype=torch.float64, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)
        self.max_norm = max_norm

    def get_weighted_loss(self, losses):
        self.prev_loss = losses
        z = torch.softmax(self.w, -1)
        d = losses - self.min_losses + 1e-8
        c = (z / d).sum().detach()
        return (d.log() * z / c).sum()

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - (curr_loss - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()

    def backward(self, losses, shared_parameters):
        loss = self.get_weighted_loss(losses)
        loss.backward()
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(shared_parameters, self.max_norm)


def _famo_net():
    torch.manual_seed(3)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh()).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(3)).double()
    return trunk, heads


def _famo_losses(trunk, heads, x, y):
    z = trunk(x)
    return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() * 10 ** i + 0.1 for i, h in enumerate(heads)]


@pytest.mark.parametrize("max_norm", [1.0, 0.05, None])
def test_training_matches_a_port_of_the_official_famo_py(max_norm):
    """Same model, same data, SGD: the official class (with the toy trainer's protocol: the
    logit update from the current losses before each backward, experiments/toy/trainer.py)
    and gradbalance's FAMO give the same parameters after every step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    gamma, lr = 0.01, 0.025
    trunk_a, heads_a = _famo_net()
    official = _OfficialFAMO(3, gamma, lr, max_norm if max_norm is not None else 0.0)
    opt_a = torch.optim.SGD(list(trunk_a.parameters()) + list(heads_a.parameters()), lr=0.1)
    trunk_b, heads_b = _famo_net()
    opt_b = gb.GradBalance(torch.optim.SGD(list(trunk_b.parameters()) + list(heads_b.parameters()), lr=0.1),
                           FAMO(lr=lr, gamma=gamma, max_norm=max_norm), shared_params=trunk_b)
    clipped = 0
    for it in range(12):
        opt_a.zero_grad()
        losses_a = torch.stack(_famo_losses(trunk_a, heads_a, x, y))
        if it > 0:
            with torch.no_grad():
                official.update(losses_a.detach())
        official.backward(losses_a, list(trunk_a.parameters()))
        opt_a.step()
        opt_b.zero_grad()
        info = opt_b.backward(_famo_losses(trunk_b, heads_b, x, y))
        opt_b.step()
        clipped += max_norm is not None and info.extras["clip"] < 1.0
        for pa, pb in zip(list(trunk_a.parameters()) + list(heads_a.parameters()),
                          list(trunk_b.parameters()) + list(heads_b.parameters())):
            torch.testing.assert_close(pb, pa, rtol=1e-6, atol=1e-9)
    if max_norm == 0.05:
        assert clipped == 12  # the clip really acted (the test would see a missing clip)


def test_clip_bounds_the_shared_gradient_only_and_reports_the_factor():
    trunk, heads = _famo_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    free = gb.GradBalance(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1),
                          FAMO(max_norm=None), shared_params=trunk)
    free.backward(_famo_losses(trunk, heads, x, y))
    raw = [p.grad.clone() for p in list(trunk.parameters()) + list(heads.parameters())]
    n_shared = len(list(trunk.parameters()))
    norm = torch.linalg.vector_norm(torch.cat([r.reshape(-1) for r in raw[:n_shared]]))
    free.zero_grad()
    clip = float(norm) / 4
    opt = gb.GradBalance(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.1),
                         FAMO(max_norm=clip), shared_params=None)  # shared inferred for the clip
    info = opt.backward(_famo_losses(trunk, heads, x, y))
    got = [p.grad for p in list(trunk.parameters()) + list(heads.parameters())]
    factor = clip / (float(norm) + 1e-6)
    assert info.extras["clip"] == pytest.approx(factor, rel=1e-12)
    for r, g_ in zip(raw[:n_shared], got[:n_shared]):
        torch.testing.assert_close(g_, r * factor, rtol=1e-12, atol=0)
    for r, g_ in zip(raw[n_shared:], got[n_shared:]):  # heads: not clipped
        torch.testing.assert_close(g_, r, rtol=1e-12, atol=0)


def test_buffered_accumulation_folds_the_clip_into_the_weights():
    trunk, heads = _famo_net()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    params = list(trunk.parameters()) + list(heads.parameters())
    ref = gb.GradBalance(torch.optim.SGD(params, lr=0.1), FAMO(max_norm=0.01), shared_params=trunk)
    ref.backward(_famo_losses(trunk, heads, x, y))
    want = [p.grad.clone() for p in params]
    ref.zero_grad()
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.1), FAMO(max_norm=0.01), shared_params=trunk,
                         accumulation="buffered")
    info = opt.backward(_famo_losses(trunk, heads, x, y))
    assert info.extras["clip"] < 1.0
    for w, p in zip(want, params):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-14)


def test_clip_under_a_grad_scaler_is_the_unscaled_clip():
    """The norm is measured on the unscaled gradient: the same update with and without a scaler."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    results = []
    for scaled in (False, True):
        trunk, heads = _famo_net()
        params = list(trunk.parameters()) + list(heads.parameters())
        opt = gb.GradBalance(torch.optim.SGD(params, lr=0.1), FAMO(max_norm=0.05), shared_params=trunk)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if scaled else None
        for _ in range(3):
            opt.zero_grad()
            info = opt.backward(_famo_losses(trunk, heads, x, y), scaler=scaler)
            assert info.extras["clip"] < 1.0
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["famo", "nash_mtl", "gradvac", "db_mtl", "imtl"])
def test_a_missing_task_is_refused_with_what_to_do_instead(name):
    """Positional per-task state: a task given as None is refused, and the message does not tell the
    user to do what they just did (pass a dict with None)."""
    model = MultiTaskNet(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.01), name, shared_params=model.trunk)
    for step in range(2):
        z, losses = task_losses(model, *make_batch(3, seed=step))
        named = {"a": losses[0], "b": losses[1], "c": None if step == 1 else losses[2]}
        if step == 0:
            opt.backward(named, features=z)
            opt.step()
            opt.zero_grad()
            continue
        with pytest.raises(ValueError, match="cannot skip or add a task") as err:
            opt.backward(named, features=z)
        assert "None in a dict of losses counts as missing" in str(err.value)
        assert all(p.grad is None for p in model.parameters())


def _adam_reference_logits(seq, mins, lr, wd):
    """torch.optim.Adam on the logits, fed J_softmax^T delta with delta measured above min_losses."""
    xi = torch.zeros(len(seq[0]), dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([xi], lr=lr, weight_decay=wd)
    m = torch.tensor(mins, dtype=torch.float64)
    out, prev = [], None
    for losses in seq:
        cur = torch.tensor(losses, dtype=torch.float64)
        if prev is not None:
            delta = (prev - m).log() - (cur - m).log()
            (xi.grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
            adam.step()
        out.append(xi.detach().clone())
        prev = cur
    return out


def test_logit_update_measures_the_log_decrease_above_min_losses():
    # delta_i = log(L_prev - m_i) - log(L_now - m_i): with m close to the losses this is far from
    # log(L_prev / L_now), so min_losses must enter both logs
    mins = [0.5, 0.1, 1.0]
    seq = [[1.0, 2.0, 4.0], [0.9, 1.5, 3.9], [0.6, 1.0, 3.0], [0.55, 0.9, 1.5]]
    method = FAMO(lr=0.1, gamma=0.01, min_losses=mins)
    for losses, want in zip(seq, _adam_reference_logits(seq, mins, 0.1, 0.01)):
        torch.testing.assert_close(_step(method, losses).extras["logits"], want, rtol=1e-12, atol=1e-14)


def test_logits_are_bit_identical_to_torch_adam():
    # the official code steps the logits with torch.optim.Adam; gradbalance places eps where it
    # does (after sqrt(v) / sqrt(1 - b2^t)), so the logits agree to the last bit
    seq = [[1.0, 2.0, 4.0], [0.9, 1.5, 3.9], [0.85, 1.0, 3.0], [0.7, 0.9, 2.9], [0.69, 0.5, 2.0]]
    method = FAMO(lr=0.1, gamma=0.01)
    for losses, want in zip(seq, _adam_reference_logits(seq, [0.0, 0.0, 0.0], 0.1, 0.01)):
        assert torch.equal(_step(method, losses).extras["logits"], want)


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    got = repr(FAMO(lr=0.1, gamma=0.01, min_losses=[0.1, 0.2], max_norm=None))
    assert got == "FAMO(lr=0.1, gamma=0.01, min_losses=(0.1, 0.2), max_norm=None)"


def test_bad_state_is_refused_and_changes_nothing():
    method = FAMO()
    _step(method, [1.0, 2.0])
    _step(method, [0.9, 1.5])
    before = method.state_dict()
    bad = dict(before)
    del bad["exp_avg_sq"]
    with pytest.raises(ValueError, match="keys"):
        method.load_state_dict(bad)
    after = method.state_dict()
    assert all(torch.equal(after[k], before[k]) if torch.is_tensor(before[k]) else after[k] == before[k]
               for k in before)


def test_with_a_gram_the_clip_is_folded_and_the_update_norm_reported():
    # with the Gram matrix at hand (accumulation="buffered") the clip goes into the weights;
    # extras report the clipped update's norm, the heads keep the unclipped weights
    g = torch.tensor([[3.0, 0.0], [1.0, 4.0]], dtype=torch.float64)
    agg = FAMO(max_norm=0.5).aggregate(TaskInputs(losses=torch.tensor([1.0, 2.0], dtype=torch.float64), gram=g @ g.T))
    unclipped = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)  # z uniform: w_i ~ 1 / L_i
    torch.testing.assert_close(agg.head_weights, unclipped)
    n = float((unclipped @ g).norm())
    torch.testing.assert_close(agg.weights, unclipped * 0.5 / (n + 1e-6))
    assert agg.max_norm is None
    assert agg.extras["update_norm"] == pytest.approx(float((agg.weights @ g).norm()), rel=1e-12)
