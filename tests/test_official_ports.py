"""gradbalance against compact ports of each method's official code.

Each ``_official_*`` function below re-expresses one official update (the repository, file and
lines are cited in its docstring; read with the ``fetch`` tool at the commits named there),
then the same model, data and steps run through ``gb.GradBalance`` and through the port, and
the gradients after ``backward`` and the parameters after each step are compared. Where the
two do not agree by design, the test states the difference and measures it; where they do not
agree and the documentation did not say so, the deviation was documented and the test asserts it
(CAGrad's factor k).

Commits read (2026-11): tianheyu927/PCGrad c5fbd7c, WeiChengTseng/Pytorch-PCGrad e987ac6,
Cranial-XIX/CAGrad dc3d481, AvivNavon/nash-mtl cce1840, lorenmt/mtan c36c30b,
median-research-group/LibMTL 4336804; torchjd 0.18.0 as installed from PyPI (its tests are
skipped where torchjd or quadprog is not installed: ``pip install "torchjd[quadprog-projector]"``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradbalance as gb
from gradbalance.methods import PCGrad

D = torch.float64


# ------------------------------------------------------------------------------------ helpers
def _mlp(k: int, seed: int, d_in: int = 5, width: int = 7) -> tuple[nn.Module, nn.ModuleList]:
    """An MLP trunk and ``k`` linear heads, float64."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()).double()
    heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k)).double()
    return trunk, heads


def _conv_bn(k: int, seed: int) -> nn.Module:
    """A conv + batch-norm network whose last layer has one output per task: every parameter
    tensor is reached by every loss (fully shared, as the official PCGrad code assumes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, k)).double()


def _shared_mlp(k: int, seed: int, d_in: int = 5, width: int = 7) -> nn.Module:
    """An MLP with one output per task: fully shared at the parameter level."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, k)).double()


def _data(k: int, seed: int, n: int = 12, d_in: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=D), torch.randn(n, k, generator=g, dtype=D)


def _head_losses(trunk, heads, x, y, scales=(1.0, 3.0, 0.5, 2.0)):
    z = trunk(x)
    return [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() * scales[i] for i, h in enumerate(heads)]


def _column_losses(net, x, y, scales=(1.0, 3.0, 0.5, 2.0)):
    out = net(x)
    return [((out[:, i] - y[:, i]) ** 2).mean() * scales[i] for i in range(y.shape[1])]


def _task_grads(losses, params) -> torch.Tensor:
    """``(k, P)``: each loss's gradient on ``params``, zeros where a loss does not reach."""
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


def _write(params, flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _assert_same(a, b, rtol=1e-10, atol=1e-13, what="parameter"):
    for i, (pa, pb) in enumerate(zip(a, b)):
        torch.testing.assert_close(pb, pa, rtol=rtol, atol=atol, msg=lambda m, i=i: f"{what} {i}: {m}")


# ------------------------------------------------------------------------------------- PCGrad
def _official_pcgrad_tf(grads: torch.Tensor) -> torch.Tensor:
    """tianheyu927/PCGrad ``PCGrad_tf.py``, ``compute_gradients`` (lines 33-68).

    Line 36 calls ``tf.random.shuffle(loss)`` and drops the result, so the tasks stay in index
    order; ``proj_grad`` (lines 44-49) runs over ALL ``num_tasks`` gradients, the task's own
    included (a no-op while ``g^PC . g_i >= 0``), subtracting ``min(<g^PC, g_j> / |g_j|^2, 0) g_j``
    with ``g_j`` the ORIGINAL gradient; lines 54-66 sum the projected gradients over the tasks.
    The vectors cover every variable of ``var_list`` (zeros where a task does not reach it).
    """
    out = torch.zeros_like(grads[0])
    for i in range(grads.shape[0]):
        g = grads[i].clone()
        for j in range(grads.shape[0]):
            coef = (g @ grads[j]) / (grads[j] @ grads[j])
            g = g - torch.clamp(coef, max=0.0) * grads[j]
        out += g
    return out


def _official_pcgrad_torch(grads: torch.Tensor, has_grad: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """WeiChengTseng/Pytorch-PCGrad ``pcgrad.py``, ``_project_conflicting`` (lines 48-68) after
    ``_pack_grad`` / ``_retrieve_grad`` (lines 83-139).

    ``grads`` are the whole flattened model (zeros where ``p.grad is None``), ``has_grad`` the
    per-parameter masks; "shared" is where every task has a gradient (line 49). For each task
    ``random.shuffle(grads)`` (line 52) orders ALL tasks, itself included: ``orders[i]`` replaces
    that shuffle. Projection on the original ``g_j`` over the whole vector (lines 53-56). Line 58
    tests ``if self._reduction:``, true for any string, so the shared entries are always the MEAN
    (lines 59-60; the ``'sum'`` branch is unreachable, its issue #14); the other entries are the
    SUM of the projected vectors (lines 66-67), with the projections' cross-task terms in them.
    """
    pc = grads.clone()
    for i in range(grads.shape[0]):
        for j in orders[i]:
            dot = pc[i] @ grads[j]
            if dot < 0:
                pc[i] = pc[i] - dot * grads[j] / grads[j].norm() ** 2
    shared = has_grad.prod(0).bool()
    merged = torch.zeros_like(grads[0])
    merged[shared] = pc[:, shared].mean(0)
    merged[~shared] = pc[:, ~shared].sum(0)
    return merged


def _pcgrad_orders(k: int, gen: torch.Generator) -> list[list[int]]:
    """The order gradbalance's PCGrad documents: per task, ``randperm(k - 1)`` over the other
    tasks in index order, from its seeded generator (re-expressed here, not imported)."""
    out = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        out.append([others[int(p)] for p in torch.randperm(k - 1, generator=gen)])
    return out


def _index_order(k: int, gen: torch.Generator) -> list[list[int]]:
    return [[j for j in range(k) if j != i] for i in range(k)]


def test_pcgrad_matches_the_official_tf_code_on_a_conv_bn_network():
    """Every parameter is reached by every loss (a conv + BN network, one output per task), so
    the official TF update is Algorithm 1 with the sum and the index order; gradbalance with its
    orders fixed to the index order gives the same gradients and the same parameters for 4 SGD
    steps (batch norm in training mode on both sides)."""
    k = 3
    net_a, net_b = _conv_bn(k, 0), _conv_bn(k, 0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, 4, 4, generator=g, dtype=D), torch.randn(4, k, generator=g, dtype=D) * 2
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.2)
    method = PCGrad()
    method.orders = _index_order  # the official code's order (its shuffle is never applied)
    opt_b = gb.GradBalance(torch.optim.SGD(net_b.parameters(), lr=0.2), method, shared_params=net_b)
    projections = 0
    for _ in range(4):
        params_a = list(net_a.parameters())
        opt_a.zero_grad()
        _write(params_a, _official_pcgrad_tf(_task_grads(_column_losses(net_a, x, y), params_a)))
        opt_b.zero_grad()
        info = opt_b.backward(_column_losses(net_b, x, y))
        projections += info.extras["projections"]
        _assert_same([p.grad for p in params_a], [p.grad for p in net_b.parameters()], what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(list(net_a.parameters()), list(net_b.parameters()))
        _assert_same(list(net_a.buffers()), list(net_b.buffers()), what="buffer")
    assert projections > 0  # the projections acted (a dropped projection would be seen)


def test_pcgrad_matches_the_official_pytorch_port_with_the_same_orders():
    """Pytorch-PCGrad on a fully shared network (GELU + LayerNorm MLP, one output per task): its
    effective rule is the MEAN of the projected gradients (the reduction bug), so it equals
    ``PCGrad(reduction="mean")``; its shuffles are replaced by gradbalance's orders (from the
    same seed, task ``i`` first: a no-op), 4 Adam steps. With 4 tasks the order matters (a
    reversed order fails this test)."""
    k, seed = 4, 5
    net_a, net_b = _shared_mlp(k, 2), _shared_mlp(k, 2)
    x, y = _data(k, 3)
    y = y * 2
    opt_a = torch.optim.Adam(net_a.parameters(), lr=0.01)
    opt_b = gb.GradBalance(torch.optim.Adam(net_b.parameters(), lr=0.01), PCGrad(reduction="mean", seed=seed),
                           shared_params=net_b)
    gen = torch.Generator().manual_seed(seed)
    projections = 0
    for _ in range(4):
        params_a = list(net_a.parameters())
        orders = [[i] + o for i, o in enumerate(_pcgrad_orders(k, gen))]
        grads = _task_grads(_column_losses(net_a, x, y), params_a)
        opt_a.zero_grad()
        _write(params_a, _official_pcgrad_torch(grads, torch.ones_like(grads), orders))
        opt_b.zero_grad()
        info = opt_b.backward(_column_losses(net_b, x, y))
        projections += info.extras["projections"]
        _assert_same([p.grad for p in params_a], [p.grad for p in net_b.parameters()], what="grad")
        opt_a.step()
        opt_b.step()
        # Adam divides the gradients by sqrt(v) + eps: entries near zero are where rounding shows
        _assert_same(list(net_a.parameters()), list(net_b.parameters()), rtol=1e-7, atol=1e-9)
    assert projections > 0


def test_pcgrad_with_heads_is_the_official_rule_on_the_shared_parameters_only():
    """With task heads, gradbalance = the official TF rule run on the shared parameters
    (``var_list`` = the trunk) plus each head's own gradient. The official code run on the whole
    model (``var_list`` = all variables) differs, as documented (docs/methods/deviations.md,
    peer-pitfalls): ``|g_j|^2`` includes task j's head, and ``g_i - c g_j`` writes into task j's
    head. Both effects are measured here, so a gradbalance that copied them would fail."""
    k = 3
    trunk, heads = _mlp(k, 4)
    x, y = _data(k, 6)
    shared, head_params = list(trunk.parameters()), list(heads.parameters())
    method = PCGrad()
    method.orders = _index_order
    opt = gb.GradBalance(torch.optim.SGD(shared + head_params, lr=0.1), method, shared_params=trunk)
    losses = _head_losses(trunk, heads, x, y)
    want_shared = _official_pcgrad_tf(_task_grads(losses, shared))
    plain_heads = _task_grads(losses, head_params).sum(0)  # each head: its own task's gradient
    whole = _official_pcgrad_tf(_task_grads(losses, shared + head_params))
    info = opt.backward(losses)
    assert info.extras["projections"] > 0
    got = torch.cat([p.grad.reshape(-1) for p in shared + head_params])
    n = want_shared.numel()
    torch.testing.assert_close(got[:n], want_shared, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(got[n:], plain_heads, rtol=0, atol=1e-15)
    # the whole-model official run: another shared update and leaked head gradients
    assert (whole[:n] - want_shared).norm() > 1e-3 * want_shared.norm()
    assert (whole[n:] - plain_heads).norm() > 1e-3 * plain_heads.norm()


def test_pytorch_pcgrad_with_heads_differs_from_gradbalance_as_documented():
    """Pytorch-PCGrad with heads: a head (reached by one task only) is "not shared", gets the SUM
    over the projected vectors, which carries other tasks' projection terms; the shared part is
    the mean of projections whose norms include the heads. gradbalance (sum, shared-only
    surgery) gives each head its own gradient; with ``reduction="mean"`` its heads get ``1/k``
    of it. Measured: neither matches the port on the heads unless no projection happened."""
    k = 3
    trunk, heads = _mlp(k, 4)
    x, y = _data(k, 6)
    params = list(trunk.parameters()) + list(heads.parameters())
    losses = _head_losses(trunk, heads, x, y)
    grads = _task_grads(losses, params)
    has_grad = torch.stack([torch.cat([torch.full((p.numel(),), float(bool(row[o:o + p.numel()].ne(0).any())),
                                                   dtype=D) for p, o in zip(params, _offsets(params))])
                            for row in grads])
    port = _official_pcgrad_torch(grads, has_grad, [list(range(k))] * k)
    opt = gb.GradBalance(torch.optim.SGD(params, lr=0.1), PCGrad(reduction="mean"), shared_params=trunk)
    opt.backward(losses)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    n = sum(p.numel() for p in trunk.parameters())
    plain = grads[:, n:].sum(0)
    torch.testing.assert_close(got[n:], plain / k, rtol=1e-12, atol=1e-15)
    assert (port[n:] - plain).norm() > 1e-3 * plain.norm()  # the leak into the heads


def _offsets(params):
    out, o = [], 0
    for p in params:
        out.append(o)
        o += p.numel()
    return out


# ------------------------------------------------------------------------------------- CAGrad
def _official_cagrad(grads: torch.Tensor, alpha: float, rescale: int = 1, **minimize_options) -> torch.Tensor:
    """Cranial-XIX/CAGrad ``nyuv2/utils.py``, ``cagrad`` (lines 377-401), for ``k`` tasks (the
    file hard-codes 3): ``GG = G^T G``; ``g0_norm = sqrt(mean(GG) + 1e-8)``; SciPy ``minimize``
    (SLSQP, its default options, numerical gradient) of ``x^T GG b + c sqrt(x^T GG x + 1e-8)``
    with ``b = 1/k``, ``c = alpha g0_norm + 1e-8``, from ``1/k``, on ``[0, 1]^k`` with
    ``sum x = 1``; ``lmbda = c / (|g_w| + 1e-8)``; ``g = mean_i g_i + lmbda g_w`` divided by
    ``1 + alpha^2`` (``rescale=1``, what the NYUv2 training calls, line 525). ``grads`` is
    ``(P, k)`` as ``grad2vec`` fills it (lines 403-415). ``minimize_options`` only to tighten the
    solver for a comparison below the official tolerance."""
    from scipy.optimize import minimize

    k = grads.shape[1]
    gg = (grads.t() @ grads).cpu()
    g0_norm = (gg.mean() + 1e-8).sqrt()
    x_start = np.ones(k) / k
    a, b = gg.numpy(), x_start.copy()
    c = float(alpha * g0_norm + 1e-8)

    def objfn(x):
        return float(x @ a @ b + c * np.sqrt(x @ a @ x + 1e-8))

    res = minimize(objfn, x_start, bounds=[(0, 1)] * k, constraints=({"type": "eq", "fun": lambda x: 1 - sum(x)},),
                   **({"options": minimize_options} if minimize_options else {}))
    ww = torch.from_numpy(res.x).to(grads)
    gw = (grads * ww.view(1, -1)).sum(1)
    g = grads.mean(1) + c / (gw.norm() + 1e-8) * gw
    return g if rescale == 0 else g / (1 + alpha**2) if rescale == 1 else g / (1 + alpha)


def _official_overwrite_grad(params, newgrad: torch.Tensor, k: int) -> None:
    """``nyuv2/utils.py`` ``overwrite_grad`` (lines 417-426): the shared gradients are set to
    ``newgrad * 3`` ("to match the sum loss"; ``* 2`` in ``cityscapes/utils.py`` line 403 with 2
    tasks), i.e. ``k`` times the CAGrad direction."""
    _write(params, newgrad * k)


def _cagrad_setup():
    """3 tasks (the official NYUv2 count) whose weights land inside the simplex (w* ~ (0.85, 0,
    0.15)): a vertex solution would hide a solver difference. Same readout on every head, the
    second target opposed to the first."""
    k = 3
    trunk, heads = _mlp(k, 4)
    with torch.no_grad():
        for h in heads[1:]:
            h.weight.copy_(heads[0].weight)
    x, y = _data(k, 14)
    y[:, 1] = -y[:, 0] + 0.3 * y[:, 1]
    return trunk, heads, x, y


def _cagrad_official_step(trunk, heads, x, y, alpha, times_k, **minimize_options):
    """One official NYUv2 step (``model_segnet_mt.py``-style loop in ``nyuv2/utils.py`` lines
    517-527): each loss backpropagated, the shared gradients collected and cleared, the heads
    keeping their own task's gradient; then ``cagrad`` and ``overwrite_grad``."""
    shared, head_params = list(trunk.parameters()), list(heads.parameters())
    losses = _head_losses(trunk, heads, x, y)
    k = len(losses)
    grads = _task_grads(losses, shared)
    _write(head_params, _task_grads(losses, head_params).sum(0))
    direction = _official_cagrad(grads.t(), alpha, rescale=1, **minimize_options)
    if times_k:
        _official_overwrite_grad(shared, direction, k)
    else:
        _write(shared, direction)


def test_cagrad_direction_matches_the_official_nyuv2_cagrad():
    """gradbalance's default CAGrad (c = 0.4, ``rescale=1``) gives the official ``cagrad``
    direction, heads their own gradient, for 4 SGD steps. The port's SLSQP runs with
    ``ftol=1e-12`` (see the next test for the official default). rtol 1e-5, atol 1e-7: the dual
    objective is flat at the optimum, so two SLSQP solves at ftol 1e-12 (the port's on ``M`` with
    ``+1e-8`` terms and a numerical gradient, gradbalance's on the trace-normalised ``M`` with the
    exact gradient) return weights 1e-6 apart (measured: 0.300982 vs 0.300983 at step 2), which
    moves single gradient entries by up to 2.5e-5 relative (1.2e-8 absolute).
    The port writes the direction itself, not ``k`` times it as ``overwrite_grad`` does: that
    factor is the deviation tested below."""
    trunk_a, heads_a, x, y = _cagrad_setup()
    trunk_b, heads_b, _, _ = _cagrad_setup()
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_a = torch.optim.SGD(params_a, lr=0.2)
    opt_b = gb.GradBalance(torch.optim.SGD(params_b, lr=0.2), "cagrad", shared_params=trunk_b)
    lambdas = []
    for _ in range(4):
        opt_a.zero_grad()
        _cagrad_official_step(trunk_a, heads_a, x, y, 0.4, times_k=False, ftol=1e-12)
        opt_b.zero_grad()
        info = opt_b.backward(_head_losses(trunk_b, heads_b, x, y))
        lambdas.append(info.extras["lambda"])
        _assert_same([p.grad for p in params_a], [p.grad for p in params_b], rtol=1e-5, atol=1e-7, what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(params_a, params_b, rtol=1e-5, atol=1e-7)
    assert min(lambdas) > 0.1  # the conflict-averse term acted on every step


def test_cagrad_matches_the_official_solver_at_its_default_tolerance():
    """With the official SciPy defaults (SLSQP ftol 1e-6, numerical gradient) the official
    weights stop short of the optimum: the directions agree to 2e-3 in norm only (measured 4.4e-4),
    and gradbalance's objective value is not above the official one (it is the better solve)."""
    from gradbalance.methods import CAGrad

    trunk, heads, x, y = _cagrad_setup()
    shared = list(trunk.parameters())
    grads = _task_grads(_head_losses(trunk, heads, x, y), shared)
    official = _official_cagrad(grads.t(), 0.4, rescale=1)
    method = CAGrad()
    w, lam, _ = method.solve(grads @ grads.T)
    ours = (torch.full((3,), 1 / 3, dtype=D) + lam * torch.from_numpy(w)) / (1 + 0.16) @ grads
    gap = float((ours - official).norm() / official.norm())
    assert 1e-6 < gap < 2e-3  # close, and the default tolerance is visible

    g0 = grads.mean(0)

    def dual(v):  # the CAGrad dual objective on the original gradients
        gw = torch.from_numpy(np.asarray(v)) @ grads
        return float(gw @ g0 + 0.4 * g0.norm() * gw.norm())

    gw_official = official * 1.16 - g0  # = lmbda g_w of the official solve
    w_official = torch.linalg.lstsq(grads.T, gw_official.unsqueeze(1)).solution.squeeze(1)
    w_official = (w_official / w_official.sum()).numpy()
    assert dual(w) <= dual(w_official) + 1e-12


def test_cagrad_official_shared_gradient_is_k_times_gradbalances():
    """The documented deviation (docs/methods/deviations.md, ``cagrad`` row): the official
    NYUv2/CityScapes code multiplies the CAGrad direction by k in ``overwrite_grad`` ("to match
    the sum loss", nyuv2/utils.py line 418, cityscapes/utils.py line 403); gradbalance keeps the
    paper's scale (``g_0`` the average gradient, weights ``(1/k + lam w) / (1 + c^2)``), the
    scale of ``"mean"``. So the official shared gradient is exactly k = 3 times gradbalance's
    (measured 2.999996-3.000014 per entry, solver tolerance), and the heads' gradients agree."""
    trunk_a, heads_a, x, y = _cagrad_setup()
    trunk_b, heads_b, _, _ = _cagrad_setup()
    _cagrad_official_step(trunk_a, heads_a, x, y, 0.4, times_k=True, ftol=1e-12)
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_b = gb.GradBalance(torch.optim.SGD(params_b, lr=0.2), "cagrad", shared_params=trunk_b)
    opt_b.backward(_head_losses(trunk_b, heads_b, x, y))
    k = len(heads_b)
    _assert_same([p.grad for p in trunk_a.parameters()], [k * p.grad for p in trunk_b.parameters()],
                 rtol=1e-5, atol=1e-7, what="grad")
    _assert_same([p.grad for p in heads_a.parameters()], [p.grad for p in heads_b.parameters()],
                 rtol=1e-5, atol=1e-7, what="grad")


# ----------------------------------------------------------------------------------- Nash-MTL
class _OfficialNashMTL:
    """AvivNavon/nash-mtl ``methods/weight_methods.py``, class ``NashMTL`` (lines 99-272):
    ``prvs_alpha`` starts at ones (line 121); ``_init_optim_problem`` (lines 163-188) builds
    ``min sum(G a) + phi'(a_t) . (a - a_t) / n`` s.t. ``-log(a_i n) - log((G a)_i) <= 0``,
    ``a >= 0``, with ``G`` the Gram matrix divided by its Frobenius norm ``n`` (lines 228-234) and
    ``phi'(a_t) = 1/a_t + (1/(G a_t)) G`` (lines 157-161); ``solve_optimization`` (lines 133-155)
    runs up to ``optim_niter`` solves from the previous step's ``alpha`` and stops on
    ``_stop_criteria`` (lines 123-131) BEFORE taking that solve's value; the weights are solved
    every ``update_weights_every`` steps (lines 213-240); ``backward`` (lines 246-272)
    back-propagates ``sum_i alpha_i L_i`` and clips the shared gradient norm to ``max_norm``.
    The solver is CLARABEL where the official code names ECOS (no longer installed with
    cvxpy >= 1.6), without ECOS's ``max_iters``; its bare ``except`` is kept."""

    def __init__(self, n_tasks, max_norm=1.0, update_weights_every=1, optim_niter=20):
        import cvxpy as cp

        self.k, self.max_norm, self.every, self.niter = n_tasks, max_norm, update_weights_every, optim_niter
        self.step = 0
        self.prvs_alpha = np.ones(n_tasks, dtype=np.float32)
        self.alpha_param = cp.Variable(shape=(n_tasks,), nonneg=True)
        self.prvs_alpha_param = cp.Parameter(shape=(n_tasks,), value=self.prvs_alpha)
        self.g_param = cp.Parameter(shape=(n_tasks, n_tasks), value=np.eye(n_tasks))
        self.norm_param = cp.Parameter(shape=(1,), value=np.array([1.0]))
        phi_tag = 1 / self.prvs_alpha_param + (1 / (self.g_param @ self.prvs_alpha_param)) @ self.g_param
        phi_alpha = phi_tag @ (self.alpha_param - self.prvs_alpha_param)
        g_alpha = self.g_param @ self.alpha_param
        cons = [-cp.log(self.alpha_param[i] * self.norm_param) - cp.log(g_alpha[i]) <= 0 for i in range(n_tasks)]
        self.prob = cp.Problem(cp.Minimize(cp.sum(g_alpha) + phi_alpha / self.norm_param), cons)

    def _stop(self, gtg, alpha_t):
        return (self.alpha_param.value is None
                or np.linalg.norm(gtg @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                or np.linalg.norm(self.alpha_param.value - self.prvs_alpha_param.value) < 1e-6)

    def _solve(self, gtg):
        import cvxpy as cp

        self.g_param.value = gtg
        self.norm_param.value = self.normalization
        alpha_t = self.prvs_alpha
        for _ in range(self.niter):
            self.alpha_param.value = alpha_t
            self.prvs_alpha_param.value = alpha_t
            try:
                self.prob.solve(solver=cp.CLARABEL, warm_start=True)
            except Exception:  # the official bare except (line 144)
                self.alpha_param.value = self.prvs_alpha_param.value
            if self._stop(gtg, alpha_t):
                break
            alpha_t = self.alpha_param.value
        if alpha_t is not None:
            self.prvs_alpha = alpha_t
        return self.prvs_alpha

    def backward(self, losses, shared):
        if self.step % self.every == 0:
            grads = _task_grads(losses, shared)
            gtg = grads @ grads.T
            self.normalization = torch.linalg.matrix_norm(gtg).numpy().reshape((1,))
            alpha = torch.from_numpy(self._solve((gtg / float(self.normalization[0])).numpy()))
        else:
            alpha = torch.from_numpy(self.prvs_alpha)
        self.step += 1
        sum(losses[i] * alpha[i] for i in range(self.k)).backward()
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(shared, self.max_norm)
        return alpha


@pytest.mark.filterwarnings("ignore::UserWarning")  # cvxpy: the official problem is not DPP
@pytest.mark.parametrize(("k", "every", "max_norm"), [(3, 1, 1.0), (3, 2, 0.05), (2, 1, 1.0)])
def test_nash_mtl_matches_a_port_of_the_official_class(k, every, max_norm):
    """Same model, data and 3 SGD steps (with ``every=2`` the second reuses the weights, clipped
    anew): the official class (ECOS -> CLARABEL) and gradbalance's NashMTL give the same weights,
    gradients and parameters: the weights to rtol 1e-6, the tensors to rtol 1e-5 / atol 1e-7
    (entries up to ~0.5; measured: 1e-7 apart in norm, up to 4e-8 on an entry). The two stop
    their convex-concave iterations at different points (gradbalance starts from ``1/|g_i|``
    where the official code starts from ones, its stopping tests differ, and its convex
    subproblem weighs the two objective terms differently), both at ``a_i (M a)_i = 1`` within
    ~1e-7; the weights measured 3e-8 apart, and the parameters drift apart at that level.
    With 2 tasks gradbalance uses its closed form instead of the iterations."""
    from gradbalance.methods import NashMTL

    trunk_a, heads_a = _mlp(k, 7)
    trunk_b, heads_b = _mlp(k, 7)
    x, y = _data(k, 8)
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    official = _OfficialNashMTL(k, max_norm=max_norm, update_weights_every=every)
    opt_a = torch.optim.SGD(params_a, lr=0.1)
    opt_b = gb.GradBalance(torch.optim.SGD(params_b, lr=0.1), NashMTL(update_every=every, max_norm=max_norm),
                           shared_params=trunk_b)
    clips = []
    for _ in range(3):
        opt_a.zero_grad()
        alpha = official.backward(_head_losses(trunk_a, heads_a, x, y), list(trunk_a.parameters()))
        opt_b.zero_grad()
        info = opt_b.backward(_head_losses(trunk_b, heads_b, x, y))
        clips.append(info.extras["clip"])
        torch.testing.assert_close(info.weights / info.extras["clip"], alpha.to(D), rtol=1e-6, atol=0)
        _assert_same([p.grad for p in params_a], [p.grad for p in params_b], rtol=1e-5, atol=1e-7, what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(params_a, params_b, rtol=1e-5, atol=1e-7)
    if max_norm < 1:
        assert max(clips) < 1.0  # the clip acted on every step


# ---------------------------------------------------------------------------------------- DWA
def _official_dwa_weights(avg_cost: np.ndarray, index: int, temp: float) -> np.ndarray:
    """lorenmt/mtan ``im2im_pred/utils.py``, ``multi_task_trainer`` (lines 138-147): weights 1 in
    epochs 0 and 1, then ``w_i = avg_cost[index-1, i] / avg_cost[index-2, i]`` and
    ``lambda_i = K exp(w_i / T) / sum_j exp(w_j / T)`` (K = 3 there); ``avg_cost`` is float32,
    the epoch's mean training loss (line 181: ``+= cost / train_batch``)."""
    k = avg_cost.shape[1]
    if index in (0, 1):
        return np.ones(k)
    w = avg_cost[index - 1] / avg_cost[index - 2]
    return k * np.exp(w / temp) / np.exp(w / temp).sum()


def test_dwa_matches_the_official_mtan_trainer():
    """5 epochs of 3 batches: the official trainer (``sum_i lambda_i L_i``, lines 165-166, then
    the epoch's mean losses) and gradbalance's DWA with ``epoch_end()`` after each epoch give the
    same weights and parameters. rtol 1e-5: the official average is kept in float32."""
    from gradbalance.methods import DWA

    k, epochs, batches = 3, 5, 3
    trunk_a, heads_a = _mlp(k, 9)
    trunk_b, heads_b = _mlp(k, 9)
    data = [_data(k, 20 + b) for b in range(batches)]
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_a = torch.optim.SGD(params_a, lr=0.05)
    opt_b = gb.GradBalance(torch.optim.SGD(params_b, lr=0.05), DWA(temperature=2.0), shared_params=trunk_b)
    avg_cost = np.zeros((epochs, k), dtype=np.float32)
    spread = 0.0
    for index in range(epochs):
        lam = _official_dwa_weights(avg_cost, index, 2.0)
        for x, y in data:
            opt_a.zero_grad()
            losses = _head_losses(trunk_a, heads_a, x, y)
            sum(float(lam[i]) * losses[i] for i in range(k)).backward()
            opt_a.step()
            avg_cost[index] += np.array([v.detach().item() for v in losses], dtype=np.float32) / batches
            opt_b.zero_grad()
            info = opt_b.backward(_head_losses(trunk_b, heads_b, x, y))
            opt_b.step()
            torch.testing.assert_close(info.weights, torch.from_numpy(lam).to(D), rtol=1e-5, atol=0)
            _assert_same(params_a, params_b, rtol=1e-5, atol=1e-8)
        opt_b.method.epoch_end()
        spread = max(spread, float(lam.max() - lam.min()))
    assert spread > 1e-3  # the weights moved away from 1


# ---------------------------------------------------------------------------- torchjd 0.18
def _grams():
    """Task-gradient matrices with conflicts: full row rank (k = 2..5, P = 9) at three scales,
    and one with more tasks than dimensions (k = 4, P = 3: rank-deficient Gram)."""
    out = []
    gen = torch.Generator().manual_seed(11)
    for k, p, scale in [(2, 9, 1.0), (3, 9, 1e-3), (4, 9, 1.0), (5, 9, 1e3), (4, 3, 1.0)]:
        g = torch.randn(k, p, generator=gen, dtype=D)
        g[1] = -0.8 * g[0] + 0.4 * g[1]  # a strong conflict
        out.append(g * scale)
    return out


def _gb_weights(method, g: torch.Tensor) -> torch.Tensor:
    from gradbalance.methods import TaskInputs

    return method.aggregate(TaskInputs(losses=torch.ones(g.shape[0], dtype=D), gram=g @ g.T)).weights


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_dual_cone_methods_match_torchjd(name):
    """torchjd 0.18 ``UPGradWeighting`` / ``DualProjWeighting`` (``aggregation/_upgrad.py``
    lines 35-38, ``_dualproj.py`` lines 34-37) project with quadprog on the Gram matrix
    normalised by its trace plus ``1e-4 I`` (``_linalg/_dual_cone.py`` lines 107-124); that is
    gradbalance's ``reg=1e-4``. Without the regulariser (quadprog's ``reg_eps=0``, full-rank
    cases only) it is gradbalance's exact default. torchjd also replaces a Gram matrix of trace
    below ``norm_eps = 1e-4`` by zero (``_linalg/_gramian.py`` lines 64-68: an absolute
    threshold, so gradients of total squared norm below 1e-4 are not projected at all);
    gradbalance is scale-invariant, so the comparison sets ``norm_eps=0`` and the default's
    behaviour is checked on the small-scale case separately."""
    tj = pytest.importorskip("torchjd.aggregation")
    pytest.importorskip("quadprog")
    from torchjd._linalg import QuadprogProjector

    from gradbalance.methods import DualProj, UPGrad

    ours_cls, theirs_cls = {"upgrad": (UPGrad, tj.UPGradWeighting), "dualproj": (DualProj, tj.DualProjWeighting)}[name]
    for g in _grams():
        m = g @ g.T
        theirs = theirs_cls(projector=QuadprogProjector(norm_eps=0.0))(m)
        torch.testing.assert_close(_gb_weights(ours_cls(reg=1e-4), g), theirs, rtol=1e-6, atol=1e-9)
        if float(m.trace()) >= 1e-4:
            torch.testing.assert_close(theirs_cls()(m), theirs, rtol=1e-12, atol=1e-15)
        else:  # torchjd's default does not project: the plain mean / u
            torch.testing.assert_close(theirs_cls()(m), torch.full_like(theirs, 1 / len(theirs)))
            assert (theirs - 1 / len(theirs)).abs().max() > 1e-2  # while the projection moves it
        if g.shape[0] <= g.shape[1]:
            exact = theirs_cls(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))(m)
            torch.testing.assert_close(_gb_weights(ours_cls(), g), exact, rtol=1e-6, atol=1e-9)


def test_mgda_matches_torchjd_where_its_frank_wolfe_is_exact_and_is_never_worse():
    """torchjd 0.18 ``MGDAWeighting`` (``aggregation/_mgda.py`` lines 24-50): Frank-Wolfe from
    ``1/k`` with the two-vector line search, stopping when the step ``gamma < epsilon`` (1e-3)
    or after 100 iterations. With 2 tasks the first line search is exact, so the weights agree
    to rounding. With more, Frank-Wolfe stops early: its ``|d|^2`` is above gradbalance's exact
    min-norm value (measured +2%, +32%, +44%, +42% on the k = 3, 4, 5 and rank-deficient cases)
    and comes down towards it with more iterations, never below it."""
    tj = pytest.importorskip("torchjd.aggregation")
    from gradbalance.methods import MGDA

    for g in _grams():
        m = g @ g.T
        ours = _gb_weights(MGDA(), g)
        value = float(ours @ m @ ours)
        if g.shape[0] == 2:
            torch.testing.assert_close(ours, tj.MGDAWeighting()(m), rtol=1e-10, atol=1e-12)
            continue
        gaps = []
        for iters in (100, 1000):
            theirs = tj.MGDAWeighting(epsilon=1e-12, max_iters=iters)(m)
            gaps.append(float(theirs @ m @ theirs) / value - 1)
        assert 0 < gaps[1] < gaps[0]


def test_imtl_g_matches_torchjd():
    """torchjd 0.18 ``IMTLGWeighting`` (``aggregation/_imtl_g.py`` lines 18-25):
    ``v = pinv(M) sqrt(diag M)``, weights ``v / sum v``. gradbalance's eq.-9 form gives the same
    weights where the gradients are independent; with more tasks than dimensions the two
    generalisations differ (not compared)."""
    tj = pytest.importorskip("torchjd.aggregation")
    from gradbalance.methods import IMTLG

    for g in _grams():
        if g.shape[0] <= g.shape[1]:
            torch.testing.assert_close(_gb_weights(IMTLG(), g), tj.IMTLGWeighting()(g @ g.T), rtol=1e-8, atol=1e-12)


def test_cagrad_matches_torchjd():
    """torchjd 0.18 ``CAGradWeighting`` (``aggregation/_cagrad.py`` lines 46-73): the same dual on
    the trace-normalised Gram matrix, solved by cvxpy/CLARABEL, weights ``1/k + (c|g0| / |g_w|) w``
    with no rescale: gradbalance's ``CAGrad(c, rescale=0)``. rtol 1e-4: two solvers (CLARABEL's
    interior point vs SLSQP at ftol 1e-12; measured up to 4.3e-5 apart at c = 1), and
    gradbalance's dual objective is not above torchjd's. ``norm_eps=0``: torchjd's default
    ``1e-4`` zeroes a Gram matrix of trace below 1e-4 and then returns ZERO weights (lines 47, 64-69),
    checked on the small-scale case."""
    tj = pytest.importorskip("torchjd.aggregation")
    from gradbalance.methods import CAGrad

    def dual(weights, m, c):  # the CAGrad dual objective at the w behind the weights
        k = len(weights)
        lam = float(weights.sum()) - 1.0
        w = (weights - 1.0 / k) / lam
        g0_sq = float(m.sum()) / k**2
        return float(w @ m @ torch.full((k,), 1.0 / k, dtype=D)) + c * g0_sq**0.5 * float(w @ m @ w) ** 0.5

    for c in (0.4, 1.0):
        for g in _grams():
            m = g @ g.T
            theirs = tj.CAGradWeighting(c=c, norm_eps=0.0)(m)
            ours = _gb_weights(CAGrad(c=c, rescale=0), g)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
            assert dual(ours, m, c) <= dual(theirs, m, c) + 1e-9 * abs(dual(theirs, m, c))
            if float(m.trace()) < 1e-4:
                assert not tj.CAGradWeighting(c=c)(m).any()


def test_pcgrad_matches_torchjd_with_the_same_permutations():
    """torchjd 0.18 ``PCGradWeighting`` (``aggregation/_pcgrad.py`` lines 20-47): for each task a
    ``torch.randperm(k)`` from the GLOBAL generator, the task itself skipped, projections on the
    original gradients, weights summed. gradbalance's orders are set to the same permutations."""
    tj = pytest.importorskip("torchjd.aggregation")

    for g in _grams():
        k = g.shape[0]
        torch.manual_seed(3)
        theirs = tj.PCGradWeighting()(g @ g.T)
        torch.manual_seed(3)
        perms = [[int(j) for j in torch.randperm(k) if int(j) != i] for i in range(k)]
        method = PCGrad()
        method.orders = lambda k, gen, perms=perms: perms
        torch.testing.assert_close(_gb_weights(method, g), theirs, rtol=1e-12, atol=1e-15)


def test_upgrad_training_matches_torchjd_mtl_backward():
    """End to end: torchjd's ``mtl_backward`` + ``jac_to_grad`` with ``UPGrad()`` (shared
    parameters get the aggregated Jacobian, heads their own gradient) and gradbalance's
    ``UPGrad(reg=1e-4)`` give the same gradients and parameters over 4 Adam steps."""
    pytest.importorskip("quadprog")
    tj = pytest.importorskip("torchjd.aggregation")
    autojac = pytest.importorskip("torchjd.autojac")
    from gradbalance.methods import UPGrad

    k = 3
    trunk_a, heads_a = _mlp(k, 12)
    trunk_b, heads_b = _mlp(k, 12)
    x, y = _data(k, 13)
    y[:, 1] = -y[:, 0]
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_a = torch.optim.Adam(params_a, lr=0.01)
    opt_b = gb.GradBalance(torch.optim.Adam(params_b, lr=0.01), UPGrad(reg=1e-4), shared_params=trunk_b)
    for _ in range(4):
        opt_a.zero_grad()
        z = trunk_a(x)
        losses = [((h(z).squeeze(-1) - y[:, i]) ** 2).mean() * (1.0, 3.0, 0.5)[i] for i, h in enumerate(heads_a)]
        autojac.mtl_backward(losses, features=z)
        autojac.jac_to_grad(list(trunk_a.parameters()), tj.UPGrad())
        opt_b.zero_grad()
        info = opt_b.backward(_head_losses(trunk_b, heads_b, x, y))
        _assert_same([p.grad for p in params_a], [p.grad for p in params_b], rtol=1e-6, atol=1e-10, what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(params_a, params_b, rtol=1e-6, atol=1e-10)
    assert not torch.allclose(info.weights, torch.ones(k, dtype=D))  # the projection acted


# ------------------------------------------------------------- LibMTL: GradVac, DB-MTL, IMTL
# median-research-group/LibMTL at 4336804. Its trainer (weighting/abstract_weighting.py,
# ``_compute_grad`` lines 37-55) backpropagates each task loss on its own, copies the shared
# gradients into a (k, P) matrix and clears them, so each head keeps its own task's gradient;
# ``_reset_grad`` (lines 67-74) then overwrites the shared gradients. ``_grad2vec`` (lines 26-35)
# fills a float32 buffer (the default dtype); the ports keep the model's float64.
def _libmtl_step(trunk, heads, losses, combine) -> None:
    shared, head_params = list(trunk.parameters()), list(heads.parameters())
    grads = _task_grads(losses, shared)
    _write(head_params, _task_grads(losses, head_params).sum(0))
    _write(shared, combine(grads))


def _official_gradvac(grads: torch.Tensor, rho_t: torch.Tensor, beta: float, orders, eps: float = 1e-8) -> torch.Tensor:
    """LibMTL ``weighting/GradVac.py`` ``backward`` (lines 45-77) with ``group_type=0``
    (whole model, one group): for each task, the other tasks in ``random.shuffle`` order
    (``orders`` replaces it), ``rho = cos(g_i^v, g_j)`` with ``+1e-8`` in the denominator
    (line 68); below the target ``rho_T`` the move of line 70 along the ORIGINAL ``g_j``; the
    target updated from the pre-move ``rho`` for every pair (line 73); the sum (line 74).
    ``rho_T`` is updated in place. ``eps`` is LibMTL's ``1e-8`` (0 to isolate the rule)."""
    pc = grads.clone()
    for i in range(grads.shape[0]):
        for j in orders[i]:
            rho = (pc[i] @ grads[j]) / (pc[i].norm() * grads[j].norm() + eps)
            target = rho_t[i, j].clone()
            if rho < target:
                w = pc[i].norm() * (target * (1 - rho**2).sqrt() - rho * (1 - target**2).sqrt()) / (
                    grads[j].norm() * (1 - target**2).sqrt() + eps)
                pc[i] = pc[i] + grads[j] * w
            rho_t[i, j] = (1 - beta) * target + beta * rho
    return pc.sum(0)


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_gradvac_matches_libmtl(eps):
    """5 SGD steps with LibMTL's ``beta = 0.5``, the same orders on both sides (gradbalance's
    documented ``randperm`` scheme from its seed): same gradients, parameters and targets.
    Without LibMTL's ``+1e-8`` (``eps=0``) to rounding (rtol 1e-9); with it, rtol 1e-5 /
    atol 1e-8 (measured: 2.9e-9 on the largest entry, gradients ~1e-2)."""
    from gradbalance.methods import GradVac

    rtol, atol = (1e-9, 1e-12) if eps == 0 else (1e-5, 1e-8)
    k, seed = 3, 4
    trunk_a, heads_a = _mlp(k, 15)
    trunk_b, heads_b = _mlp(k, 15)
    x, y = _data(k, 16)
    y[:, 1] = -y[:, 0] + 0.2 * y[:, 1]
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_a = torch.optim.SGD(params_a, lr=0.1)
    opt_b = gb.GradBalance(torch.optim.SGD(params_b, lr=0.1), GradVac(beta=0.5, seed=seed), shared_params=trunk_b)
    rho_t = torch.zeros(k, k, dtype=D)
    gen = torch.Generator().manual_seed(seed)
    corrections = 0
    for _ in range(5):
        orders = _pcgrad_orders(k, gen)
        opt_a.zero_grad()
        _libmtl_step(trunk_a, heads_a, _head_losses(trunk_a, heads_a, x, y),
                     lambda g, orders=orders: _official_gradvac(g, rho_t, 0.5, orders, eps))
        opt_b.zero_grad()
        info = opt_b.backward(_head_losses(trunk_b, heads_b, x, y))
        corrections += info.extras["corrections"]
        _assert_same([p.grad for p in params_a], [p.grad for p in params_b], rtol=rtol, atol=atol, what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(params_a, params_b, rtol=rtol, atol=atol)
    targets = opt_b.method.state_dict()["targets"]
    torch.testing.assert_close(targets, rho_t, rtol=rtol, atol=atol)
    assert corrections > 0


class _OfficialDBMTL:
    """LibMTL ``weighting/DB_MTL.py`` (lines 8-38): gradients of ``log(L_i + 1e-8)`` (line 28),
    ``buffer <- g + beta / t^sigma (buffer - g)`` from zeros (line 30), scales
    ``max |buffer_j| / (|buffer_i| + 1e-8)`` (lines 32-34), shared gradient
    ``sum_i alpha_i buffer_i`` (line 35). Heads: the gradient of their log loss. ``eps`` is
    LibMTL's ``1e-8`` (0 to isolate the rule)."""

    def __init__(self, beta, beta_sigma, eps=1e-8):
        self.beta, self.sigma, self.eps, self.step, self.buffer = beta, beta_sigma, eps, 0, None

    def __call__(self, trunk, heads, losses):
        self.step += 1
        logs = [torch.log(v + self.eps) for v in losses]

        def combine(g):
            buf = torch.zeros_like(g) if self.buffer is None else self.buffer
            self.buffer = g + (self.beta / self.step**self.sigma) * (buf - g)
            norms = self.buffer.norm(dim=-1)
            return ((norms.max() / (norms + self.eps))[:, None] * self.buffer).sum(0)

        _libmtl_step(trunk, heads, logs, combine)


@pytest.mark.parametrize(("beta_sigma", "eps"), [(0.0, 0.0), (0.5, 0.0), (0.0, 1e-8)])
def test_db_mtl_matches_libmtl(beta_sigma, eps):
    """4 Adam steps with LibMTL's ``DB_beta = 0.9`` and ``DB_beta_sigma`` 0 (default) or 0.5:
    same gradients and parameters. Without LibMTL's ``+1e-8`` (``eps=0``) to rounding; with it
    rtol 1e-5 / atol 1e-8 (the ``1e-8`` on a loss of ~0.05 and on the norms; measured 7e-9 on
    the largest entry)."""
    from gradbalance.methods import DBMTL

    rtol, atol = (1e-9, 1e-12) if eps == 0 else (1e-5, 1e-8)
    k = 3
    trunk_a, heads_a = _mlp(k, 17)
    trunk_b, heads_b = _mlp(k, 17)
    x, y = _data(k, 18)
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_a = torch.optim.Adam(params_a, lr=0.01)
    opt_b = gb.GradBalance(torch.optim.Adam(params_b, lr=0.01), DBMTL(beta=0.9, beta_sigma=beta_sigma),
                           shared_params=trunk_b)
    official = _OfficialDBMTL(0.9, beta_sigma, eps)
    scales = (1.0, 30.0, 0.05)
    for _ in range(4):
        opt_a.zero_grad()
        official(trunk_a, heads_a, _head_losses(trunk_a, heads_a, x, y, scales))
        opt_b.zero_grad()
        opt_b.backward(_head_losses(trunk_b, heads_b, x, y, scales))
        _assert_same([p.grad for p in params_a], [p.grad for p in params_b], rtol=rtol, atol=atol, what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(params_a, params_b, rtol=rtol, atol=atol)


def test_imtl_matches_libmtl():
    """LibMTL ``weighting/IMTL.py`` (lines 19-40): ``s`` a parameter (init 0) of the weighting
    module, trained by the network's optimizer; scaled losses ``e^s L - s`` (line 23), each
    backpropagated (so ``s`` gets ``e^s L - 1`` and each head ``e^{s_i}`` times its gradient);
    IMTL-G on the scaled gradients with ``torch.inverse`` (lines 28-34); shared gradient
    ``sum_i alpha_i e^{s_i} g_i`` (``_backward_new_grads``). With an Adam of lr 1e-3 for the
    network and ``s`` (LibMTL's setting) and gradbalance's ``IMTL()`` (its own Adam, lr 1e-3):
    same gradients, parameters and scales over 5 steps."""
    from gradbalance.methods import IMTL

    k = 3
    trunk_a, heads_a = _mlp(k, 19)
    trunk_b, heads_b = _mlp(k, 19)
    x, y = _data(k, 20)
    scales = (1.0, 5.0, 0.2)
    s = torch.zeros(k, dtype=D, requires_grad=True)
    params_a = list(trunk_a.parameters()) + list(heads_a.parameters())
    params_b = list(trunk_b.parameters()) + list(heads_b.parameters())
    opt_a = torch.optim.Adam(params_a + [s], lr=1e-3)
    opt_b = gb.GradBalance(torch.optim.Adam(params_b, lr=1e-3), IMTL(), shared_params=trunk_b)

    def imtl_g(g):
        unit = g / g.norm(dim=-1, keepdim=True)
        d_mat, u_mat = g[0:1] - g[1:], unit[0:1] - unit[1:]
        alpha = (g[0] @ u_mat.t()) @ torch.inverse(d_mat @ u_mat.t())
        alpha = torch.cat([(1 - alpha.sum()).unsqueeze(0), alpha])
        return (alpha[:, None] * g).sum(0)

    for _ in range(5):
        opt_a.zero_grad()
        losses = _head_losses(trunk_a, heads_a, x, y, scales)
        scaled = [s[i].exp() * v - s[i] for i, v in enumerate(losses)]
        s.grad = torch.stack([(s[i].exp() * v - 1).detach() for i, v in enumerate(losses)])
        _libmtl_step(trunk_a, heads_a, scaled, imtl_g)
        opt_b.zero_grad()
        opt_b.backward(_head_losses(trunk_b, heads_b, x, y, scales))
        _assert_same([p.grad for p in params_a], [p.grad for p in params_b], rtol=1e-7, atol=1e-10, what="grad")
        opt_a.step()
        opt_b.step()
        _assert_same(params_a, params_b, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(opt_b.method.s, s.detach(), rtol=1e-7, atol=1e-12)
    assert float(s.detach().abs().min()) > 1e-3  # the scales moved
