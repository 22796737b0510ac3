"""DB-MTL: log-loss gradients, the EMA, equal rescaled norms, loss-scale invariance, state."""

from __future__ import annotations

import copy

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import DBMTL, TaskInputs
from tests.helpers import MultiTaskNet, make_batch, task_losses
from tests.modern_checks import check_deterministic, check_one_step, check_resume_bit_identical


def _inputs(g, losses):
    return TaskInputs(losses=torch.as_tensor(losses, dtype=torch.float64), grads=g)


def test_rescaled_ema_gradients_all_have_the_largest_norm():
    gen = torch.Generator().manual_seed(0)
    method = DBMTL()
    for step in range(3):
        g = (
            torch.randn(4, 9, generator=gen, dtype=torch.float64)
            * torch.tensor([0.1, 1.0, 5.0, 20.0])[:, None]
        )
        agg = method.aggregate(_inputs(g, [0.5, 2.0, 1.0, 3.0]))
        ema, t = agg.pending
        scaled = agg.extras["alpha"][:, None] * ema
        norms = scaled.norm(dim=1)
        torch.testing.assert_close(norms, ema.norm(dim=1).max().expand(4))
        torch.testing.assert_close(agg.direction, scaled.sum(0))
        method.commit(agg.pending)
        assert t == step + 1


def test_ema_recursion_with_decaying_beta():
    g1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    g2 = torch.tensor([[0.0, 4.0], [3.0, 0.0]], dtype=torch.float64)
    losses = [2.0, 0.5]
    method = DBMTL(beta=0.8, beta_sigma=0.5)
    agg = method.aggregate(_inputs(g1, losses))
    h1 = (1 - 0.8) * g1 / torch.tensor(losses, dtype=torch.float64)[:, None]  # beta_1 = 0.8
    torch.testing.assert_close(agg.pending[0], h1)
    method.commit(agg.pending)
    agg = method.aggregate(_inputs(g2, losses))
    beta2 = 0.8 / 2**0.5
    h2 = beta2 * h1 + (1 - beta2) * g2 / torch.tensor(losses, dtype=torch.float64)[:, None]
    torch.testing.assert_close(agg.pending[0], h2)
    n = h2.norm(dim=1)
    torch.testing.assert_close(agg.direction, (n.max() / n) @ h2)
    torch.testing.assert_close(agg.head_weights, 1 / torch.tensor(losses, dtype=torch.float64))


def test_loss_scale_invariance_end_to_end():
    # multiplying a task's loss by a constant changes nothing: the method sees log L_i, and
    # heads get the gradient of log L_i too
    k = 3
    a = MultiTaskNet(k)
    b = copy.deepcopy(a)
    opt_a = gb.GradBalance(
        torch.optim.SGD(a.parameters(), lr=0.05), "db_mtl", shared_params=a.trunk
    )
    opt_b = gb.GradBalance(
        torch.optim.SGD(b.parameters(), lr=0.05),
        "db_mtl",
        shared_params=b.trunk,
        task_weights=[1000.0, 1.0, 1e-3],
    )
    for s in range(4):
        x, y = make_batch(k, seed=s)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            opt.backward(task_losses(model, x, y)[1])
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.trunk[0].weight, MultiTaskNet(k).trunk[0].weight)


def test_invariant_to_task_order():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    losses = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    d = DBMTL().aggregate(_inputs(g, losses)).direction
    torch.testing.assert_close(DBMTL().aggregate(_inputs(g[perm], losses[perm])).direction, d)


def test_validation():
    for bad in (-0.1, 1.0, "x"):
        with pytest.raises(ValueError, match="beta must"):
            DBMTL(beta=bad)
    with pytest.raises(ValueError, match="beta_sigma"):
        DBMTL(beta_sigma=-1)
    with pytest.raises(ValueError, match=r"\[1\] is <= 0"):
        DBMTL().aggregate(_inputs(torch.ones(2, 3), [1.0, 0.0]))
    method = DBMTL()
    method.commit(method.aggregate(_inputs(torch.ones(2, 3), [1.0, 1.0])).pending)
    with pytest.raises(ValueError, match="2 tasks but this step has 3"):
        method.aggregate(_inputs(torch.ones(3, 3), [1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="reset"):
        method.aggregate(_inputs(torch.ones(2, 4), [1.0, 1.0]))
    assert repr(DBMTL()) == "DBMTL(beta=0.9, beta_sigma=0.0)"


def test_end_to_end_step_and_heads():
    _, info = check_one_step("db_mtl")
    assert info.weights is None and "alpha" in info.extras


def test_determinism_and_resume():
    check_deterministic(DBMTL)
    check_resume_bit_identical(DBMTL)


def test_training_matches_a_direct_implementation_of_the_recursion():
    # an independent loop: gradients of log L_i by autograd, the EMA, the rescaled sum on the
    # shared parameters, the gradient of log L_i on each head
    k = 3
    a = MultiTaskNet(k)
    b = copy.deepcopy(a)
    opt = gb.GradBalance(torch.optim.Adam(a.parameters(), lr=1e-2), "db_mtl", shared_params=a.trunk)
    ref = torch.optim.Adam(b.parameters(), lr=1e-2)
    shared = list(b.trunk.parameters())
    ema = None
    for s in range(6):
        x, y = make_batch(k, seed=s)
        opt.zero_grad()
        opt.backward(task_losses(a, x, y)[1])
        opt.step()
        ref.zero_grad()
        logs = [torch.log(v) for v in task_losses(b, x, y)[1]]
        rows = []
        for i, v in enumerate(logs):
            rows.append(
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(v, shared, retain_graph=True)]
                )
            )
            v.backward(inputs=list(b.heads[i].parameters()), retain_graph=True)
        g = torch.stack(rows)
        ema = 0.1 * g if ema is None else 0.9 * ema + 0.1 * g
        n = ema.norm(dim=1)
        new = (n.max() / n) @ ema
        offset = 0
        for p in shared:
            p.grad = new[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_state_dict_carries_the_step_count_of_the_decaying_beta():
    # with beta_sigma > 0 the next beta_t = beta / t^sigma depends on the saved step count: a
    # loaded method must take exactly the original's next step, a fresh one must not
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    losses = [0.5, 1.0, 2.0]
    method = DBMTL(beta=0.8, beta_sigma=1.0)
    for g in batches[:2]:
        method.commit(method.aggregate(_inputs(g, losses)).pending)
    state = method.state_dict()
    assert state["steps"] == 2
    loaded = DBMTL(beta=0.8, beta_sigma=1.0)
    loaded.load_state_dict(copy.deepcopy(state))
    expected = method.aggregate(_inputs(batches[2], losses))
    got = loaded.aggregate(_inputs(batches[2], losses))
    assert torch.equal(got.direction, expected.direction) and got.pending[1] == 3
    # beta_3 = 0.8 / 3: the EMA recursion from the saved h with the step count restored
    beta3 = 0.8 / 3
    h3 = beta3 * state["ema"] + (1 - beta3) * batches[2] / torch.tensor(losses, dtype=torch.float64)[:, None]
    torch.testing.assert_close(got.pending[0], h3)
    only_ema = DBMTL(beta=0.8, beta_sigma=1.0)
    only_ema.load_state_dict({"ema": state["ema"], "steps": 0})
    assert not torch.allclose(only_ema.aggregate(_inputs(batches[2], losses)).direction, expected.direction)


def test_zero_ema_gradient_gets_scale_zero():
    # h = g / L with beta = 0: norms (3, 0, 1), scales (1, 0, 3), d = 1 * (3, 0) + 3 * (0, 1)
    g = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    agg = DBMTL(beta=0.0).aggregate(_inputs(g, [1.0, 1.0, 1.0]))
    torch.testing.assert_close(agg.extras["alpha"], torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(agg.direction, torch.tensor([3.0, 3.0], dtype=torch.float64))


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    assert repr(DBMTL(beta=0.5, beta_sigma=0.25)) == "DBMTL(beta=0.5, beta_sigma=0.25)"


def test_bad_state_is_refused_and_changes_nothing():
    method = DBMTL()
    method.commit(method.aggregate(_inputs(torch.ones(2, 3, dtype=torch.float64), [1.0, 2.0])).pending)
    before = method.state_dict()
    with pytest.raises(ValueError, match="keys"):
        method.load_state_dict({"ema": torch.zeros(2, 3, dtype=torch.float64)})
    after = method.state_dict()
    assert torch.equal(after["ema"], before["ema"]) and after["steps"] == before["steps"] == 1
