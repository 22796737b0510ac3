"""The Hugging Face Trainer recipe trains exactly like the plain gradbalance loop."""

from __future__ import annotations

import pytest
import torch

TrainingArguments = pytest.importorskip("transformers").TrainingArguments  # optional: skip when absent

import gradbalance as gb  # noqa: E402
from gradbalance.integrations.transformers import GradBalanceTrainer  # noqa: E402
from tests.helpers import MultiTaskNet, make_batch, task_losses  # noqa: E402


class DictModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = MultiTaskNet(2)

    def forward(self, x, y):
        z, losses = task_losses(self.net, x, y)
        return {"losses": {"a": losses[0], "b": losses[1]}, "features": z}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def test_trainer_matches_plain_loop(tmp_path):
    x, y = make_batch(2, n=16)
    model = DictModel()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=3, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
    )
    trainer = GradBalanceTrainer(model=model, args=args, train_dataset=Rows(x, y),
                                 gradbalance_method="sum", shared_params=model.net.trunk)
    trainer.train()
    assert isinstance(trainer.gradbalance_info, gb.StepInfo)
    assert trainer.gradbalance_info.task_names == ("a", "b")

    ref = MultiTaskNet(2)
    opt = gb.GradBalance(torch.optim.SGD(ref.parameters(), lr=0.1), "sum", shared_params=ref.trunk)
    for _ in range(3):
        opt.zero_grad()
        _, losses = task_losses(ref, x, y)
        opt.backward(losses)
        opt.step()
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
