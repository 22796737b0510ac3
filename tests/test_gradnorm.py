"""GradNorm: closed-form weight gradient vs autograd, invariants, dynamics, resume, end to end."""

from __future__ import annotations

import math

import pytest
import torch

import gradbalance as gb
from benchmarks.models import BasicBlock
from gradbalance.methods import GradNorm, TaskInputs
from gradbalance.methods.gradnorm import last_shared_layer
from tests.classics_helpers import assert_resume_bit_identical
from tests.helpers import MultiTaskNet, make_batch, task_losses

D = torch.float64


def step(m: GradNorm, losses, norms) -> torch.Tensor:
    norms = torch.as_tensor(norms, dtype=D)
    agg = m.aggregate(TaskInputs(losses=torch.as_tensor(losses, dtype=D), gram=torch.diag(norms**2)))
    m.commit(agg.pending)
    return agg.weights


def test_weight_gradient_matches_autograd_on_the_paper_formulation():
    # a real shared layer W and three losses; G_i = ||grad_W (w_i L_i)|| by double backward
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 5, generator=gen, dtype=D, requires_grad=True)
    xs = [torch.randn(8, 4, generator=gen, dtype=D) for _ in range(3)]
    losses = [((x @ W).tanh() - c).pow(2).mean() for x, c in zip(xs, (0.1, -0.4, 0.7))]
    gW = torch.stack([torch.autograd.grad(l, W, retain_graph=True)[0].reshape(-1) for l in losses])
    L = torch.stack([l.detach() for l in losses])
    m = GradNorm(alpha=1.5)
    w0, l0 = torch.tensor([0.7, 1.5, 0.8], dtype=D), L * torch.tensor([1.3, 2.0, 1.1], dtype=D)
    state = m.state_dict()
    state.update(tasks=["task0", "task1", "task2"], w=w0, l0=l0, m=torch.zeros(3, dtype=D),
                 v=torch.zeros(3, dtype=D), t=torch.zeros(3, dtype=torch.int64))
    m.load_state_dict(state)
    agg = m.aggregate(TaskInputs(losses=L, gram=gW @ gW.T))

    w = w0.clone().requires_grad_(True)
    G = torch.stack([
        torch.autograd.grad(w[i] * losses[i], W, create_graph=True, retain_graph=True)[0].norm()
        for i in range(3)
    ])
    r = (L / l0) / (L / l0).mean()
    target = (G.mean() * r**1.5).detach()
    l_grad = (G - target).abs().sum()
    (expected,) = torch.autograd.grad(l_grad, w)
    torch.testing.assert_close(agg.pending["grad"], expected, atol=1e-12, rtol=1e-10)
    assert agg.extras["grad_loss"] == pytest.approx(float(l_grad.detach()), rel=1e-12)
    assert torch.equal(agg.weights, w0)  # the model is updated with the CURRENT weights
    assert (expected != 0).all()


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.3), ("sgd", 2.0)])
def test_weights_sum_to_k_and_stay_nonnegative(optimizer, lr):
    gen = torch.Generator().manual_seed(1)
    m = GradNorm(lr=lr, optimizer=optimizer)
    hit_zero = False
    for _ in range(200):
        losses = torch.rand(4, generator=gen, dtype=D) + 0.05
        norms = torch.rand(4, generator=gen, dtype=D) * torch.tensor([1.0, 10.0, 0.1, 3.0], dtype=D)
        step(m, losses, norms)
        w = m.weights
        assert float(w.sum()) == pytest.approx(4.0, abs=1e-12)
        assert (w >= 0).all()
        hit_zero |= bool((w == 0).any())
    assert hit_zero  # the clamp was exercised


def test_identical_tasks_keep_unit_weights():
    m = GradNorm()
    g = torch.tensor([0.3, -1.1, 2.0], dtype=D)
    for t in range(50):
        loss = 2.0 * math.exp(-0.05 * t)
        gram = torch.full((3, 3), float(g @ g), dtype=D)
        agg = m.aggregate(TaskInputs(losses=torch.full((3,), loss, dtype=D), gram=gram))
        m.commit(agg.pending)
        assert torch.equal(agg.weights, torch.ones(3, dtype=D))
    assert torch.equal(m.weights, torch.ones(3, dtype=D))


def test_task_whose_loss_falls_more_slowly_gains_weight():
    m = GradNorm()
    for t in range(40):
        step(m, [math.exp(-0.1 * t), math.exp(-0.01 * t)], [1.0, 1.0])
    w = m.weights
    assert w[1] > 1.2 and w[0] < 0.8


def test_alpha_zero_equalises_the_weighted_gradient_norms():
    m = GradNorm(alpha=0.0)
    norms = torch.tensor([1.0, 2.0, 4.0], dtype=D)
    for _ in range(400):
        step(m, [1.0, 0.5, 2.0], norms)
    expected = 3 / norms / (1 / norms).sum()  # w_i n_i equal, sum w = 3
    torch.testing.assert_close(m.weights, expected, atol=0.08, rtol=0)


def test_first_step_sets_L0_and_rates_are_relative_to_it():
    m = GradNorm()
    step(m, [2.0, 4.0], [1.0, 1.0])
    assert m.state_dict()["l0"].tolist() == [2.0, 4.0]
    agg = m.aggregate(TaskInputs(losses=torch.tensor([1.0, 4.0], dtype=D), gram=torch.eye(2, dtype=D)))
    # ratios 0.5 and 1, mean 0.75
    torch.testing.assert_close(agg.extras["inverse_rate"], torch.tensor([2 / 3, 4 / 3], dtype=D))


def test_errors():
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(alpha=-1)
    with pytest.raises(ValueError, match="lr must be positive, got 0"):
        GradNorm(lr=0)
    with pytest.raises(ValueError, match="alpha must be >= 0.0, got -1"):
        GradNorm(alpha=-1)
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="lr must be a number"):
            GradNorm(lr=bad)
    with pytest.raises(ValueError, match="lr must be finite"):
        GradNorm(lr=float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        GradNorm(optimizer="lbfgs")
    with pytest.raises(TypeError, match="layer"):
        GradNorm(layer="last")
    with pytest.raises(ValueError, match="positive losses"):
        GradNorm().aggregate(TaskInputs(losses=torch.tensor([0.0, 1.0], dtype=D), gram=torch.eye(2, dtype=D)))
    m = GradNorm()
    step(m, [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="2 tasks but this step has 3"):
        step(m, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="keys"):
        m.load_state_dict({"w": torch.ones(2)})
    shared = list(MultiTaskNet(2).trunk.parameters())
    with pytest.raises(ValueError, match="out of range"):
        GradNorm(layer=7).shared_subset(shared)
    with pytest.raises(ValueError, match="one of the shared"):
        GradNorm(layer=torch.zeros(2)).shared_subset(shared)


def test_layer_selection():
    model = MultiTaskNet(2)
    shared = list(model.trunk.parameters())  # w0, b0, w2, b2
    assert GradNorm().shared_subset(shared)[0] is model.trunk[2].weight  # last weight matrix
    assert GradNorm(layer=-1).shared_subset(shared)[0] is model.trunk[2].bias
    m = GradNorm(layer=model.trunk[0].weight)
    assert m.shared_subset(shared)[0] is model.trunk[0].weight and m.layer_used == "shared[0] (16, 6)"


def test_resume_is_bit_identical():
    assert_resume_bit_identical(lambda: GradNorm(lr=0.1), k=3)


def test_end_to_end_weights_move_and_are_applied_to_shared_and_heads():
    k = 3
    model = MultiTaskNet(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), "gradnorm", shared_params=model.trunk)
    for s in range(15):
        x, y = make_batch(k, seed=s)
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        info = opt.backward(losses)
        opt.step()
    assert info.extras["layer"] == "shared[2] (16, 16)"
    w = opt.method.weights
    assert float(w.sum()) == pytest.approx(3.0) and (w - 1).abs().max() > 0.1
    # the applied gradient is that of sum_i w_i L_i, on the trunk and on every head
    opt.zero_grad()
    x, y = make_batch(k, seed=99)
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    assert torch.equal(info.weights, w)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    (torch.stack(losses) * w.float()).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-6)


def test_missing_tasks_keep_their_state():
    """Tasks keyed by name: an absent task's weight and moments wait; present ones keep their share."""
    m = GradNorm(lr=0.1)

    def step(losses: dict, norms: dict):
        x = TaskInputs(losses=torch.tensor(list(losses.values()), dtype=D), task_names=tuple(losses),
                       gram=torch.diag(torch.tensor(list(norms.values()), dtype=D) ** 2))
        agg = m.aggregate(x)
        m.commit(agg.pending)
        return agg

    step({"depth": 2.0, "seg": 1.0, "normal": 1.0}, {"depth": 1.0, "seg": 3.0, "normal": 1.0})
    step({"depth": 2.0, "seg": 1.0, "normal": 1.0}, {"depth": 1.0, "seg": 3.0, "normal": 1.0})
    frozen = m.state_dict()
    assert float(frozen["w"].sum()) == pytest.approx(3.0, abs=1e-12)
    agg = step({"depth": 1.0, "normal": 1.0}, {"depth": 1.0, "seg": 1.0})  # seg has no labels
    torch.testing.assert_close(agg.weights, frozen["w"][[0, 2]])
    state = m.state_dict()
    assert state["w"][1] == frozen["w"][1] and state["m"][1] == frozen["m"][1]
    assert state["t"].tolist() == [3, 2, 3]
    assert float(state["w"].sum()) == pytest.approx(3.0, abs=1e-12)  # the share of depth+normal kept
    assert not torch.equal(state["w"][[0, 2]], frozen["w"][[0, 2]])
    agg = step({"edges": 0.5, "seg": 1.0}, {"edges": 1.0, "seg": 1.0})  # seg returns, edges is new
    assert m.tasks == ("depth", "seg", "normal", "edges")
    assert agg.weights.tolist() == [1.0, float(frozen["w"][1])]
    assert m.state_dict()["l0"][3] == 0.5
    assert float(m.weights.sum()) == pytest.approx(4.0, abs=1e-12)


def test_missing_tasks_through_the_optimizer():
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(3, 4), torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(3))
    opt = gb.GradBalance(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.01),
                         method="gradnorm", shared_params=trunk)
    x = torch.randn(8, 3)
    for step in range(4):
        opt.zero_grad()
        z = trunk(x)
        losses = {n: heads[i](z).pow(2).mean() + 1 for i, n in enumerate("abc")}
        if step >= 2:
            losses["b"] = None
        frozen_head = heads[1].weight.detach().clone()
        opt.backward(losses)
        if step >= 2:
            assert heads[1].weight.grad is None  # the absent task's head gets nothing
        opt.step()
        if step >= 2:
            assert torch.equal(heads[1].weight, frozen_head)
    state = opt.method.state_dict()
    assert state["tasks"] == ["a", "b", "c"] and state["t"].tolist() == [4, 2, 4]
    assert float(state["w"].sum()) == pytest.approx(3.0, abs=1e-12)


def test_sgd_step_is_exactly_w_minus_lr_times_the_gradient():
    """One SGD step from w = 1: n = (1, 4), equal rates: G = (1, 4), target 2.5, so
    dL_grad/dw = sign(G - target) n = (-1, 4); w - lr * grad, then renormalised to sum 2."""
    m = GradNorm(lr=0.025, optimizer="sgd")
    step(m, [1.0, 1.0], [1.0, 4.0])
    raw = torch.tensor([1.0 + 0.025, 1.0 - 0.1], dtype=D)
    torch.testing.assert_close(m.weights, raw * 2 / raw.sum(), rtol=1e-15, atol=0)


# ------------------------------------------ the default layer: the last shared layer, from the graph
def _index(params, tensor):
    return next(i for i, p in enumerate(params) if p is tensor)


def _resnet_trunk():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               BasicBlock(4, 8), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_default_layer_on_a_resnet_trunk_is_the_last_main_path_conv():
    trunk = _resnet_trunk()
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))
    shared = list(trunk.parameters())
    block = trunk[3]
    # the old rule (the last registered tensor with 2+ dims) is the 1x1 shortcut conv
    assert max(i for i, p in enumerate(shared) if p.dim() >= 2) == _index(shared, block.shortcut[0].weight)
    x = torch.randn(4, 3, 6, 6)
    z = trunk(x)
    losses = [h(z).pow(2).mean() for h in heads]
    m = GradNorm()
    assert m.choose_subset(shared, losses)[0] is block.conv2.weight
    assert m.layer_used == f"shared[{_index(shared, block.conv2.weight)}] (8, 8, 3, 3)"
    opt = gb.GradBalance(torch.optim.SGD(list(trunk.parameters()) + list(heads.parameters()), lr=0.01),
                         GradNorm(), shared_params=trunk)
    z = trunk(x)
    info = opt.backward([h(z).pow(2).mean() for h in heads])
    assert info.extras["layer"] == m.layer_used


def test_default_layer_shared_tensor_used_after_the_features_and_tied_weights():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 6)
    mix = torch.nn.Linear(6, 6)
    scale = torch.nn.Parameter(torch.ones(6))  # a shared 1-D tensor used after the features
    tokens = torch.randint(0, 10, (5, 3))
    z = mix(emb(tokens)).mean(1) * scale
    logits = z @ emb.weight.T  # the output layer is tied to the embedding (weight tying)
    losses = [logits[:, :5].logsumexp(1).mean(), z.pow(2).mean()]
    shared = [emb.weight, mix.weight, mix.bias, scale]
    # the tied embedding is the shared matrix nearest the first loss: the last shared layer
    assert last_shared_layer(losses, shared) == 0
    # without the tying, the nearest 2-D shared tensor is mix.weight (the 1-D scale is skipped)
    z = mix(emb(tokens)).mean(1) * scale
    assert last_shared_layer([z.sum(), z.pow(2).sum()], shared) == 1
    assert last_shared_layer([z.sum()], [scale]) == 0  # no 2-D tensor: the nearest of any
    assert last_shared_layer([torch.ones(1, requires_grad=True).sum()], shared) is None


def test_defaults_are_the_papers():
    assert GradNorm().hyperparameters() == {"alpha": 1.5, "lr": 0.025, "layer": None, "optimizer": "adam"}
    assert gb.methods.make_method("gradnorm").hyperparameters() == GradNorm().hyperparameters()


def _reference_gradnorm(steps, alpha, lr):
    """Algorithm 1 with the closed-form weight gradient, stepped by Adam as written in the Adam
    paper (m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), w -= lr m_hat / (sqrt(v_hat) + eps)),
    then clamped at 0 and renormalised to sum k."""
    k = len(steps[0][0])
    w, m, v, l0, out = torch.ones(k, dtype=D), torch.zeros(k, dtype=D), torch.zeros(k, dtype=D), None, []
    for t, (losses, norms) in enumerate(steps, start=1):
        losses, norms = torch.tensor(losses, dtype=D), torch.tensor(norms, dtype=D)
        l0 = losses if l0 is None else l0
        ratio = losses / l0
        r = ratio / ratio.mean()
        g = w * norms
        grad = torch.sign(g - g.mean() * r**alpha) * norms
        m = 0.9 * m + (1 - 0.9) * grad
        v = 0.999 * v + (1 - 0.999) * grad * grad
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        w = (w - lr * m_hat / (v_hat.sqrt() + 1e-8)).clamp_min(0.0)
        w = w * (k / w.sum())
        out.append(w)
    return out


def test_training_is_bit_identical_to_a_literal_algorithm_1_with_adam():
    # alpha = 0.7 and lr = 0.2 differ from the defaults, and the rates differ, so a method that
    # ignored either argument (or placed Adam's eps differently) would not agree to the last bit
    gen = torch.Generator().manual_seed(3)
    steps = []
    for t in range(8):
        losses = (torch.tensor([2.0, 1.0, 0.5], dtype=D) * torch.tensor([0.9, 0.97, 0.8], dtype=D) ** t).tolist()
        steps.append((losses, (torch.rand(3, generator=gen, dtype=D) + 0.5).tolist()))
    m = GradNorm(alpha=0.7, lr=0.2)
    for (losses, norms), want in zip(steps, _reference_gradnorm(steps, 0.7, 0.2)):
        step(m, losses, norms)
        assert torch.equal(m.weights, want)


def test_present_weights_all_clamped_to_zero_share_what_they_held():
    # tasks a, b present, c absent with w_c = 2; a and b have positive weight gradients
    # (alpha = 0.5, r = (0.5, 1.5), n = (0.75, 1.25): G_i above its target for both), and a large
    # SGD step sends both below 0: they get equal parts of the 1.0 they held, and sum(w) stays 3
    m = GradNorm(alpha=0.5, lr=10.0, optimizer="sgd")
    m.load_state_dict({"tasks": ["a", "b", "c"], "w": torch.tensor([0.5, 0.5, 2.0], dtype=D),
                       "l0": torch.ones(3, dtype=D), "m": torch.zeros(3, dtype=D), "v": torch.zeros(3, dtype=D),
                       "t": torch.zeros(3, dtype=torch.int64)})
    agg = m.aggregate(TaskInputs(losses=torch.tensor([0.5, 1.5], dtype=D), task_names=("a", "b"),
                                 gram=torch.diag(torch.tensor([0.75, 1.25], dtype=D) ** 2)))
    assert (agg.pending["grad"] > 0).all()
    m.commit(agg.pending)
    torch.testing.assert_close(m.weights, torch.tensor([0.5, 0.5, 2.0], dtype=D), rtol=0, atol=1e-15)


def test_repr_names_every_argument():
    # repr is built from hyperparameters(), which checkpoints record to warn on a changed method
    expected = "GradNorm(alpha=0.5, lr=0.1, layer=2, optimizer='sgd')"
    assert repr(GradNorm(alpha=0.5, lr=0.1, layer=2, optimizer="sgd")) == expected
    expected = "GradNorm(alpha=1.5, lr=0.025, layer='<tensor (3, 4)>', optimizer='adam')"
    assert repr(GradNorm(layer=torch.zeros(3, 4))) == expected


def test_bad_state_is_refused_and_changes_nothing():
    m = GradNorm()
    step(m, [1.0, 2.0], [1.0, 3.0])
    before = m.state_dict()
    bad = dict(before, v=torch.zeros(3, dtype=D))  # one entry too many
    with pytest.raises(ValueError, match="one entry per task"):
        m.load_state_dict(bad)
    after = m.state_dict()
    assert after["tasks"] == before["tasks"]
    assert all(torch.equal(after[k], before[k]) for k in ("w", "l0", "m", "v", "t"))
