"""Brain masks and bias-field correction of head MRI, skull on or off.

A radiologist's scan is raw: skull, scalp and neck on, with the coil's bias field. The
brain presets need a brain mask (intensities are normalised inside it, and only voxels
inside it are segmented) and intensities free of the bias field. This module decides,
per scan:

* **Skull-on scans** are masked by deepbet (Fisch et al., *Computers in Biology and
  Medicine* 2024; MIT licence), a 3D network whose two TorchScript models ship inside its
  PyPI wheel (nothing is downloaded). On every skull-on real scan we have it matches the
  reference brain mask better than the heuristic below (FLAIR and T1: Dice 0.95-0.96
  against 0.83-0.95; ``Testing/benchmarks/eval_skull_stripping.py``, docs/results.md).
  Their bias field is then corrected with SimpleITK's N4 inside that mask.
* **Skull-stripped scans** (public data sets, scans exported from a research pipeline)
  are left alone: their mask is the heuristic :func:`foreground_brain_mask` of their own
  foreground, which is what the base models were trained with, and they are not bias
  corrected again (such pipelines correct before stripping).

Whether a scan is skull-stripped is read from the image (:func:`tissue_outside_brain`:
a stripped scan has nothing as bright as tissue just outside the brain, a skull-on scan
has scalp, marrow and muscle there) or declared by the caller.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

#: ``skull_stripped`` choices: detect from the image, or declare it.
SKULL_STRIPPED_CHOICES = ("auto", "yes", "no")
#: ``bias_correction`` choices: on for skull-on scans only, always, never.
BIAS_CORRECTION_CHOICES = ("auto", "on", "off")
#: Fraction of the shell around the brain at tissue brightness below which a scan counts
#: as skull-stripped. Measured: 0.000-0.005 on the skull-stripped real sets (Ljubljana
#: cross-sectional, BraTS), 0.37-0.60 on skull-on ones (Ljubljana longitudinal FLAIR, T1W,
#: T2W; Brain-Tumor-Progression T1c; the synthetic heads).
STRIPPED_SHELL_FRACTION = 0.1
#: The shell: voxels this far (mm) outside the brain mask (skull, scalp, marrow, muscle).
SHELL_MM = (3.0, 20.0)
#: N4 runs on a copy shrunk by this factor in-plane (less along thick slices); the bias
#: field is smooth and is evaluated at full resolution from the fit. Measured on the raw
#: Ljubljana T1W and FLAIR (320x320x36-39): 0.7-0.9 s per volume on 2 cores, log field
#: within 0.014-0.018 RMS of a shrink-2 fit whose SD is 0.09-0.13; shrink 4 takes 5-7 s.
N4_SHRINK = 8


@dataclass(frozen=True)
class BrainMask:
    """A brain mask and how it was made.

    Attributes
    ----------
    mask : ndarray of bool, SimpleITK array order ``(z, y, x)`` of the scan's grid
    skull_stripped : whether the scan was taken (or declared) to be skull-stripped
    method : "deepbet" or "foreground heuristic"
    shell_fraction : :func:`tissue_outside_brain` of the scan, or None when declared
    """

    mask: np.ndarray
    skull_stripped: bool
    method: str
    shell_fraction: float | None = None

    def describe(self) -> str:
        how = (
            "declared"
            if self.shell_fraction is None
            else f"detected: {100 * self.shell_fraction:.1f} % of the shell outside the brain is tissue-bright"
        )
        state = "skull-stripped" if self.skull_stripped else "skull on"
        return f"automatic brain mask ({self.method}; scan {state}, {how})"


def foreground_brain_mask(volume: np.ndarray, spacing_zyx: Sequence[float], erosion_mm: float = 6.0) -> np.ndarray:
    """Approximate brain mask from a T1/T2/FLAIR volume's foreground (heuristic).

    Method: Gaussian smoothing, Otsu threshold (head or brain vs air), erosion by
    ``erosion_mm`` to cut the thin bridges between brain and scalp, the largest connected
    component, then a geodesic dilation back by the same distance that may only grow
    through above-threshold voxels (so it cannot jump across the dark skull into scalp or
    marrow), and hole filling slice by slice.

    Limits: a heuristic, not a skull stripper. It is right for skull-stripped scans (the
    foreground is the brain) and fair on skull-on FLAIR (Dice 0.95 to the reference
    brain mask), poor on skull-on T1 (0.83-0.90) and T1 post-contrast, where enhancing
    dura, marrow and scalp fat are as bright as brain and stay attached. Skull-on scans
    are masked by :func:`deepbet_brain_mask` instead (see :func:`brain_mask`).

    Parameters
    ----------
    volume : ndarray (z, y, x)
    spacing_zyx : voxel spacing in mm, numpy order

    Raises
    ------
    ValueError
        Nothing brighter than the background survives the erosion.
    """
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(volume.astype(np.float32), sigma=[1.0 / s for s in spacing_zyx])
    head = smooth > threshold_otsu(smooth[::2, ::2, ::2])
    core = ndimage.distance_transform_edt(head, sampling=spacing_zyx) > erosion_mm
    labels, n = ndimage.label(core)
    if n == 0:
        raise ValueError("automatic brain mask found no brain; provide an organ mask (--organ)")
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, n + 1))
    core = labels == (int(np.argmax(sizes)) + 1)
    steps = int(np.ceil(erosion_mm / min(spacing_zyx)))
    brain = ndimage.binary_dilation(core, ndimage.generate_binary_structure(3, 1), iterations=steps, mask=head)
    for z in range(brain.shape[0]):
        brain[z] = ndimage.binary_fill_holes(brain[z])
    return brain


def deepbet_brain_mask(image: sitk.Image) -> np.ndarray:
    """Brain mask of a skull-on T1, T1c, T2 or FLAIR scan by deepbet 1.0.2.

    deepbet works on arrays in the closest RAS+ voxel order, as nibabel loads them. The
    scan is reoriented with SimpleITK (a permutation and flips of its voxels, nothing
    interpolated), masked, and the mask is taken back onto the scan's grid by nearest
    neighbour on coincident voxel centres, so it is exact for any storage order,
    oblique or flipped.

    deepbet runs on the CPU (1.1-1.7 s per scan on 2 cores, the model loaded each time):
    the case is read before the network's device is chosen, and the time is small.

    Parameters
    ----------
    image : a 3D scalar SimpleITK image

    Returns
    -------
    ndarray of bool, SimpleITK array order ``(z, y, x)`` of ``image``'s grid
    """
    import nibabel
    from deepbet import BrainExtraction  # about 1 s to import (pandas): only when needed

    canonical = sitk.DICOMOrient(sitk.Cast(image, sitk.sitkFloat32), "RAS")
    voxels = np.ascontiguousarray(sitk.GetArrayFromImage(canonical).transpose(2, 1, 0))  # (i, j, k) as nibabel
    # the voxels are in RAS+ order already: a diagonal affine keeps deepbet from reordering them
    affine = np.diag([*canonical.GetSpacing(), 1.0])
    with warnings.catch_warnings():  # deepbet loads TorchScript, which torch now marks deprecated
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load")
        try:
            _, mask, _ = BrainExtraction(no_gpu=True).run(nibabel.Nifti1Image(voxels, affine))
        except (AssertionError, ValueError) as error:  # no foreground for its box, or no component to keep
            raise ValueError(
                f"the automatic brain mask (deepbet) found no brain ({error}); is this a head scan? Provide an organ mask (--organ)"
            ) from None
    mask_image = sitk.GetImageFromArray(
        np.ascontiguousarray(np.asarray(mask.dataobj).transpose(2, 1, 0)).astype(np.uint8)
    )
    mask_image.CopyInformation(canonical)
    back = sitk.Resample(mask_image, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back) > 0


def tissue_outside_brain(volume: np.ndarray, brain: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Fraction of the shell ``SHELL_MM`` outside ``brain`` that is as bright as tissue.

    "Tissue-bright" is above a quarter of the way from the background level (the
    volume's 1st percentile) to the brain's median, so the measure does not depend on
    intensity units or offsets (uint16 raw, z-scored float). Near 0 for a skull-stripped
    scan, 0.3 or more for a skull-on one (scalp, marrow, fat and muscle lie there).
    """
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing_zyx)
    shell = (distance > SHELL_MM[0]) & (distance < SHELL_MM[1])
    if not shell.any():
        return 0.0
    background = float(np.percentile(volume, 1))
    threshold = background + 0.25 * (float(np.median(volume[brain])) - background)
    return float((volume[shell] > threshold).mean())


def brain_mask(image: sitk.Image, skull_stripped: str = "auto") -> BrainMask:
    """The brain mask of a head scan: deepbet's if it is skull-on, the foreground's if not.

    Parameters
    ----------
    image : 3D scalar image (the first sequence of a case)
    skull_stripped : "auto" (detect), "yes" or "no" (declared)
    """
    if skull_stripped not in SKULL_STRIPPED_CHOICES:
        raise ValueError(f"skull_stripped must be one of {', '.join(SKULL_STRIPPED_CHOICES)}, not {skull_stripped!r}")
    volume = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    spacing_zyx = image.GetSpacing()[::-1]
    if skull_stripped == "yes":
        return BrainMask(foreground_brain_mask(volume, spacing_zyx), True, "foreground heuristic")
    deep = deepbet_brain_mask(image)
    if not deep.any():
        raise ValueError(
            "the automatic brain mask (deepbet) found no brain; is this a head scan? Provide an organ mask (--organ)"
        )
    if skull_stripped == "no":
        return BrainMask(deep, False, "deepbet")
    shell = tissue_outside_brain(volume, deep, spacing_zyx)
    if shell < STRIPPED_SHELL_FRACTION:
        return BrainMask(foreground_brain_mask(volume, spacing_zyx), True, "foreground heuristic", shell)
    return BrainMask(deep, False, "deepbet", shell)


def correct_bias_field(
    volume: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float], shrink: int = N4_SHRINK
) -> np.ndarray:
    """N4 bias-field correction of one volume inside ``mask`` (SimpleITK defaults otherwise).

    The field is fitted on a copy shrunk by ``shrink`` (slices thicker than ``shrink``
    times the in-plane spacing are not shrunk along that axis) and evaluated at full
    resolution. Voxels outside the mask are divided by the same smooth field. Returns a
    new float32 array; ``volume`` is not changed.
    """
    image = sitk.GetImageFromArray(np.maximum(volume, 0).astype(np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    fit_mask = sitk.GetImageFromArray((mask & (volume > 0)).astype(np.uint8))
    fit_mask.CopyInformation(image)
    finest = min(spacing_zyx)
    factors = [max(1, min(shrink, int(round(shrink * finest / s)))) for s in image.GetSpacing()]
    shrunk_mask = sitk.Shrink(fit_mask, factors)
    # N4 fits its B-spline over the mask's extent; one voxel thick along an axis, that
    # extent is zero and ITK fails with "Zero-valued spacing ... Refusing to change spacing"
    spans = [int(np.ptp(ix)) + 1 if ix.size else 0 for ix in np.nonzero(sitk.GetArrayFromImage(shrunk_mask))]
    if min(spans) < 2:
        raise ValueError(
            f"N4 bias-field correction cannot fit this volume: the brain spans {spans[::-1]} voxel(s) (x, y, z) of "
            f"{tuple(round(v, 3) for v in image.GetSpacing())} mm once shrunk by {factors} for the fit, and needs at least 2 "
            "along every axis; give --bias-correction off, or a finer scan"
        )
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.Execute(sitk.Shrink(image, factors), shrunk_mask)
    log_field = sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image))
    return (volume / np.exp(log_field)).astype(np.float32)


def head_pair_for_registration(
    baseline: sitk.Image, followup: sitk.Image, skull_stripped: str = "auto"
) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Two visits of a head, ready to register the follow-up onto the baseline.

    Returns the baseline and follow-up as float32 images, each bias-corrected inside its
    own brain mask when it is skull-on, and the baseline's brain mask (uint8) for the
    registration metric. Measured on the raw Ljubljana longitudinal pairs
    (``Testing/benchmarks/eval_registration.py``): without a mask the affine registration
    of patient 01 fails (FLAIR correlation inside the brain 0.20 where the supplied
    transforms give 0.94); inside deepbet's mask it comes within 0.004 of the supplied
    transforms, and within 0.0005 with N4 as well (patient 12: 0.0023, 0.0004).
    """
    prepared, mask = [], None
    for image in (baseline, followup):
        image = sitk.Cast(image, sitk.sitkFloat32)
        brain = brain_mask(image, skull_stripped)
        if not brain.skull_stripped:
            corrected = sitk.GetImageFromArray(
                correct_bias_field(sitk.GetArrayFromImage(image), brain.mask, image.GetSpacing()[::-1])
            )
            corrected.CopyInformation(image)
            image = corrected
        prepared.append(image)
        if mask is None:
            mask = sitk.GetImageFromArray(brain.mask.astype(np.uint8))
            mask.CopyInformation(image)
    return prepared[0], prepared[1], mask
