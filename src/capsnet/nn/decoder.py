"""The reconstruction decoder of Sabour et al. (2017), Figure 2.

All class capsules but one are masked to zero; the survivor is decoded by
FC 512 -> FC 1024 -> FC pixels with a sigmoid. Training masks with the true
label, evaluation with the longest capsule (the caller chooses `select`).
`init="truncated_normal"` is the official code's initialisation of these
layers: weights from a truncated normal of std 0.1, biases 0.1
(models/layers/layers.py lines 459-461, Sarasra/models research/capsules).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from capsnet.nn.features import check_init, init_layer


class ReconstructionDecoder(nn.Module):
    def __init__(self, num_classes: int, capsule_dim: int, out_shape, hidden=(512, 1024),
                 init: str = "default", init_std: float = 0.1, bias_init: float = 0.1):
        super().__init__()
        check_init(init, "model.decoder")
        self.num_classes, self.out_shape = num_classes, tuple(out_shape)
        layers, width = [], num_classes * capsule_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Linear(width, math.prod(self.out_shape)), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                init_layer(layer, init, init_std, bias_init)

    def forward(self, poses: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
        """poses [B, K, D]; select: class indices [B] or a 0/1 mask [B, K] -> images [B, *out_shape]."""
        mask = F.one_hot(select, self.num_classes) if select.dim() == 1 else select
        x = (poses * mask.unsqueeze(-1).to(poses.dtype)).flatten(1)
        return self.net(x).view(-1, *self.out_shape)
