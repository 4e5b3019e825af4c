"""Matrix capsules with EM routing: the smallNORB network of Hinton, Sabour, Frosst (ICLR 2018), Figure 1.

ReLU Conv1 (A channels, 5x5 stride 2) -> PrimaryCaps (B types, 1x1) ->
ConvCaps1 (C types, K=3 stride 2) -> ConvCaps2 (D types, K=3 stride 1) ->
Class capsules (one per class, W shared over positions, coordinate
addition). The class activations are the scores; train with the spread loss.

Sizes on 32x32 smallNORB crops with valid convolutions (the paper's
figure): 14x14 -> 14x14 -> 6x6 -> 4x4 -> classes. IBM's re-implementation
pads Conv1 (SAME: 16 -> 7 -> 5) and batch-normalises the *input* with no
learned scale or shift (`input_batchnorm`); both are options here, off by
default (the paper mentions neither; our smallNORB pipeline already
standardises each image). Neither changes the parameter count.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from capsnet.errors import CapsnetError
from capsnet.nn.matrix_capsules import ClassMatrixCapsules, ConvMatrixCapsules, PrimaryMatrixCapsules
from capsnet.types import ModelOutput


class MatrixCapsNet(nn.Module):
    """The paper's network; `routing` is a factory (Hydra `_partial_`) built once per capsule layer.

    Args:
        in_shape, num_classes: from the data.
        A, B, C, D: Conv1 channels, primary / ConvCaps1 / ConvCaps2 capsule types
            (paper: 32 each, ~310K parameters; small: 64, 8, 16, 16, ~68K).
        kernel_size: the convolutional capsules' K (paper: 3).
        conv1_kernel, conv1_stride, conv1_padding: Conv1 (paper: 5, 2, valid).
        input_batchnorm: IBM's parameter-free batch norm of the input images.
        coord_add: coordinate addition in the class capsules.
        w_std: std of the 4x4 transform matrices' initialisation.
    """

    def __init__(self, in_shape, num_classes: int, A: int = 32, B: int = 32, C: int = 32, D: int = 32,
                 routing=None, kernel_size: int = 3, conv1_kernel: int = 5, conv1_stride: int = 2,
                 conv1_padding: int = 0, input_batchnorm: bool = False, coord_add: bool = True,
                 w_std: float = 1.0):
        super().__init__()
        self.in_shape, self.num_classes = tuple(in_shape), int(num_classes)
        channels = self.in_shape[0]
        self.input_norm = nn.BatchNorm2d(channels, affine=False) if input_batchnorm else nn.Identity()
        self.conv1 = nn.Conv2d(channels, A, conv1_kernel, conv1_stride, conv1_padding)
        self.primary = PrimaryMatrixCapsules(in_channels=A, types=B)
        self.conv_caps1 = ConvMatrixCapsules(in_types=B, out_types=C, kernel_size=kernel_size, stride=2,
                                             routing=routing, w_std=w_std)
        self.conv_caps2 = ConvMatrixCapsules(in_types=C, out_types=D, kernel_size=kernel_size, stride=1,
                                             routing=routing, w_std=w_std)
        self.class_caps = ClassMatrixCapsules(in_types=D, num_classes=self.num_classes, routing=routing,
                                              coord_add=coord_add, w_std=w_std)
        self.grid_sizes = self._check_sizes(conv1_kernel, conv1_stride, conv1_padding)

    def _check_sizes(self, kernel: int, stride: int, padding: int) -> list[tuple[int, int]]:
        """The capsule grids' sizes, or a CapsnetError naming the fix if an image is too small."""
        h, w = self.in_shape[1:]
        h, w = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        if h < 1 or w < 1:
            raise CapsnetError(f"images of {self.in_shape[1]}x{self.in_shape[2]} are smaller than Conv1's "
                               f"{kernel}x{kernel} kernel: use larger images or model.conv1_padding")
        sizes = [(h, w)]
        for layer in (self.conv_caps1, self.conv_caps2):
            h, w = layer.output_size(h), layer.output_size(w)
            sizes.append((h, w))
        return sizes

    @property
    def routing(self):
        """The class capsules' routing: the one whose couplings the loop records."""
        return self.class_caps.routing

    def forward(self, images: torch.Tensor, recon_classes: torch.Tensor | None = None) -> ModelOutput:
        """images [N, C, H, W] -> ModelOutput(scores = class activations [N, K], poses [N, K, 16]).

        `recon_classes` is accepted for the model contract; this network has no decoder.
        """
        x = torch.relu(self.conv1(self.input_norm(images)))
        poses, acts = self.primary(x)
        poses, acts = self.conv_caps1(poses, acts)
        poses, acts = self.conv_caps2(poses, acts)
        out = self.class_caps(poses, acts)
        extras = {}
        if getattr(self.routing, "record", False):
            extras["couplings"] = self.routing.recorded.get("couplings", [])
        return ModelOutput(scores=out.activations, poses=out.poses, extras=extras)


def build_smallnorb_model(small: bool = False, iters: int = 3, in_shape=(2, 32, 32)) -> MatrixCapsNet:
    """The paper's smallNORB network (5 classes, 2-camera 32x32 crops) for benchmarks.

    small=False: A=B=C=D=32 (~310K parameters); small=True: A=64, B=8, C=D=16 (~68K).
    """
    from capsnet.routing.em import EMRouting

    sizes = dict(A=64, B=8, C=16, D=16) if small else dict(A=32, B=32, C=32, D=32)
    return MatrixCapsNet(in_shape, 5, routing=functools.partial(EMRouting, iters=iters), **sizes)
