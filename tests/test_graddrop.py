"""GradDrop: sign purity, exactness where tasks agree, the keep probability, leak, state."""

from __future__ import annotations

import pytest
import torch

from gradbalance.methods import GradDrop, TaskInputs
from tests.modern_checks import check_deterministic, check_one_step, check_resume_bit_identical


def _run(method, g):
    return method.aggregate(TaskInputs(losses=torch.ones(g.shape[0], dtype=torch.float64), grads=g))


def test_purity_formula_by_hand():
    g = torch.tensor([[3.0, 1.0, -2.0, 0.0, 0.5], [-1.0, 2.0, -1.0, 0.0, -0.5]])
    expected = torch.tensor([0.5 * (1 + 2 / 4), 1.0, 0.0, 0.5, 0.5])
    torch.testing.assert_close(GradDrop.purity(g), expected)


def test_coordinates_where_all_tasks_agree_are_kept_exactly():
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(4, 300, generator=gen) + 0.01
    sign = torch.where(torch.rand(300, generator=gen) < 0.5, -1.0, 1.0)
    g = g * sign  # every column has one sign for all tasks
    g[:, :100] *= torch.where(torch.rand(4, 100, generator=gen) < 0.5, -1.0, 1.0)  # mixed columns
    agree = (g > 0).all(0) | (g < 0).all(0)
    for seed in range(3):
        d = _run(GradDrop(seed=seed), g).direction
        assert torch.equal(d[agree], g[:, agree].sum(0))
        # a mixed coordinate keeps exactly one sign's entries: the positive or the negative sum
        pos, neg = g.clamp_min(0).sum(0), g.clamp_max(0).sum(0)
        mixed = ~agree
        assert bool(((d[mixed] == pos[mixed]) | (d[mixed] == neg[mixed])).all())


def test_positive_side_is_kept_with_probability_purity():
    n = 20000
    g = torch.tensor([[3.0], [-1.0]]).expand(2, n).contiguous()  # P = 0.75 in every coordinate
    d = _run(GradDrop(seed=5), g).direction
    frac = float((d == 3.0).float().mean())
    assert set(d.unique().tolist()) == {3.0, -1.0}
    assert abs(frac - 0.75) < 0.015  # 5 standard deviations of a binomial mean


def test_leak():
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_run(GradDrop(leak=1.0), g).direction, g.sum(0))
    # a leak of 1 for task 0 only: task 0 passes whole, the others are masked as with leak 0
    mixed = _run(GradDrop(leak=[1.0, 0.0, 0.0], seed=4), g).direction
    plain = _run(GradDrop(seed=4), g).direction
    assert not torch.equal(mixed, plain)
    # same purity (from all tasks) and the same draw: the same side is kept in every coordinate
    keep_pos = (plain - g.clamp_min(0).sum(0)).abs() < 1e-12
    expected = g[0] + torch.where(keep_pos, g[1:].clamp_min(0).sum(0), g[1:].clamp_max(0).sum(0))
    both_signs_present = (g > 0).any(0) & (g < 0).any(0)
    torch.testing.assert_close(mixed[both_signs_present], expected[both_signs_present])
    assert 0 < int(keep_pos[both_signs_present].sum()) < int(both_signs_present.sum())


def test_determinism_purity_and_generator_advance():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(3, 200, generator=gen)
    m = GradDrop(seed=11)
    a, b = _run(m, g), _run(m, g)
    assert torch.equal(a.direction, b.direction)  # aggregate does not advance the generator
    assert torch.equal(a.direction, _run(GradDrop(seed=11), g).direction)
    assert not torch.equal(a.direction, _run(GradDrop(seed=12), g).direction)
    m.commit(a.pending)
    assert not torch.equal(_run(m, g).direction, a.direction)  # next step, next draw
    assert a.weights is None and torch.equal(a.head_weights, torch.ones(3, dtype=torch.float64))


def test_validation():
    for bad in (-0.1, 1.1, [0.5, 2.0], [], "a", True):
        with pytest.raises(ValueError, match="leak"):
            GradDrop(leak=bad)
    with pytest.raises(ValueError, match="seed"):
        GradDrop(seed=1.5)
    with pytest.raises(ValueError, match="2 entries but got 3"):
        _run(GradDrop(leak=[0.1, 0.2]), torch.ones(3, 4))
    assert repr(GradDrop(leak=[0.5, 0.0])) == "GradDrop(leak=(0.5, 0.0), seed=0)"


def test_end_to_end_step_and_heads():
    agg, info = check_one_step("graddrop")
    assert info.weights is None and agg.direction is not None


def test_determinism_and_resume():
    check_deterministic(GradDrop)
    check_resume_bit_identical(GradDrop)


def test_invariant_to_task_order():
    # the purity and the draw do not depend on the order of the tasks, so neither does the result
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(4, 100, generator=gen, dtype=torch.float64)
    d = _run(GradDrop(seed=3), g).direction
    d_perm = _run(GradDrop(seed=3), g[torch.tensor([3, 1, 0, 2])]).direction
    torch.testing.assert_close(d_perm, d, rtol=1e-12, atol=1e-12)


def _reference_direction(g, u, leak):
    """Algorithm 1 written out: P from the signs, M_ip = [U_p < P_p][g_ip > 0] + [U_p > P_p][g_ip < 0]."""
    total = g.abs().sum(0)
    purity = torch.where(total > 0, 0.5 * (1 + g.sum(0) / total.clamp_min(1e-300)), 0.5)
    keep = ((u < purity) & (g > 0)) | ((u > purity) & (g < 0))
    mask = leak[:, None] + (1 - leak[:, None]) * keep.to(g.dtype)
    return (mask * g).sum(0)


def test_direction_is_algorithm_1_with_the_documented_draw_and_reset_reseeds():
    # the documented draw: one rand(P) per committed step from the method's own generator
    # (seeded with `seed`), in the gradients' dtype; reset() starts that stream again
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randn(3, 200, generator=gen, dtype=torch.float64) for _ in range(2)]
    leak = torch.tensor([0.25, 0.0, 0.5], dtype=torch.float64)
    stream = torch.Generator().manual_seed(9)
    method = GradDrop(leak=leak.tolist(), seed=9)
    for g in batches:
        u = torch.rand(200, generator=stream, dtype=torch.float64)
        agg = _run(method, g)
        torch.testing.assert_close(agg.direction, _reference_direction(g, u, leak), rtol=0, atol=1e-15)
        method.commit(agg.pending)
    method.reset()
    fresh = GradDrop(leak=leak.tolist(), seed=9)
    assert torch.equal(_run(method, batches[0]).direction, _run(fresh, batches[0]).direction)
