"""The base CNN of Jansen et al. 2020 (Fig. 2): a multi-pathway dilated 2D network.

Each MR sequence gets its own pathway of 13 3x3 convolutions (conv + BatchNorm + ReLU) in
five blocks; the output of every block of every pathway is concatenated and passed to a
head of two 1x1 convolutions with dropout before and after the first. Fine-tuning trains
only the head, so the network exposes ``features()`` (backbone) and ``head()`` separately:
the backbone output can be computed once and the head re-run cheaply.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
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


def keep_mask(
    shape: Sequence[int], threshold: int, seed, device: torch.device | str = "cpu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float dropout mask of ``shape``: 0 where an element's random byte is below
    ``threshold`` (drop probability ``threshold / 256``), 1 elsewhere.

    The bytes come from a generator seeded by ``seed`` (an int or a sequence of ints):
    numpy's SFC64 on the CPU (faster than torch's generator there), torch's generator on
    other devices. The mask is float, not bool: on the CPU torch's kernels on bool
    tensors cost several times a float multiply (both measured in docs/benchmarks.md).
    ``out``: a float buffer of ``shape`` to
    reuse (a fresh mask of tens of MB costs more in page faults than drawing it).
    """
    device = torch.device(device)
    n = int(np.prod(shape))
    if device.type == "cpu":
        words = np.random.Generator(np.random.SFC64(seed)).bit_generator.random_raw((n + 7) // 8)
        random_bytes = torch.from_numpy(words.view(np.uint8)[:n]).view(tuple(shape))
    else:
        state = np.random.SeedSequence(seed).generate_state(1, np.uint64)[0]
        generator = torch.Generator(device).manual_seed(int(state))
        random_bytes = torch.randint(0, 256, tuple(shape), dtype=torch.uint8, device=device, generator=generator)
    return torch.ge(random_bytes, threshold, out=torch.empty(tuple(shape), device=device) if out is None else out)


class ByteDropout(nn.Dropout):
    """Element-wise dropout whose mask costs one random byte per element.

    ``torch.nn.Dropout`` draws a Bernoulli variable per element, which on a CPU costs more
    than the 1x1 convolution after it (every feature of every pixel, 25 times for MC
    dropout). Here each element is dropped when its byte is below ``round(256 p)``: the
    drop probability is that over 256 (p = 0.2 -> 51/256 = 0.199) and kept elements are
    scaled by 1 / (1 - that). Masks drawn without a seed take one from torch's global
    generator, so ``torch.manual_seed`` fixes them as usual.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self.threshold = int(round(256 * p))
        self.scale = 256.0 / (256 - self.threshold) if self.threshold < 256 else 0.0

    @property
    def active(self) -> bool:
        """Whether the layer drops anything now (training mode and a rate above 0)."""
        return self.training and self.threshold > 0

    def keep(
        self, shape: Sequence[int], device: torch.device | str, seed=None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A float 0/1 mask of this layer's rate (see :func:`keep_mask`); ``seed=None``
        draws the seed from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        return keep_mask(shape, self.threshold, seed, device, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return x * self.keep(x.shape, x.device) * self.scale


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

    def head(self, features: torch.Tensor, keep: tuple = (None, None), overwrite: bool = False) -> torch.Tensor:
        """Head: logits (N, n_classes, H, W) from backbone features (N, C, H, W).

        The head is pixel-wise, so it runs on the feature vectors as rows of a matrix
        (:meth:`head_rows`, which explains ``keep``): its 1x1 convolutions are plain matrix
        products. Channels-last features are those rows already (no copy). ``overwrite``:
        the first dropout may write into ``features`` (a caller's own buffer: a fresh
        P x C result costs more in page faults than the arithmetic); never while autograd
        records through them.
        """
        n, c, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(n * h * w, c)
        # rows that are a copy (features not channels-last) are ours to overwrite
        logits = self.head_rows(rows, keep, overwrite=overwrite or rows.data_ptr() != features.data_ptr())
        return logits.view(n, h, w, self.n_classes).permute(0, 3, 1, 2)

    def head_rows(self, rows: torch.Tensor, keep: tuple = (None, None), overwrite: bool = False) -> torch.Tensor:
        """The head on feature vectors as rows: (P, feature_channels) -> logits (P, n_classes).

        Parameters
        ----------
        keep : the two dropout layers' float 0/1 masks, broadcastable to (P, C) and
            (P, head_width) (e.g. one mask per sample shared by every pixel); ``None``
            draws an element-wise mask while that dropout layer is in training mode and
            applies none otherwise.
        overwrite : the first dropout may write into ``rows`` (ignored while autograd
            records through them).

        The dropout scale multiplies the (small) weight matrix instead of the activations;
        a BatchNorm folded away (:func:`inference_copy`) is an identity here.
        """
        drop1, conv1, norm, _, drop2, conv2 = self.classifier
        x, w1 = rows, conv1.weight.flatten(1)
        if keep[0] is not None or drop1.active:
            mask = keep[0] if keep[0] is not None else drop1.keep(rows.shape, rows.device)
            x = rows.mul_(mask) if overwrite and not rows.requires_grad else rows * mask
            w1 = w1 * drop1.scale
        y = F.linear(x, w1, conv1.bias)
        if isinstance(norm, nn.BatchNorm2d):
            y = F.batch_norm(
                y, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.training, norm.momentum, norm.eps
            )
            if norm.training:
                norm.num_batches_tracked.add_(1)
        w2 = conv2.weight.flatten(1)
        if keep[1] is not None or drop2.active:
            # a 0/1 mask commutes with ReLU: masking first lets both run in place
            y = y.mul_(keep[1] if keep[1] is not None else drop2.keep(y.shape, y.device))
            w2 = w2 * drop2.scale
        y = F.relu(y, inplace=True)  # neither the product, batch_norm nor the mask needs y for backward
        return F.linear(y, w2, conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes, H, W); apply softmax for probabilities."""
        return self.head(self.features(x), overwrite=True)


def inference_copy(model: LesionNet) -> LesionNet:
    """A copy of ``model`` for inference, in evaluation mode, with every BatchNorm folded
    into the convolution before it (at inference BatchNorm is a per-channel affine map:
    ``scale * conv(x) + shift`` is one convolution with scaled weights and a bias). Same
    outputs to float rounding, 20 % less time on a CPU at width 16; the caller's model is
    untouched. Not for training (nothing re-estimates the folded statistics)."""
    folded = copy.deepcopy(model).eval()
    layers = [(layer, 0, 1) for pathway in folded.pathways for block in pathway.blocks for layer in block]
    layers.append((folded.classifier, 1, 2))
    with torch.no_grad():
        for sequence, conv_at, norm_at in layers:
            conv, norm = sequence[conv_at], sequence[norm_at]
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                padding=conv.padding,
                dilation=conv.dilation,
                bias=True,
            )
            fused.weight.copy_(conv.weight * scale[:, None, None, None])
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
            sequence[conv_at], sequence[norm_at] = fused.to(conv.weight.device), nn.Identity()
    return folded.requires_grad_(False)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (optionally only trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
