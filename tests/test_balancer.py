"""The coordinator's contract: failed calls change nothing, the window sums what it must, the reuse
cache, the options' validation, checkpoints, the functional API's step count, autocast."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import gradbalance as gb
from tests.helpers import FixedWeights, MultiTaskNet, assert_same_snapshot, make_batch, snapshot, task_losses


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _same_state(a, b):
    """Nested state dicts equal (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b))
    return a == b


def _plain(model, x, y, combine):
    """The gradients of ``combine(losses)`` by one ordinary backward."""
    model.zero_grad(set_to_none=True)
    _, losses = task_losses(model, x, y)
    combine(losses).backward()
    out = _grads(model)
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads(got, want, atol=1e-6):
    assert got.keys() == want.keys()
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=0)


class _Recorder(gb.methods.Method):
    """A Gram method that records what it sees and returns fixed weights (or a direction)."""

    requires = "gram"

    def __init__(self, weights=(1.0, 1.0), head_weights=None, mode="exact", direction=False):
        self.mode = mode
        self.w = torch.tensor(weights, dtype=torch.float64)
        self.hw = None if head_weights is None else torch.tensor(head_weights, dtype=torch.float64)
        self.direction = direction
        self.seen = []

    def aggregate(self, inputs):
        self.seen.append(inputs)
        if self.direction:
            return gb.methods.Aggregation(weights=None, direction=torch.zeros(3))
        return gb.methods.Aggregation(weights=self.w, head_weights=self.hw)


# ----------------------------------------------------------------------------- the window


def test_representation_window_sums_the_gram_of_the_micro_batches():
    # The concatenated batch's z holds the micro-batches' rows: its Gram of dL/dz is the sum of
    # theirs. A window that kept only the last call's Gram (or averaged them) fails.
    model = MultiTaskNet(2)
    x, y = make_batch(2, n=32)
    method = _Recorder(mode="representation")
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method, shared_params=model.trunk)
    z, losses = task_losses(model, x, y)
    opt.backward(losses, features=z)
    big = method.seen[-1].gram
    opt.zero_grad()
    for part in range(4):
        sl = slice(8 * part, 8 * part + 8)
        z, losses = task_losses(model, x[sl], y[sl])
        opt.backward([loss / 4 for loss in losses], features=z)
    torch.testing.assert_close(method.seen[-1].gram, big, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(method.seen[1].gram, big)  # one micro-batch alone differs
    torch.testing.assert_close(method.seen[-1].losses, method.seen[0].losses, rtol=1e-6, atol=0)


def test_direction_in_representation_mode_raises_and_changes_nothing():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1),
                         _Recorder(mode="representation", direction=True), shared_params=model.trunk)
    before = snapshot(model, opt)
    z, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="returns a direction"):
        opt.backward(losses, features=z)
    assert_same_snapshot(before, snapshot(model, opt))


def test_buffered_representation_needs_features():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda_ub", shared_params=model.trunk,
                         accumulation="buffered")
    before = snapshot(model, opt)
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="representation mode: pass the shared representation"):
        opt.backward(losses)
    assert_same_snapshot(before, snapshot(model, opt))
    z, losses = task_losses(model, x, y)
    assert opt.backward(losses, features=z).engine == "loop"  # and with features it runs


# ----------------------------------------------------------------------------- failed calls


def test_failed_call_leaves_the_list_length_alone():
    # issue 16: a uw call that raised made the next, correct call fail with "got 3 losses but 2"
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "uw", shared_params=model.trunk)
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    opt.step()
    opt.zero_grad()
    before = snapshot(model, opt)
    state = copy.deepcopy(opt.state_dict()["gradbalance"])
    _, losses = task_losses(model, x, y)
    head_only = model.heads[1](torch.ones(1, 16)).sum()
    with pytest.raises(ValueError):  # two losses where the method keeps state for three
        opt.backward([losses[0], head_only])
    assert_same_snapshot(before, snapshot(model, opt))
    assert _same_state(opt.state_dict()["gradbalance"], state)
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)  # the correct call works
    assert info.task_names == ("task0", "task1", "task2")


def test_failed_call_keeps_no_inferred_shared_parameters():
    # the head of a single task would be "shared" for good if an inference from a failed call stuck
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0, 1.0]))
    _, losses = task_losses(model, x, y)
    bad = losses[0] + torch.sqrt(model.trunk[0].weight.abs() * 0).sum()  # inf gradient
    with pytest.raises(gb.NonFiniteError):
        opt.backward([bad, losses[1]])
    assert opt.shared_params is None
    with pytest.raises(ValueError):  # one loss: everything it reaches would be "shared"
        opt.backward([losses[0] * float("nan")])
    assert opt.shared_params is None
    _, losses = task_losses(model, x, y)
    opt.backward(losses)
    assert {id(p) for p in opt.shared_params} == {id(p) for p in model.trunk.parameters()}


def test_detached_features_raise_and_do_not_switch_the_engine():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0, 1.0]),
                         shared_params=model.trunk, engine="batched")
    before = snapshot(model, opt)
    z, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="not in the losses' graph"):
        opt.backward(losses, features=z.detach())
    assert_same_snapshot(before, snapshot(model, opt))
    z, losses = task_losses(model, x, y)
    assert opt.backward(losses, features=z).engine == "batched"


def test_loop_switch_is_kept_only_by_a_successful_call(monkeypatch):
    # A batched call that raises (an op vmap cannot run at all) reruns with the loop and switches
    # the optimizer to the loop for good, but only if the call succeeds.
    from gradbalance import jacobian

    real = jacobian.task_gradients

    def no_vmap(*args, engine="loop", **kwargs):
        if engine == "batched":
            raise RuntimeError("vmap: cannot run this op")
        return real(*args, engine=engine, **kwargs)

    monkeypatch.setattr(jacobian, "task_gradients", no_vmap)
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0, 1.0]),
                         shared_params=model.trunk, engine="batched")
    z, losses = task_losses(model, x, y)
    bad = losses[0] + torch.sqrt(z.abs() * 0).sum()  # a NaN gradient on the trunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from a failed call
        with pytest.raises(gb.NonFiniteError):
            opt.backward([bad, losses[1]], features=z)
    assert not opt._balancer._use_loop
    z, losses = task_losses(model, x, y)
    with pytest.warns(RuntimeWarning, match="the batched engine failed"):
        info = opt.backward(losses, features=z)
    assert "batched failed" in info.engine and opt._balancer._use_loop
    opt.zero_grad()
    z, losses = task_losses(model, x, y)
    assert opt.backward(losses, features=z).engine == "loop"  # now kept


def test_head_only_loss_is_rejected_on_every_step():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model.trunk)
    for _ in range(3):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        opt.backward(losses)
        opt.step()
    opt.zero_grad()
    before = snapshot(model, opt)
    _, losses = task_losses(model, x, y)
    head_only = model.heads[1](torch.ones(4, 16)).pow(2).mean()
    with pytest.raises(ValueError, match="'task1' does not reach any shared parameter"):
        opt.backward([losses[0], head_only])
    assert_same_snapshot(before, snapshot(model, opt))


# ----------------------------------------------------------------------------- recompute_every


def test_reuse_steps_keep_the_head_weights():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    w, hw = [0.25, 0.75], [2.0, 0.5]
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), _Recorder(w, hw),
                         shared_params=model.trunk, recompute_every=2)
    trunk_names = {f"trunk.{n}" for n, _ in model.trunk.named_parameters()}
    want_trunk = _plain(model, x, y, lambda ls: w[0] * ls[0] + w[1] * ls[1])
    want_heads = _plain(model, x, y, lambda ls: hw[0] * ls[0] + hw[1] * ls[1])
    want = {n: (want_trunk if n in trunk_names else want_heads)[n] for n in want_trunk}
    for step in range(3):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        info = opt.backward(losses)
        assert info.engine == ("reused" if step == 1 else "loop")
        assert info.extras["reused"] == (1 if step == 1 else 0)
        _assert_grads(_grads(model), want)
        opt.step()


def test_recompute_every_validation_and_old_name():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="recompute_every must be >= 1"):
        gb.GradBalance(opt, "mgda", recompute_every=0)
    with pytest.raises(TypeError, match="recompute_every must be an int"):
        gb.GradBalance(opt, "mgda", recompute_every="3")
    with pytest.raises(TypeError, match="recompute_every must be an int"):
        gb.GradBalance(opt, "mgda", recompute_every=True)
    with pytest.warns(DeprecationWarning, match="recompute_every"):
        assert gb.GradBalance(opt, "mgda", update_every=4).options.recompute_every == 4
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=">= 1"):
        gb.GradBalance(opt, "mgda", update_every=0)
    with pytest.raises(TypeError, match="not both"):
        gb.GradBalance(opt, "mgda", update_every=2, recompute_every=3)


def test_recompute_every_warns_for_a_direction_method():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "graddrop", shared_params=model.trunk,
                         recompute_every=3)
    engines = []
    for step in range(3):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        if step == 0:
            with pytest.warns(UserWarning, match="recompute_every=3 has no effect for GradDrop"):
                info = opt.backward(losses)
        else:
            info = opt.backward(losses)
        engines.append(info.engine)
        opt.step()
    assert engines == ["loop", "loop", "loop"]


# ----------------------------------------------------------------------------- options


def test_list_task_weights_are_applied_and_their_length_checked():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "sum", shared_params=model.trunk,
                         task_weights=[1.0, 3.0])
    want = _plain(model, x, y, lambda ls: ls[0] + 3.0 * ls[1])
    _, losses = task_losses(model, x, y)
    info = opt.backward(losses)
    _assert_grads(_grads(model), want)
    torch.testing.assert_close(info.losses[1], 3.0 * losses[1].detach().double())
    opt3 = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "sum", shared_params=model.trunk,
                          task_weights=[1.0, 2.0, 3.0])
    before = snapshot(model, opt3)
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError, match="task_weights has 3 entries but got 2 losses"):
        opt3.backward(losses)
    assert_same_snapshot(before, snapshot(model, opt3))


@pytest.mark.parametrize("weights,exc,match", [
    ({"a": -1.0}, ValueError, "finite number > 0"),
    ({"a": 0.0}, ValueError, "finite number > 0"),
    ([1.0, float("nan")], ValueError, "finite number > 0"),
    ({"a": "2"}, TypeError, "must be a number"),
    ("ab", TypeError, "sequence of numbers"),
])
def test_bad_task_weights_raise_at_construction(weights, exc, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(exc, match=match):
        gb.GradBalance(opt, "sum", task_weights=weights)


def test_task_weight_naming_no_task_raises_at_the_first_step():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "sum", shared_params=model.trunk,
                         task_weights={"depht": 2.0})
    _, losses = task_losses(model, x, y)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"task_weights names task\(s\) \['depht'\]"):
        opt.backward({"depth": losses[0], "seg": losses[1]})
    assert_same_snapshot(before, snapshot(model, opt))
    # a task absent from this batch (None) is still a task
    ok = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "sum", shared_params=model.trunk,
                        task_weights={"seg": 2.0})
    ok.backward({"depth": losses[0], "seg": None})


@pytest.mark.parametrize("kwargs,exc", [
    ({"engine": 1}, TypeError), ({"engine": "fast"}, ValueError),
    ({"chunk_size": 2.0}, TypeError), ({"chunk_size": 0}, ValueError),
    ({"accumulation": "sum"}, ValueError), ({"distributed": "nccl"}, ValueError),
])
def test_options_types_and_values(kwargs, exc):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(exc):
        gb.GradBalance(opt, "mean", **kwargs)
    with pytest.raises(exc):
        gb.Options(**kwargs)


# ----------------------------------------------------------------------------- checkpoints


def _trained(method, steps=2):
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.01), method, shared_params=model.trunk)
    for _ in range(steps):
        opt.zero_grad()
        _, losses = task_losses(model, x, y)
        opt.backward(losses)
        opt.step()
    return model, opt


def test_checkpoint_of_another_method_is_refused_before_anything_loads():
    _, src = _trained("uw")
    model, dst = _trained("mgda", steps=1)
    before = snapshot(model, dst)
    ours = copy.deepcopy(dst.state_dict()["gradbalance"])
    with pytest.raises(ValueError, match="saved by UW.*balances with MGDA"):
        dst.load_state_dict(src.state_dict())
    assert_same_snapshot(before, snapshot(model, dst))  # the inner Adam state too
    assert _same_state(dst.state_dict()["gradbalance"], ours)
    _, pc = _trained("pcgrad")
    _, rlw = _trained("rlw")
    with pytest.raises(ValueError, match="saved by PCGrad"):
        rlw.load_state_dict(pc.state_dict())


def test_checkpoint_with_other_arguments_loads_with_a_warning_and_bad_format_is_refused():
    _, src = _trained(gb.methods.PCGrad(seed=1))
    model, dst = _trained(gb.methods.PCGrad(seed=2), steps=1)
    with pytest.warns(UserWarning, match="arguments"):
        dst.load_state_dict(src.state_dict())
    assert dst.state_dict()["gradbalance"]["step"] == 2
    before = snapshot(model, dst)
    state = src.state_dict()
    state["gradbalance"] = dict(state["gradbalance"], format=99)
    with pytest.raises(ValueError, match="unknown gradbalance state format 99"):
        dst.load_state_dict(state)
    assert_same_snapshot(before, snapshot(model, dst))


def test_failed_inner_optimizer_load_restores_the_method_state():
    _, src = _trained("uw", steps=3)
    model, dst = _trained("uw", steps=1)
    ours = copy.deepcopy(dst.state_dict()["gradbalance"])
    state = src.state_dict()
    state["param_groups"] = state["param_groups"] + state["param_groups"]  # wrong group count
    with pytest.raises(ValueError):
        dst.load_state_dict(state)
    assert _same_state(dst.state_dict()["gradbalance"], ours)
    assert not _same_state(src.state_dict()["gradbalance"], ours)  # the test would see a load


def test_old_checkpoints_without_the_method_record_still_load():
    _, src = _trained("uw")
    _, dst = _trained("uw", steps=1)
    state = src.state_dict()
    for key in ("method_class", "method_args"):
        state["gradbalance"].pop(key)
    dst.load_state_dict(state)
    assert dst.state_dict()["gradbalance"]["step"] == 2


# ----------------------------------------------------------------------------- functional API


def _run_both(make_method, steps=5):
    """The same training through GradBalance and through gb.backward + a plain optimizer."""
    x, y = make_batch(2)
    infos = {}
    for how in ("wrapper", "functional"):
        model = MultiTaskNet(2)
        method = make_method()
        if how == "wrapper":
            opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), method, shared_params=model.trunk)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
        got = []
        for _ in range(steps):
            opt.zero_grad()
            _, losses = task_losses(model, x, y)
            if how == "wrapper":
                got.append(opt.backward(losses))
            else:
                got.append(gb.backward(losses, model.trunk, method=method, params=list(model.parameters())))
            opt.step()
        infos[how] = got
    return infos["wrapper"], infos["functional"]


def test_functional_backward_counts_steps_like_the_wrapper_nash_mtl():
    wrapper, functional = _run_both(lambda: gb.methods.NashMTL(update_every=3))
    assert [i.extras["reused"] for i in functional] == [0, 1, 1, 0, 1]
    for a, b in zip(wrapper, functional):
        assert a.extras["reused"] == b.extras["reused"]
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-7)


def test_functional_backward_counts_steps_like_the_wrapper_stch():
    wrapper, functional = _run_both(lambda: gb.methods.STCH(warmup_steps=2))
    for a, b in zip(wrapper, functional):
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-6, atol=1e-9)
    phases = [i.extras.get("phase") for i in functional]
    assert phases == [i.extras.get("phase") for i in wrapper]
    assert phases[:2] == ["warmup", "warmup"] and "warmup" not in phases[2:]  # never left it before


def test_functional_step_argument_and_failed_calls():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    method = gb.methods.NashMTL(update_every=3)
    _, losses = task_losses(model, x, y)
    assert gb.backward(losses, model.trunk, method=method, step=4).extras["reused"] == 0  # first solve
    _, losses = task_losses(model, x, y)
    assert gb.backward(losses, model.trunk, method=method).extras["reused"] == 1  # step 5
    _, losses = task_losses(model, x, y)
    with pytest.raises(ValueError):  # a failed call does not advance the count
        gb.backward([losses[0], losses[1] * float("nan")], model.trunk, method=method)
    _, losses = task_losses(model, x, y)
    assert gb.backward(losses, model.trunk, method=method).extras["reused"] == 0  # step 6
    with pytest.raises(ValueError, match="step must be >= 0"):
        gb.backward(losses, model.trunk, method=method, step=-1)


# ----------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("name", sorted(gb.available_methods()))
def test_every_method_under_cpu_bf16_autocast(name):
    # Lightning's precision="bf16-mixed" calls opt.backward inside torch.autocast: the result must
    # equal the same forward balanced outside autocast, written in the parameters' dtype.
    x, y = make_batch(2)
    results = []
    for inside in (True, False):
        model = MultiTaskNet(2)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), name, shared_params=model.trunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, losses = task_losses(model, x, y)
            if inside:
                opt.backward(losses, features=z)
        if not inside:
            opt.backward(losses, features=z)
        grads = _grads(model)
        assert all(g is None or g.dtype == torch.float32 for g in grads.values())
        results.append(grads)
    for n in results[0]:
        if results[0][n] is None:
            assert results[1][n] is None
        else:
            torch.testing.assert_close(results[0][n], results[1][n], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("method", ["uw", "mgda"])
def test_non_finite_loss_under_a_scaler_is_an_overflow(method):
    # plain AMP skips a step whose loss is inf/NaN (its gradients are); so must the wrapper
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1), method, shared_params=model.trunk)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _, losses = task_losses(model, x, y)
    opt.backward(losses, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before = snapshot(model, opt)[0], snapshot(model, opt)[2]
    state = copy.deepcopy(opt.state_dict()["gradbalance"])
    _, losses = task_losses(model, x, y)
    info = opt.backward([losses[0] * float("inf"), losses[1]], scaler=scaler)
    assert info.engine == "skipped" and "NaN or inf" in info.extras["non_finite"]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    after = snapshot(model, opt)
    for n in before[0]:
        assert torch.equal(before[0][n], after[0][n]), n
    assert _same_state(before[1], after[2])
    assert _same_state(opt.state_dict()["gradbalance"], state)
    opt.zero_grad()
    _, losses = task_losses(model, x, y)
    assert opt.backward(losses, scaler=scaler).weights is not None  # and training goes on
    with pytest.raises(gb.NonFiniteError, match="NaN or inf"):  # without a scaler: an error
        opt.backward([losses[0] * float("nan"), losses[1]])


def test_heads_passed_as_shared_warn_on_the_first_step():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model)
    _, losses = task_losses(model, x, y)
    with pytest.warns(UserWarning, match="4 of the 8 shared parameters are reached by one task only"):
        opt.backward(losses)
    opt.step()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only, and never for the trunk alone
        _, losses = task_losses(model, x, y)
        opt.backward(losses)
        good = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.trunk)
        _, losses = task_losses(model, x, y)
        good.backward(losses)


def test_gram_engine_switch_off_is_kept_only_by_a_successful_call():
    # engine="gram" cannot make a second call of an exact window exact: it switches to the loop
    # for good, with a warning, but not on a call that raised.
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.trunk,
                         engine="gram")
    _, losses = task_losses(model, x, y)
    assert opt.backward(losses).engine == "gram"
    z, losses = task_losses(model, x, y)
    bad = losses[0] + torch.sqrt(z.abs() * 0).sum()  # a NaN gradient on the trunk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the switch nor its warning on a failed call
        with pytest.raises(gb.NonFiniteError):
            opt.backward([bad, losses[1]])
    assert not opt._balancer._gram_off
    _, losses = task_losses(model, x, y)
    with pytest.warns(UserWarning, match="engine='gram' with accumulation='exact'"):
        assert opt.backward(losses).engine == "loop"
    opt.step()
    opt.zero_grad()
    _, losses = task_losses(model, x, y)
    assert opt.backward(losses).engine == "loop"  # kept
    assert gb.RankMismatchError is gb.distributed.RankMismatchError
