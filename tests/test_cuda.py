"""The CUDA path gives the CPU path's weights and gradients (runs only where CUDA exists).

This file is skipped on machines without a GPU (CI has none); run it on a GPU machine with
``python -m pytest tests/test_cuda.py`` (``python -m benchmarks gpu`` runs it first). TF32 is
switched off so that CUDA matmuls and convolutions are fp32 like the CPU's. ``nash_mtl`` needs
cvxpy; where it is not installed that one method is skipped (carry its wheels: see
``benchmarks/gpu.py``).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

import gradbalance as gb
from gradbalance import jacobian
from tests import engine_models as em
from tests.helpers import FixedWeights, MultiTaskNet, make_batch, task_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

K = 4
HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None


@pytest.fixture(autouse=True)
def _fp32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _run(name, model, device, engine, steps=3):
    model = copy.deepcopy(model).to(device)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.05), name,
                         shared_params=model.trunk, engine=engine)
    infos = []
    for s in range(steps):
        x, y = (t.to(device) for t in make_batch(K, n=32, seed=s))
        opt.zero_grad()
        z, losses = task_losses(model, x, y)
        infos.append(opt.backward(losses, features=z))
        grads = [p.grad.detach().cpu().clone() for p in model.parameters() if p.grad is not None]
        opt.step()
    return infos, grads, [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("engine", ["loop", "batched", "auto"])
@pytest.mark.parametrize("name", sorted(gb.available_methods()))
def test_cuda_matches_cpu(name, engine):
    if name == "nash_mtl" and not HAS_CVXPY:
        pytest.skip("cvxpy is not installed here (carry its wheels, see benchmarks/gpu.py)")
    model = MultiTaskNet(K)
    cpu_infos, cpu_grads, cpu_params = _run(name, model, "cpu", "loop")
    gpu_infos, gpu_grads, gpu_params = _run(name, model, "cuda", engine)
    for a, b in zip(cpu_infos, gpu_infos):
        if a.weights is not None:
            torch.testing.assert_close(b.weights.cpu(), a.weights, atol=1e-4, rtol=1e-4)
    for a, b in zip(cpu_grads, gpu_grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for a, b in zip(cpu_params, gpu_params):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [None, 2, "auto"])
@pytest.mark.parametrize("features", [True, False])
@pytest.mark.parametrize("name", ["resnet", "mlp", "text"])
def test_batched_equals_loop_on_cuda(name, features, chunk):
    k = 5
    trunk, heads, x, ys = em.build(name, k, device="cuda")
    z, losses = em.losses(trunk, heads, x, ys)
    shared, head_params = list(trunk.parameters()), list(heads.parameters())
    loop = jacobian.task_gradients(losses, shared, head_params, engine="loop", retain_graph=True)
    batched = jacobian.task_gradients(losses, shared, head_params, engine="batched",
                                      features=z if features else None, chunk_size=chunk)
    assert batched.engine == "batched" and batched.note == ""
    scale = float(loop.shared.abs().max())
    torch.testing.assert_close(batched.shared, loop.shared, rtol=1e-4, atol=1e-5 * scale)
    assert (loop.shared[0] - loop.shared[1]).abs().max() > 1e-4 * scale  # the tasks differ
    if chunk == "auto":
        assert 1 <= batched.chunk <= k


@pytest.mark.parametrize("features", [True, False])
def test_transformer_on_cuda_is_exact_whatever_attention_backward_does(features):
    # The CUDA attention backward (efficient/flash/math, chosen by PyTorch) may lack a batching
    # rule (recorded, stays batched) or be one vmap cannot run (then the loop reruns the step,
    # with a note): either way the step equals the plain backward, and the label says which.
    k = 3
    trunk, heads, x, ys = em.build("transformer", k, device="cuda")
    params = [*trunk.parameters(), *heads.parameters()]
    ref = [copy.deepcopy(m) for m in (trunk, heads)]
    torch.stack(em.losses(ref[0], ref[1], x, ys)[1]).sum().backward()
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.0), FixedWeights([1.0] * k), shared_params=trunk,
                         engine="batched")
    z, losses = em.losses(trunk, heads, x, ys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the "batched engine failed" notice, if any
        info = opt.backward(losses, features=z if features else None)
    print(f"transformer on CUDA, features={features}: engine = {info.engine!r}")
    assert info.engine.startswith(("batched", "loop (batched failed")), info.engine
    for got, want in zip(params, [*ref[0].parameters(), *ref[1].parameters()]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["layer", "scale", "tied"])
def test_shared_parameter_after_features_on_cuda(kind):
    k = 3
    model = em.AfterFeatures(kind, k).cuda()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 12, (6, 5), generator=gen).cuda()
    targets = [torch.randint(0, 12, (6,), generator=gen).cuda() for _ in range(k)]

    def run():
        z, outs = model(tokens)
        return z, [torch.nn.functional.cross_entropy(o, t) * (i + 1) for i, (o, t) in enumerate(zip(outs, targets))]

    model.zero_grad(set_to_none=True)
    torch.stack(run()[1]).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    for engine in ("loop", "batched", "auto"):
        model.zero_grad(set_to_none=True)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), FixedWeights([1.0] * k),
                             shared_params=model.shared_parameters(), engine=engine)
        z, losses = run()
        info = opt.backward(losses, features=z)
        assert info.engine.startswith("loop" if engine == "loop" else "batched"), info.engine
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain[n], rtol=1e-4, atol=1e-5, msg=f"{engine} {n}")


def test_auto_chunk_probe_on_cuda(monkeypatch):
    # One task is measured with the allocator's peak counter, the figure is cached, and a small
    # fake budget (2.5 tasks) gives chunks of 2; the gradients equal the loop's throughout.
    k = 5
    trunk, heads, x, ys = em.build("resnet", k, device="cuda")
    shared = list(trunk.parameters())
    monkeypatch.setattr(jacobian, "_TASK_BYTES", {})

    def grads(budget=None):
        if budget is not None:
            monkeypatch.setattr(jacobian, "memory_budget", lambda device, fraction=0.5: budget)
        z, losses = em.losses(trunk, heads, x, ys)
        loop = jacobian.task_gradients(losses, shared, engine="loop", retain_graph=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        tg = jacobian.task_gradients(losses, shared, engine="batched", features=z, chunk_size="auto")
        torch.testing.assert_close(tg.shared, loop.shared, rtol=1e-4, atol=1e-5 * float(loop.shared.abs().max()))
        return tg.chunk

    assert grads() == k - 1  # the probe (1 task), then the 4 others at once (a GPU has room)
    (per_task,) = jacobian._TASK_BYTES.values()
    assert per_task > sum(p.numel() * 4 for p in shared)  # at least the task's gradient row
    assert grads() == k  # the cached figure: no probe
    assert grads(budget=2.5 * per_task) == 2


def test_auto_engine_on_cuda_is_batched_and_compiled_trunk_takes_the_loop():
    torch._dynamo.reset()
    k = 3
    trunk, heads, x, ys = em.build("mlp", k, device="cuda")
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.0), FixedWeights([1.0] * k), shared_params=trunk)
    z, losses = em.losses(trunk, heads, x, ys)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = opt.backward(losses, features=z)
    assert not [w for w in caught if "batched engine failed" in str(w.message)]
    assert info.engine == "batched" and 1 <= info.extras["chunk_size"] <= k
    opt.zero_grad()
    ref = [copy.deepcopy(m) for m in (trunk, heads)]
    torch.stack(em.losses(ref[0], ref[1], x, ys)[1]).sum().backward()
    z, losses = em.losses(torch.compile(trunk, backend="aot_eager"), heads, x, ys)
    info = opt.backward(losses, features=z)
    assert info.engine == "loop (compiled graph)"
    for got, want in zip(params, [*ref[0].parameters(), *ref[1].parameters()]):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", ["loop", "batched", "gram"])
def test_unreached_shared_parameter_keeps_no_gradient_on_cuda(engine):
    """As on CPU (tests/test_unreached.py): a shared parameter no loss reaches keeps .grad None."""
    from tests.test_unreached import Branchy

    torch.manual_seed(0)
    model = Branchy().cuda()
    opt = gb.GradBalance(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5), "mgda",
                         shared_params=model.shared(), engine=engine)
    z, losses = model(torch.randn(8, 4, device="cuda"), use_b=False)
    info = opt.backward(losses, features=z)
    assert info.engine.startswith(engine)
    assert model.b.weight.grad is None and model.a.weight.grad is not None
    before = model.b.weight.detach().clone()
    opt.step()
    assert torch.equal(model.b.weight, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_on_cuda(dtype):
    """The NaN/inf probe on CUDA tensors: finds one bad entry, accepts a large finite half sum."""
    from gradbalance.paths.grads import check_finite_grads

    check_finite_grads([torch.ones(300_000, dtype=dtype, device="cuda")], ["a"])
    bad = torch.zeros(1000, dtype=dtype, device="cuda")
    bad[17] = float("nan")
    with pytest.raises(gb.NonFiniteError):
        check_finite_grads([torch.ones(10, dtype=dtype, device="cuda"), bad], ["a", "b"])
