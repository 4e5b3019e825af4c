"""Sigmoid cross-entropy on multi-hot labels: the MultiMNIST baseline CNN's loss (Sabour et al. 2017, section 6).

Each class is an independent yes/no, so two digits are two positive
targets. The official `layers.evaluate` (loss_type 'sigmoid') averages the
element-wise loss over batch and classes, as here, and feeds it `labels / 2`:
`target_scale: 0.5` reproduces that; 1.0 (default) is the plain two-hot target.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from capsnet.types import Batch, ModelOutput


class SigmoidCrossEntropyLoss(nn.Module):
    def __init__(self, target_scale: float = 1.0):
        super().__init__()
        self.target_scale = target_scale

    def forward(self, out: ModelOutput, batch: Batch) -> dict:
        """{"loss", "bce_loss"}: mean over images and classes of -t log s(x) - (1 - t) log(1 - s(x))."""
        scores = out.scores.float()
        labels = batch.labels
        target = F.one_hot(labels, scores.shape[-1]).float() if labels.dim() == 1 else labels.float()
        loss = F.binary_cross_entropy_with_logits(scores, target * self.target_scale)
        return {"bce_loss": loss, "loss": loss}
