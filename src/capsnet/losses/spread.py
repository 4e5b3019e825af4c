"""Spread loss of Hinton, Sabour, Frosst (ICLR 2018), section 4.

L = sum_{i != t} max(0, m - (a_t - a_i))^2: every wrong class's activation
must sit at least m below the target's. The margin m grows from 0.2 to 0.9
during training ("starting with a small margin of 0.2 and linearly
increasing it during training to 0.9"), which avoids dead capsules early on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.errors import CapsnetError
from capsnet.types import Batch, ModelOutput


def _multi_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    if target.dim() == 1:
        return F.one_hot(target.long(), num_classes).float()
    return target.float()


def spread_loss(activations: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over target t and non-target i of max(0, m - (a_t - a_i))^2, mean over the batch.

    `target` is class ids [B] (the paper's case: one t) or a multi-hot [B, K],
    where every (target, non-target) pair counts once.
    """
    a = activations.to(torch.promote_types(activations.dtype, torch.float32))  # float32 at least, float64 kept
    t = _multi_hot(target, a.shape[-1])
    gap = a.unsqueeze(-1) - a.unsqueeze(-2)  # [B, t, i]: a_t - a_i
    pairs = t.unsqueeze(-1) * (1.0 - t).unsqueeze(-2)
    return (pairs * F.relu(margin - gap).square()).sum((-2, -1)).mean()


class SpreadLoss(nn.Module):
    """Spread loss with a margin growing linearly from `m_start` to `m_end` over the first `ramp` of training.

    The loop calls `set_progress(fraction)` before every step (0 at the start,
    1 at the end); the margin reaches `m_end` at fraction `ramp` (default 1:
    the whole run, the paper's "linearly during training"). `margin` can
    also be set directly (tests, evaluation).
    """

    def __init__(self, m_start: float = 0.2, m_end: float = 0.9, ramp: float = 1.0):
        super().__init__()
        if not 0 < ramp <= 1:
            raise CapsnetError(f"loss.ramp must be in (0, 1] (a fraction of training), got {ramp}")
        self.m_start, self.m_end, self.ramp = float(m_start), float(m_end), float(ramp)
        self.margin = self.m_start

    def set_progress(self, fraction: float) -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        self.margin = self.m_start + (self.m_end - self.m_start) * min(1.0, f / self.ramp)

    def forward(self, out: ModelOutput, batch: Batch) -> dict:
        loss = spread_loss(out.scores, batch.labels, self.margin)
        return {"loss": loss, "spread_loss": loss}

    def extra_repr(self) -> str:
        return f"m_start={self.m_start}, m_end={self.m_end}, ramp={self.ramp}, margin={self.margin:.4f}"
