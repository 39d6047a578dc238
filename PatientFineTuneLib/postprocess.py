"""From lesion probability to lesion objects: threshold, morphology, smallest lesion, components, table.

Arrays are slice-first (S, H, W) as everywhere in the library, so "per slice" means
along axis 0.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .files import atomic_write

if TYPE_CHECKING:  # annotations only: labelling and tabulating lesions needs neither PyTorch nor image I/O
    import SimpleITK as sitk

    from .images import SliceLayout

CUBE_3x3x3 = np.ones((3, 3, 3), dtype=bool)
#: 3x3 plus in the slice plane only.
PLUS_IN_PLANE = ndimage.generate_binary_structure(2, 1)[None]


def threshold_probability(
    probability: np.ndarray, organ: np.ndarray | None = None, threshold: float = 0.5
) -> np.ndarray:
    """Lesion where the (organ-masked) lesion probability exceeds ``threshold``."""
    mask = probability > threshold
    if organ is not None:
        mask &= organ
    return mask


def close_cube(mask: np.ndarray) -> np.ndarray:
    """Morphological closing with a 3x3x3 cube (paper: fills holes in lesions).

    The volume is padded first: scipy's closing erodes with a zero border, which would
    otherwise erase lesions touching the edge of the volume.
    """
    padded = np.pad(mask, 2)
    closed = ndimage.binary_closing(padded, structure=CUBE_3x3x3)
    return closed[2:-2, 2:-2, 2:-2]


def open_plus_per_slice(mask: np.ndarray) -> np.ndarray:
    """Opening with a 3x3 plus in each slice (paper, liver only: removes noise pixels)."""
    return ndimage.binary_opening(mask, structure=PLUS_IN_PLANE)


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected lesion components with 26-connectivity; labels 1..n."""
    labels, n = ndimage.label(mask, structure=CUBE_3x3x3)
    return labels.astype(np.int32, copy=False), int(n)


def remove_small_lesions(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` without its lesions (26-connected components) of fewer than
    ``min_voxels`` voxels. ``min_voxels`` <= 1 keeps every lesion (the mask itself is
    returned)."""
    if min_voxels <= 1:
        return mask
    labels, _ = label_lesions(mask)
    # only the lesion voxels are looked at: a volume-sized gather costs seconds at 512x512x200
    voxels = np.flatnonzero(mask)
    of_lesion = labels.ravel()[voxels]
    large = np.bincount(of_lesion) >= min_voxels
    kept = np.zeros(mask.size, dtype=bool)
    kept[voxels[large[of_lesion]]] = True
    return kept.reshape(mask.shape)


def postprocess(
    probability: np.ndarray,
    organ: np.ndarray | None,
    opening: bool = False,
    threshold: float = 0.5,
    min_lesion_voxels: int = 1,
) -> np.ndarray:
    """The paper's post-processing: mask by organ, threshold, 3x3x3 closing, and for the
    liver preset a per-slice plus opening; then lesions (26-connected) of fewer than
    ``min_lesion_voxels`` voxels are dropped (the brain presets' 2: single-voxel specks,
    see :class:`~PatientFineTuneLib.presets.Preset`). Returns a boolean lesion mask."""
    mask = close_cube(threshold_probability(probability, organ, threshold))
    if organ is not None:
        mask &= organ  # closing may bridge across the organ boundary
    if opening:
        mask = open_plus_per_slice(mask)
    return remove_small_lesions(mask, min_lesion_voxels)


def lesion_table(
    labels: np.ndarray,
    grid: sitk.Image,
    layout: SliceLayout,
    extra_maps: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """One row per lesion: id, voxels, volume (mm³), centroid in physical coordinates.

    Centroids are in the image file's physical space (ITK/DICOM LPS millimetres, as stored
    in NIfTI/NRRD by SimpleITK; Slicer shows RAS: negate x and y). ``extra_maps`` adds the
    mean of each given slice-first map inside each lesion (e.g. probability, uncertainty).
    """
    labels_zyx = layout.from_slices(labels)
    maps_zyx = {name: layout.from_slices(values) for name, values in (extra_maps or {}).items()}
    voxel_mm3 = float(np.prod(grid.GetSpacing()))
    rows = []
    # one small bounding box per lesion: no volume-sized temporaries (a 512x512x200 label
    # map would otherwise cost several float64 copies)
    for k, box in enumerate(ndimage.find_objects(labels_zyx)):
        if box is None:
            continue
        inside = labels_zyx[box] == k + 1
        count = int(inside.sum())
        centre = np.argwhere(inside).mean(axis=0) + [b.start for b in box]
        x, y, z = grid.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre[::-1]])
        row = {
            "id": k + 1,
            "voxels": count,
            "volume_mm3": round(count * voxel_mm3, 3),
            "centroid_x_mm": round(x, 2),
            "centroid_y_mm": round(y, 2),
            "centroid_z_mm": round(z, 2),
        }
        for name, values in maps_zyx.items():
            row[f"mean_{name}"] = round(float(values[box][inside].mean()), 4)
        rows.append(row)
    return rows


LESION_TABLE_COLUMNS = ["id", "voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]


def write_csv(rows: list[dict], path: str | Path, columns: list[str] | None = None, overwrite: bool = False) -> None:
    """Write dict rows as CSV atomically (header even when there are no rows)."""
    columns = columns or (list(rows[0]) if rows else LESION_TABLE_COLUMNS)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)

    def write(tmp):
        Path(tmp).write_text(buffer.getvalue())

    atomic_write(path, write, overwrite=overwrite)
