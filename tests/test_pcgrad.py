"""PCGrad: projection identities, Algorithm 1 in vector form vs Gram form, seeds, resume, heads."""

from __future__ import annotations

import itertools

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import PCGrad, TaskInputs
from gradbalance.methods.base import generator_from_state
from tests.classics_helpers import assert_resume_bit_identical
from tests.helpers import MultiTaskNet, make_batch, task_losses

D = torch.float64


def reference(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Algorithm 1 of the paper on explicit vectors: the projected g_i^PC, row by row."""
    out = []
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in orders[i]:
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return torch.stack(out)


def inputs(grads: torch.Tensor) -> TaskInputs:
    return TaskInputs(losses=torch.ones(grads.shape[0], dtype=D), gram=grads @ grads.T)


def all_orders(k: int):
    per_task = [list(itertools.permutations([j for j in range(k) if j != i])) for i in range(k)]
    return [[list(o) for o in combo] for combo in itertools.product(*per_task)]


# order matters here: g0 conflicts with g1 and g2, and the result depends on which comes first
ORDER_MATTERS = torch.tensor([[1.0, 0.2, 0.0], [-1.0, 1.0, 0.3], [-0.5, -1.0, 1.0]], dtype=D)


def test_two_conflicting_gradients_become_orthogonal_to_the_other_original():
    g = torch.tensor([[2.0, 1.0, -1.0, 0.5], [-3.0, 0.5, 1.0, 2.0]], dtype=D)
    assert g[0] @ g[1] < 0
    agg = PCGrad().aggregate(inputs(g))
    projected = agg.extras["coefficients"] @ g
    assert abs(projected[0] @ g[1]) < 1e-12 and abs(projected[1] @ g[0]) < 1e-12
    # the paper's closed form for two tasks, written out by hand
    expected = (g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]) + (g[1] - (g[0] @ g[1]) / (g[0] @ g[0]) * g[0])
    torch.testing.assert_close(agg.weights @ g, expected, atol=1e-12, rtol=0)
    assert agg.extras["projections"] == 2


def test_hand_computed_two_task_case():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=D)
    agg = PCGrad().aggregate(inputs(g))
    # g1^PC = g1 + g2 / 2 = (0.5, 0.5), g2^PC = g2 + g1 = (0, 1)
    torch.testing.assert_close(agg.extras["coefficients"], torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=D))
    torch.testing.assert_close(agg.weights @ g, torch.tensor([0.5, 1.5], dtype=D))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_no_conflict_gives_plain_sum_or_mean(reduction):
    g = torch.rand(4, 7, generator=torch.Generator().manual_seed(0), dtype=D)  # all entries >= 0
    agg = PCGrad(reduction=reduction).aggregate(inputs(g))
    scale = 1.0 if reduction == "sum" else 0.25
    assert torch.equal(agg.weights, torch.full((4,), scale, dtype=D))
    assert agg.extras["projections"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_gram_form_matches_vector_form_for_every_order(seed):
    g = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed), dtype=D)
    m = PCGrad()
    results = []
    for orders in all_orders(3):
        coef, _ = m.project(g @ g.T, orders)
        ref = reference(g, orders)
        torch.testing.assert_close(coef @ g, ref, atol=1e-10, rtol=0)
        results.append(ref.sum(0))
    # and the method's own random order is one of them
    got = m.aggregate(inputs(g)).weights @ g
    assert min(float((got - r).abs().max()) for r in results) < 1e-10


def test_orders_are_permutations_of_the_other_tasks():
    orders = PCGrad().orders(6, torch.Generator().manual_seed(0))
    for i, order in enumerate(orders):
        assert sorted(order) == [j for j in range(6) if j != i]


def test_fresh_order_per_task_and_per_step():
    # not one shuffle reused: the permutation pattern differs between tasks and between steps
    m = PCGrad()
    firsts = []
    for _ in range(4):
        orders = m.orders(6, generator_from_state(m._generator))
        patterns = {tuple(sorted(o).index(j) for j in o) for o in orders}
        assert len(patterns) > 1
        firsts.append(tuple(orders[0]))
        m.commit(m.aggregate(inputs(torch.eye(6, dtype=D))).pending)
    assert len(set(firsts)) > 1


def test_orthogonal_gradients_are_not_conflicting():
    """g_i . g_j = 0 is no conflict (the paper projects on g_i . g_j < 0): no projection counted,
    the update is the plain sum."""
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]], dtype=D)
    agg = PCGrad().aggregate(inputs(grads))
    assert agg.extras["projections"] == 2  # g0 and g2 conflict, both ways; g1 is orthogonal to both
    torch.testing.assert_close(agg.weights @ grads, reference(grads, [[1, 2], [0, 2], [0, 1]]).sum(0))
    free = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=D)
    agg = PCGrad().aggregate(inputs(free))
    assert agg.extras["projections"] == 0
    torch.testing.assert_close(agg.weights, torch.ones(2, dtype=D), rtol=0, atol=0)


def test_order_matters_case_really_depends_on_order():
    outs = {tuple(reference(ORDER_MATTERS, o).sum(0).round(decimals=9).tolist()) for o in all_orders(3)}
    assert len(outs) > 1


def test_same_seed_same_result_different_seed_can_differ():
    def run(seed, steps=4):
        m = PCGrad(seed=seed)
        out = []
        for _ in range(steps):
            agg = m.aggregate(inputs(ORDER_MATTERS))
            m.commit(agg.pending)
            out.append(agg.weights)
        return torch.stack(out)

    assert torch.equal(run(0), run(0))
    assert any(not torch.equal(run(0), run(s)) for s in range(1, 6))


def test_aggregate_is_pure_until_commit():
    m = PCGrad(seed=1)
    a = m.aggregate(inputs(ORDER_MATTERS))
    b = m.aggregate(inputs(ORDER_MATTERS))  # an accumulation re-run: same draw
    assert torch.equal(a.weights, b.weights) and torch.equal(a.pending, b.pending)


def test_zero_gradient_is_never_projected_on():
    g = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 0.0]], dtype=D)
    agg = PCGrad().aggregate(inputs(g))
    assert torch.isfinite(agg.weights).all()
    assert agg.extras["coefficients"][:, 1].tolist() == [0.0, 1.0, 0.0]


def test_errors():
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(reduction="avg")
    with pytest.raises(ValueError, match="seed"):
        PCGrad(seed=-1)
    with pytest.raises(ValueError, match="at least 2"):
        PCGrad().aggregate(inputs(torch.ones(1, 3, dtype=D)))
    with pytest.raises(ValueError, match="generator"):
        PCGrad().load_state_dict({"gen": torch.zeros(1)})
    assert repr(PCGrad()) == "PCGrad(reduction='sum', seed=0)"
    assert isinstance(gb.methods.make_method("pcgrad"), PCGrad)


def test_one_loss_raises_before_anything_is_written():
    model = MultiTaskNet(1)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", shared_params=model.trunk)
    _, losses = task_losses(model, *make_batch(1))
    with pytest.raises(ValueError, match="at least 2 task losses"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())


def test_resume_is_bit_identical():
    assert_resume_bit_identical(lambda: PCGrad(seed=5), k=4)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_end_to_end_heads_get_their_own_gradient_and_shared_gets_the_surgery(reduction):
    k = 3
    model = MultiTaskNet(k, seed=3)
    x, y = make_batch(k, seed=4)
    _, losses = task_losses(model, x, y)
    trunk, heads = list(model.trunk.parameters()), [list(h.parameters()) for h in model.heads]
    own = [torch.autograd.grad(losses[i], heads[i], retain_graph=True) for i in range(k)]
    g = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(l, trunk, retain_graph=True)])
                     for l in losses]).double()
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), PCGrad(reduction=reduction),
                         shared_params=model.trunk)
    info = opt.backward(losses)
    assert info.extras["projections"] > 0  # the tasks do conflict
    hw = torch.tensor(1.0 if reduction == "sum" else 1 / k, dtype=D)
    for i in range(k):
        for p, expected in zip(heads[i], own[i]):
            assert torch.equal(p.grad, expected * hw.to(expected.dtype))
    # the shared gradient is one of the 8 vector-form PCGrad results
    got = torch.cat([p.grad.reshape(-1) for p in trunk]).double()
    # ... it is the combination of the task gradients that StepInfo reports
    torch.testing.assert_close(got, info.weights @ g, atol=1e-5, rtol=0)
    torch.testing.assert_close(info.weights, info.extras["coefficients"].sum(0))
    candidates = [reference(g, o).sum(0) * float(hw) for o in all_orders(3)]
    assert min(float((got - c).abs().max()) for c in candidates) < 1e-5
