"""The batched engine (torch.func.vmap over autograd.grad) on the models users train.

Batched equals the loop on conv/BN/pool/residual, GELU/SiLU/LayerNorm, embedding and attention
trunks, with and without ``features=``, chunked or not; no op falls back except the CPU
attention backward, which is recorded and stays exact; shared parameters reached other than
through the features get their gradient in both engines; compiled graphs take the loop up front;
``chunk_size="auto"`` picks the chunk its rule says.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import gradbalance as gb
from gradbalance import jacobian
from tests import engine_models as em
from tests.helpers import FixedWeights

TRUNKS = ["resnet", "mlp", "text"]


def _both(name, k, features, chunk):
    trunk, heads, x, ys = em.build(name, k)
    z, losses = em.losses(trunk, heads, x, ys)
    shared, head_params = list(trunk.parameters()), list(heads.parameters())
    loop = jacobian.task_gradients(losses, shared, head_params, engine="loop", retain_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning escaping the engine fails the test
        batched = jacobian.task_gradients(losses, shared, head_params, engine="batched",
                                          features=z if features else None, chunk_size=chunk)
    return loop, batched


def _assert_same(loop, batched):
    torch.testing.assert_close(batched.shared, loop.shared, rtol=1e-4, atol=1e-6)
    for row_l, row_b in zip(loop.heads, batched.heads):
        for a, b in zip(row_l, row_b):
            if a is None:
                assert b is None or torch.count_nonzero(b) == 0
            else:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("features", [True, False])
@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("name", TRUNKS)
def test_batched_equals_loop_without_fallback(name, k, features, chunk):
    loop, batched = _both(name, k, features, chunk)
    _assert_same(loop, batched)
    assert batched.engine == "batched" and batched.fallback == () and batched.note == ""
    assert batched.chunk == (k if chunk is None else chunk)
    # the tasks really differ, so equal matrices are not a coincidence of identical rows
    assert (loop.shared[0] - loop.shared[1]).abs().max() > 1e-4 * loop.shared.abs().max()


def test_transformer_is_exact_and_reports_its_attention_fallback():
    loop, batched = _both("transformer", 3, True, None)
    _assert_same(loop, batched)
    assert batched.engine == "batched"
    assert any("scaled_dot_product" in op for op in batched.fallback), batched.fallback
    label, extras = jacobian.describe(batched)
    assert label.startswith("batched (fallback: ") and "scaled_dot_product" in label
    assert "scaled_dot_product" in extras["vmap_fallback"]


@pytest.mark.parametrize("name", TRUNKS + ["transformer"])
def test_engine_stays_batched_over_steps_and_matches_plain_backward(name):
    k = 3
    trunk, heads, x, ys = em.build(name, k)
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.05), FixedWeights([1.0] * k),
                         shared_params=trunk, engine="batched")
    for _ in range(3):
        # reference: plain summed-loss backward on a copy of the current model
        ref_trunk, ref_heads = _copies(trunk, heads)
        _, ref_losses = em.losses(ref_trunk, ref_heads, x, ys)
        torch.stack(ref_losses).sum().backward()
        expected = [p.grad for p in [*ref_trunk.parameters(), *ref_heads.parameters()]]
        opt.zero_grad()
        z, losses = em.losses(trunk, heads, x, ys)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            info = opt.backward(losses, features=z)
        if name == "transformer":
            assert info.engine.startswith("batched (fallback: ") and "vmap_fallback" in info.extras
        else:
            assert info.engine == "batched" and "vmap_fallback" not in info.extras
        for got, want in zip((p.grad for p in params), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        opt.step()


def _copies(trunk, heads):
    import copy

    return copy.deepcopy(trunk), copy.deepcopy(heads)


# ---------------------------------------------------------------------------- shared parameters after z
@pytest.mark.parametrize("kind", ["layer", "scale", "tied"])
def test_shared_parameter_reached_other_than_through_features(kind):
    k = 3
    model = em.AfterFeatures(kind, k)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (6, 5), generator=gen)
    targets = [torch.randint(0, 12, (6,), generator=gen) for _ in range(k)]

    def run():
        z, outs = model(tokens)
        return z, [torch.nn.functional.cross_entropy(o, t) * (i + 1) for i, (o, t) in enumerate(zip(outs, targets))]

    shared = model.shared_parameters()
    special = {"layer": lambda: model.post.weight, "scale": lambda: model.scale,
               "tied": lambda: model.emb.weight}[kind]()
    # plain backward of the summed losses
    model.zero_grad(set_to_none=True)
    _, losses = run()
    torch.stack(losses).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert plain_norm(plain, model, special) > 0
    model.zero_grad(set_to_none=True)
    # jacobian level: batched rows equal the loop's rows (each task's own gradient)
    z, losses = run()
    heads = [p for p in model.parameters() if all(p is not s for s in shared)]
    loop = jacobian.task_gradients(losses, shared, heads, engine="loop", retain_graph=True)
    batched = jacobian.task_gradients(losses, shared, heads, engine="batched", features=z)
    _assert_same(loop, batched)
    assert batched.engine == "batched"
    assert batched.note == ("shared parameter after features" if kind == "tied" else "")
    torch.testing.assert_close(loop.shared.sum(0), jacobian.flatten([plain[_name(model, p)] for p in shared], shared),
                               rtol=1e-4, atol=1e-6)
    # GradBalance level, both engines: the same .grad as the plain backward on every parameter
    for engine in ("loop", "batched"):
        model.zero_grad(set_to_none=True)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * k),
                             shared_params=shared, engine=engine)
        z, losses = run()
        info = opt.backward(losses, features=z)
        assert info.engine.startswith(engine)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-6, msg=f"{engine} {n}")


def plain_norm(grads, model, param):
    return float(grads[_name(model, param)].norm())


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


# ---------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("engine", ["batched", "auto"])
def test_compiled_model_takes_the_loop_up_front(engine):
    torch._dynamo.reset()
    k = 3
    trunk, heads, x, ys = em.build("mlp", k)
    params = [*trunk.parameters(), *heads.parameters()]
    ref_trunk, ref_heads = _copies(trunk, heads)
    _, ref_losses = em.losses(ref_trunk, ref_heads, x, ys)
    torch.stack(ref_losses).sum().backward()
    expected = [p.grad for p in [*ref_trunk.parameters(), *ref_heads.parameters()]]
    compiled = torch.compile(trunk, backend="aot_eager")
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.1), FixedWeights([1.0] * k),
                         shared_params=trunk, engine=engine)
    z, losses = em.losses(compiled, heads, x, ys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failed batched attempt, no retry warning
        info = opt.backward(losses, features=z)
    want = "loop (compiled graph)" if engine == "batched" else "loop"  # auto on CPU: the loop anyway
    assert info.engine == want
    if engine == "batched":
        assert info.extras["engine_note"] == "compiled graph"
    for got, ref in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert jacobian.compiled_graph([z]) and not jacobian.compiled_graph([trunk(x)])


# ---------------------------------------------------------------------------- chunk_size="auto"
def test_auto_chunk_arithmetic():
    assert jacobian.auto_chunk(40, 100.0, 750.0) == 7  # floor(750 / 100)
    assert jacobian.auto_chunk(40, 100.0, 99.0) == 1  # never below one task
    assert jacobian.auto_chunk(5, 100.0, 1e9) == 5  # never above k
    assert jacobian.auto_chunk(7, 100.0, None) == 7  # unknown budget: all at once
    assert jacobian.auto_chunk(7, 0.0, 10.0) == 7
    # never above the measured cap, however much memory there is (or when it is unknown)
    assert jacobian.AUTO_CHUNK_MAX == 10
    assert jacobian.auto_chunk(40, 100.0, 1e12) == 10
    assert jacobian.auto_chunk(40, 100.0, None) == 10


def test_memory_budget_is_a_fraction_of_free_memory():
    budget = jacobian.memory_budget(torch.device("cpu"), fraction=0.25)
    import os

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert budget == pytest.approx(0.25 * free, rel=0.2)


def test_auto_chunk_on_cpu_follows_the_budget(monkeypatch):
    k = 5
    trunk, heads, x, ys = em.build("mlp", k)
    z, losses = em.losses(trunk, heads, x, ys)
    shared = list(trunk.parameters())
    per_task = jacobian._cpu_task_bytes(shared, torch.zeros_like(z))
    # a fake budget of 2.5 tasks: chunks of 2
    monkeypatch.setattr(jacobian, "memory_budget", lambda device, fraction=0.5: 2.5 * per_task)
    calls = []
    real = jacobian._vmap_vjp
    monkeypatch.setattr(jacobian, "_vmap_vjp", lambda o, i, c, f: calls.append(c.shape[0]) or real(o, i, c, f))
    loop = jacobian.task_gradients(losses, shared, engine="loop", retain_graph=True)
    tg = jacobian.task_gradients(losses, shared, engine="batched", features=z, chunk_size="auto")
    assert tg.chunk == 2 and calls == [2, 2, 1]
    torch.testing.assert_close(tg.shared, loop.shared, rtol=1e-4, atol=1e-6)


def test_auto_chunk_probe_then_cached(monkeypatch):
    # The CUDA rule, with the allocator faked: one task is run and measured (100 bytes), the rest
    # go in chunks that fit the budget (250 bytes: 2 tasks); the next call uses the cached
    # figure without a probe; an inexact probe (peak not raised) is used but not cached.
    k = 5
    trunk, heads, x, ys = em.build("mlp", k)
    shared = list(trunk.parameters())
    monkeypatch.setattr(jacobian, "_TASK_BYTES", {})
    monkeypatch.setattr(jacobian, "_can_probe", lambda device: True)
    monkeypatch.setattr(jacobian, "_peak_probe", lambda device: (0, 0))
    exact = [False]
    monkeypatch.setattr(jacobian, "_probed_bytes", lambda device, before: (100.0, exact[0]))
    monkeypatch.setattr(jacobian, "memory_budget", lambda device, fraction=0.5: 250.0)
    calls = []
    real = jacobian._vmap_vjp
    monkeypatch.setattr(jacobian, "_vmap_vjp", lambda o, i, c, f: calls.append(c.shape[0]) or real(o, i, c, f))

    def run():
        calls.clear()
        z, losses = em.losses(trunk, heads, x, ys)
        loop = jacobian.task_gradients(losses, shared, engine="loop", retain_graph=True)
        tg = jacobian.task_gradients(losses, shared, engine="batched", features=z, chunk_size="auto")
        torch.testing.assert_close(tg.shared, loop.shared, rtol=1e-4, atol=1e-6)
        return tg.chunk, list(calls)

    assert run() == (2, [1, 2, 2]) and jacobian._TASK_BYTES == {}  # inexact: not cached
    exact[0] = True
    assert run() == (2, [1, 2, 2]) and list(jacobian._TASK_BYTES.values()) == [100.0]
    assert run() == (2, [2, 2, 1])  # cached: no probe


@pytest.mark.parametrize("bad", [0, -1, 1.5, "big", True])
def test_bad_chunk_size_is_refused(bad):
    trunk, heads, _, _ = em.build("mlp", 2)
    with pytest.raises(ValueError, match="chunk_size"):
        gb.GradBalance(torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1), "mgda",
                       shared_params=trunk, chunk_size=bad)


# ---------------------------------------------------------------------------- representation mode
class _Representation(FixedWeights):
    mode = "representation"


@pytest.mark.parametrize("kind", ["plain", "layer", "scale", "tied", "adapter"])
def test_representation_mode_finishes_through_the_trunk_exactly(kind):
    # MGDA-UB style: weights w on the shared parameters and head weights hw on the heads, applied
    # from the head passes and one backward through the trunk (when every parameter reached
    # through z is shared and none is reached around it), else by weighted backward passes. Both
    # give the plain autograd gradients of sum w_i L_i (shared) and sum hw_i L_i (heads).
    k, w, hw = 3, torch.tensor([0.2, 0.5, 0.3]), torch.tensor([1.0, 2.0, -1.0])
    if kind == "plain":
        trunk, heads, x, ys = em.build("mlp", k)
        model = torch.nn.ModuleDict({"trunk": trunk, "heads": heads})
        shared = list(trunk.parameters())

        def run():
            return em.losses(trunk, heads, x, ys)
    else:
        model = em.AfterFeatures("layer" if kind == "adapter" else kind, k)
        shared = model.shared_parameters()
        if kind == "adapter":  # a task-specific parameter before z: not shared, reached through z
            shared = shared[:-2]  # the layer after z becomes task-specific too
            shared = [p for p in shared if p is not model.body[0].bias]
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 12, (6, 5), generator=gen)
        targets = [torch.randint(0, 12, (6,), generator=gen) for _ in range(k)]

        def run():
            z, outs = model(tokens)
            return z, [torch.nn.functional.cross_entropy(o, t) * (i + 1) for i, (o, t) in enumerate(zip(outs, targets))]

    params = list(model.parameters())
    _, losses = run()
    ids = {id(p) for p in shared}
    ref_w = torch.autograd.grad(torch.stack(losses) @ w, params, retain_graph=True, allow_unused=True)
    ref_hw = torch.autograd.grad(torch.stack(losses) @ hw, params, allow_unused=True)
    expected = [a if id(p) in ids else b for p, a, b in zip(params, ref_w, ref_hw)]
    z, losses = run()
    passes = jacobian.feature_passes(losses, z, params, shared)
    assert passes.direct == (kind in ("plain", "layer", "scale"))
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.1), _Representation(w, hw), shared_params=shared)
    z, losses = run()
    info = opt.backward(losses, features=z)
    assert info.engine == "representation"
    for p, want in zip(params, expected):
        if want is None:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0
        else:
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-6)
