"""Uncertainty weighting: Kendall's objective, its stationary point, closed-form gradient, resume."""

from __future__ import annotations

import math

import pytest
import torch

import gradbalance as gb
from gradbalance.methods import UW, TaskInputs
from tests.classics_helpers import assert_resume_bit_identical
from tests.helpers import MultiTaskNet, make_batch, task_losses

D = torch.float64
KINDS = ["regression", "classification", "regression"]


def kendall_total(losses, s, kinds):
    """Eqs. 7 and 10 of the paper in sigma: L/(2 sigma^2) + log sigma, L/sigma^2 + log sigma."""
    sigma = torch.exp(s / 2)
    terms = [l / (2 * sg**2) if kd == "regression" else l / sg**2 for l, sg, kd in zip(losses, sigma, kinds)]
    return torch.stack(terms).sum() + torch.log(sigma).sum()


def with_s(m: UW, s) -> UW:
    s = torch.as_tensor(s, dtype=D)
    m.load_state_dict({"tasks": [f"task{i}" for i in range(len(s))], "s": s, "m": torch.zeros_like(s),
                       "v": torch.zeros_like(s), "t": torch.zeros(len(s), dtype=torch.int64)})
    return m


def test_weights_total_and_gradient_match_the_paper():
    s0 = torch.tensor([0.3, -1.2, 2.0], dtype=D)
    losses = torch.tensor([0.8, 2.5, 0.05], dtype=D)
    agg = with_s(UW(kind=KINDS), s0).aggregate(TaskInputs(losses=losses))
    torch.testing.assert_close(agg.weights, torch.tensor([0.5, 1.0, 0.5], dtype=D) * torch.exp(-s0))
    s = s0.clone().requires_grad_(True)
    total = kendall_total(losses, s, KINDS)
    (grad,) = torch.autograd.grad(total, s)
    assert agg.extras["total"] == pytest.approx(float(total.detach()), rel=1e-12)
    torch.testing.assert_close(agg.pending["grad"], grad, atol=1e-12, rtol=1e-12)
    # and the weights are d total / d L_i
    L = losses.clone().requires_grad_(True)
    (dl,) = torch.autograd.grad(kendall_total(L, s0, KINDS), L)
    torch.testing.assert_close(agg.weights, dl, atol=1e-12, rtol=0)


def test_stationary_point_is_reached_on_constant_losses():
    # regression: s* = log L; classification: s* = log(2 L)
    m = UW(kind=KINDS, lr=0.05)
    losses = torch.tensor([0.2, 3.0, 40.0], dtype=D)
    for _ in range(1500):
        m.commit(m.aggregate(TaskInputs(losses=losses)).pending)
    expected = torch.log(losses * torch.tensor([1.0, 2.0, 1.0], dtype=D))
    torch.testing.assert_close(m.log_variances, expected, atol=2e-3, rtol=0)


def test_negative_total_is_expected_and_nothing_is_clamped():
    m = with_s(UW(), [math.log(0.01), math.log(0.02)])
    agg = m.aggregate(TaskInputs(losses=torch.tensor([0.01, 0.02], dtype=D)))
    # at the optimum each task contributes 1/2 + log(L)/2 < 0
    assert agg.extras["total"] == pytest.approx(1.0 + 0.5 * math.log(0.01 * 0.02), rel=1e-12)
    assert agg.extras["total"] < 0
    torch.testing.assert_close(agg.weights, torch.tensor([50.0, 25.0], dtype=D))


def test_per_task_init_and_kind():
    agg = UW(kind=["classification", "regression"], init=[0.0, math.log(4.0)]).aggregate(
        TaskInputs(losses=torch.ones(2, dtype=D)))
    torch.testing.assert_close(agg.weights, torch.tensor([1.0, 0.125], dtype=D))


def test_aggregate_is_pure_and_sgd_step_is_exact():
    m = UW(lr=0.1, optimizer="sgd")
    x = TaskInputs(losses=torch.tensor([2.0, 0.5], dtype=D))
    a, b = m.aggregate(x), m.aggregate(x)
    assert torch.equal(a.weights, b.weights) and m.log_variances.numel() == 0
    m.commit(a.pending)
    # ds = 1/2 - L/2 at s = 0
    torch.testing.assert_close(m.log_variances, -0.1 * torch.tensor([0.5 - 1.0, 0.5 - 0.25], dtype=D))


def test_errors():
    with pytest.raises(ValueError, match="kind"):
        UW(kind="poisson")
    with pytest.raises(ValueError, match="init"):
        UW(init=float("inf"))
    with pytest.raises(ValueError, match="init"):
        UW(init=True)
    with pytest.raises(ValueError, match="lr must be positive, got -1.0"):
        UW(lr=-1.0)
    with pytest.raises(TypeError, match="lr must be a number"):
        UW(lr=True)
    with pytest.raises(ValueError, match="optimizer"):
        UW(optimizer="adamw")
    with pytest.raises(ValueError, match="3 values of kind but has seen 4 tasks"):
        UW(kind=KINDS).aggregate(TaskInputs(losses=torch.ones(4, dtype=D)))
    m = UW()
    m.commit(m.aggregate(TaskInputs(losses=torch.ones(2, dtype=D))).pending)
    with pytest.raises(ValueError, match="2 tasks but this step has 4"):
        m.aggregate(TaskInputs(losses=torch.ones(4, dtype=D)))


def test_registry_and_alias():
    assert isinstance(gb.methods.make_method("uw"), UW)
    assert isinstance(gb.methods.make_method("uncertainty"), UW)
    assert "uncertainty" in gb.available_methods()


def test_resume_is_bit_identical():
    assert_resume_bit_identical(lambda: UW(lr=0.1), k=3)


def test_end_to_end_weights_move_and_apply_to_everything():
    k = 2
    model = MultiTaskNet(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), "uw", shared_params=model.trunk)
    for s in range(10):
        x, y = make_batch(k, seed=s)
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        info = opt.backward(losses)
        opt.step()
    assert info.engine == "losses"
    s_now = opt.method.log_variances
    assert (s_now.abs() > 0.01).all()  # the log-variances moved (Adam: about lr per step)
    opt.zero_grad()
    x, y = make_batch(k, seed=50)
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    torch.testing.assert_close(info.weights, 0.5 * torch.exp(-s_now))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    (torch.stack(losses) * info.weights.float()).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-6)


def test_a_task_that_joins_later_starts_at_its_own_init():
    """init given per task (in first-seen order): a task first seen at a later step starts at its
    own entry, not at the first one."""
    m = UW(init=[0.1, 0.2, 0.3], lr=0.1)
    for names in (("a", "b"), ("a", "b", "c")):
        agg = m.aggregate(TaskInputs(losses=torch.ones(len(names), dtype=D), task_names=names))
        m.commit(agg.pending)
    torch.testing.assert_close(agg.extras["log_variance"][2], torch.tensor(0.3, dtype=D), rtol=0, atol=0)
    torch.testing.assert_close(agg.weights[2], 0.5 * torch.exp(torch.tensor(-0.3, dtype=D)))


def test_missing_tasks_keep_their_state():
    """Tasks are keyed by name: an absent task's s and moments stay untouched until it returns."""
    m = UW(lr=0.1)

    def step(losses: dict):
        names = tuple(losses)
        agg = m.aggregate(TaskInputs(losses=torch.tensor(list(losses.values()), dtype=D), task_names=names))
        m.commit(agg.pending)
        return agg

    step({"depth": 2.0, "seg": 0.5})
    step({"depth": 2.0, "seg": 0.5})
    frozen = m.state_dict()
    step({"depth": 1.0})                       # seg has no labels in this batch
    state = m.state_dict()
    i = state["tasks"].index("seg")
    assert state["s"][i] == frozen["s"][i] and state["m"][i] == frozen["m"][i]
    assert state["t"].tolist() == [3, 2]
    assert state["s"][0] != frozen["s"][0]
    agg = step({"normal": 1.0, "seg": 0.5})    # seg returns, a new task starts at init
    assert m.tasks == ("depth", "seg", "normal")
    expected = 0.5 * torch.exp(-torch.stack([torch.tensor(0.0, dtype=D), frozen["s"][i]]))
    torch.testing.assert_close(agg.weights, expected)  # order of this step: normal, seg


# ------------------------------------------------- the seed scenario: one kind per named task
def _face_model():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.LayerNorm(16)).double()
    heads = torch.nn.ModuleDict({"age": torch.nn.Linear(16, 1), "gender": torch.nn.Linear(16, 1),
                                 "race": torch.nn.Linear(16, 4)}).double()
    return trunk, heads


def _face_losses(trunk, heads, x, age, gender, race):
    z = trunk(x)
    f = torch.nn.functional
    return {"age": f.l1_loss(heads["age"](z).squeeze(-1), age),
            "gender": f.binary_cross_entropy_with_logits(heads["gender"](z).squeeze(-1), gender),
            "race": f.cross_entropy(heads["race"](z), race)}


def test_seed_scenario_l1_age_bce_gender_ce_race_uses_each_papers_form():
    """Kendall et al. eq. 7 for the L1 age regression (L / (2 sigma^2) + log sigma) and eq. 10 for
    the two classification losses (L / sigma^2 + log sigma): the gradients gradbalance writes
    equal autograd of that objective written with sigma, at the current sigma."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    age = 20 + 40 * torch.rand(32, generator=gen, dtype=torch.float64)
    gender = torch.randint(0, 2, (32,), generator=gen).double()
    race = torch.randint(0, 4, (32,), generator=gen)
    kinds = {"age": "regression", "gender": "classification", "race": "classification"}
    trunk, heads = _face_model()
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = gb.GradBalance(torch.optim.SGD(params, lr=1e-3), UW(kind=kinds, init=[0.3, -0.2, 0.1], lr=0.05),
                         shared_params=trunk)
    for step in range(3):
        s = dict(zip(opt._balancer.method.tasks, opt._balancer.method.log_variances.tolist())) if step else \
            {"age": 0.3, "gender": -0.2, "race": 0.1}
        losses = _face_losses(trunk, heads, x, age, gender, race)
        sigma = {n: math.exp(0.5 * v) for n, v in s.items()}  # s = log sigma^2
        paper = (losses["age"] / (2 * sigma["age"] ** 2) + math.log(sigma["age"])
                 + losses["gender"] / sigma["gender"] ** 2 + math.log(sigma["gender"])
                 + losses["race"] / sigma["race"] ** 2 + math.log(sigma["race"]))
        want = torch.autograd.grad(paper, params, retain_graph=True)
        opt.zero_grad()
        info = opt.backward(losses)
        for w, p in zip(want, params):
            torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)
        names = list(info.task_names)
        torch.testing.assert_close(
            info.weights, torch.tensor([(0.5 if n == "age" else 1.0) / sigma[n] ** 2 for n in names],
                                       dtype=torch.float64), rtol=1e-12, atol=0)
        # the gradient of the paper's objective w.r.t. s_i, from the loss values
        s_t = torch.tensor([s[n] for n in names], dtype=torch.float64, requires_grad=True)
        c = torch.tensor([0.5 if n == "age" else 1.0 for n in names], dtype=torch.float64)
        lv = torch.stack([losses[n].detach() for n in names])
        (grad_s,) = torch.autograd.grad((c * torch.exp(-s_t) * lv + 0.5 * s_t).sum(), s_t)
        pending = opt._balancer._window.pending
        torch.testing.assert_close(pending["grad"], grad_s, rtol=1e-12, atol=1e-15)
        opt.step()


def test_kind_dict_must_name_every_task_and_stays_keyed_by_name():
    with pytest.raises(ValueError, match=r"no kind for task\(s\) \['race'\]"):
        UW(kind={"age": "regression"}).aggregate(
            TaskInputs(losses=torch.ones(2, dtype=torch.float64), task_names=("age", "race")))
    with pytest.raises(ValueError, match="kind must be"):
        UW(kind={"age": "poisson"})
    m = UW(kind={"a": "classification", "b": "regression"})
    agg = m.aggregate(TaskInputs(losses=torch.ones(2, dtype=torch.float64), task_names=("b", "a")))
    torch.testing.assert_close(agg.weights, torch.tensor([0.5, 1.0], dtype=torch.float64))
