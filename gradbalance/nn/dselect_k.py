"""DSelect-k: differentiable selection of k experts by smooth-step binary encodings."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from gradbalance.nn.mmoe import MMoE, expert_list

__all__ = ["DSelectK", "DSelectKGate", "smooth_step"]

EPS = 1e-6  # inside the entropy's log, so that a saturated selector (exact zeros) has a finite gradient


def _check_gamma(gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    return float(gamma)


def smooth_step(t: Tensor, gamma: float = 1.0) -> Tensor:
    """The cubic smooth-step function of DSelect-k (Hazimeh et al. 2021).

    $$ S(t) = \\begin{cases} 0 & t \\le -\\gamma/2 \\\\
       -\\frac{2}{\\gamma^3} t^3 + \\frac{3}{2\\gamma} t + \\frac12 & -\\gamma/2 \\le t \\le \\gamma/2 \\\\
       1 & t \\ge \\gamma/2 \\end{cases} $$

    Continuously differentiable (the cubic meets 0 and 1 with zero slope), and exactly 0 or 1
    outside ``[-gamma/2, gamma/2]``: this is what lets the gates reach exact zeros in training.

    Args:
        t: any tensor.
        gamma: the width of the transition, > 0 (default 1.0).

    Example:
        >>> import torch
        >>> from gradbalance.nn import smooth_step
        >>> smooth_step(torch.tensor([-1.0, -0.25, 0.0, 0.25, 1.0]))
        tensor([0.0000, 0.1562, 0.5000, 0.8438, 1.0000])
    """
    gamma = _check_gamma(gamma)
    cubic = -2.0 / gamma**3 * t.pow(3) + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectKGate(nn.Module):
    """One DSelect-k gate: a distribution over n experts that becomes k-sparse in training.

    With ``m = ceil(log2 n)`` and ``k`` single-expert selectors ``z^(1..k)`` in ``R^m``, the
    selector ``i`` gives expert ``e`` (binary code ``b(e)`` of ``e``) the weight

    $$ r(z)_e = \\prod_{j=1}^{m} \\big(S(z_j)\\big)^{b(e)_j} \\big(1 - S(z_j)\\big)^{1 - b(e)_j}, $$

    and the gate combines the selectors with softmax weights ``alpha``:

    $$ q = \\sum_{i=1}^{k} \\operatorname{softmax}(\\alpha)_i\\, r(z^{(i)}). $$

    Once every ``|z^(i)_j| >= gamma/2``, each ``r(z^(i))`` is one-hot and ``q`` has at most k
    nonzero entries. The entropy regulariser ``sum_i h(r(z^(i)))`` (:meth:`entropy`; the paper's
    ``lambda`` is the weight you give it) pushes the selectors there.

    *Static* gate (``in_features=None``): ``z`` and ``alpha`` are parameters, one gate for all
    examples. *Per-example* gate (``in_features=d``): ``z^(i) = Z^(i) x`` and
    ``alpha = A x`` are affine in the flat input ``x`` (the form the paper uses for multi-task
    learning). Initialisation as in LibMTL's port of the authors' code: ``z`` (or the
    weight and bias of ``Z``) uniform in ``[-gamma/100, gamma/100]``, so that every selector
    starts in the smooth region, near uniform; ``alpha`` (or ``A``) uniform in ``[-0.05, 0.05]``.

    When n is not a power of 2, only the first n of the ``2^m`` codes are experts: the weights
    then sum to at most 1, and :meth:`regularization` adds the term of that code
    ``sum_i 1 / sum_e r(z^(i))_e``, which keeps a selector from moving all its weight to a code
    with no expert. With n a power of 2 they sum to exactly 1.

    Args:
        num_experts: n >= 1.
        k: the number of selectors (the most experts the gate ends up using), 1 <= k.
        gamma: the smooth-step width (default 1.0, the authors' default).
        in_features: flat input size for a per-example gate; ``None`` (default) for a static gate.

    Example:
        >>> import torch
        >>> from gradbalance.nn import DSelectKGate
        >>> gate = DSelectKGate(num_experts=8, k=2)
        >>> w = gate()  # static: one distribution over the 8 experts
        >>> bool(torch.isclose(w.sum(), torch.tensor(1.0)))
        True
    """

    codes: Tensor

    def __init__(self, num_experts: int, k: int, gamma: float = 1.0, in_features: int | None = None) -> None:
        super().__init__()
        for what, v in (("num_experts", num_experts), ("k", k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be a positive int, got {v!r}")
        if in_features is not None and (isinstance(in_features, bool) or not isinstance(in_features, int)
                                        or in_features < 1):
            raise ValueError(f"in_features must be None or a positive int, got {in_features!r}")
        self.num_experts, self.k, self.gamma, self.in_features = num_experts, k, _check_gamma(gamma), in_features
        self.num_binary = max(1, math.ceil(math.log2(num_experts)))
        codes = torch.tensor([[(e >> j) & 1 for j in range(self.num_binary)] for e in range(num_experts)])
        self.register_buffer("codes", codes.bool(), persistent=False)  # (n, m): b(e)_j
        m = self.num_binary
        if in_features is None:
            self.z = nn.Parameter(torch.empty(k, m).uniform_(-self.gamma / 100, self.gamma / 100))
            self.alpha = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
        else:
            self.z_layer = nn.Linear(in_features, k * m)
            self.alpha_layer = nn.Linear(in_features, k)
            with torch.no_grad():
                for p in self.z_layer.parameters():
                    p.uniform_(-self.gamma / 100, self.gamma / 100)
                for p in self.alpha_layer.parameters():
                    p.uniform_(-0.05, 0.05)

    @property
    def power_of_2(self) -> bool:
        return self.num_experts == 2**self.num_binary

    def _logits(self, x: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(z, alpha)`` of shapes ``(B, k, m)`` and ``(B, k)``; ``B = 1`` for a static gate."""
        if self.in_features is None:
            return self.z.unsqueeze(0), self.alpha.unsqueeze(0)
        if x is None:
            raise ValueError("a per-example gate (in_features given) needs the input x")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(f"the gate expects {self.in_features} input features, got {flat.shape[1]}")
        return self.z_layer(flat).reshape(-1, self.k, self.num_binary), self.alpha_layer(flat)

    def selectors(self, x: Tensor | None = None) -> Tensor:
        """``r(z^(i))`` for every selector: ``(B, k, n)``, each row over the n experts."""
        z, _ = self._logits(x)
        s = smooth_step(z, self.gamma).unsqueeze(-2)  # (B, k, 1, m)
        return torch.where(self.codes, s, 1 - s).prod(-1)

    def forward(self, x: Tensor | None = None) -> Tensor:
        """The gate weights ``q``: ``(n,)`` for a static gate, ``(N, n)`` per example."""
        z, alpha = self._logits(x)
        s = smooth_step(z, self.gamma).unsqueeze(-2)
        r = torch.where(self.codes, s, 1 - s).prod(-1)  # (B, k, n)
        q = (torch.softmax(alpha, dim=-1).unsqueeze(-1) * r).sum(-2)
        return q[0] if self.in_features is None else q

    def entropy(self, x: Tensor | None = None) -> Tensor:
        """``sum_i h(r(z^(i)))``, averaged over the examples of a per-example gate (the paper's
        regulariser without its weight ``lambda``)."""
        r = self.selectors(x)
        return -(r * torch.log(r + EPS)).sum(-1).sum(-1).mean()

    def regularization(self, x: Tensor | None = None, entropy_weight: float = 0.0) -> Tensor:
        """``entropy_weight * entropy(x)`` plus, when n is not a power of 2, the reachability
        term ``sum_i 1 / sum_e r(z^(i))_e`` (averaged over examples)."""
        if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float)) \
                or not math.isfinite(entropy_weight) or entropy_weight < 0:
            raise ValueError(f"entropy_weight must be a finite number >= 0, got {entropy_weight!r}")
        total = self.entropy(x) * float(entropy_weight)
        if not self.power_of_2:
            total = total + (1 / self.selectors(x).sum(-1)).sum(-1).mean()
        return total

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, gamma={self.gamma}, in_features={self.in_features}"


class DSelectK(MMoE):
    """Multi-task mixture of experts with DSelect-k gates: MMoE whose softmax gates are replaced
    by k-sparse differentiable selectors (one :class:`DSelectKGate` per task).

    With shared experts ``f_1 .. f_n`` and, for task t, gate weights ``q_t(x)`` and tower ``h_t``:

    $$ y_t = h_t\\Big(\\sum_{e=1}^{n} q_t(x)_e\\, f_e(x)\\Big), $$

    where ``q_t`` becomes k-sparse during training (see :class:`DSelectKGate`). The experts are
    the shared parameters; each task's gate and tower are its own. Every expert still runs in the
    forward (no sparse dispatch): the sparsity is in the gate weights.

    The regulariser is not a task: call ``model.regularization(x, entropy_weight).backward()``
    after ``opt.backward(losses)`` and before ``opt.step()``, so the balancing method neither
    weights it nor counts it among the task losses (it only reaches the gates, which are task
    parameters, so it does not change what the method balances on the experts).

    ``forward(x, return_features=True)`` also returns the stacked expert outputs ``(N, n, d)``:
    the gates read ``x`` directly and are task parameters, so every path from the experts to the
    losses goes through that tensor (as for :class:`~gradbalance.nn.MMoE`).

    Args:
        experts: n >= 1 modules with outputs of one shape ``(N, d)``.
        towers: ``{task: module}`` or a list (tasks ``task0``, ...), each reading a mixture.
        k: selectors per gate (default 2); 1 <= k.
        gamma: smooth-step width (default 1.0).
        in_features: flat input size of per-example gates (the paper's multi-task form);
            ``None`` (default) for static gates (one set of weights per task).

    Example:
        >>> import torch, gradbalance as gb
        >>> from gradbalance.nn import DSelectK
        >>> model = DSelectK([torch.nn.Linear(4, 8) for _ in range(4)],
        ...                  {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 1)}, k=2, in_features=4)
        >>> opt = gb.GradBalance(torch.optim.Adam(model.parameters()), "mean", shared_params=model)
        >>> x = torch.randn(5, 4)
        >>> info = opt.backward({t: o.pow(2).mean() for t, o in model(x).items()})
        >>> model.regularization(x, entropy_weight=0.1).backward()
        >>> opt.step()
        >>> model.gate_weights(x)["a"].shape
        torch.Size([5, 4])

    References:
        Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong, Chi. "DSelect-k:
        Differentiable Selection in the Mixture of Experts with Applications to Multi-Task
        Learning", NeurIPS 2021.
    """

    def __init__(self, experts: Sequence[nn.Module], towers: Any, k: int = 2, gamma: float = 1.0,
                 in_features: int | None = None) -> None:
        experts = expert_list(experts)
        n_tasks = len(towers)
        super().__init__(experts, towers, gates=[DSelectKGate(len(experts), k, gamma, in_features)
                                                 for _ in range(n_tasks)])

    def gate_weights(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: (N, n)}`` gate weights (a static gate's ``(n,)`` is repeated over the batch)."""
        out = {}
        for t, g in self.gates.items():
            w = g(x)
            out[t] = w.expand(x.shape[0], -1) if w.ndim == 1 else w
        return out

    def regularization(self, x: Tensor | None = None, entropy_weight: float = 0.0) -> Tensor:
        """The sum over tasks of :meth:`DSelectKGate.regularization` (the entropy regulariser
        times ``entropy_weight``, plus the reachability term when n is not a power of 2)."""
        terms = [cast(DSelectKGate, g).regularization(x, entropy_weight) for g in self.gates.values()]
        return torch.stack(terms).sum()
