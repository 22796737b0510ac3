"""The wrapper and the engine: equality with plain backward, engines, errors, torch.optim contract."""

from __future__ import annotations

import copy

import pytest
import torch

import gradbalance as gb
from tests.helpers import (
    FixedWeights,
    MultiTaskNet,
    assert_same_snapshot,
    make_batch,
    snapshot,
    task_losses,
)


def _plain_grads(model, x, y, reduce):
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    reduce(torch.stack(losses)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("method,reduce", [("sum", torch.sum), ("mean", torch.mean)])
def test_linear_methods_equal_plain_backward(k, method, reduce):
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    expected = _plain_grads(model, x, y, reduce)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method, shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)
    assert info.engine == "losses"
    assert info.weights.shape == (k,)


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("use_features", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_exact_engine_with_unit_weights_equals_plain_sum(engine, use_features, k):
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    expected = _plain_grads(model, x, y, torch.sum)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * k),
        shared_params=model.trunk, engine=engine,
    )
    z, losses = task_losses(model, x, y)
    info = opt.backward(losses, features=z if use_features else None)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)
    assert info.engine.startswith(engine)
    assert info.cosine.shape == (k, k)
    torch.testing.assert_close(info.cosine.diagonal(), torch.ones(k, dtype=torch.float64))


def _task_grads(model, x, y, engine, features, chunk):
    from gradbalance import jacobian

    z, losses = task_losses(model, x, y)
    shared = list(model.trunk.parameters())
    heads = list(model.heads.parameters())
    return jacobian.task_gradients(
        losses, shared, heads, engine=engine, features=z if features else None, chunk_size=chunk
    )


@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
@pytest.mark.parametrize("features", [False, True])
def test_batched_and_loop_engines_agree(chunk, features):
    k = 5
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    loop = _task_grads(model, x, y, "loop", False, None)
    batched = _task_grads(model, x, y, "batched", features, chunk)
    torch.testing.assert_close(batched.shared, loop.shared, atol=1e-6, rtol=0)
    for i in range(k):
        for a, b in zip(loop.heads[i], batched.heads[i]):
            if a is None:
                assert b is None or torch.count_nonzero(b) == 0
            else:
                torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    # a real difference between tasks: the engines are not trivially equal
    assert (loop.shared[0] - loop.shared[1]).abs().max() > 1e-3


class _HostReadInBackward(torch.autograd.Function):
    """Identity whose backward reads a value to the host: vmap cannot run it at all."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 + 0.0 * grad.sum().item())


def test_batched_engine_that_cannot_run_reruns_the_step_with_the_loop():
    # An op functorch only lacks a batching rule for stays batched (tests/test_engines.py); an
    # op vmap cannot run at all raises inside vmap: the step is redone by the loop before
    # anything is written, a warning says so once, and later steps use the loop.
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k)

    def run():
        z = _HostReadInBackward.apply(model.trunk(x))
        return z, [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() * (i + 1) for i, h in enumerate(model.heads)]

    model.zero_grad(set_to_none=True)
    torch.stack(run()[1]).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * k),
        shared_params=model.trunk, engine="batched",
    )
    z, losses = run()
    with pytest.warns(RuntimeWarning, match="batched engine failed"):
        info = opt.backward(losses, features=z)
    assert info.engine.startswith("loop (batched failed: RuntimeError")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)
    opt.zero_grad()
    z, losses = run()
    assert opt.backward(losses, features=z).engine == "loop"


def test_weights_are_applied_to_shared_and_heads():
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    w = torch.tensor([0.2, 0.5, 0.3])
    model.zero_grad()
    _, losses = task_losses(model, x, y)
    (torch.stack(losses) * w).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights(w),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)


def test_head_weights_differ_from_shared_weights():
    k = 2
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    opt = gb.GradBalance(
        torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.3, 0.7], head_weights=[1.0, 1.0]),
        shared_params=model.trunk,
    )
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    head0 = model.heads[0].weight.grad.clone()
    model.zero_grad()
    _, losses = task_losses(model, x, y)
    losses[0].backward()
    torch.testing.assert_close(head0, model.heads[0].weight.grad, atol=1e-7, rtol=0)


def test_gradients_accumulate_into_existing_grad():
    k = 2
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    expected = _plain_grads(model, x, y, torch.sum)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "sum", shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n] + 1, atol=1e-6, rtol=0)


def test_shared_params_inferred_from_graph():
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * k))
    assert opt.shared_params is None
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    assert [id(p) for p in opt.shared_params] == [id(p) for p in model.trunk.parameters()]


def test_accumulation_exact_equals_one_big_batch():
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k, n=32)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.1, 0.2, 0.7]),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    big = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    for part in range(4):
        sl = slice(8 * part, 8 * part + 8)
        _, losses = task_losses(model, x[sl], y[sl])
        opt.backward([loss / 4 for loss in losses])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, big[n], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(model, x, y):
    z, losses = task_losses(model, x, y)
    detached = losses[0].detach()
    nan = losses[0] * float("nan")
    off_trunk = model.heads[0].bias.sum() * 0 + model.heads[0].bias.sum()
    return {
        "empty": ([], ValueError, "empty"),
        "single tensor": (torch.stack(losses).sum(), TypeError, "list"),
        "non-scalar": ([losses[0].expand(3), losses[1]], ValueError, "not a scalar"),
        "nan loss": ([nan, losses[1]], ValueError, "NaN or inf"),
        "inf loss": ([losses[0] + float("inf"), losses[1]], ValueError, "NaN or inf"),
        "detached": ([detached, losses[1]], ValueError, "does not require grad"),
        "not a tensor": ([1.0, losses[1]], TypeError, "not a tensor"),
        "misses shared": ([off_trunk, losses[1]], ValueError, "does not reach any shared"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs(MultiTaskNet(2), *make_batch(2))))
@pytest.mark.parametrize("method", ["mean", "gram"])
def test_bad_input_raises_and_changes_nothing(case, method):
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    m = "mean" if method == "mean" else FixedWeights([0.5, 0.5])
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1), m, shared_params=model.trunk)
    _, losses = task_losses(model, x, y)  # one good step so that Adam has state
    # (under other task names: loss-only methods check the graph once per task set)
    opt.backward({"a": losses[0], "b": losses[1]})
    opt.step()
    before = snapshot(model, opt)
    value, exc, match = _bad_inputs(model, x, y)[case]
    with pytest.raises(exc, match=match):
        opt.backward(value)
    assert_same_snapshot(before, snapshot(model, opt))


def test_nan_gradient_raises_and_changes_nothing():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.5, 0.5]),
                         shared_params=model.trunk)
    before = snapshot(model, opt)
    z, losses = task_losses(model, x, y)
    # sqrt at 0 has an infinite derivative: a finite loss with an inf gradient
    bad = losses[0] + torch.sqrt(model.trunk[0].weight.abs() * 0).sum()
    with pytest.raises(ValueError, match="task0.*NaN or inf"):
        opt.backward([bad, losses[1]])
    assert_same_snapshot(before, snapshot(model, opt))


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*mean"):
        gb.GradBalance(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), "nope")


def test_shared_params_not_in_optimizer():
    model = MultiTaskNet(2)
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not held by the optimizer"):
        gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=other)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gb.GradBalance(object(), "mean")


def test_bad_engine_and_chunk():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="engine"):
        gb.GradBalance(opt, "mean", engine="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        gb.GradBalance(opt, "mean", chunk_size=0)


def test_task_set_change_within_window_raises():
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="tasks changed"):
        opt.backward(losses[:2])


# ----------------------------------------------------------------------------- torch.optim contract


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.AdamW(p, lr=0.01),
        lambda p: torch.optim.RMSprop(p, lr=0.01),
        lambda p: torch.optim.Adagrad(p, lr=0.01),
    ],
)
def test_training_matches_plain_optimizer(make_opt):
    k = 3
    model = MultiTaskNet(k)
    twin = copy.deepcopy(model)
    x, y = make_batch(k)
    opt = gb.GradBalance(make_opt(model.parameters()), "mean", shared_params=model.trunk)
    plain = make_opt(twin.parameters())
    for _ in range(5):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        opt.backward(losses)
        opt.step()
        plain.zero_grad()
        _, losses = task_losses(twin, x, y)
        torch.stack(losses).mean().backward()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_scheduler_clipping_and_param_groups_are_the_inner_ones():
    k = 2
    model = MultiTaskNet(k)
    inner = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = gb.GradBalance(inner, FixedWeights([0.5, 0.5]), shared_params=model.trunk)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batch(k)
    for _ in range(3):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        opt.backward(losses)
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)
        assert total > 1e-3
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert norm <= 1e-3 * 1.0001
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.125)
    extra = torch.nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra]})
    assert inner.param_groups[-1]["params"][0] is extra


def test_step_hooks_and_closure():
    model = MultiTaskNet(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model.trunk)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x, y = make_batch(2)

    def closure():
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        opt.backward(losses)
        return sum(float(loss.detach()) for loss in losses)

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and loss > 0


def test_grad_scaler_matches_unscaled_step():
    k = 2
    model = MultiTaskNet(k)
    twin = copy.deepcopy(model)
    x, y = make_batch(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([0.3, 0.7]),
                         shared_params=model.trunk)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, losses = task_losses(model, x, y)
    opt.backward(losses, scaler=scaler)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    ref = gb.GradBalance(torch.optim.SGD(twin.parameters(), lr=0.1), FixedWeights([0.3, 0.7]),
                         shared_params=twin.trunk)
    _, losses = task_losses(twin, x, y)
    ref.backward(losses)
    ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_grad_scaler_overflow_skips_step():
    k = 2
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1), FixedWeights([0.3, 0.7]),
                         shared_params=model.trunk)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    before = snapshot(model, opt)[0]
    z, losses = task_losses(model, x, y)
    bad = losses[0] + torch.sqrt(model.trunk[0].weight.abs() * 0).sum()
    info = opt.backward([bad, losses[1]], scaler=scaler)
    assert info.engine == "skipped"
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**20
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert len(opt.state) == 0
    assert opt._balancer.step_count == 0


def test_state_dict_round_trip_carries_method_state():
    model = MultiTaskNet(2)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1), "mean", shared_params=model.trunk)
    x, y = make_batch(2)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    opt.step()
    state = opt.state_dict()
    assert state["gradbalance"]["step"] == 1
    fresh = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1), "mean", shared_params=model.trunk)
    fresh.load_state_dict(state)
    assert fresh._balancer.step_count == 1
    assert fresh.state_dict()["state"].keys() == state["state"].keys()


def test_functional_backward():
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    expected = _plain_grads(model, x, y, torch.mean)
    _, losses = task_losses(model, x, y)
    info = gb.backward(losses, model.trunk, method=FixedWeights([1 / 3] * 3))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], atol=1e-6, rtol=0)
    assert info.grad_norms.shape == (3,)


def test_dict_losses_and_static_task_weights():
    k = 2
    model = MultiTaskNet(k)
    x, y = make_batch(k)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "sum", shared_params=model.trunk,
                         task_weights={"b": 3.0})
    _, losses = task_losses(model, x, y)
    info = opt.backward({"a": losses[0], "b": losses[1]})
    assert info.task_names == ("a", "b")
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    (losses[0] + 3 * losses[1]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=0)


def test_step_info_to_dict():
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0, 1.0, 1.0]),
                         shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    flat = opt.backward(losses).to_dict()
    assert flat["engine"] == "loop"
    keys = {"weight/task0", "loss/task2", "grad_norm/task1", "cosine/mean", "cosine/min", "conflicts"}
    assert keys <= set(flat)
    assert -1.0 <= flat["cosine/min"] <= flat["cosine/mean"] <= 1.0


class _CountingMethod(gb.methods.Method):
    """Gram method whose weights change every committed step (to see reuse)."""

    requires = "gram"

    def __init__(self):
        self.commits = 0
        self.calls = 0

    def aggregate(self, inputs):
        self.calls += 1
        w = torch.tensor([1.0, float(self.commits + 1)], dtype=torch.float64)
        return gb.methods.Aggregation(weights=w, pending=self.commits + 1)

    def commit(self, pending):
        self.commits = pending

    def state_dict(self):
        return {"commits": self.commits}

    def load_state_dict(self, state):
        self.commits = state["commits"]


def test_update_every_reuses_weights_with_one_backward():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    method = _CountingMethod()
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), method,
                         shared_params=model.trunk, recompute_every=3)
    engines, weights = [], []
    for _ in range(7):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        info = opt.backward(losses)
        engines.append(info.engine)
        weights.append(info.weights.tolist())
        if info.engine == "reused":  # the reused step equals a plain weighted backward
            got = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
            _, losses = task_losses(model, x, y)
            (losses[0] * weights[-1][0] + losses[1] * weights[-1][1]).backward()
            for n, p in model.named_parameters():
                torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=0)
        opt.step()
    assert engines == ["loop", "reused", "reused", "loop", "reused", "reused", "loop"]
    assert method.calls == 3 and method.commits == 3
    assert weights[1] == weights[0] == [1.0, 1.0] and weights[3] == [1.0, 2.0]
    state = opt.state_dict()
    fresh = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), _CountingMethod(),
                           shared_params=model.trunk, recompute_every=3)
    fresh.load_state_dict(state)
    opt.zero_grad()
    fresh.zero_grad()
    _, losses = task_losses(model, x, y)
    info = fresh.backward(losses)
    assert info.engine == "reused" and info.weights.tolist() == [1.0, 3.0]


def test_auto_engine_is_the_loop_on_cpu_even_with_features():
    # On CPU the batched VJP measured no faster than the loop (docs/guide/engines.md), so auto
    # must never pick it there.
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * 3),
                         shared_params=model.trunk)
    z, losses = task_losses(model, x, y)
    assert opt.backward(losses, features=z).engine == "loop"


def test_subset_gradients_accumulate_over_the_window():
    # GradNorm-style methods see per-task gradients on one layer: under accumulation they must
    # see the window's summed gradients, as one big batch would.
    seen = []

    class LastLayer(gb.methods.Method):
        requires = "gram"

        def shared_subset(self, shared):
            return [shared[-2]]

        def aggregate(self, inputs):
            seen.append(inputs.gram.clone())
            return gb.methods.Aggregation(weights=torch.ones(inputs.num_tasks, dtype=torch.float64))

    model = MultiTaskNet(2)
    x, y = make_batch(2, n=32)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), LastLayer(), shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    opt.zero_grad()
    for part in range(4):
        sl = slice(8 * part, 8 * part + 8)
        _, losses = task_losses(model, x[sl], y[sl])
        opt.backward([loss / 4 for loss in losses])
    torch.testing.assert_close(seen[-1], seen[0], rtol=1e-6, atol=1e-9)
    assert not torch.allclose(seen[1], seen[0])


def test_missing_task_in_dict_and_changing_list_length():
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "uw", shared_params=model.trunk)
    for present in (("a", "b", "c"), ("a", "b", "c"), ("a", "c")):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        full = dict(zip("abc", losses))
        info = opt.backward({n: (full[n] if n in present else None) for n in "abc"})
        assert info.task_names == present
        if present == ("a", "c"):  # b has no labels: its head gets no gradient
            assert model.heads[1].weight.grad is None
        opt.step()
    assert opt.method.tasks == ("a", "b", "c")
    # unnamed losses whose number changes are refused for a method with state
    opt2 = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "uw", shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt2.backward(losses)
    opt2.step()
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="matched by name"):
        opt2.backward(losses[:2])
