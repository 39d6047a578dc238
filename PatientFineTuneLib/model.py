"""The base CNN of Jansen et al. (seed 000, Fig. 2): a multi-pathway dilated 2D network.

Each MR sequence gets its own pathway of 13 3x3 convolutions (conv + BatchNorm + ReLU) in
five blocks; the output of every block of every pathway is concatenated and passed to a
head of two 1x1 convolutions with dropout before and after the first. Fine-tuning trains
only the head, so the network exposes ``features()`` (backbone) and ``head()`` separately:
the backbone output can be computed once and the head re-run cheaply.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

#: The paper's dilation schedule: blocks of (2, 2, 3, 3, 3) layers, block 1 undilated.
#: RF = 1 + 2 * sum(dilations) = 1 + 2 * 61 = 123 pixels.
PAPER_DILATIONS: tuple[tuple[int, ...], ...] = ((1, 1), (2, 3), (4, 4, 4), (6, 6, 6), (8, 8, 8))


def _conv_bn_relu(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(
        # padding = dilation keeps the slice size, so the net is fully convolutional
        # and a whole slice is segmented in one pass.
        nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ByteDropout(nn.Dropout):
    """Element-wise dropout whose mask costs one random byte per element.

    ``torch.nn.Dropout`` draws a Bernoulli variable per element, which on a CPU costs more
    than the 1x1 convolution after it (640 channels x every pixel, 25 times for MC
    dropout). Here each element is dropped when its byte is below ``round(256 p)``: the
    drop probability is that over 256 (p = 0.2 -> 51/256 = 0.199) and kept elements are
    scaled by 1 / (1 - that). The bytes come from the global torch generator, so
    ``torch.manual_seed`` fixes the masks as usual.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.threshold = int(round(256 * p))
        self.scale = 256.0 / (256 - self.threshold) if self.threshold < 256 else 0.0

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Drop and scale, into ``out`` when given (``x`` itself for in place, or a buffer
        of x's shape and layout reused between calls: a fresh 168 MB result costs more in
        page faults than the arithmetic)."""
        if not self.training or self.threshold == 0:
            return x
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        # the bytes are laid out as x is (channels-last in the head): an element-wise op on
        # tensors of different layouts costs twice as much on a CPU
        drop = words.view(torch.uint8)[:n].as_strided(x.shape, x.stride()) < self.threshold
        out = x * self.scale if out is None else torch.mul(x, self.scale, out=out)
        return out.masked_fill_(drop, 0.0)


class Pathway(nn.Module):
    """One sequence's feature extractor: blocks of dilated 3x3 conv + BN + ReLU."""

    def __init__(self, in_channels: int, width: int, dilations: Sequence[Sequence[int]]):
        super().__init__()
        blocks = []
        channels = in_channels
        for block_dilations in dilations:
            layers = []
            for d in block_dilations:
                layers.append(_conv_bn_relu(channels, width, int(d)))
                channels = width
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


class LesionNet(nn.Module):
    """Multi-pathway dilated FCN for 2D lesion segmentation.

    Parameters
    ----------
    in_channels : sequence of int
        Channel count of each pathway's input, one entry per MR sequence, e.g. ``(1, 1)``
        for FLAIR + T1 or ``(16, 3)`` for liver DCE (16 phases) + DWI (3 b-values).
        The network takes one tensor with all channels stacked in this order.
    width : int
        Filters per 3x3 convolution (paper: 64).
    head_width : int
        Filters of the first 1x1 convolution of the head (paper: 128).
    dropout : float
        Rate of both dropout layers in the head (paper: 0.2; applied as 51/256 = 0.199,
        see :class:`ByteDropout`).
    dilations : sequence of sequence of int
        Dilation of each 3x3 layer, grouped by block (paper: ``PAPER_DILATIONS``).
    n_classes : int
        Output classes (background, lesion).
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (1, 1),
        width: int = 64,
        head_width: int = 128,
        dropout: float = 0.2,
        dilations: Sequence[Sequence[int]] = PAPER_DILATIONS,
        n_classes: int = 2,
    ):
        super().__init__()
        if len(in_channels) < 1 or any(int(c) < 1 for c in in_channels):
            raise ValueError(f"in_channels must list at least one positive channel count, got {in_channels!r}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.width = int(width)
        self.head_width = int(head_width)
        self.dropout = float(dropout)
        self.dilations = tuple(tuple(int(d) for d in block) for block in dilations)
        self.n_classes = int(n_classes)

        self.pathways = nn.ModuleList(Pathway(c, self.width, self.dilations) for c in self.in_channels)
        n_features = self.feature_channels
        # "The last two layers" of the paper: the two 1x1 convolutions (and the BN between).
        self.classifier = nn.Sequential(
            ByteDropout(self.dropout),
            nn.Conv2d(n_features, self.head_width, 1, bias=False),
            nn.BatchNorm2d(self.head_width),
            nn.ReLU(inplace=True),
            ByteDropout(self.dropout),
            nn.Conv2d(self.head_width, self.n_classes, 1),
        )
        self.reset_parameters()

    @property
    def feature_channels(self) -> int:
        """Channels of the concatenated block outputs (5 x 64 per pathway in the paper)."""
        return len(self.in_channels) * len(self.dilations) * self.width

    def architecture(self) -> dict:
        """Constructor arguments, enough to rebuild the network (stored in model files)."""
        return {
            "in_channels": list(self.in_channels),
            "width": self.width,
            "head_width": self.head_width,
            "dropout": self.dropout,
            "dilations": [list(b) for b in self.dilations],
            "n_classes": self.n_classes,
        }

    def reset_parameters(self) -> None:
        """He-uniform initialisation of every convolution (paper), BN at identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def receptive_field(self) -> int:
        """Receptive field in pixels, computed from the convolution layers of one pathway.

        For stride-1 convolutions RF = 1 + sum((kernel - 1) * dilation); the 1x1 head
        adds nothing. The paper's network gives 123.
        """
        rf = 1
        for m in self.pathways[0].modules():
            if isinstance(m, nn.Conv2d):
                rf += (m.kernel_size[0] - 1) * m.dilation[0]
        return rf

    def head_modules(self) -> nn.Module:
        """The layers trained by patient-specific fine-tuning."""
        return self.classifier

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != sum(self.in_channels):
            raise ValueError(
                f"expected input of shape (N, {sum(self.in_channels)}, H, W) for pathways with "
                f"{list(self.in_channels)} channels, got {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone: concatenated block outputs of every pathway, (N, feature_channels, H, W)."""
        self._check_input(x)
        parts = torch.split(x, list(self.in_channels), dim=1)
        outputs: list[torch.Tensor] = []
        for pathway, part in zip(self.pathways, parts):
            outputs.extend(pathway(part))
        return torch.cat(outputs, dim=1)

    def head(self, features: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Head: logits (N, n_classes, H, W) from backbone features.

        The head runs channels-last: its 1x1 convolutions are then plain matrix products
        (about 2x faster on a CPU); features already in that layout are not copied. The
        head is pixel-wise, so any (N, C, H, W) arrangement of feature vectors works, e.g.
        a gathered (1, C, P, 1) column of P pixels. ``scratch`` (``features`` itself, or a
        buffer of their shape and channels-last layout) receives the first dropout's
        result instead of a fresh tensor; it is ignored when its layout differs or while
        autograd records through the features.
        """
        x = features.contiguous(memory_format=torch.channels_last)
        if x.requires_grad or (scratch is not None and (scratch.shape, scratch.stride()) != (x.shape, x.stride())):
            scratch = None
        return self.classifier[1:](self.classifier[0](x, out=scratch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes, H, W); apply softmax for probabilities."""
        features = self.features(x)
        return self.head(features, scratch=features)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (optionally only trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
