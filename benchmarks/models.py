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


# ----------------------------------------------------------------------------------------------
# HydraNet: a ResNet trunk with one head per face attribute


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN plus the input (a 1x1
    conv-BN projection when the stride or the width changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet feature extractor: stem, stages of :class:`BasicBlock`, global average pool.

    The defaults are ResNet-18's layout (He et al. 2016, table 1: 7x7/2 conv 64 + 3x3/2 max
    pool, four stages of two blocks of widths 64-128-256-512, the first block of stages 2-4 with
    stride 2): the same parameters as torchvision's ``resnet18`` without its ``fc`` layer
    (11,176,512). ``stem="small"`` uses a 3x3/1 conv and no pooling instead, for small images.
    ``forward(x)`` returns ``(N, widths[-1])``; ``out_features`` is that width.
    """

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks: tuple[int, ...] = (2, 2, 2, 2),
                 in_channels: int = 3, stem: str = "imagenet") -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths and blocks must have the same positive length, got {widths} and {blocks}")
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        elif stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


def torchvision_resnet18() -> nn.Module | None:
    """torchvision's ResNet-18 (random initialisation, ``fc`` replaced by the identity, so it
    returns the 512 pooled features), or ``None`` when torchvision cannot be used.

    The except is broad on purpose: next to a torch build it was not compiled for, torchvision
    fails at import with a RuntimeError ("operator torchvision::nms does not exist"), an
    AttributeError or an OSError, not only an ImportError.
    """
    try:
        from torchvision.models import resnet18

        net = resnet18(weights=None)
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    net.fc = nn.Identity()
    return net


#: the three UTKFace attributes of HydraNet, in head order
HYDRA_TASKS = ("age", "gender", "race")


def hydranet(arch: str = "resnet18", races: int = 5) -> MultiHead:
    """HydraNet: a ResNet trunk and three linear heads: age (1 output, L1), gender (1 logit,
    BCE), race (``races`` logits, CE).

    ``arch="resnet18"``: torchvision's ResNet-18 when it can be imported, else :class:`ResNet`
    with the same layout; ``arch="small"``: a narrow ResNet for small images and CPUs
    (widths 16-32-64, one block per stage, 3x3 stem). The model's ``trunk_source`` says which.
    """
    if arch == "resnet18":
        trunk = torchvision_resnet18()
        source = "torchvision resnet18"
        if trunk is None:
            trunk, source = ResNet(), "benchmarks.models.ResNet (ResNet-18 layout; torchvision not importable)"
        width = 512
    elif arch == "small":
        trunk = ResNet(widths=(16, 32, 64), blocks=(1, 1, 1), stem="small")
        source, width = "benchmarks.models.ResNet (small: 16-32-64, one block per stage)", 64
    else:
        raise ValueError(f"arch must be 'resnet18' or 'small', got {arch!r}")
    model = MultiHead(trunk, [nn.Linear(width, 1), nn.Linear(width, 1), nn.Linear(width, races)])
    model.trunk_source = source  # type: ignore[assignment]
    return model
