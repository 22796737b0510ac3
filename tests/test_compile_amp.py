"""torch.compile'd models and autocast forwards work with both engines."""

from __future__ import annotations

import pytest
import torch

import gradbalance as gb
from tests.helpers import FixedWeights, MultiTaskNet, make_batch


def _losses(outs, y):
    return [((o.float() - y[:, i]) ** 2).mean() * (i + 1) for i, o in enumerate(outs)]


def _reference(model, x, y, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, outs = model(x)
    sum(_losses(outs, y)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model(engine, backend):
    torch._dynamo.reset()
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    expected = _reference(model, x, y)
    compiled = torch.compile(model, backend=backend)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * 3),
                         shared_params=model.trunk, engine=engine)
    z, outs = compiled(x)
    # with the whole model compiled by aot_eager the returned z is not on the heads' path,
    # so the batched engine runs from the stacked losses (no features=)
    info = opt.backward(_losses(outs, y), features=z if backend == "eager" else None)
    # vmap cannot run a compiled backward: the batched engine takes the loop, up front
    compiled = engine == "batched" and backend != "eager"
    assert info.engine == ("loop (compiled graph)" if compiled else engine)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_compiled_whole_model_with_features_takes_the_loop():
    # The whole model compiled: the returned z is a separate output that the heads do not read,
    # and the compiled backward cannot be vmapped. Detected before anything runs: the loop
    # gives the plain backward's gradients, whatever features= says.
    torch._dynamo.reset()
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    expected = _reference(model, x, y)
    compiled = torch.compile(model, backend="aot_eager")
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * 2),
                         shared_params=model.trunk, engine="batched")
    z, outs = compiled(x)
    info = opt.backward(_losses(outs, y), features=z)
    assert info.engine == "loop (compiled graph)"
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_compiled_trunk_and_heads_separately_keep_the_feature_route():
    torch._dynamo.reset()
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    expected = _reference(model, x, y)
    trunk = torch.compile(model.trunk, backend="aot_eager")
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * 3),
                         shared_params=model.trunk, engine="batched")
    z = trunk(x)
    outs = [h(z).squeeze(-1) for h in model.heads]
    info = opt.backward(_losses(outs, y), features=z)
    assert info.engine == "loop (compiled graph)"  # the trunk's compiled backward cannot be vmapped
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_bf16_autocast_forward(engine):
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    expected = _reference(model, x, y, autocast=True)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * 3),
                         shared_params=model.trunk, engine=engine)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, outs = model(x)
    info = opt.backward(_losses(outs, y), features=z)
    assert info.grad_norms.dtype == torch.float64
    for got, want in zip((p.grad for p in model.parameters()), expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
