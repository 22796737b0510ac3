"""A tiny LightningModule trained with gradbalance equals the plain gradbalance loop."""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")  # an optional dependency: skip when absent

import gradbalance as gb  # noqa: E402
from gradbalance.integrations.lightning import balance_backward, find_gradbalance  # noqa: E402
from tests.helpers import MultiTaskNet, make_batch, task_losses  # noqa: E402


class TwoTask(L.LightningModule):
    def __init__(self, method: str, clip: float | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.net = MultiTaskNet(2)
        self.method = method
        self.clip = clip
        self.infos = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        z, losses = task_losses(self.net, x, y)
        self.infos.append(balance_backward(self, losses, features=z))
        if self.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()

    def configure_optimizers(self):
        return gb.GradBalance(torch.optim.SGD(self.net.parameters(), lr=0.1), self.method,
                              shared_params=self.net.trunk)


def _loader(n_batches=4):
    data = [make_batch(2, n=8, seed=s) for s in range(n_batches)]
    return data


def _plain(method, data, clip=None):
    net = MultiTaskNet(2)
    opt = gb.GradBalance(torch.optim.SGD(net.parameters(), lr=0.1), method, shared_params=net.trunk)
    for x, y in data:
        opt.zero_grad()
        z, losses = task_losses(net, x, y)
        opt.backward(losses, features=z)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return net


@pytest.mark.parametrize("clip", [None, 0.05])
def test_lightning_manual_optimisation_matches_plain_loop(clip):
    data = _loader()
    module = TwoTask("mean", clip=clip)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert len(module.infos) == len(data)
    reference = _plain("mean", data, clip)
    for a, b in zip(module.net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_automatic_optimisation_is_refused():
    module = TwoTask("mean")
    module.automatic_optimization = True
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        balance_backward(module, [torch.ones(1, requires_grad=True)])


def test_find_gradbalance_errors():
    with pytest.raises(TypeError, match="no GradBalance"):
        find_gradbalance(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))


def _plain_bf16(method, data):
    """The plain loop with the forward under CPU bf16 autocast, balanced outside it."""
    net = MultiTaskNet(2)
    opt = gb.GradBalance(torch.optim.SGD(net.parameters(), lr=0.1), method, shared_params=net.trunk)
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, losses = task_losses(net, x, y)
        opt.backward(losses, features=z)
        opt.step()
    return net


@pytest.mark.parametrize("method", ["mgda", "pcgrad", "upgrad"])
def test_lightning_bf16_mixed(method):
    # issue 16: precision="bf16-mixed" runs training_step, and so opt.backward, inside autocast;
    # exact-path methods failed with "assign a gradient with dtype BFloat16".
    data = _loader(n_batches=2)
    module = TwoTask(method)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert len(module.infos) == len(data) and all(i.weights is not None for i in module.infos)
    reference = _plain_bf16(method, data)
    for a, b in zip(module.net.parameters(), reference.parameters()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
