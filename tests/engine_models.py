"""Small versions of the models users train, for the engine tests (CPU and CUDA).

Every builder returns ``(trunk, heads, batch)`` where ``trunk(x)`` gives the shared
representation ``z`` and ``losses(trunk, heads, batch)`` the ``k`` task losses and ``z``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.models import BasicBlock


def resnet_trunk(width: int = 8) -> nn.Module:
    """Stem conv-BN-ReLU-maxpool, two residual blocks (one strided), adaptive average pool."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def mlp_trunk(d_in: int = 12, width: int = 16) -> nn.Module:
    """Linear-GELU-LayerNorm-Linear-SiLU-LayerNorm (a transformer FFN / MLP-Mixer block)."""
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.LayerNorm(width),
                         nn.Linear(width, width), nn.SiLU(), nn.LayerNorm(width))


class TextTrunk(nn.Module):
    """Token + position embeddings, LayerNorm, a GELU projection, mean over tokens."""

    def __init__(self, vocab: int = 40, width: int = 16, length: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(length, width))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, tokens):
        h = self.norm(self.tok(tokens) + self.pos)
        return F.gelu(self.proj(h)).mean(dim=1)


class TransformerTrunk(nn.Module):
    """Embeddings and one ``nn.TransformerEncoderLayer`` (attention), mean over tokens."""

    def __init__(self, vocab: int = 40, width: int = 16, length: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(length, width))
        self.layer = nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)

    def forward(self, tokens):
        return self.layer(self.tok(tokens) + self.pos).mean(dim=1)


def build(name: str, k: int, seed: int = 0, device: str = "cpu"):
    """``(trunk, heads, x, ys)`` for one of ``resnet``, ``mlp``, ``text``, ``transformer``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n = 8
    if name == "resnet":
        trunk, width = resnet_trunk(), 16
        x = torch.randn(n, 3, 16, 16, generator=gen)
    elif name == "mlp":
        trunk, width = mlp_trunk(), 16
        x = torch.randn(n, 12, generator=gen)
    elif name in ("text", "transformer"):
        trunk, width = (TextTrunk() if name == "text" else TransformerTrunk()), 16
        x = torch.randint(0, 40, (n, 6), generator=gen)
    else:
        raise ValueError(name)
    heads = nn.ModuleList(nn.Linear(width, 3) for _ in range(k))
    ys = [torch.randint(0, 3, (n,), generator=gen) for _ in range(k)]
    return trunk.to(device), heads.to(device), x.to(device), [y.to(device) for y in ys]


def losses(trunk, heads, x, ys):
    """``(z, [cross-entropy of head i, scaled by i + 1])``: distinct tasks."""
    z = trunk(x)
    return z, [F.cross_entropy(h(z), y) * (i + 1) for i, (h, y) in enumerate(zip(heads, ys))]


class AfterFeatures(nn.Module):
    """Shared parameters that the losses reach other than through ``z``.

    ``kind="layer"``: a shared layer applied after ``z`` (heads read ``post(z)``);
    ``kind="scale"``: a shared scalar multiplying every head's output;
    ``kind="tied"``: the input embedding reused as every head's output projection (weight tying).
    ``forward`` returns ``(z, outputs)``; the shared parameters are :meth:`shared_parameters`.
    """

    def __init__(self, kind: str, k: int, vocab: int = 12, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.kind = kind
        self.emb = nn.Embedding(vocab, width)
        self.body = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        if kind == "layer":
            self.post = nn.Linear(width, width)
        if kind == "scale":
            self.scale = nn.Parameter(torch.tensor(1.7))
        self.heads = nn.ModuleList(nn.Linear(width, width if kind == "tied" else vocab) for _ in range(k))

    def shared_parameters(self):
        extra = {"layer": lambda: [*self.post.parameters()], "scale": lambda: [self.scale], "tied": list}[self.kind]()
        return [*self.emb.parameters(), *self.body.parameters(), *extra]

    def forward(self, tokens):
        z = self.body(self.emb(tokens)).mean(dim=1)
        read = self.post(z) if self.kind == "layer" else z
        outs = []
        for h in self.heads:
            o = h(read)
            if self.kind == "scale":
                o = o * self.scale
            elif self.kind == "tied":
                o = o @ self.emb.weight.T
            outs.append(o)
        return z, outs
