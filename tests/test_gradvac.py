"""GradVac: the paper's closed-form correction, its Gram form, the EMA targets, state."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import GradVac, TaskInputs
from tests.modern_checks import check_deterministic, check_one_step, check_resume_bit_identical


def _inputs(g: torch.Tensor) -> TaskInputs:
    return TaskInputs(losses=torch.ones(g.shape[0], dtype=torch.float64), gram=g @ g.T)


def _cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def _vector_reference(g, targets, orders, beta):
    """Algorithm 1 of the paper on explicit vectors (independent of the Gram implementation)."""
    k = g.shape[0]
    new = targets.clone()
    out = []
    for i in range(k):
        gi = g[i].clone()
        for j in orders[i]:
            phi = _cos(gi, g[j])
            t = targets[i, j]
            if phi < t:
                gi = (
                    gi
                    + gi.norm()
                    * (t * (1 - phi**2).sqrt() - phi * (1 - t**2).sqrt())
                    / (g[j].norm() * (1 - t**2).sqrt())
                    * g[j]
                )
            new[i, j] = (1 - beta) * t + beta * phi
        out.append(gi)
    return torch.stack(out).sum(0), new


@pytest.mark.parametrize("target", [-0.3, 0.0, 0.4, 0.9])
def test_two_tasks_cosine_reaches_target_exactly(target):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    g[1] = -0.8 * g[0] + 0.3 * g[1]  # strongly conflicting: cos well below every target
    method = GradVac(beta=0.25)
    targets = torch.full((2, 2), target, dtype=torch.float64)
    coef, new, count = method.vaccinate(g @ g.T, targets, [[1], [0]])
    assert count == 2
    for i, j in ((0, 1), (1, 0)):
        gi = coef[i] @ g
        # the paper's identity: after the correction cos(g_i', g_j) equals the target
        torch.testing.assert_close(_cos(gi, g[j]), torch.tensor(target, dtype=torch.float64))
        # only g_j was added, with a positive coefficient: the cosine moved up to the target
        assert coef[i, i] == 1 and coef[i, j] > 0
        phi = _cos(g[i], g[j])
        torch.testing.assert_close(new[i, j], 0.75 * target + 0.25 * phi)


def test_no_correction_when_cosine_is_above_target():
    g = torch.tensor([[1.0, 0.2, 0.0], [0.8, 0.0, 0.1]], dtype=torch.float64)
    coef, new, count = GradVac(beta=0.5).vaccinate(
        g @ g.T, torch.zeros(2, 2, dtype=torch.float64), [[1], [0]]
    )
    assert count == 0 and torch.equal(coef, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(new[0, 1], 0.5 * _cos(g[0], g[1]))


@pytest.mark.parametrize("k", [3, 5])
def test_gram_form_equals_vector_algorithm(k):
    gen = torch.Generator().manual_seed(k)
    g = torch.randn(k, 11, generator=gen, dtype=torch.float64)
    targets = torch.rand(k, k, generator=gen, dtype=torch.float64) * 1.6 - 0.6
    orders = [[j for j in torch.randperm(k, generator=gen).tolist() if j != i] for i in range(k)]
    method = GradVac(beta=0.3)
    coef, new, count = method.vaccinate(g @ g.T, targets, orders)
    ref, ref_targets = _vector_reference(g, targets, orders, 0.3)
    assert count > 0
    torch.testing.assert_close(coef.sum(0) @ g, ref)
    torch.testing.assert_close(new, ref_targets)


def test_targets_move_toward_cosines_and_cosines_toward_targets():
    # fixed conflicting gradients: the targets (EMA of the measured cosines) fall toward the
    # cosine, and after each step the corrected gradient sits exactly at the old target
    g = torch.tensor([[1.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)  # cos = -0.6
    method = GradVac(beta=0.5)
    for step in range(4):
        agg = method.aggregate(_inputs(g))
        targets, _ = agg.pending
        expected = -0.6 * (1 - 0.5 ** (step + 1))
        torch.testing.assert_close(targets[0, 1], torch.tensor(expected, dtype=torch.float64))
        old = -0.6 * (1 - 0.5**step)
        g0 = agg.extras["coefficients"][0] @ g
        torch.testing.assert_close(_cos(g0, g[1]), torch.tensor(old, dtype=torch.float64))
        method.commit(agg.pending)


def test_first_step_with_zero_targets_equals_pcgrad_projection():
    # targets start at 0: each conflicting g_i is raised to be orthogonal to g_j (PCGrad's result)
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    agg = GradVac().aggregate(_inputs(g))
    torch.testing.assert_close(agg.weights @ g, torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert torch.equal(agg.head_weights, torch.ones(2, dtype=torch.float64))


def test_aggregate_is_pure_and_seed_controls_orders():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    method = GradVac(beta=0.5, seed=7)
    a = method.aggregate(_inputs(g))
    b = method.aggregate(_inputs(g))
    assert torch.equal(a.weights, b.weights)
    assert method.state_dict()["targets"].numel() == 0  # nothing committed
    c = GradVac(beta=0.5, seed=7).aggregate(_inputs(g))
    assert torch.equal(a.weights, c.weights)


def test_validation():
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ValueError, match="beta"):
            GradVac(beta=bad)
    with pytest.raises(ValueError, match="seed"):
        GradVac(seed=-1)
    with pytest.raises(ValueError, match="at least 2"):
        GradVac().aggregate(_inputs(torch.ones(1, 3, dtype=torch.float64)))
    method = GradVac()
    method.commit(method.aggregate(_inputs(torch.eye(3, dtype=torch.float64))).pending)
    with pytest.raises(ValueError, match="3 tasks but this step has 2"):
        method.aggregate(_inputs(torch.eye(2, dtype=torch.float64)))
    with pytest.raises(ValueError, match="keys"):
        method.load_state_dict({"generator": torch.Generator().get_state()})
    assert repr(GradVac()) == "GradVac(beta=0.01, seed=0)"
    assert gb.available_methods()["gradvac"]


def test_end_to_end_step_and_heads():
    agg, info = check_one_step("gradvac")
    assert torch.equal(info.weights, agg.weights)


def test_determinism_and_resume():
    check_deterministic(lambda: GradVac(beta=0.5))
    check_resume_bit_identical(lambda: GradVac(beta=0.5))


def test_steps_follow_the_documented_orders_and_reset_reseeds():
    # the orders are one randperm(k - 1) per task (over the other tasks in index order) from the
    # method's own generator seeded with `seed`, advancing once per committed step; checked over
    # three steps against Algorithm 1 on vectors with orders drawn here from that stream
    k, beta = 4, 0.5
    gen = torch.Generator().manual_seed(12)
    batches = [torch.randn(k, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    for g in batches:
        g[1] = -0.9 * g[0] + 0.2 * g[1]  # conflicts, so the order matters
    stream = torch.Generator().manual_seed(5)
    method = GradVac(beta=beta, seed=5)
    targets = torch.zeros(k, k, dtype=torch.float64)
    order_mattered = []
    for g in batches:
        orders = []
        for i in range(k):
            others = [j for j in range(k) if j != i]
            orders.append([others[int(p)] for p in torch.randperm(k - 1, generator=stream)])
        agg = method.aggregate(_inputs(g))
        ref, ref_targets = _vector_reference(g, targets, orders, beta)
        torch.testing.assert_close(agg.weights @ g, ref)
        torch.testing.assert_close(agg.pending[0], ref_targets)
        in_index_order, _ = _vector_reference(g, targets, [[j for j in range(k) if j != i] for i in range(k)], beta)
        order_mattered.append(not torch.allclose(ref, in_index_order))
        method.commit(agg.pending)
        targets = ref_targets
    assert any(order_mattered)  # the test would see unshuffled orders
    method.reset()
    assert torch.equal(method.aggregate(_inputs(batches[0])).weights,
                       GradVac(beta=beta, seed=5).aggregate(_inputs(batches[0])).weights)


def test_a_zero_gradient_task_is_skipped():
    # task 1 has no gradient: its pairs are not corrected and their targets do not move; the other
    # two tasks get exactly the two-task result
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    method = GradVac(beta=0.5)
    method.load_state_dict({"targets": torch.full((3, 3), 0.3, dtype=torch.float64),
                            "generator": torch.Generator().manual_seed(0).get_state()})
    agg = method.aggregate(_inputs(g))
    targets = agg.pending[0]
    assert (targets[1, [0, 2]] == 0.3).all() and (targets[[0, 2], 1] == 0.3).all()
    pair = GradVac(beta=0.5)
    pair.load_state_dict({"targets": torch.full((2, 2), 0.3, dtype=torch.float64),
                          "generator": torch.Generator().manual_seed(0).get_state()})
    two = pair.aggregate(_inputs(g[[0, 2]]))
    torch.testing.assert_close(agg.weights @ g, two.weights @ g[[0, 2]])
    assert agg.extras["corrections"] == two.extras["corrections"] == 2


def test_cosine_at_the_target_needs_no_correction():
    # orthogonal gradients and zero targets: phi = target exactly, so nothing is corrected
    agg = GradVac().aggregate(_inputs(torch.diag(torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64))))
    assert agg.extras["corrections"] == 0
    assert torch.equal(agg.weights, torch.ones(3, dtype=torch.float64))


def test_exactly_opposed_gradients_with_a_rounded_cosine_below_minus_one():
    # a Gram of exactly opposed unit gradients whose rounded off-diagonal gives cos = -1 - 1e-15
    # (it happens in float64 for some vectors): the cosine is clamped to -1, so each gradient is
    # corrected to cos 0 with the other, g_i + (||g_i|| / ||g_j||) g_j: coefficients (1, 1) each
    gram = torch.tensor([[1.0, -1.0 - 1e-15], [-1.0 - 1e-15, 1.0]], dtype=torch.float64)
    agg = GradVac().aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), gram=gram))
    torch.testing.assert_close(agg.weights, torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(agg.pending[0], torch.tensor([[0.0, -0.01], [-0.01, 0.0]], dtype=torch.float64))


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    assert repr(GradVac(beta=0.5, seed=3)) == "GradVac(beta=0.5, seed=3)"


def test_a_target_of_exactly_one_gets_no_infinite_correction():
    # Regression: after ~50 steps of parallel gradients the EMA target rounds to exactly 1.0
    # (beta = 0.5 here; the default 0.01 gets there too, later). cos = 1 cannot be reached by a
    # finite move along g_j (sqrt(1 - phi_hat^2) = 0 in the denominator): the pair is left
    # uncorrected instead of giving infinite weights; its target still moves by the EMA.
    method = GradVac(beta=0.5)
    parallel = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    for _ in range(60):
        method.commit(method.aggregate(_inputs(parallel)).pending)
    assert torch.equal(method.state_dict()["targets"], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    agg = method.aggregate(_inputs(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)))
    assert agg.extras["corrections"] == 0
    torch.testing.assert_close(agg.weights, torch.ones(2, dtype=torch.float64))
    cos = 2**-0.5
    torch.testing.assert_close(agg.pending[0], torch.tensor([[0.0, 0.5 + 0.5 * cos], [0.5 + 0.5 * cos, 0.0]],
                                                            dtype=torch.float64))
