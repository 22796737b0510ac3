"""Multi-task architectures that tell ``GradBalance`` what they share.

Each block exposes ``shared_parameters()`` (what ``GradBalance(opt, method, shared_params=model)``
uses) and ``task_parameters(name)``:

- :class:`HardSharing`: one trunk, one head per task (the trunk is shared).
- :class:`SoftSharing` and :func:`soft_sharing_penalty`: one network per task, tied by an l2 or
  trace-norm penalty (nothing is shared: only loss-weighting methods apply).
- :class:`CrossStitch`: task towers mixed by learned cross-stitch units (the units are shared).
- :class:`MMoE`: shared experts, one softmax gate and tower per task (the experts are shared).
- :class:`CGC`: MMoE plus task-specific experts (PLE's building block; shared experts shared).
- :class:`PLE`: stacked CGC levels with shared gates between them (progressive layered extraction).
- :class:`DSelectK` (:class:`DSelectKGate`, :func:`smooth_step`): MMoE with k-sparse
  differentiable expert selection.
- :class:`MTAN`: a shared convolutional backbone with per-task attention masks at every stage.
- :func:`group_sparsity_penalty`: the l1/lq block-sparse penalty across tasks' parameters.
"""

from gradbalance.nn.cgc import CGC
from gradbalance.nn.cross_stitch import CrossStitch, CrossStitchUnit
from gradbalance.nn.dselect_k import DSelectK, DSelectKGate, smooth_step
from gradbalance.nn.hard import HardSharing
from gradbalance.nn.mmoe import MMoE
from gradbalance.nn.mtan import MTAN
from gradbalance.nn.penalties import group_sparsity_penalty
from gradbalance.nn.ple import PLE
from gradbalance.nn.soft import SoftSharing, soft_sharing_penalty

__all__ = [
    "CGC",
    "CrossStitch",
    "CrossStitchUnit",
    "DSelectK",
    "DSelectKGate",
    "HardSharing",
    "MMoE",
    "MTAN",
    "PLE",
    "SoftSharing",
    "group_sparsity_penalty",
    "smooth_step",
    "soft_sharing_penalty",
]
