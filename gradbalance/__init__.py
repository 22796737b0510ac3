"""gradbalance: multi-task gradient balancing as a drop-in wrapper around any torch.optim optimizer.

    import gradbalance as gb
    opt = gb.GradBalance(torch.optim.AdamW(model.parameters()), method="mgda", shared_params=model.trunk)
    info = opt.backward([loss_a, loss_b]); opt.step()
"""

from gradbalance import log, methods, nn
from gradbalance.errors import NonFiniteError, RankMismatchError
from gradbalance.info import StepInfo
from gradbalance.methods.base import available_methods
from gradbalance.optim import GradBalance, backward
from gradbalance.options import Options

__version__ = "0.1.0"

__all__ = [
    "GradBalance",
    "NonFiniteError",
    "Options",
    "RankMismatchError",
    "StepInfo",
    "__version__",
    "available_methods",
    "backward",
    "log",
    "methods",
    "nn",
]
