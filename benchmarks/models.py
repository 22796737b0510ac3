"""Networks of the real-data benchmarks: one shared trunk, one head per task.

Every model has ``.trunk`` (the shared parameters handed to ``GradBalance(shared_params=...)``)
and ``.heads`` (a ``ModuleList``); ``forward(x)`` returns ``(z, [head(z) for each head])`` so
that ``z`` can be passed as ``features=``.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiHead(nn.Module):
    """A shared ``trunk`` and task ``heads`` reading its output."""

    def __init__(self, trunk: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor):
        z = self.trunk(x)
        return z, [h(z) for h in self.heads]


def lenet(size: int = 28, features: int = 50, tasks: int = 2, classes: int = 10) -> MultiHead:
    """The MGDA paper's MultiMNIST network (Sener & Koltun 2018, MultiLeNetR/MultiLeNetO in their
    code): trunk conv 5x5 (10) - maxpool - ReLU - conv 5x5 (20) - maxpool - ReLU - FC (50) - ReLU;
    each head FC 50 - ReLU - FC 10. Their dropout layers are left out. On 28x28 inputs the FC
    layer reads 320 features, as theirs."""
    conv = nn.Sequential(nn.Conv2d(1, 10, 5), nn.MaxPool2d(2), nn.ReLU(),
                         nn.Conv2d(10, 20, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        flat = conv(torch.zeros(1, 1, size, size)).shape[1]
    trunk = nn.Sequential(conv, nn.Linear(flat, features), nn.ReLU())
    heads = [nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, classes))
             for _ in range(tasks)]
    return MultiHead(trunk, heads)


def mlp_mixed(inputs: int, width: int = 64, classes: int = 3) -> MultiHead:
    """Tabular trunk (2 hidden ReLU layers of ``width``) with a regression head (1 output), a
    binary head (1 logit) and a ``classes``-way head."""
    trunk = nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
    return MultiHead(trunk, [nn.Linear(width, 1), nn.Linear(width, 1), nn.Linear(width, classes)])


def cnn_mixed(channels: int = 3, width: int = 64, classes: int = 5) -> MultiHead:
    """Small image trunk for UTKFace (3 conv-BN-free blocks, global average pool, FC ``width``)
    with the same three heads as :func:`mlp_mixed` (age, gender, race)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    trunk = nn.Sequential(*block(channels, 16), *block(16, 32), *block(32, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, width), nn.ReLU())
    return MultiHead(trunk, [nn.Linear(width, 1), nn.Linear(width, 1), nn.Linear(width, classes)])
