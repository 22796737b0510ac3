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


def test_partial_last_window_is_scaled_like_trainer(tmp_path):
    # 5 batches, gradient_accumulation_steps=2: windows of 2, 2 and 1 batches. Trainer divides the
    # last one by 1, not 2 (issue 16: dividing by args.gradient_accumulation_steps halved it).
    x, y = make_batch(2, n=1)
    rows = Rows(x.expand(20, -1).clone(), y.expand(20, -1).clone())  # every batch the same
    model = DictModel()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=0.1,
        gradient_accumulation_steps=2, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True,
    )
    trainer = GradBalanceTrainer(model=model, args=args, train_dataset=rows, gradbalance_method="sum",
                                 shared_params=model.net.trunk)
    trainer.train()
    assert trainer.state.global_step == 3

    ref = MultiTaskNet(2)
    opt = gb.GradBalance(torch.optim.SGD(ref.parameters(), lr=0.1), "sum", shared_params=ref.trunk)
    xb, yb = x.expand(4, -1), y.expand(4, -1)
    for window in (2, 2, 1):
        opt.zero_grad()
        for _ in range(window):
            _, losses = task_losses(ref, xb, yb)
            opt.backward([loss / window for loss in losses])
        opt.step()
    for a, b in zip(model.net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
