"""Patch positions and rotated patch extraction.

Patches are cut straight out of a slice by a rotated sampling grid, so rotation never
blurs twice and never brings in padded corners from a smaller crop: image channels are
sampled bilinearly, labels and weight maps with nearest neighbour on the very same grid,
which keeps labels aligned with the image at any angle.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PATCH_SIZE = 128


def random_patch_centres(organ: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` patch centres (row, col) drawn uniformly from the organ pixels of a slice.

    Base training (paper): 25 overlapping patches per lesion slice, inside the organ.
    Centres sit on pixel corners (+0.5) so an unrotated even-sized patch is an exact crop.
    """
    rows, cols = np.nonzero(organ)
    if rows.size == 0:
        raise ValueError("the slice has no organ pixels to place patches in")
    pick = rng.integers(0, rows.size, size=n)
    return np.stack([rows[pick], cols[pick]], axis=1).astype(np.float64) + 0.5


def corner_and_centre_patch_centres(organ: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """Five patch centres (row, col): the four corners of the organ's bounding box in the
    slice and its centre (paper, fine-tuning).

    A corner patch has its corner on the box's corner and extends inwards. Along an axis
    where the box is shorter than a patch, the patches are centred on the box instead (the
    "corners" would otherwise reach beyond the box on one side only). Every centre is then
    clamped so that the unrotated patch lies on the slice (centred on the slice when the
    slice is smaller than a patch).
    """
    rows, cols = np.nonzero(organ)
    if rows.size == 0:
        raise ValueError("the slice has no organ pixels to place patches in")
    half = size / 2
    per_axis = []
    for lo, hi, length in ((rows.min(), rows.max() + 1, organ.shape[0]), (cols.min(), cols.max() + 1, organ.shape[1])):
        middle = (lo + hi) / 2
        near, far = (lo + half, hi - half) if hi - lo >= size else (middle, middle)
        if length <= size:
            per_axis.append((length / 2,) * 3)
        else:
            per_axis.append(tuple(min(max(c, half), length - half) for c in (near, far, middle)))
    (top, bottom, mid_row), (left, right, mid_col) = per_axis
    return np.array(
        [[top, left], [top, right], [bottom, left], [bottom, right], [mid_row, mid_col]],
        dtype=np.float64,
    )


def sampling_grid(
    centres: np.ndarray, angles_deg: np.ndarray, image_shape: tuple[int, int], size: int = PATCH_SIZE
) -> torch.Tensor:
    """``grid_sample`` grid (N, size, size, 2) of rotated square patches.

    Output pixel (u, v) of patch k samples the slice at
    ``centre_k + R(angle_k) @ (u - (size-1)/2, v - (size-1)/2)`` (row, col).
    """
    h, w = image_shape
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    du, dv = torch.meshgrid(offsets, offsets, indexing="ij")
    theta = torch.as_tensor(np.deg2rad(angles_deg), dtype=torch.float64)[:, None, None]
    cos, sin = torch.cos(theta), torch.sin(theta)
    centres_t = torch.as_tensor(centres, dtype=torch.float64)
    # centre is in continuous pixel-edge coordinates; pixel i's centre is at i + 0.5
    rows = centres_t[:, 0, None, None] + cos * du - sin * dv
    cols = centres_t[:, 1, None, None] + sin * du + cos * dv
    # align_corners=False normalisation: x = 2 * pos / extent - 1 with pos in edge coords
    grid = torch.stack([2 * cols / w - 1, 2 * rows / h - 1], dim=-1)
    return grid.float()


def extract_patches(
    image: torch.Tensor,
    centres: np.ndarray,
    angles_deg: np.ndarray,
    size: int = PATCH_SIZE,
    label: bool = False,
) -> torch.Tensor:
    """Rotated patches from one slice.

    Parameters
    ----------
    image : (C, H, W) tensor
    centres : (N, 2) patch centres (row, col) in pixel-edge coordinates
    angles_deg : (N,) rotation angles
    label : nearest-neighbour sampling (labels, weights) instead of bilinear

    Returns
    -------
    (N, C, size, size) tensor; outside the slice is zero.
    """
    centres = np.atleast_2d(centres)
    grid = sampling_grid(centres, np.asarray(angles_deg, dtype=np.float64), tuple(image.shape[-2:]), size)
    batch = image[None].expand(len(centres), *image.shape).to(grid.device)
    return F.grid_sample(
        batch.float(), grid, mode="nearest" if label else "bilinear", padding_mode="zeros", align_corners=False
    )
