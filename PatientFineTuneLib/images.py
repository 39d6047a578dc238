"""Reading and writing images, multi-sequence cases on one grid, slicing, normalisation
and organ masks.

Conventions
-----------
* Every file is read with SimpleITK, so NIfTI, NRRD, MetaImage and any other format it
  knows work; geometry (origin, spacing, direction) always comes from the header.
* A case's arrays are kept *slice-first*: ``(channels, slices, rows, cols)`` for images and
  ``(slices, rows, cols)`` for masks, where the slice axis is the acquisition axis (largest
  spacing) or, for (near-)isotropic data, the index axis closest to the patient's
  superior-inferior axis, so isotropic volumes are cut axially whatever their storage order.
  Rows and columns are put in one anatomical orientation (radiological display order), so a
  volume stored flipped or transposed gives the network the same slices
  (:class:`SliceLayout`). This is a permutation and flips of the stored voxels: results
  are mapped back onto the input grid exactly, with the input's origin, spacing and
  direction.
* Every resampling of an array (image, mask, weight map, network output) goes through
  :func:`.arrays.resample_array`, which is pixel-centre aligned.
* Sequences with several channels (DCE phases, DWI b-values) are one file each, stored as a
  4D image (x, y, z, channel) or as a 3D image with vector pixels.
"""

from __future__ import annotations

import gzip
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .arrays import NORMALISED_RANGE, SPACING_TOLERANCE, ImageError, normalise, resample_array, resampled_shape  # noqa: F401 (public here too)
from .brainmask import BIAS_CORRECTION_CHOICES, SKULL_STRIPPED_CHOICES, brain_mask, correct_bias_field
from .files import atomic_write, incomplete_output

if TYPE_CHECKING:
    import torch


class GeometryError(ImageError):
    """Images that must share one voxel grid do not."""


# ---------------------------------------------------------------------------------------
# Reading and writing


def read_image(path: str | os.PathLike | sitk.Image, series_uid: str | None = None) -> sitk.Image:
    """Read any image SimpleITK can read, or a folder holding a DICOM series (the one with
    ``series_uid`` when it holds several), with a clear error otherwise (an image already
    in memory, e.g. from a Slicer volume node, is returned as it is)."""
    if isinstance(path, sitk.Image):
        return path
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    if _nifti_sheared(
        path
    ):  # before ITK, which coerces such a NIfTI to orthogonal axes (a warning) or refuses it in its words
        raise _sheared_error(path)
    try:
        with native_stderr_captured():
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageError(f"could not read {path} as an image ({str(exc).strip().splitlines()[-1]})") from None
    if _sheared(np.array(image.GetDirection()).reshape(image.GetDimension(), image.GetDimension())):
        raise _sheared_error(path)
    one_slice = image.GetDimension() == 2 or (image.GetDimension() == 3 and image.GetSize()[2] == 1)
    if one_slice and path.suffix.lower() in ("", ".dcm", ".ima"):
        raise ImageError(f"{path} is a single 2D DICOM image; give the folder that holds the whole series instead")
    return image


def _sheared(axes: np.ndarray) -> bool:
    """Whether the columns of ``axes`` (voxel axes in physical space, any lengths) are not
    mutually perpendicular."""
    unit = axes / np.linalg.norm(axes, axis=0)
    return not np.allclose(unit.T @ unit, np.eye(len(unit)), atol=1e-4)


def _nifti_sheared(path: Path) -> bool:
    """Whether a NIfTI file's affine (sform, else qform; read from the header only) has
    non-perpendicular voxel axes."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return False
    import nibabel

    try:
        affine = nibabel.load(str(path)).header.get_best_affine()
    except Exception:  # nibabel raises many types for damaged headers: ITK's reader then says what is wrong
        return False
    return _sheared(affine[:3, :3])


def _sheared_error(path: Path) -> ImageError:
    """The one message for an image with sheared axes, whatever its format."""
    return ImageError(
        f"{path} has sheared (non-perpendicular) voxel axes, which the slice grid cannot hold: results would land "
        "on another grid. Resample it onto a grid with perpendicular axes first (e.g. 3D Slicer's Resample Scalar Volume)"
    )


def dicom_series_uids(folder: str | os.PathLike) -> list[str]:
    """The DICOM series instance UIDs of the files in ``folder`` (not its subfolders)."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def read_dicom_series(folder: Path, series_uid: str | None = None) -> sitk.Image:
    """One DICOM series of ``folder`` as a 3D image (slices sorted by position): the only
    one, or the one with ``series_uid``."""
    series = dicom_series_uids(folder)
    if not series:
        raise ImageError(
            f"{folder} is a folder without a DICOM series; give an image file (NIfTI, NRRD, ...) or a DICOM series folder"
        )
    listed = f"{', '.join(series[:4])}{', ...' if len(series) > 4 else ''}"
    if series_uid is not None and series_uid not in series:
        raise ImageError(f"{folder} holds no DICOM series {series_uid}; its series: {listed}")
    if series_uid is None and len(series) > 1:
        raise ImageError(
            f"{folder} holds {len(series)} DICOM series ({listed}); choose one with --series-uid UID, or put each series in its own folder"
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid or series[0])
    if len(files) == 1 and _dicom_frames(files[0]) > 1:  # one multi-frame file holds the whole volume
        return read_image(files[0])
    check_dicom_slices(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with native_stderr_captured():  # the checks above said what matters; ITK's warnings would bury it
            return reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"could not read the DICOM series in {folder} ({str(exc).strip().splitlines()[-1]})") from None


#: DICOM tags of a slice's geometry: Image Position and Image Orientation (Patient).
_POSITION, _ORIENTATION = "0020|0032", "0020|0037"


def _dicom_frames(file: str) -> int:
    """How many frames (slices) one DICOM file holds."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    size = reader.GetSize()
    return size[2] if len(size) > 2 else 1


def check_dicom_slices(folder: Path, files: Sequence[str]) -> None:
    """Refuse a DICOM series whose slices do not stack into one regular volume: slices of
    another orientation, two slices at one position (a slice sent twice) or uneven gaps (a
    missing slice). ITK would read each with a wrong slice spacing or shifted positions and
    say so only in a warning. The message names the slices (their files)."""
    names = [Path(f).name for f in files]
    if len(files) < 2:
        raise ImageError(
            f"{folder} holds a single DICOM slice ({names[0]}); a volume needs the whole series: give its folder with every slice"
        )
    geometry = []
    for f in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(f)
        reader.ReadImageInformation()
        if not (reader.HasMetaDataKey(_POSITION) and reader.HasMetaDataKey(_ORIENTATION)):
            return  # no geometry in the headers to check (ITK orders such files by name)
        geometry.append(
            [float(v) for v in (reader.GetMetaData(_POSITION) + "\\" + reader.GetMetaData(_ORIENTATION)).split("\\")]
        )
    geometry = np.array(geometry)
    positions, orientations = geometry[:, :3], geometry[:, 3:9]
    alike = np.all(np.abs(orientations[:, None] - orientations[None]) < 1e-3, axis=2)
    majority = int(np.argmax(alike.sum(axis=1)))  # a slice with the orientation most slices have
    turned = [n for n, like in zip(names, alike[majority]) if not like]
    if turned:
        raise ImageError(
            f"{folder}: {len(turned)} of its {len(files)} slices ({', '.join(turned[:4])}{', ...' if len(turned) > 4 else ''}) "
            "have another orientation than the others; a series must be one stack of parallel slices: put them in a folder of their own"
        )
    normal = np.cross(orientations[majority, :3], orientations[majority, 3:])
    depth = positions @ normal
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    same = np.flatnonzero(gaps < 1e-3)
    if same.size:
        a, b = names[order[same[0]]], names[order[same[0] + 1]]
        raise ImageError(
            f"{folder}: slices {a} and {b} are at the same position ({depth[order[same[0]]]:.2f} mm along the slice normal): "
            "a slice was sent twice; remove one of them or export the series again"
        )
    spacing = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - spacing) > 0.01 * spacing)
    if uneven.size:
        a, b = names[order[uneven[0]]], names[order[uneven[0] + 1]]
        raise ImageError(
            f"{folder}: the slices are not evenly spaced: {a} and {b} are {gaps[uneven[0]]:g} mm apart where the others are "
            f"{spacing:g} mm (a missing slice?); export the whole series again"
        )


def assign_series_uids(paths: Sequence, series_uids: Sequence[str]) -> list[str | None]:
    """Match ``series_uids`` (``--series-uid``, in order) to the ``paths`` that are folders
    holding several DICOM series, in order; None for every other path.

    Raises ImageError when more UIDs are given than such folders (a left-over UID would be
    silently ignored otherwise).
    """
    if not series_uids:  # a folder with several series is refused when it is read
        return [None] * len(paths)
    remaining = list(series_uids)
    assigned: list[str | None] = []
    for path in paths:
        several = not isinstance(path, sitk.Image) and Path(path).is_dir() and len(dicom_series_uids(path)) > 1
        assigned.append(remaining.pop(0) if several and remaining else None)
    if remaining:
        raise ImageError(
            f"{len(series_uids)} --series-uid given but only {len(series_uids) - len(remaining)} image folder(s) hold several "
            "DICOM series; give one --series-uid per such folder, in the order of the images"
        )
    return assigned


def nonfinite_voxels(source, values: np.ndarray) -> int:
    """NaN and infinite voxels of an image: counted in ``values`` and, for NIfTI files, in
    the raw file, because SimpleITK's NIfTI reader turns them into zeros."""
    bad = int((~np.isfinite(values)).sum())
    if bad or isinstance(source, sitk.Image) or not str(source).lower().endswith((".nii", ".nii.gz")):
        return bad
    import nibabel

    stored = nibabel.load(str(source))  # reads the header only
    if not np.issubdtype(stored.get_data_dtype(), np.floating):
        return 0  # integer voxels cannot be NaN: no second read of the file
    raw = np.asanyarray(stored.dataobj)
    return int((~np.isfinite(raw)).sum())


def write_image(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False, compress: bool = True) -> None:
    """Write an image atomically; refuses to replace an existing file unless ``overwrite``.

    The file is read back before it gets its name: ITK's writers do not report a write
    that failed part-way (a full disk gives a cut file, a ``** ERROR: NWAD`` line on
    stderr and no exception), so a file that does not read back as ``image`` raises
    :class:`~PatientFineTuneLib.files.OutputError` instead.
    """
    path = Path(path)

    def write(tmp):
        with native_stderr_captured() as printed:
            sitk.WriteImage(image, tmp, compress)
            whole = _reads_back_as(tmp, image)
        if not whole:  # ITK's own lines about it would only repeat ours, less clearly
            raise incomplete_output(path)
        sys.stderr.write(printed.text)

    atomic_write(path, write, overwrite=overwrite)


def _reads_back_as(path: str, image: sitk.Image) -> bool:
    """Whether the file at ``path`` holds ``image``'s voxels, all of them."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path) as f:  # a cut gzip stream raises at its end; ITK would read zeros
                while f.read(1 << 22):
                    pass
        back = sitk.ReadImage(path)
    except (OSError, EOFError, zlib.error, RuntimeError):
        return False
    return bool(np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image), equal_nan=True))


@contextmanager
def native_stderr_captured() -> Iterator[SimpleNamespace]:
    """Collect what native code (ITK) prints on file descriptor 2 meanwhile; the yielded
    namespace's ``text`` holds it afterwards, for the caller to show or drop."""
    printed = SimpleNamespace(text="")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            printed.text = capture.read().decode(errors="replace")


def channels_and_grid(image: sitk.Image) -> tuple[np.ndarray, sitk.Image]:
    """Split an image into channels and its 3D grid.

    Returns
    -------
    channels : ndarray, (C, z, y, x) float32
    grid : sitk.Image
        A 3D image carrying the geometry (its pixels are not meaningful).
    """
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        arr = sitk.GetArrayFromImage(image)  # (t, z, y, x)
        grid = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        return arr.astype(np.float32, copy=False), grid
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ImageError(f"expected a 3D or 4D image, got {image.GetDimension()}D")
    arr = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)
        grid = sitk.VectorIndexSelectionCast(image, 0)
    else:
        arr = arr[None]
        grid = image
    return arr.astype(np.float32, copy=False), grid


def grid_mismatch(a: sitk.Image, b: sitk.Image) -> str | None:
    """Name the first geometric difference between two 3D grids, or None if they match."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=1e-4, atol=1e-6):
        return f"spacing {a.GetSpacing()} vs {b.GetSpacing()}"
    tol = 1e-3 * float(sa.min())
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-5)):
        return f"origin {a.GetOrigin()} vs {b.GetOrigin()}"
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        return f"direction {a.GetDirection()} vs {b.GetDirection()}"
    return None


def resample_onto(image: sitk.Image, reference: sitk.Image, label: bool = False) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid (identity transform, physical space)."""
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    if image.GetDimension() == 4:
        # Resample each channel and stack them back into a 4D image.
        size = list(image.GetSize())
        vols = [resample_onto(sitk.Extract(image, size[:3] + [0], [0, 0, 0, t]), reference) for t in range(size[3])]
        return sitk.JoinSeries(vols)
    return sitk.Resample(image, reference, sitk.Transform(), interp, 0.0, image.GetPixelID())


# ---------------------------------------------------------------------------------------
# Slicing


def slice_axis(grid: sitk.Image) -> int:
    """ITK index axis (0=i, 1=j, 2=k) along which 2D slices are taken.

    The acquisition axis (largest spacing) when the voxels are clearly anisotropic
    (> 1.2x); otherwise the index axis most parallel to the superior-inferior direction,
    so isotropic data is cut axially.
    """
    spacing = np.array(grid.GetSpacing())
    k = int(np.argmax(spacing))
    if spacing[k] > 1.2 * np.delete(spacing, k).max():
        return k
    direction = np.array(grid.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2, :])))  # row 2: S component in LPS


#: Where rows and columns of a slice point, by the physical axis closest to the slice
#: normal (0 = L, 1 = P, 2 = S in LPS): radiological display order, as Slicer shows slices
#: (axial: columns to the patient's left, rows to posterior; coronal and sagittal: rows
#: downwards, i.e. inferior; sagittal columns to posterior).
_DISPLAY_DIRECTIONS = {
    2: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    1: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    0: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class SliceLayout:
    """How a stored (z, y, x) volume becomes slice-first (slices, rows, cols) arrays.

    The slice axis is a stored index axis (so slice ``s`` is index ``s`` along it, as the
    user sees it); within the slice, rows and columns are the other two index axes, swapped
    and flipped as needed so that every slice is in the same anatomical orientation
    whatever the storage order (see :func:`slice_layout`). It is a permutation and
    flips of the stored voxels: nothing is interpolated and :meth:`from_slices` undoes it
    exactly.
    """

    axis: int  # ITK index axis (0=i, 1=j, 2=k) of the slices
    row_axis: int  # ITK index axis running down the rows
    col_axis: int  # ITK index axis running along the columns
    flip_rows: bool = False
    flip_cols: bool = False

    def _numpy_axes(self, ndim: int) -> list[int]:
        return [ndim - 1 - a for a in (self.axis, self.row_axis, self.col_axis)]

    def to_slices(self, volume: np.ndarray) -> np.ndarray:
        """(..., z, y, x) stored array -> (..., slices, rows, cols), C-contiguous."""
        n = volume.ndim
        out = np.moveaxis(volume, self._numpy_axes(n), [n - 3, n - 2, n - 1])
        if self.flip_rows:
            out = np.flip(out, -2)
        if self.flip_cols:
            out = np.flip(out, -1)
        return np.ascontiguousarray(out)

    def from_slices(self, slices: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_slices`: back to the stored (..., z, y, x) order."""
        n = slices.ndim
        out = slices
        if self.flip_rows:
            out = np.flip(out, -2)
        if self.flip_cols:
            out = np.flip(out, -1)
        return np.ascontiguousarray(np.moveaxis(out, [n - 3, n - 2, n - 1], self._numpy_axes(n)))

    def itk_index(self, s: float, row: float, col: float, slice_shape: Sequence[int]) -> list[float]:
        """Continuous ITK (i, j, k) index of slice-first position (s, row, col) in a slice of
        ``slice_shape`` (rows, cols)."""
        index = [0.0, 0.0, 0.0]
        index[self.axis] = float(s)
        index[self.row_axis] = float(slice_shape[0] - 1 - row if self.flip_rows else row)
        index[self.col_axis] = float(slice_shape[1] - 1 - col if self.flip_cols else col)
        return index

    def spacing(self, grid: sitk.Image) -> tuple[float, float, float]:
        """Spacing (mm) of the (slices, rows, cols) axes."""
        spacing = grid.GetSpacing()
        return tuple(float(spacing[a]) for a in (self.axis, self.row_axis, self.col_axis))


def slice_layout(grid: sitk.Image) -> SliceLayout:
    """The slicing of ``grid``: the slice axis of :func:`slice_axis`, then rows and
    columns in radiological display order (``_DISPLAY_DIRECTIONS``), so the network sees
    the same slice whether the scanner stored the volume flipped, transposed or not.

    Rows and columns are assigned to the two in-plane index axes that are best aligned
    with the display directions (an oblique acquisition keeps its own in-plane angle),
    and flipped where they point the other way.
    """
    axis = slice_axis(grid)
    direction = np.array(grid.GetDirection()).reshape(3, 3)  # column a: ITK axis a in LPS
    normal = int(np.argmax(np.abs(direction[:, axis])))
    col_target, row_target = (np.array(v) for v in _DISPLAY_DIRECTIONS[normal])
    low, high = (a for a in range(3) if a != axis)
    stored = abs(direction[:, low] @ col_target) + abs(direction[:, high] @ row_target)
    swapped = abs(direction[:, high] @ col_target) + abs(direction[:, low] @ row_target)
    col_axis, row_axis = (low, high) if stored >= swapped else (high, low)
    return SliceLayout(
        axis,
        row_axis,
        col_axis,
        flip_rows=bool(direction[:, row_axis] @ row_target < 0),
        flip_cols=bool(direction[:, col_axis] @ col_target < 0),
    )


# ---------------------------------------------------------------------------------------
# Intensities and organ masks


# ---------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    """One timepoint of one patient: co-registered sequences, organ and lesion masks.

    Arrays are slice-first (see module docstring); ``images`` are raw intensities until
    :func:`prepare_case` normalises them.
    """

    images: np.ndarray  # (C, S, H, W) float32
    organ: np.ndarray  # (S, H, W) bool
    lesions: np.ndarray | None  # (S, H, W) bool
    grid: sitk.Image  # 3D reference grid of the first sequence
    layout: SliceLayout  # how the stored volume became slice-first arrays
    name: str = ""
    sources: dict = field(default_factory=dict)

    @property
    def axis(self) -> int:
        """ITK index axis (0=i, 1=j, 2=k) of the slices."""
        return self.layout.axis

    @property
    def spacing(self) -> tuple[float, float]:
        """In-plane (row, col) spacing in mm."""
        return self.volume_spacing[1:]

    @property
    def volume_spacing(self) -> tuple[float, float, float]:
        """Spacing (mm) of the (slices, rows, cols) axes of the arrays."""
        return self.layout.spacing(self.grid)

    def slice_tensor(self, s: int) -> torch.Tensor:
        """Slice ``s`` of every channel as a (C, H, W) float tensor."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.images[:, s]))

    def physical_point(self, s: int, row: float, col: float) -> tuple[float, float, float]:
        """Physical (LPS mm) position of a slice-first index."""
        index = self.layout.itk_index(s, row, col, self.organ.shape[-2:])
        return tuple(float(c) for c in self.grid.TransformContinuousIndexToPhysicalPoint(index))

    def lesion_slices(self) -> list[int]:
        if self.lesions is None:
            return []
        return [int(s) for s in np.flatnonzero(self.lesions.any(axis=(1, 2)))]

    def to_image(self, slices: np.ndarray, pixel_type=None) -> sitk.Image:
        """A slice-first (S, H, W) array as a SimpleITK image on this case's input grid."""
        image = sitk.GetImageFromArray(self.layout.from_slices(slices))
        image.CopyInformation(self.grid)
        if pixel_type is not None:
            image = sitk.Cast(image, pixel_type)
        return image


#: Fewest voxels along any axis of a volume: a 3x3x3 closing, the brain mask's 3D network
#: and the bias-field fit need a volume, not a slice.
MIN_VOXELS_PER_AXIS = 3


def check_usable_volume(image: sitk.Image, what: str) -> None:
    """Refuse, before any work, an image the network cannot use, in our words (the
    libraries would fail later and unclearly): a 2D image or a single slice (torch:
    "Input and output sizes should be greater than 0"), and float64 values beyond
    float32's range (they become infinite in the network's float32)."""
    size = image.GetSize()[:3]
    if image.GetDimension() < 3 or min(size) < MIN_VOXELS_PER_AXIS:
        raise ImageError(
            f"{what} is a single slice or too thin to be a volume (size {size}, at least {MIN_VOXELS_PER_AXIS} voxels along "
            "every axis are needed); give the whole scan (for DICOM, the folder with every slice)"
        )
    if image.GetPixelID() in (sitk.sitkFloat64, sitk.sitkVectorFloat64):
        values = sitk.GetArrayViewFromImage(image)
        largest = float(np.abs(values[np.isfinite(values)]).max(initial=0.0))
        float32_max = float(
            np.finfo(np.float32).max
        )  # as a Python float: comparing with the float32 would cast 1e300 to it
        if largest > float32_max:
            raise ImageError(
                f"{what} holds values up to {largest:.3g}, beyond what float32 holds ({float32_max:.3g}), which "
                "the network computes in; rescale the image (intensity units do not matter, the network normalises them)"
            )


def source_name(source) -> str:
    """How to name an image source in messages: its path, or that it was given in memory."""
    return "(image in memory)" if isinstance(source, sitk.Image) else str(source)


def _binary_mask(source, grid: sitk.Image, what: str, resample: bool, labels: Sequence[int] | None) -> np.ndarray:
    image = read_image(source)
    path = source_name(source)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(f"{what} {path} must be a 3D single-channel image")
    mismatch = grid_mismatch(grid, image)
    if mismatch:
        if not resample:
            raise GeometryError(
                f"{what} {path} is not on the grid of the first sequence ({mismatch}). "
                "Resample it onto the first sequence (resample_to / --resample-to) or fix the file."
            )
        image = resample_onto(image, grid, label=True)
    arr = sitk.GetArrayFromImage(image)
    return np.isin(arr, list(labels)) if labels else arr > 0


def load_case(
    sequence_paths: Sequence[str | os.PathLike | sitk.Image],
    organ_path: str | os.PathLike | None = None,
    lesion_path: str | os.PathLike | None = None,
    expected_channels: Sequence[int] | None = None,
    sequence_names: Sequence[str] | None = None,
    resample_to_first: bool = False,
    lesion_labels: Sequence[int] | None = None,
    auto_organ: bool = True,
    name: str = "",
    skull_stripped: str = "auto",
    bias_correction: str = "auto",
    series_uids: Sequence[str | None] | None = None,
) -> Case:
    """Read a multi-sequence case onto one grid.

    Parameters
    ----------
    sequence_paths : one path (or SimpleITK image) per sequence, in the model's pathway order.
    organ_path : organ mask; if None and ``auto_organ``, an automatic brain mask is
        computed from the first sequence (brain presets only; see
        :func:`~PatientFineTuneLib.brainmask.brain_mask`).
    lesion_path : lesion mask (any label > 0 is lesion, or only ``lesion_labels``).
    expected_channels : channel count of each sequence (from the model); checked.
    resample_to_first : resample every other sequence and mask onto the first sequence's
        grid instead of refusing mismatched grids.
    skull_stripped : for the automatic brain mask: "auto" (detected from the image),
        "yes" or "no".
    series_uids : for sequences given as a DICOM folder holding several series, the
        series to read (aligned with ``sequence_paths``; see :func:`assign_series_uids`).
    bias_correction : N4 bias-field correction of every sequence inside the brain mask:
        "auto" (only for a skull-on scan given without an organ mask, i.e. raw), "on",
        "off".

    Raises
    ------
    GeometryError
        Sequences or masks on different grids (and ``resample_to_first`` is False).
    ImageError
        Wrong number of sequences or channels, NaN/inf voxels, empty organ mask.
    """
    if skull_stripped not in SKULL_STRIPPED_CHOICES:
        raise ValueError(f"skull_stripped must be one of {', '.join(SKULL_STRIPPED_CHOICES)}, not {skull_stripped!r}")
    if bias_correction not in BIAS_CORRECTION_CHOICES:
        raise ValueError(
            f"bias_correction must be one of {', '.join(BIAS_CORRECTION_CHOICES)}, not {bias_correction!r}"
        )
    names = list(sequence_names or [f"sequence {i + 1}" for i in range(len(sequence_paths))])
    if expected_channels is not None and len(sequence_paths) != len(expected_channels):
        raise ImageError(
            f"the model expects {len(expected_channels)} sequences ({', '.join(names)}), but {len(sequence_paths)} were given"
        )
    channels: list[np.ndarray] = []
    channel_names: list[str] = []
    grid = None
    sources = [source_name(p) for p in sequence_paths]
    for i, path in enumerate(sources):
        image = read_image(sequence_paths[i], series_uids[i] if series_uids else None)
        if grid is not None:
            ref = grid
            this_grid = channels_and_grid(image)[1]
            mismatch = grid_mismatch(ref, this_grid)
            if mismatch:
                if not resample_to_first:
                    raise GeometryError(
                        f"{names[i]} ({path}) is not on the grid of {names[0]} ({sources[0]}): "
                        f"{mismatch}. Register/resample the sequences onto one grid, or pass "
                        "--resample-to to resample them onto the first sequence."
                    )
                image = resample_onto(image, ref)
        check_usable_volume(image, f"{names[i]} ({path})")
        arr, this_grid = channels_and_grid(image)
        if grid is None:
            grid = this_grid
        if expected_channels is not None and arr.shape[0] != int(expected_channels[i]):
            raise ImageError(
                f"{names[i]} ({path}) has {arr.shape[0]} channel(s); the model expects "
                f"{expected_channels[i]}. Multi-channel sequences are one 4D or vector image."
            )
        bad = nonfinite_voxels(sequence_paths[i], arr)
        if bad:
            raise ImageError(f"{names[i]} ({path}) contains {bad} NaN or infinite voxels; fix or mask them first")
        for c in range(arr.shape[0]):
            if not np.ptp(arr[c]) > 0:
                where = f" (channel {c + 1})" if arr.shape[0] > 1 else ""
                raise ImageError(
                    f"{names[i]}{where} ({path}) is blank or constant (every voxel is {float(arr[c].flat[0]):g}); "
                    "check that the right file was given"
                )
            channel_names.append(f"{names[i]} channel {c + 1}" if arr.shape[0] > 1 else names[i])
        channels.append(arr)
    images = np.concatenate(channels, axis=0)
    spacing_zyx = grid.GetSpacing()[::-1]

    brain = None
    if organ_path is not None:
        organ = _binary_mask(organ_path, grid, "organ mask", resample_to_first, None)
    elif auto_organ:
        first = sitk.GetImageFromArray(images[0])
        first.CopyInformation(grid)
        brain = brain_mask(first, skull_stripped)
        organ = brain.mask
    else:
        raise ImageError("this preset needs an organ mask (e.g. a liver mask); pass it with --organ")
    if not organ.any():
        raise ImageError(f"the organ mask {source_name(organ_path)} is empty")
    corrected = bias_correction == "on" or (
        bias_correction == "auto" and brain is not None and not brain.skull_stripped
    )
    if corrected:
        images = np.stack([correct_bias_field(channel, organ, spacing_zyx) for channel in images])
    lesions = None
    if lesion_path is not None:
        lesions = _binary_mask(lesion_path, grid, "lesion mask", resample_to_first, lesion_labels)

    layout = slice_layout(grid)
    return Case(
        images=layout.to_slices(images).astype(np.float32, copy=False),
        organ=layout.to_slices(organ),
        lesions=None if lesions is None else layout.to_slices(lesions),
        grid=grid,
        layout=layout,
        name=name,
        sources={
            "sequences": sources,
            "organ": source_name(organ_path) if organ_path is not None else brain.describe(),
            "bias_corrected": corrected,
            "lesions": source_name(lesion_path) if lesion_path is not None else None,
            "channel_names": channel_names,
        },
    )


def prepare_case(case: Case) -> Case:
    """The case with its intensities normalised inside its organ mask (a new case; the
    caller's keeps the intensities as read)."""
    return replace(case, images=normalise(case.images, case.organ, case.sources.get("channel_names")))


def with_absent_sequences(case: Case, channels: int) -> Case:
    """A normalised ``case`` whose images are extended with zero channels up to
    ``channels``: the sequences a model was trained to do without (sequence dropout, e.g.
    a FLAIR-only follow-up to a FLAIR + T1 model) reach it as they did in training, as the
    normalised median. Returns a new case; ``case`` is left as it is."""
    present = case.images.shape[0]
    if present > channels:
        raise ValueError(f"{case.name or 'the case'} has {present} channels; the model reads {channels}")
    blank = np.zeros((channels - present, *case.images.shape[1:]), dtype=case.images.dtype)
    return replace(case, images=np.concatenate([case.images, blank]))
