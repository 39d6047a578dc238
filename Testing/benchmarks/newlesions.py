"""New-lesion segmentation from a subtraction image (Wahlig et al. 2023): the cases of the
``brain-new-lesions`` preset, built for the evaluation (``eval_new_lesions.py``).

The follow-up FLAIR and the baseline FLAIR brought onto its grid are normalised alike
(robust z-score inside the brain), and their difference becomes a second input pathway
of the network, beside the follow-up FLAIR: a lesion that is new or has grown is bright
in both, an old stable lesion only in the FLAIR. Such a model reads the sequences of the
``brain-new-lesions`` preset (``FLAIR``, ``FLAIR_subtraction``) and is trained, stored,
loaded and applied like any other (``train-base``, ``segment``).

The training target on synthetic pairs is the follow-up's *new* lesions: follow-up
lesions (26-connected) that do not touch any baseline lesion once the baseline is
registered. On the Ljubljana longitudinal studies the only reference is their change
mask (new, enlarged *and* shrunk lesion voxels), which is what lesion-wise sensitivity
and PPV are measured against there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PatientFineTuneLib.images import normalise, write_image
from PatientFineTuneLib.postprocess import label_lesions

#: Sequence names of the ``brain-new-lesions`` preset, in pathway order.
SEQUENCES = ("FLAIR", "FLAIR_subtraction")


def subtraction_image(followup: sitk.Image, baseline_on_followup: sitk.Image, brain: np.ndarray) -> sitk.Image:
    """Normalised follow-up minus normalised (registered) baseline, on the follow-up grid,
    zero outside ``brain`` (a boolean (z, y, x) array on that grid)."""
    if not brain.any():
        raise ValueError("the brain mask is empty: cannot normalise the two FLAIRs for the subtraction")
    pair = np.stack([sitk.GetArrayFromImage(followup), sitk.GetArrayFromImage(baseline_on_followup)]).astype(np.float32)
    z = normalise(pair, brain)
    difference = sitk.GetImageFromArray(np.where(brain, z[0] - z[1], 0.0).astype(np.float32))
    difference.CopyInformation(followup)
    return difference


def new_lesion_mask(followup_lesions: np.ndarray, baseline_lesions: np.ndarray) -> np.ndarray:
    """Follow-up lesions (26-connected components) that share no voxel with the baseline's
    lesions on the same grid."""
    labels, n = label_lesions(followup_lesions.astype(bool))
    old = np.unique(labels[baseline_lesions.astype(bool) & (labels > 0)])
    return (labels > 0) & ~np.isin(labels, old)


def write_case(
    folder: str | os.PathLike, flair: sitk.Image, subtraction: sitk.Image, brain: sitk.Image, target: sitk.Image | None
) -> Path:
    """A case folder of the ``brain-new-lesions`` preset: FLAIR, FLAIR_subtraction, organ
    and (when known) lesions = the new-lesion target."""
    folder = Path(folder)
    for name, image in zip((*SEQUENCES, "organ", "lesions"), (flair, subtraction, brain, target)):
        if image is not None:
            write_image(image, folder / f"{name}.nii.gz", overwrite=True)
    return folder


def _normalised(image: sitk.Image, brain: sitk.Image) -> sitk.Image:
    z = sitk.GetImageFromArray(
        normalise(sitk.GetArrayFromImage(image)[None].astype(np.float32), sitk.GetArrayFromImage(brain) > 0)[0]
    )
    z.CopyInformation(image)
    return z


def synthetic_pair_case(pair_folder: str | os.PathLike, out_folder: str | os.PathLike, seed: int = 0) -> dict:
    """A ``brain-new-lesions`` case from a synthetic pair (``baseline/`` and ``followup/``
    with FLAIR, organ, lesions): the baseline is registered onto the follow-up (rigid +
    affine, inside the follow-up brain); returns the registration's quality figures."""
    from PatientFineTuneLib.registration import register_followup, resample_mask

    pair_folder = Path(pair_folder)

    def read(visit, name):
        return sitk.ReadImage(str(pair_folder / visit / f"{name}.nii.gz"))

    followup, baseline = read("followup", "FLAIR"), read("baseline", "FLAIR")
    brain, baseline_brain = read("followup", "organ"), read("baseline", "organ")
    # register the visits normalised inside their own brains (as the copy-forward reference
    # does): raw intensities of two visits need not share a scale
    registration = register_followup(
        _normalised(followup, brain), _normalised(baseline, baseline_brain), brain, seed=seed
    )
    baseline_on_followup = sitk.Resample(
        baseline, followup, registration.transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    baseline_lesions = (
        sitk.GetArrayFromImage(resample_mask(read("baseline", "lesions"), followup, registration.transform)) > 0
    )
    brain_array = sitk.GetArrayFromImage(brain) > 0
    subtraction = subtraction_image(followup, baseline_on_followup, brain_array)
    target = new_lesion_mask(sitk.GetArrayFromImage(read("followup", "lesions")) > 0, baseline_lesions)
    target_image = sitk.GetImageFromArray(target.astype(np.uint8))
    target_image.CopyInformation(followup)
    write_case(out_folder, followup, subtraction, brain, target_image)
    return {
        "correlation_before": registration.correlation_before,
        "correlation_after": registration.correlation_after,
        "new_lesions": int(label_lesions(target)[1]),
    }


def ljubljana_case(patient_folder: str | os.PathLike, out_folder: str | os.PathLike) -> None:
    """A ``brain-new-lesions`` case from a Ljubljana longitudinal patient: both studies'
    FLAIRs onto the change mask's common grid through the supplied transforms, the common
    brain mask as organ, and the change mask as the reference."""
    patient = Path(patient_folder)
    reference = sitk.ReadImage(str(patient / "gt.nii.gz"))

    def flair_on_common(study):
        flair = sitk.Cast(sitk.ReadImage(str(patient / f"study{study}_FLAIR.nii.gz")), sitk.sitkFloat32)
        transform = sitk.ReadTransform(str(patient / f"study{study}_FLAIR_to_common_space.txt"))
        return sitk.Resample(flair, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    brain = sitk.ReadImage(str(patient / "brainmask_common.nii.gz"))
    brain.CopyInformation(reference)
    followup, baseline = flair_on_common(2), flair_on_common(1)
    subtraction = subtraction_image(followup, baseline, sitk.GetArrayFromImage(brain) > 0)
    write_case(
        out_folder,
        followup,
        subtraction,
        sitk.Cast(brain > 0, sitk.sitkUInt8),
        sitk.Cast(reference > 0, sitk.sitkUInt8),
    )
