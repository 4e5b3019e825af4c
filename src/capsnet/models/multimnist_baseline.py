"""The paper's MultiMNIST baseline CNN (Sabour et al. 2017, section 6; SPEC 5.1).

9x9 conv 512 ("same") -> 2x2 max pool -> 5x5 conv 256 ("same") -> pool ->
FC 1024 -> 10 logits, ReLU between, trained with sigmoid cross-entropy:
24,563,978 parameters on 1x36x36, the paper's "24.56M". The official
`models/conv_model.py` uses 5x5 kernels in both layers (24,535,306
parameters); `kernel_sizes: [5, 5]` gives it. Pooling rounds up, as
TensorFlow's "SAME" max pooling does on odd sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.errors import CapsnetError
from capsnet.types import ModelOutput


class MultiMNISTBaselineCNN(nn.Module):
    def __init__(self, in_shape, num_classes: int, channels=(512, 256), kernel_sizes=(9, 5),
                 hidden=(1024,), dropout: float = 0.0):
        super().__init__()
        if len(channels) != len(kernel_sizes):
            raise CapsnetError(f"model.channels {list(channels)} and model.kernel_sizes {list(kernel_sizes)} "
                               "need one entry per conv layer: give both the same length")
        self.in_shape, self.num_classes = tuple(in_shape), num_classes
        layers, c_in = [], self.in_shape[0]
        for c_out, k in zip(channels, kernel_sizes):
            layers += [nn.Conv2d(c_in, c_out, k, padding="same"), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            width = self.features(torch.zeros(1, *self.in_shape)).numel()
        head = []
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, images: torch.Tensor, recon_classes: torch.Tensor | None = None) -> ModelOutput:
        """Logits [B, K]; recon_classes is unused (no decoder)."""
        return ModelOutput(scores=self.head(self.features(images).flatten(1)))
