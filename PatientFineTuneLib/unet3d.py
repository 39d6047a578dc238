"""The 3D U-Net of Wahlig et al. 2023 (after Rudie / Duong et al.): four down-sampling and four
up-sampling blocks, for whole-volume segmentation and cohort-level transfer (Kaur et al. 2019).

Each block is two 3x3x3 convolutions with instance normalisation and leaky ReLU; the
encoder halves the grid with max pooling, the decoder doubles it with a transposed
convolution and concatenates the encoder's output of the same level (skip connection). A
dropout layer before the final 1x1x1 convolution makes Monte-Carlo dropout possible.
Instance normalisation keeps no running statistics, so freezing part of the network for
transfer learning cannot leave stale batch statistics behind, and the network behaves the
same on a batch of 2 patches as on one volume window.

Layer groups for transfer learning (Kaur et al. 2019), see :meth:`UNet3D.trainable_modules`:
``all`` (FT_All), ``decoder`` (FT_Decoder: every up-sampling block and the output layer,
the encoder frozen), ``last-layers`` (FT_LastThree: the two convolutions of the last
decoder block and the output layer) and ``head`` (the output layer only, as the 2D
network's patient-specific head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE_TYPE = "unet3d"
STRATEGIES = ("all", "decoder", "last-layers", "head")


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (in_channels, out_channels):
        layers += [
            nn.Conv3d(c, out_channels, 3, padding=1, bias=False),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        ]
    return nn.Sequential(*layers)


class UNet3D(nn.Module):
    """3D U-Net with ``depth`` down- and up-sampling blocks.

    Parameters
    ----------
    in_channels : sequence of int
        Channel count of each MR sequence, in model order (stacked into one input tensor,
        as for the 2D network).
    width : int
        Filters of the first level; each level down doubles them.
    depth : int
        Down-sampling (and up-sampling) blocks (Wahlig et al. 2023: 4). Inputs must be a multiple
        of ``2 ** depth`` voxels along each axis (see :attr:`size_multiple`).
    dropout : float
        Dropout rate before the output layer (Monte-Carlo dropout at inference).
    n_classes : int
        Output classes (background, lesion).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (1,),
        width: int = 16,
        depth: int = 4,
        dropout: float = 0.2,
        n_classes: int = 2,
    ):
        super().__init__()
        if len(in_channels) < 1 or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"in_channels must list at least one positive channel count, got {in_channels!r}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.width, self.depth, self.dropout_rate, self.n_classes = (
            int(width),
            int(depth),
            float(dropout),
            int(n_classes),
        )
        widths = [self.width * 2**level for level in range(self.depth + 1)]
        self.encoder = nn.ModuleList(
            _double_conv(sum(self.in_channels) if level == 0 else widths[level - 1], widths[level])
            for level in range(self.depth + 1)
        )
        # decoder[i] and up[i] work at level depth - 1 - i (coarse to fine)
        levels = range(self.depth - 1, -1, -1)
        self.up = nn.ModuleList(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2) for level in levels)
        self.decoder = nn.ModuleList(_double_conv(2 * widths[level], widths[level]) for level in levels)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.final = nn.Conv3d(widths[0], self.n_classes, 1)
        self.reset_parameters()

    @property
    def size_multiple(self) -> int:
        """Input sizes must be multiples of this (one halving per down-sampling block)."""
        return 2**self.depth

    def architecture(self) -> dict:
        """Constructor arguments plus the type (stored in model files)."""
        return {
            "type": ARCHITECTURE_TYPE,
            "in_channels": list(self.in_channels),
            "width": self.width,
            "depth": self.depth,
            "dropout": self.dropout_rate,
            "n_classes": self.n_classes,
        }

    def reset_parameters(self) -> None:
        """He-uniform convolutions, normalisation at identity."""
        for m in self.modules():
            self._reset(m)

    @staticmethod
    def _reset(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="leaky_relu", a=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.InstanceNorm3d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def trainable_modules(self, strategy: str) -> list[nn.Module]:
        """The modules a transfer strategy trains (see the module docstring)."""
        groups = {
            "all": [self],
            "decoder": [self.up, self.decoder, self.final],
            "last-layers": [self.decoder[-1], self.final],
            "head": [self.final],
        }
        if strategy not in groups:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        return groups[strategy]

    def reset_last_layers(self) -> None:
        """Replace the last three layers (last decoder block's two convolutions and the
        output layer) with freshly initialised ones, as Kaur et al. 2019 do before transfer."""
        for module in (self.decoder[-1], self.final):
            for m in module.modules():
                self._reset(m)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != sum(self.in_channels):
            raise ValueError(f"expected input of shape (N, {sum(self.in_channels)}, D, H, W), got {tuple(x.shape)}")
        if any(s % self.size_multiple or s < 2 * self.size_multiple for s in x.shape[2:]):
            raise ValueError(
                f"every spatial size must be a multiple of {self.size_multiple} and at least {2 * self.size_multiple}, got {tuple(x.shape[2:])}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes, D, H, W)."""
        self._check_input(x)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.final(self.dropout(x))
