"""The paper's baseline CNN (section 5): conv 256, 256, 128 (5x5, "same"), FC 328, 192, dropout, softmax.

35,445,522 parameters on MNIST, the paper's "35.4M".
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.types import ModelOutput


class BaselineCNN(nn.Module):
    def __init__(self, in_shape, num_classes: int, features, hidden=(328, 192), dropout: float = 0.5):
        super().__init__()
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        self.features = features(in_channels=self.in_shape[0])
        with torch.no_grad():
            width = self.features(torch.zeros(1, *self.in_shape)).numel()
        layers = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor, recon_classes: torch.Tensor | None = None) -> ModelOutput:
        return ModelOutput(scores=self.head(self.features(images).flatten(1)))
