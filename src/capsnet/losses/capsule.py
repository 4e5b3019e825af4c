"""Losses of Sabour et al. (2017): the margin loss (section 3, Eq. 4) and the reconstruction loss (section 4.1)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.errors import CapsnetError
from capsnet.types import Batch, ModelOutput


def as_multi_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices [B] or a multi-hot [B, K] (multi-digit data) -> float multi-hot [B, K]."""
    if target.dim() == 1:
        return F.one_hot(target, num_classes).float()
    return target.float()


def margin_loss(lengths: torch.Tensor, target: torch.Tensor, m_plus: float = 0.9,
                m_minus: float = 0.1, lam: float = 0.5) -> torch.Tensor:
    """Eq. 4: sum over classes of T max(0, m+ - |v|)^2 + lam (1 - T) max(0, |v| - m-)^2, mean over the batch."""
    lengths = lengths.float()
    t = as_multi_hot(target, lengths.shape[-1])
    present = t * F.relu(m_plus - lengths).square()
    absent = lam * (1.0 - t) * F.relu(lengths - m_minus).square()
    return (present + absent).sum(-1).mean()


def reconstruction_loss(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the pixels of all R reconstructions [B, R, ...], mean over the batch.

    MultiMNIST (section 6) decodes each of the two digits separately: SSE_1 + SSE_2.
    """
    err = reconstructions.float() - targets.float()
    return err.square().flatten(1).sum(1).mean()


class CapsuleLoss(nn.Module):
    """margin_scale * margin + recon_weight * reconstruction (paper: 1 and 0.0005).

    recon_weight 0 keeps the decoder but trains nothing through it. The
    official code's margin loss is 1/20 of Eq. 4 (an extra 0.5 on both terms,
    and a mean instead of a sum over the classes: layers.py lines 357-362 and
    396), while its reconstruction term stays 0.0005 x the batch-mean SSE
    (layers.py lines 466-468): `margin_scale=0.05` reproduces it, so the
    reconstruction weighs 0.01 relative to Eq. 4 there.
    """

    def __init__(self, m_plus: float = 0.9, m_minus: float = 0.1, lam: float = 0.5,
                 recon_weight: float = 0.0005, margin_scale: float = 1.0):
        super().__init__()
        if not margin_scale > 0:
            raise CapsnetError(f"loss.margin_scale={margin_scale} is impossible: it must be a number > 0 "
                               "(1: Eq. 4, 0.05: the official code)")
        self.m_plus, self.m_minus, self.lam, self.recon_weight = m_plus, m_minus, lam, recon_weight
        self.margin_scale = margin_scale

    def forward(self, out: ModelOutput, batch: Batch) -> dict:
        margin = margin_loss(out.scores, batch.labels, self.m_plus, self.m_minus, self.lam)
        if self.margin_scale != 1.0:
            margin = margin * self.margin_scale
        terms = {"margin_loss": margin}
        loss = margin
        if out.reconstructions is not None:
            recon = reconstruction_loss(out.reconstructions, batch.recon_targets)
            terms["recon_loss"] = recon
            loss = loss + self.recon_weight * recon
        terms["loss"] = loss
        return terms
