"""Plain functions on arrays that every part of the library shares: the one resampling of
arrays and the intensity normalisation. No SimpleITK here, so base training and
inference run where only torch and numpy are installed (a GPU machine with no image I/O,
see ``Resources/Models/gpu_training.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

#: Relative in-plane spacing difference below which slices are not resampled.
SPACING_TOLERANCE = 0.01
#: Robust z-scores are clipped to this range (lesions are bright outliers; keep them).
NORMALISED_RANGE = (-5.0, 10.0)


class ImageError(ValueError):
    """An input image is unreadable, inconsistent with the others, or unusable."""


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Array shape after resampling from ``spacing`` to ``target`` mm (same field of view).

    Axes whose spacing is within ``SPACING_TOLERANCE`` of the target keep their size, so
    data already at the model's spacing is not interpolated.
    """
    return tuple(
        int(n) if abs(s / t - 1) < SPACING_TOLERANCE else max(1, int(round(n * s / t)))
        for n, s, t in zip(shape, spacing, target)
    )


def resample_array(x: torch.Tensor, shape: Sequence[int], label: bool = False) -> torch.Tensor:
    """Resample (N, C, H, W) slices or (N, C, D, H, W) volumes to ``shape``, keeping the
    field of view.

    The one resampling of arrays in the library (images, masks, weight maps, network
    outputs, in both directions). Both interpolations are pixel-centre aligned: output
    pixel ``j`` of ``m`` samples the input at ``(j + 0.5) * n / m - 0.5``, so a label and
    the image it annotates stay on each other at any spacing ratio. Intensities and
    probabilities: (bi/tri)linear; labels and weight maps: ``nearest-exact`` (values kept).
    Plain ``nearest`` would floor ``j * n / m`` instead and shift labels by up to half a
    pixel towards the origin on every non-integer ratio.
    """
    import torch.nn.functional as F  # here: reading and writing images needs no torch (evaluate, compare)

    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    if len(shape) not in (2, 3) or x.dim() != len(shape) + 2:
        raise ValueError(
            f"cannot resample a {tuple(x.shape)} tensor to {shape}: expected (N, C, *spatial) with 2 or 3 spatial axes"
        )
    if label:
        return F.interpolate(x, size=shape, mode="nearest-exact")
    return F.interpolate(x, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear", align_corners=False)


def normalise(images: np.ndarray, organ: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """Robust z-score of each channel inside the organ mask; zero outside it.

    ``(x - median) / (IQR / 1.349)`` over organ voxels (the IQR of a normal distribution is
    1.349 sigma), clipped to ``NORMALISED_RANGE``. Robust statistics keep bright lesions
    and intensity outliers from setting the scale; the result does not depend on the
    scanner's intensity units (uint16 raw, z-scored float, ...).

    Raises ImageError for a channel (named by ``names``) with no spread inside the organ:
    a blank, constant or mostly empty image would be segmented confidently and wrongly.
    """
    if not organ.any():
        raise ImageError("the organ mask is empty; cannot normalise intensities inside it")
    out = np.zeros(images.shape, dtype=np.float32)
    for c in range(images.shape[0]):
        values = images[c][organ]
        p25, median, p75 = np.percentile(values, [25, 50, 75])
        scale = (p75 - p25) / 1.349
        if not scale > 1e-6 * max(abs(float(p25)), abs(float(p75)), 1e-30):
            name = names[c] if names else f"channel {c + 1}"
            raise ImageError(
                f"{name} has no intensity spread inside the organ mask (its middle half of values is "
                f"{float(median):g} throughout): a blank, constant or mostly empty image cannot be segmented; check the file"
            )
        z = (images[c] - median) / scale
        np.clip(z, *NORMALISED_RANGE, out=z)
        out[c] = np.where(organ, z, 0.0)
    return out
