"""What every model's forward returns, so the loop and losses need not know the model."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    scores: torch.Tensor  # [B, K]: capsule lengths (CapsNet) or logits (CNN); argmax = prediction
    reconstruction: torch.Tensor | None = None  # [B, C, H, W]
    poses: torch.Tensor | None = None  # class capsules [B, K, D]
    couplings: torch.Tensor | None = None  # last routing iteration [B, I, K]
