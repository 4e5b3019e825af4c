"""A plain stack of conv + ReLU (+ optional 2x2 max pooling) layers.

One module serves CapsNet's Conv1 (256 kernels 9x9), the Keras variant's two
pooled 5x5 layers and the baseline CNN's three 5x5 layers.
"""

from __future__ import annotations

from torch import nn


class ConvFeatures(nn.Sequential):
    def __init__(self, in_channels: int, channels=(256,), kernel_size: int = 9,
                 padding: int | str = 0, pool: bool = False):
        layers, c_in = [], in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, kernel_size, padding=padding), nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        super().__init__(*layers)
        self.out_channels = c_in
