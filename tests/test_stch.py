"""STCH: the weights are the gradient of the smooth Tchebycheff function; mu -> 0; warm-up."""

from __future__ import annotations

import pytest
import torch

from gradbalance.methods import STCH, TaskInputs
from tests.modern_checks import check_deterministic, check_one_step, check_resume_bit_identical


def _weights(method, losses, step=0):
    return method.aggregate(
        TaskInputs(losses=torch.as_tensor(losses, dtype=torch.float64), step=step)
    )


@pytest.mark.parametrize("mu", [0.05, 1.0, 10.0])
def test_linear_weights_are_the_gradient_of_the_smooth_tchebycheff_function(mu):
    pref, ideal = [0.2, 0.5, 0.3], [0.1, -1.0, 0.0]
    losses = torch.tensor([1.0, 0.4, 2.0], dtype=torch.float64, requires_grad=True)
    f = torch.tensor(pref, dtype=torch.float64) * (
        losses - torch.tensor(ideal, dtype=torch.float64)
    )
    value = 3 * mu * torch.logsumexp(f / mu, 0)
    (expected,) = torch.autograd.grad(value, losses)
    method = STCH(mu=mu, objective="linear", preference=pref, ideal=ideal)
    torch.testing.assert_close(
        _weights(method, losses.detach()).weights, expected, rtol=1e-12, atol=1e-300
    )


def test_log_weights_are_the_gradient_with_the_warmup_nadir():
    method = STCH(mu=0.5, warmup_steps=3, nadir_steps=2)
    history = [[4.0, 1.0], [2.0, 3.0], [1.0, 2.0]]
    for step, losses in enumerate(history):
        agg = _weights(method, losses, step)
        # warm-up: the gradient of sum_i log L_i
        torch.testing.assert_close(agg.weights, 1 / torch.tensor(losses, dtype=torch.float64))
        method.commit(agg.pending)
    assert method.state_dict()["nadir_count"] == 2  # the last 2 warm-up steps only
    nadir = torch.tensor([1.5, 2.5], dtype=torch.float64)
    losses = torch.tensor([0.9, 2.4], dtype=torch.float64, requires_grad=True)
    value = 2 * 0.5 * torch.logsumexp(torch.log(losses / nadir) / 0.5, 0)
    (expected,) = torch.autograd.grad(value, losses)
    agg = _weights(method, losses.detach(), step=3)
    torch.testing.assert_close(agg.weights, expected, rtol=1e-12, atol=0)
    assert agg.pending is None  # nothing to commit after the warm-up


def test_nadir_is_the_mean_of_the_warmup_losses_with_a_preference():
    """With a preference the nadir's scale matters (lambda_i log(L_i / n_i) shifts by lambda_i times
    a common log factor): n must be the mean of the averaged warm-up losses. A state_dict round
    trip in the middle of the warm-up continues identically."""
    history = [[4.0, 1.0], [2.0, 3.0], [1.0, 2.0], [3.0, 1.0]]
    pref = torch.tensor([1.0, 3.0], dtype=torch.float64)

    def run(reload_at):
        method = STCH(mu=0.5, preference=pref.tolist(), warmup_steps=3, nadir_steps=2)
        for step, losses in enumerate(history[:3]):
            if step == reload_at:
                state = method.state_dict()
                method = STCH(mu=0.5, preference=pref.tolist(), warmup_steps=3, nadir_steps=2)
                method.load_state_dict(state)
            method.commit(_weights(method, losses, step).pending)
        return _weights(method, history[3], step=3).weights

    nadir = torch.tensor([1.5, 2.5], dtype=torch.float64)
    losses = torch.tensor(history[3], dtype=torch.float64, requires_grad=True)
    value = 2 * 0.5 * torch.logsumexp(pref * torch.log(losses / nadir) / 0.5, 0)
    (expected,) = torch.autograd.grad(value, losses)
    torch.testing.assert_close(run(None), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(run(2), expected, rtol=1e-12, atol=0)


def test_small_mu_concentrates_on_the_worst_task_and_large_mu_spreads():
    losses = [1.0, 3.0, 2.0]
    w = _weights(STCH(mu=1e-3, objective="linear"), losses).weights
    torch.testing.assert_close(w, torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))
    w = _weights(STCH(mu=1e6, objective="linear"), losses).weights
    torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=0)
    # "worst" in the log objective is the largest relative loss log(L_i / nadir_i)
    w = _weights(STCH(mu=1e-3), [0.5, 0.2, 0.4]).weights
    torch.testing.assert_close(w, torch.tensor([3 / 0.5, 0.0, 0.0], dtype=torch.float64))


def test_invariant_to_task_order():
    losses = torch.tensor([0.5, 3.0, 1.2], dtype=torch.float64)
    perm = torch.tensor([2, 0, 1])
    for method in (STCH(), STCH(objective="linear", mu=0.3)):
        w = _weights(method, losses).weights
        torch.testing.assert_close(_weights(method, losses[perm]).weights, w[perm])


def test_validation():
    with pytest.raises(ValueError, match="mu"):
        STCH(mu=0)
    with pytest.raises(ValueError, match="objective"):
        STCH(objective="max")
    with pytest.raises(ValueError, match="preference"):
        STCH(preference=[1.0, -1.0])
    with pytest.raises(ValueError, match="warmup_steps"):
        STCH(warmup_steps=-1)
    with pytest.raises(ValueError, match="nadir_steps"):
        STCH(warmup_steps=2, nadir_steps=3)
    with pytest.raises(ValueError, match="'log' objective"):
        STCH(objective="linear", warmup_steps=2)
    with pytest.raises(ValueError, match="'linear' objective"):
        STCH(ideal=[0.0, 0.0])
    with pytest.raises(ValueError, match="2 entries but got 3"):
        _weights(STCH(preference=[1.0, 2.0]), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="needs every loss > 0"):
        _weights(STCH(), [1.0, 0.0])
    assert repr(STCH()).startswith("STCH(mu=1.0, objective='log'")


def test_end_to_end_step_and_heads():
    agg, info = check_one_step("stch")
    torch.testing.assert_close(info.weights, agg.weights)


def test_determinism_and_resume_through_warmup():
    check_deterministic(lambda: STCH(warmup_steps=2))
    check_resume_bit_identical(lambda: STCH(warmup_steps=4, nadir_steps=3), before=3, after=3)
