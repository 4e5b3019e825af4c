"""A plain stack of conv + ReLU (+ optional 2x2 max pooling) layers, and the official code's initialisation.

One module serves CapsNet's Conv1 (256 kernels 9x9), the Keras variant's two
pooled 5x5 layers and the baseline CNN's three 5x5 layers.
"""

from __future__ import annotations

import torch
from torch import nn

from capsnet.errors import CapsnetError

INITS = ("default", "truncated_normal")


def check_init(init: str, where: str) -> None:
    if init not in INITS:
        raise CapsnetError(f"{where}.init={init} is unknown: choose one of {', '.join(INITS)}")


def truncated_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """TensorFlow's truncated_normal_initializer(stddev=std): N(0, std) with draws beyond 2 std redrawn.

    The resulting spread is about 0.88 std (the truncation is not rescaled, as in TF 1).
    """
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def init_layer(layer: nn.Module, init: str, std: float, bias: float) -> None:
    """'default' leaves PyTorch's initialisation (and its random draws) as they are, so the paper
    protocol's numbers do not move; 'truncated_normal' is the official code's: weights from a truncated
    normal, biases constant (models/layers/variables.py lines 29-70, Sarasra/models research/capsules)."""
    if init == "default":
        return
    with torch.no_grad():
        truncated_normal_(layer.weight, std)
        if layer.bias is not None:
            layer.bias.fill_(bias)


class ConvFeatures(nn.Sequential):
    """`init="truncated_normal"`: the official Conv1 (std 0.05, bias 0.1: capsule_model.py lines 181-184)."""

    def __init__(self, in_channels: int, channels=(256,), kernel_size: int = 9,
                 padding: int | str = 0, pool: bool = False,
                 init: str = "default", init_std: float = 0.05, bias_init: float = 0.1):
        check_init(init, "model.features")
        layers, c_in = [], in_channels
        for c_out in channels:
            conv = nn.Conv2d(c_in, c_out, kernel_size, padding=padding)
            init_layer(conv, init, init_std, bias_init)
            layers += [conv, nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        super().__init__(*layers)
        self.out_channels = c_in
