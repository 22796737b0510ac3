"""The Hugging Face Trainer recipe trains exactly like the plain gradbalance loop."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # an optional dependency: skip when absent
Trainer, TrainingArguments = transformers.Trainer, transformers.TrainingArguments

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


class SumModel(torch.nn.Module):
    """The plain Trainer's reference: the same network, returning the summed loss."""

    def __init__(self):
        super().__init__()
        self.net = MultiTaskNet(2)

    def forward(self, x, y):
        _, losses = task_losses(self.net, x, y)
        return {"loss": losses[0] + losses[1]}


def test_partial_accumulation_window_scaled_like_the_plain_trainer(tmp_path):
    """5 batches, windows of 2: the last window holds one batch, which Trainer divides by 1, not 2."""
    x, y = make_batch(2, n=20)
    args = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_train_epochs=1, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=3,
    )
    ours = DictModel()
    plain = SumModel()
    plain.load_state_dict(ours.state_dict())
    trainer = GradBalanceTrainer(model=ours, args=TrainingArguments(**args), train_dataset=Rows(x, y),
                                 gradbalance_method="sum", shared_params=ours.net.trunk)
    out = trainer.train()
    ref = Trainer(model=plain, args=TrainingArguments(**args), train_dataset=Rows(x, y))
    ref_out = ref.train()
    assert out.global_step == ref_out.global_step == 3
    assert abs(out.training_loss - ref_out.training_loss) < 1e-5 * abs(ref_out.training_loss)
    for a, b in zip(ours.net.parameters(), plain.net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
