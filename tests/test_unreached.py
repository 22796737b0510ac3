"""A shared parameter that no loss reaches gets no gradient, as under a plain ``loss.backward()``.

An optimizer skips a parameter whose ``.grad`` is ``None`` (no weight decay, no momentum step), so
writing zeros there would move it where plain PyTorch does not. Every engine (loop, batched, gram,
representation, the loss-weighting path) leaves it alone, and an accumulation window writes it as
soon as one of its calls reaches it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradbalance as gb


class Branchy(nn.Module):
    """Trunk ``a`` always used; ``b`` (also shared) only when ``use_b``: e.g. a deep-supervision
    or conditional block, or the unused ``fc`` of a backbone passed as ``shared_params``."""

    def __init__(self, k: int = 2) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(k))

    def forward(self, x: torch.Tensor, use_b: bool):
        z = torch.tanh(self.a(x))
        if use_b:
            z = z + torch.tanh(self.b(z))
        return z, [h(z).pow(2).mean() for h in self.heads]

    def shared(self) -> list[nn.Parameter]:
        return [*self.a.parameters(), *self.b.parameters()]


CASES = [("mgda", "loop"), ("mgda", "batched"), ("mgda", "gram"), ("pcgrad", "loop"), ("upgrad", "batched"),
         ("mean", "loop"), (gb.methods.MGDA(mode="representation"), "loop")]


@pytest.mark.parametrize("method,engine", CASES, ids=lambda c: c if isinstance(c, str) else "mgda-ub")
def test_unreached_shared_parameter_is_left_alone_and_not_decayed(method, engine):
    torch.manual_seed(0)
    model = Branchy()
    before = [p.detach().clone() for p in model.b.parameters()]
    inner = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    opt = gb.GradBalance(inner, method, shared_params=model.shared(), engine=engine)
    z, losses = model(torch.randn(8, 4), use_b=False)
    opt.backward(losses, features=z)
    assert model.b.weight.grad is None and model.b.bias.grad is None
    assert model.a.weight.grad is not None and model.a.weight.grad.abs().sum() > 0
    opt.step()
    for p, old in zip(model.b.parameters(), before):
        assert torch.equal(p, old)  # AdamW skipped it, as it does after a plain backward
        assert p not in inner.state


def test_plain_backward_agrees():
    """The reference: a plain summed backward leaves the unreached parameter's .grad None too."""
    model = Branchy()
    _, losses = model(torch.randn(8, 4), use_b=False)
    torch.stack(losses).sum().backward()
    assert model.b.weight.grad is None


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("b_in", [0, 1])
def test_window_writes_a_parameter_that_one_call_reaches(engine, b_in):
    """accumulation='exact': two calls (``b`` used by call ``b_in`` only) give the gradient of one
    call whose task losses are the sums, where ``b`` is reached."""
    torch.manual_seed(1)
    model = Branchy(k=3)
    xs = [torch.randn(8, 4), torch.randn(8, 4)]
    opt = gb.GradBalance(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", shared_params=model.shared(),
                         engine=engine)
    for i, x in enumerate(xs):
        _, losses = model(x, use_b=(i == b_in))
        opt.backward(losses)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert got["b.weight"].abs().sum() > 0
    opt.zero_grad()
    parts = [model(x, use_b=(i == b_in))[1] for i, x in enumerate(xs)]
    opt.backward([l0 + l1 for l0, l1 in zip(*parts)])
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5)
