"""PNG montages of volumes with lesion outlines, for looking at data and results."""

from __future__ import annotations

import numpy as np


def to_uint8(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Window an image to 0..255 on the 0.5-99.5 percentiles inside ``mask`` (or of the
    non-zero voxels)."""
    if mask is None or not mask.any():
        mask = image > 0
    values = image[mask] if mask.any() else image
    lo, hi = np.percentile(values, [0.5, 99.5])
    return (np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def montage(slices: list[np.ndarray], outlines: list[np.ndarray | None] | None = None, columns: int = 4) -> np.ndarray:
    """Tile 2D uint8-scaled slices into one RGB image; outlines drawn in red."""
    from skimage.segmentation import find_boundaries

    h = max(s.shape[0] for s in slices)
    w = max(s.shape[1] for s in slices)
    rows = (len(slices) + columns - 1) // columns
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k, s in enumerate(slices):
        rgb = np.repeat(s[..., None], 3, axis=2)
        if outlines is not None and outlines[k] is not None:
            edge = find_boundaries(outlines[k], mode="outer")
            rgb[edge] = (255, 40, 40)
        r, c = divmod(k, columns)
        canvas[r * h : r * h + s.shape[0], c * w : c * w + s.shape[1]] = rgb
    return canvas


def volume_montage(
    volume: np.ndarray, lesions: np.ndarray | None, n_slices: int = 4, organ: np.ndarray | None = None
) -> list[np.ndarray]:
    """``n_slices`` evenly spaced slices (axis 0) of a volume, windowed, with lesion masks."""
    idx = np.linspace(0.2, 0.8, n_slices) * (volume.shape[0] - 1)
    scaled = to_uint8(volume, organ)
    picks = [int(round(i)) for i in idx]
    return [scaled[i] for i in picks], [None if lesions is None else lesions[i] for i in picks]


def radiological(slices: np.ndarray, direction) -> np.ndarray:
    """Flip axial (..., rows, cols) slices of a *stored* (z, y, x) array with ITK
    ``direction`` so that anterior is up and the patient's right is on the viewer's left,
    as radiologists read them. (A Case's slices are in that order already.)"""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    if d[1, 1] < 0:  # rows run towards anterior (LPS y decreasing)
        slices = slices[..., ::-1, :]
    if d[0, 0] < 0:  # columns run towards the patient's right
        slices = slices[..., :, ::-1]
    return slices


def save_png(rgb: np.ndarray, path) -> None:
    from skimage.io import imsave

    imsave(str(path), rgb, check_contrast=False)
