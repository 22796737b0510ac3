"""IMTL (IMTL-L + IMTL-G): IMTL-G on the scaled gradients, the scale update, resume."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import IMTL
from gradbalance.methods.imtl import imtl_g_weights
from tests.weighted_sum_check import (
    check_end_to_end,
    check_resume,
    inputs_for,
    random_gradients,
    run_doc_snippets,
)


def with_scales(method: IMTL, s: list[float]) -> IMTL:
    k = len(s)
    zeros = torch.zeros(k, dtype=torch.float64)
    method.load_state_dict({"num_tasks": k, "t": 1, "s": torch.tensor(s, dtype=torch.float64),
                            "exp_avg": zeros, "exp_avg_sq": zeros})
    return method


def test_imtl_g_on_the_scaled_gradients():
    grads = random_gradients(4, seed=1)
    s = [0.3, -0.7, 1.1, 0.0]
    scale = torch.tensor(s, dtype=torch.float64).exp()
    agg = with_scales(IMTL(), s).aggregate(inputs_for(grads))
    w = agg.weights
    d = w @ grads
    proj = grads @ d / grads.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(4), rtol=1e-9, atol=1e-10)  # impartial
    assert float((w / scale).sum()) == pytest.approx(1.0, abs=1e-12)  # alpha on g~ sums to 1
    torch.testing.assert_close(w / scale, imtl_g_weights((grads * scale[:, None]) @ (grads * scale[:, None]).T))
    torch.testing.assert_close(agg.head_weights, scale)


def test_sgd_step_on_the_scale_loss():
    # d/ds (e^s L - s) = e^s L - 1
    grads = random_gradients(2, seed=0)
    losses = torch.tensor([2.0, 0.25], dtype=torch.float64)
    method = IMTL(lr=0.1, optimizer="sgd")
    method.commit(method.aggregate(inputs_for(grads, losses=losses)).pending)
    torch.testing.assert_close(method.s, torch.tensor([-0.1 * (2.0 - 1.0), -0.1 * (0.25 - 1.0)],
                                                      dtype=torch.float64))


def test_init_sets_the_first_scales():
    """init = s_0: the first step scales the gradients, heads and the s-gradient by e^init."""
    grads = random_gradients(3, seed=3)
    losses = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    method = IMTL(init=0.5, lr=0.1, optimizer="sgd")
    agg = method.aggregate(inputs_for(grads, losses=losses))
    scale = torch.full((3,), 0.5, dtype=torch.float64).exp()
    torch.testing.assert_close(agg.head_weights, scale)
    torch.testing.assert_close(agg.weights, imtl_g_weights(grads @ grads.T) * scale)  # a common scale: same alpha
    method.commit(agg.pending)
    torch.testing.assert_close(method.s, 0.5 - 0.1 * (scale * losses - 1.0))


def test_adam_step_matches_torch_adam():
    grads = random_gradients(3, seed=2)
    method, s = IMTL(lr=0.05), torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.Adam([s], lr=0.05)
    for step in range(5):
        losses = torch.tensor([1.0 + step, 0.5, 3.0 / (step + 1)], dtype=torch.float64)
        method.commit(method.aggregate(inputs_for(grads, losses=losses)).pending)
        ref.zero_grad()
        (s.exp() * losses - s).sum().backward()
        ref.step()
        torch.testing.assert_close(method.s, s.detach(), rtol=1e-12, atol=1e-14)


def test_scaled_losses_converge_to_one():
    grads = random_gradients(3, seed=3)
    losses = torch.tensor([5.0, 0.2, 1.0], dtype=torch.float64)
    method = IMTL(lr=0.3, optimizer="sgd")  # contraction factor 1 - lr at the fixed point
    for _ in range(100):
        method.commit(method.aggregate(inputs_for(grads, losses=losses)).pending)
    torch.testing.assert_close(method.s.exp() * losses, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_aggregate_is_pure_and_task_count_is_checked():
    method = with_scales(IMTL(), [0.1, 0.2, 0.3])
    before = method.state_dict()
    method.aggregate(inputs_for(random_gradients(3)))
    assert all(torch.equal(before[k], v) if torch.is_tensor(v) else before[k] == v
               for k, v in method.state_dict().items())
    with pytest.raises(ValueError, match="3 tasks but this step has 2"):
        method.aggregate(inputs_for(random_gradients(2)))


def test_permutation_invariance():
    grads = random_gradients(4, seed=5)
    s = [0.2, -0.4, 0.6, 0.1]
    perm = [2, 0, 3, 1]
    w = with_scales(IMTL(), s).aggregate(inputs_for(grads)).weights
    wp = with_scales(IMTL(), [s[i] for i in perm]).aggregate(inputs_for(grads[perm])).weights
    torch.testing.assert_close(wp, w[perm], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": float("nan")}, {"optimizer": "adamw"},
                                    {"init": float("inf")}, {"mode": "ub"}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        IMTL(**kwargs)


def test_bad_state():
    with pytest.raises(ValueError, match="missing"):
        IMTL().load_state_dict({"s": torch.zeros(2)})


def test_registry():
    assert repr(gb.methods.base.make_method("imtl")) == "IMTL(lr=0.001, optimizer='adam', init=0.0, mode='exact')"


def test_end_to_end_with_learned_scales():
    check_end_to_end(with_scales(IMTL(), [0.5, -0.5, 0.2]), k=3)
    check_end_to_end(with_scales(IMTL(mode="representation"), [0.5, -0.5, 0.2]), k=3, features=True)


def test_save_load_continue_is_bit_identical():
    method = check_resume(lambda: IMTL(lr=0.05), k=3, before=3, after=3)
    assert method.t == 6 and (method.s != 0).all()  # the scales moved


def test_doc_snippets_run():
    assert run_doc_snippets("imtl") >= 1
