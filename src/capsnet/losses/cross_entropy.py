"""Softmax cross-entropy, for models whose scores are logits (the paper's baseline CNN)."""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from capsnet.types import Batch, ModelOutput


class CrossEntropyLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, out: ModelOutput, batch: Batch) -> dict:
        loss = F.cross_entropy(out.scores.float(), batch.labels, label_smoothing=self.label_smoothing)
        return {"ce_loss": loss, "loss": loss}
