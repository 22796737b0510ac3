"""engine="gram" (gradbalance.gram): the Gram matrix of the task gradients without the k x P
matrix, equal to the loop engine's G G^T, and the same update as the loop for every Gram method."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradbalance as gb
from gradbalance import gram, jacobian
from gradbalance.methods.base import make_method
from tests.helpers import FixedWeights, MultiTaskNet, make_batch, snapshot, task_losses

K = 3


# ----------------------------------------------------------------------------- architectures
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class EmbedAttention(nn.Module):
    """Embedding -> self-attention -> GELU/LayerNorm MLP, mean over positions (3-D Linear inputs)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8))

    def forward(self, x):
        e = self.emb(x)
        a, _ = self.attn(e, e, e)
        return self.mlp(a + e).mean(1)


class Tied(nn.Module):
    """One Linear applied twice (its weight and bias each reach the losses along two paths)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 8)

    def forward(self, x):
        return torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.a(x))))))


def build(arch: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "mlp":
        trunk = nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 8), nn.ReLU())
        x = torch.randn(6, 5)
    elif arch == "conv_bn":
        trunk, x = ConvBN(), torch.randn(5, 2, 8, 8)
    elif arch == "embedding":
        trunk, x = EmbedAttention(), torch.randint(0, 11, (4, 5))
    else:
        trunk, x = Tied(), torch.randn(7, 6)
    heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 2)) for _ in range(K))
    trunk, heads = trunk.to(dtype), heads.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    ys = [torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(K)]

    def losses():
        z = trunk(x)
        return z, [F.mse_loss(h(z), y) * (i + 1) for i, (h, y) in enumerate(zip(heads, ys))]

    return trunk, heads, losses


ARCHS = ["mlp", "conv_bn", "embedding", "tied"]


def loop_gram(losses, shared):
    G = jacobian.task_gradients(losses, shared, retain_graph=True).shared.double()
    return G @ G.T


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def rel_update(a, b):
    """Relative max error over ALL the parameters' gradients together (a bias ahead of batch norm
    has an exactly-zero gradient up to rounding: per-tensor ratios would compare noise)."""
    return rel(torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b]))


# ----------------------------------------------------------------------------- the Gram matrix
@pytest.mark.parametrize("arch,linear,route", [
    *[(arch, linear, "features") for arch in ARCHS for linear in ("auto", "activations", "gradients")],
    *[(arch, "auto", "losses") for arch in ("mlp", "conv_bn", "tied")],
])
def test_gram_matrix_equals_the_loop_engines(arch, linear, route):
    trunk, _, make = build(arch)
    z, losses = make()
    shared = list(trunk.parameters())
    result = gram.gram_matrix(losses, shared, features=z if route == "features" else None, linear=linear)
    assert result.route == route
    assert rel(result.gram, loop_gram(losses, shared)) < 1e-5
    assert torch.equal(result.gram, result.gram.T)
    if linear == "gradients":
        assert result.forms["activations"] == 0
    if linear == "activations" and arch != "conv_bn":  # conv_bn's Linear reads ReLU output: eligible too
        assert result.forms["activations"] >= 1


@pytest.mark.parametrize("arch", ["mlp", "tied", "embedding"])
def test_both_linear_forms_give_the_same_gram_in_float64(arch):
    trunk, _, make = build(arch, dtype=torch.float64)
    shared = list(trunk.parameters())
    z, losses = make()
    by_act = gram.gram_matrix(losses, shared, features=z, linear="activations")
    by_grad = gram.gram_matrix(losses, shared, features=z, linear="gradients")
    assert by_act.forms["activations"] >= 1 and by_grad.forms["activations"] == 0
    torch.testing.assert_close(by_act.gram, by_grad.gram, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(by_act.gram, loop_gram(losses, shared), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("arch", ["mlp", "tied"])
def test_public_vmap_route_gives_the_same_gram(arch, monkeypatch):
    # without functorch's accessors the hooks leave vmap through custom Functions' vmap rules
    trunk, _, make = build(arch, dtype=torch.float64)
    shared = list(trunk.parameters())
    z, losses = make()
    fast = gram.gram_matrix(losses, shared, features=z, linear="activations").gram
    monkeypatch.setattr(gram, "_UNWRAP", False)
    public = gram.gram_matrix(losses, shared, features=z, linear="activations")
    assert public.forms["activations"] >= 1
    torch.testing.assert_close(public.gram, fast, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(public.gram, loop_gram(losses, shared), rtol=1e-12, atol=1e-15)


def test_tied_weight_is_never_split_into_per_use_blocks():
    # a's weight reaches the output along two paths: the block must be <g_i, g_j> of the SUMMED
    # gradient (cross terms between the uses included), so it is taken from its gradients
    trunk, _, make = build("tied", dtype=torch.float64)
    z, losses = make()
    shared = list(trunk.parameters())
    result = gram.gram_matrix(losses, shared, features=z, linear="activations")
    assert result.forms == {"gradients": 3, "activations": 1}  # a.weight, a.bias, b.bias | b.weight
    torch.testing.assert_close(result.gram, loop_gram(losses, shared), rtol=1e-12, atol=1e-15)


def test_shared_parameter_used_after_the_features_is_counted():
    # a shared scale read by every head: dL/dz alone would miss its gradient, so the engine must
    # start from the losses
    torch.manual_seed(0)
    trunk = nn.Linear(4, 6)
    scale = nn.Parameter(torch.tensor(1.5))
    heads = [nn.Linear(6, 1) for _ in range(K)]
    x = torch.randn(5, 4)
    z = trunk(x)
    losses = [(h(z) * scale).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
    shared = [*trunk.parameters(), scale]
    result = gram.gram_matrix(losses, shared, features=z)
    assert result.route == "losses"
    assert rel(result.gram, loop_gram(losses, shared)) < 1e-5


def test_hooks_are_removed_and_the_graph_is_kept():
    trunk, _, make = build("mlp")
    z, losses = make()
    shared = list(trunk.parameters())
    gram.gram_matrix(losses, shared, features=z)
    assert all(not p._backward_hooks for p in shared)
    torch.stack(losses).sum().backward()  # the graph is still there, and no hook fires
    assert all(p.grad is not None and p.grad.stride() != (0,) * p.dim() for p in shared)


def test_hooks_are_removed_on_error():
    trunk, _, make = build("mlp")
    z, losses = make()
    shared = list(trunk.parameters())
    with pytest.raises(ValueError, match="linear must be one of"):
        gram.gram_matrix(losses, shared, linear="nope")
    z, losses = make()
    z.sum().backward(retain_graph=False)  # frees the trunk's graph: the batched backward fails
    with pytest.raises(RuntimeError, match="second time"):
        gram.gram_matrix(losses, shared)
    assert all(not p._backward_hooks for p in shared)


def test_linear_form_rule():
    # few rows against a wide layer: N x N products; many rows against a narrow one: gradients
    assert gram.linear_form(rows=32, fan_in=1024, fan_out=1024, k=10) == "activations"
    assert gram.linear_form(rows=8192, fan_in=64, fan_out=64, k=10) == "gradients"
    # the rule compares the two flop estimates of its docstring
    for rows, fi, fo, k in ((256, 512, 512, 40), (512, 256, 256, 2), (300, 300, 10, 40)):
        by_grad = 2 * k * fo * fi * (rows + k)
        by_act = 2 * rows * rows * (fi + k * fo) + 2 * k * k * rows * fo
        assert gram.linear_form(rows, fi, fo, k) == ("activations" if by_act < by_grad else "gradients")


def test_prefer_gram_compares_the_k_by_p_matrix_with_the_budget():
    p = [torch.zeros(10, 10, requires_grad=True), torch.zeros(5, requires_grad=True)]
    assert gram.jacobian_bytes(4, p) == 4 * 105 * 4
    assert gram.prefer_gram(4, p, budget=4 * 105 * 4 - 1)
    assert not gram.prefer_gram(4, p, budget=4 * 105 * 4)


def test_prefer_gram_keeps_the_loop_where_activations_outweigh_parameters():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)  # 224 parameters, 8 x 16 x 16 outputs per sample
    head = nn.Linear(8, 1)
    x = torch.randn(16, 3, 16, 16)
    feats = conv(x)
    losses = [head(feats.mean((2, 3))).pow(i + 1).mean() for i in range(3)]
    shared = list(conv.parameters())
    # largest gradient into a node: the conv output, 16 x 8 x 16 x 16 floats; largest block: the
    # conv kernel, 8 x 3 x 3 x 3 floats
    assert gram.batched_backward_bytes(3, losses, shared) == 2 * 3 * 16 * 8 * 16 * 16 * 4 + 3 * 216 * 4
    assert not gram.prefer_gram(3, shared, losses, budget=0)  # 2 x 3 x 128 KiB > 3 x 224 floats
    lin = nn.Linear(512, 512)
    h = lin(torch.randn(2, 512))
    losses = [h.pow(i + 1).mean() for i in range(3)]
    assert gram.prefer_gram(3, list(lin.parameters()), losses, budget=0)  # 3 x 1 MiB > 2 x 3 x 4 KiB


# ----------------------------------------------------------------------------- the wrapper
GRAM_METHODS = [n for n in gb.available_methods()
                if make_method(n).requires == "gram" and make_method(n).mode == "exact"
                and n != "gradnorm"]  # gradnorm reads a subset (its own cheap path)


def _two_steps(method, engine, arch="mlp", dtype=torch.float64, **kwargs):
    trunk, heads, make = build(arch, dtype=dtype)
    params = [*trunk.parameters(), *heads.parameters()]
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.05), method if not isinstance(method, str)
                         else make_method(method), shared_params=trunk, engine=engine, **kwargs)
    infos, grads = [], []
    for _ in range(2):
        opt.zero_grad()
        z, losses = make()
        infos.append(opt.backward(losses, features=z))
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return infos, grads


def test_every_gram_method_is_covered():
    assert {"mgda", "pcgrad", "cagrad", "nash_mtl", "imtl_g", "upgrad", "dualproj", "aligned_mtl",
            "config", "fairgrad", "gradvac"} <= set(GRAM_METHODS)


@pytest.mark.parametrize("method", GRAM_METHODS)
def test_gram_engine_gives_the_loop_update_for_every_gram_method(method):
    ref_infos, ref = _two_steps(method, "loop")
    infos, out = _two_steps(method, "gram")
    assert [i.engine for i in infos] == ["gram", "gram"]
    for a, b in zip(infos, ref_infos):
        assert rel(a.weights, b.weights) < 1e-5
    for step_a, step_b in zip(out, ref):
        assert rel_update(step_a, step_b) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["mgda", "upgrad"])
def test_gram_engine_gives_the_loop_update_on_every_architecture(arch, method):
    ref_infos, ref = _two_steps(method, "loop", arch=arch, dtype=torch.float32)
    infos, out = _two_steps(method, "gram", arch=arch, dtype=torch.float32)
    for a, b in zip(infos, ref_infos):
        assert a.engine == "gram" and rel(a.weights, b.weights) < 1e-5
        torch.testing.assert_close(a.cosine, b.cosine, rtol=1e-5, atol=1e-6)
    for step_a, step_b in zip(out, ref):
        assert rel_update(step_a, step_b) < 1e-5


def test_head_weights_apart_from_shared_weights():
    # shared params get sum w_i g_i, the heads hw_i * their own gradient
    ref_infos, ref = _two_steps(FixedWeights([0.2, 0.3, 0.5], [1.0, 2.0, 3.0]), "loop")
    _, out = _two_steps(FixedWeights([0.2, 0.3, 0.5], [1.0, 2.0, 3.0]), "gram")
    for step_a, step_b in zip(out, ref):
        for a, b in zip(step_a, step_b):
            assert rel(a, b) < 1e-10


class _NumpyTanh(torch.autograd.Function):
    """A layer whose backward leaves torch (numpy): vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return torch.from_numpy(g.detach().numpy() * (1 - y.detach().numpy() ** 2))


def test_unbatchable_backward_falls_back_to_the_loop_with_a_warning():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6))
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(K))
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(5, 4)
    grads = {}
    for engine in ("gram", "loop"):
        opt = gb.GradBalance(torch.optim.SGD(params, lr=0.0), "mgda", shared_params=trunk, engine=engine)
        for step in range(2):
            opt.zero_grad()
            z = _NumpyTanh.apply(trunk(x))
            losses = [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = opt.backward(losses, features=z)
            opt.step()
            if engine == "gram":
                assert info.engine == "loop"
                assert len([w for w in caught if "could not batch" in str(w.message)]) == (step == 0)
        grads[engine] = [p.grad.clone() for p in params]
    for a, b in zip(grads["gram"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_grad_scaler_unscales_before_the_gram():
    def run(scaled):
        model = MultiTaskNet(2)
        x, y = make_batch(2)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda",
                             shared_params=model.trunk, engine="gram")
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        z, losses = task_losses(model, x, y)
        info = opt.backward(losses, features=z, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        return info, list(model.parameters())

    info, scaled = run(True)
    ref_info, plain = run(False)
    assert info.engine == "gram"
    torch.testing.assert_close(info.grad_norms, ref_info.grad_norms, rtol=1e-5, atol=0)
    torch.testing.assert_close(info.weights, ref_info.weights, rtol=1e-5, atol=1e-8)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_overflow_skips_the_step():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.Adam(model.parameters(), lr=0.1), "mgda",
                         shared_params=model.trunk, engine="gram")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    before = snapshot(model)[0]
    _, losses = task_losses(model, x, y)
    bad = losses[0] + torch.sqrt(model.trunk[0].weight.abs() * 0).sum()  # inf gradient at 0
    info = opt.backward([bad, losses[1]], scaler=scaler)
    assert info.engine == "skipped"
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**20
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_exact_accumulation_falls_back_to_the_loop_once_then_equals_the_big_batch():
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k, n=32)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), "mgda",
                         shared_params=model.trunk, engine="gram")
    with pytest.warns(UserWarning, match="second backward call"):
        for part in range(2):  # the window in which the second call comes: warned
            z, losses = task_losses(model, x[16 * part:16 * part + 16], y[16 * part:16 * part + 16])
            opt.backward([loss / 2 for loss in losses], features=z)
    opt.step()
    opt.zero_grad()
    big = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), "mgda", shared_params=model.trunk,
                         engine="loop")
    z, losses = task_losses(model, x, y)
    ref = big.backward(losses)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    big.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for part in range(4):
            sl = slice(8 * part, 8 * part + 8)
            z, losses = task_losses(model, x[sl], y[sl])
            info = opt.backward([loss / 4 for loss in losses], features=z)
    assert info.engine == "loop"
    torch.testing.assert_close(info.weights, ref.weights, rtol=1e-5, atol=1e-8)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7)


def test_combine_accumulation_keeps_the_gram_engine():
    k = 3
    model = MultiTaskNet(k)
    x, y = make_batch(k, n=32)
    grads = {}
    for engine in ("gram", "loop"):
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), "upgrad",
                             shared_params=model.trunk, engine=engine, accumulation="combine")
        opt.zero_grad()
        for part in range(2):
            z, losses = task_losses(model, x[16 * part:16 * part + 16], y[16 * part:16 * part + 16])
            assert opt.backward(losses, features=z).engine == engine
        grads[engine] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["gram"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_auto_chooses_gram_only_above_the_memory_budget(monkeypatch):
    # a wide trunk on a small batch: k x P outweighs two k x (activation) buffers
    for budget, expected in ((gram.AUTO_BUDGET_BYTES, "loop"), (0, "gram")):
        monkeypatch.setattr(gram, "AUTO_BUDGET_BYTES", budget)
        model = MultiTaskNet(2, width=64)
        x, y = make_batch(2, n=8)
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.trunk)
        z, losses = task_losses(model, x, y)
        assert opt.backward(losses, features=z).engine == expected
        # a loss weighting is one backward whatever the budget
        opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mean", shared_params=model.trunk)
        z, losses = task_losses(model, x, y)
        assert opt.backward(losses).engine == "losses"


@pytest.mark.parametrize("method,accumulation,match", [
    ("graddrop", "exact", "requires='grads'"),
    ("db_mtl", "exact", "requires='grads'"),
    ("mgda", "buffered", "buffered"),
])
def test_bad_configurations_are_refused(method, accumulation, match):
    model = MultiTaskNet(2)
    with pytest.raises(ValueError, match=match):
        gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), method, shared_params=model.trunk,
                       engine="gram", accumulation=accumulation)


def test_distributed_is_refused_and_nothing_changes():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.trunk,
                         engine="gram")
    balancer = opt._balancer

    class FakeSync:  # what distributed.resolve returns under DDP; never reached
        strategy, fsdp, bytes_sent, world = "allreduce", False, 0, 2

        def open_call(self, *args):  # the call checkpoint: every rank makes the same call
            pass

        def begin(self, *args):
            pass

        def flush(self):
            pass

        def fail(self, error):
            pass

        def mean(self, t):
            return t

    from gradbalance.distributed import AllReduce

    balancer._reducer = AllReduce(FakeSync())  # the reducer a balancer resolves under DDP
    _, losses = task_losses(model, x, y)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="does not support distributed"):
        opt.backward(losses)
    after = snapshot(model, opt)
    for n in before[0]:
        assert torch.equal(before[0][n], after[0][n]) and after[1][n] is None
    assert balancer._window is None and balancer.step_count == 0


def test_loss_missing_the_shared_parameters_is_refused_before_any_change():
    model = MultiTaskNet(2)
    x, y = make_batch(2)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.trunk,
                         engine="gram")
    _, losses = task_losses(model, x, y)
    off = model.heads[0].bias.sum() ** 2
    with pytest.raises(ValueError, match="does not reach any shared"):
        opt.backward([off, losses[1]])
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- the benchmark
def test_quick_benchmark_runs_and_agrees_with_the_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADBALANCE_NO_PROGRESS", "1")
    from benchmarks import gram as bench

    assert bench.main(["--quick", "--model", "mlp", "--ks", "3", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gram-quick.md").read_text()
    assert "mgda (gram)" in text and "gram / loop" in text
    rows, _ = bench.run("mlp", "cpu", (3,), "mgda", steps=2, warmup=1, budget=0.1, quick=True)
    by_label = {r["label"]: r for r in rows}
    for engine in ("loop", "batched", "gram"):
        row = by_label[f"mgda ({engine})"]
        assert row["status"] == "ok" and row["ran"] == engine
        assert 0 < row["ratio"] < float("inf") and row["mem_ratio"] > 0
    assert rows[0]["agreement"] < 1e-5
    tjd = by_label["mgda (torchjd autogram)"]
    assert tjd["status"] == "ok" or tjd["status"].startswith("skipped")


def test_recompute_every_reuses_the_gram_engines_weights():
    model = MultiTaskNet(3)
    x, y = make_batch(3)
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.0), "mgda", shared_params=model.trunk,
                         engine="gram", recompute_every=2)
    infos = []
    for _ in range(3):
        opt.zero_grad()
        z, losses = task_losses(model, x, y)
        infos.append(opt.backward(losses, features=z))
        opt.step()
    assert [i.engine for i in infos] == ["gram", "reused", "gram"]
    torch.testing.assert_close(infos[1].weights, infos[0].weights, rtol=0, atol=0)


def test_functional_backward_with_the_gram_engine():
    grads = {}
    for engine in ("gram", "loop"):
        model = MultiTaskNet(3)
        x, y = make_batch(3)
        z, losses = task_losses(model, x, y)
        info = gb.backward(losses, model.trunk, "upgrad", features=z, engine=engine)
        assert info.engine == engine
        grads[engine] = [p.grad.clone() for p in model.parameters()]
    assert rel_update(grads["gram"], grads["loop"]) < 1e-5


def test_the_k_by_p_matrix_is_never_formed():
    # four wide layers, a small batch: k x P (16 MiB) dwarfs everything else the step allocates
    from benchmarks.overhead import peak_bytes

    torch.manual_seed(0)
    k = 16
    trunk = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(256, 256), nn.Tanh())])
    heads = [nn.Linear(256, 1) for _ in range(k)]
    x = torch.randn(4, 256)
    shared = list(trunk.parameters())
    matrix = gram.jacobian_bytes(k, shared)
    for linear in ("auto", "gradients"):
        def run(linear=linear):
            z = trunk(x)
            gram.gram_matrix([h(z).pow(2).mean() for h in heads], shared, features=z, linear=linear)

        run()
        # gradients: at most one layer's k gradients (a quarter) at a time; activations: N x N
        # products, no k x out x in tensor at all
        assert peak_bytes(run, "cpu") < matrix / (2 if linear == "gradients" else 8), linear

    def loop():
        z = trunk(x)
        jacobian.task_gradients([h(z).pow(2).mean() for h in heads], shared)

    loop()
    assert peak_bytes(loop, "cpu") >= matrix  # the probe does see a k x P matrix
