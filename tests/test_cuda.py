"""The CUDA path gives the CPU path's weights and gradients (runs only where CUDA exists).

This file is skipped on machines without a GPU (CI has none); run it on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradbalance as gb
from tests.helpers import MultiTaskNet, make_batch, task_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

K = 4


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


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("name", sorted(gb.available_methods()))
def test_cuda_matches_cpu(name, engine):
    torch.backends.cuda.matmul.allow_tf32 = False
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
