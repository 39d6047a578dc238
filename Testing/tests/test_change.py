"""Lesion change analysis and follow-up registration."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from PatientFineTuneLib.change import CATEGORIES, ChangeThresholds, lesion_changes
from PatientFineTuneLib.registration import masked_correlation, register_followup

from conftest import SHARED_DATA


def cube(mask, centre, half):
    z, y, x = centre
    mask[z - half : z + half + 1, y - half : y + half + 1, x - half : x + half + 1] = True


def test_every_category_on_hand_built_masks():
    baseline, followup = np.zeros((20, 60, 60), bool), np.zeros((20, 60, 60), bool)
    cube(baseline, (5, 8, 8), 1), cube(followup, (5, 8, 8), 1)  # stable: 27 -> 27 voxels
    cube(baseline, (5, 8, 30), 1), cube(followup, (5, 8, 30), 2)  # enlarged: 27 -> 125
    cube(baseline, (5, 30, 8), 2), cube(followup, (5, 30, 8), 1)  # shrinking: 125 -> 27
    cube(baseline, (14, 30, 30), 1)  # resolved
    cube(followup, (14, 50, 50), 1)  # new
    # two baseline lesions joined by one follow-up lesion: one group, enlarged (2 x 8 -> 8 x 3 x 3 ... )
    cube(baseline, (14, 8, 44), 0), cube(baseline, (14, 8, 50), 0)
    followup[14, 7:10, 43:52] = True
    rows, summary = lesion_changes(baseline, followup, (1.0, 1.0, 1.0))
    assert [summary[c] for c in CATEGORIES] == [1, 2, 1, 1, 1]
    merged = next(r for r in rows if len(r["baseline_ids"].split()) == 2)
    assert merged["change"] == "enlarged" and merged["baseline_mm3"] == 2.0 and merged["followup_mm3"] == 27.0
    enlarged = next(r for r in rows if r["baseline_mm3"] == 27.0 and r["change"] == "enlarged")
    assert (
        enlarged["followup_mm3"] == 125.0
        and enlarged["change_mm3"] == 98.0
        and enlarged["change_relative"] == pytest.approx(98 / 27, abs=1e-4)
    )
    assert (
        summary["baseline_load_mm3"] == baseline.sum() and summary["load_change_mm3"] == followup.sum() - baseline.sum()
    )
    new = next(r for r in rows if r["change"] == "new")
    assert new["baseline_ids"] == "" and new["change_relative"] is None and new["centroid"] == [14.0, 50.0, 50.0]


def test_thresholds_decide_between_stable_and_enlarged():
    baseline, followup = np.zeros((9, 30, 30), bool), np.zeros((9, 30, 30), bool)
    cube(baseline, (4, 15, 15), 2)  # 125 voxels
    followup[:] = baseline
    followup[4, 12:18, 18] = True  # +6 voxels (+5 %): stable
    assert lesion_changes(baseline, followup, (1, 1, 1))[0][0]["change"] == "stable"
    grown = np.zeros_like(followup)
    cube(grown, (4, 15, 15), 3)  # 343 voxels (+174 %)
    assert lesion_changes(baseline, grown, (1, 1, 1))[0][0]["change"] == "enlarged"
    assert lesion_changes(baseline, grown, (1, 1, 1), ChangeThresholds(relative_change=2.0))[0][0]["change"] == "stable"
    with pytest.raises(ValueError, match="not on one grid"):
        lesion_changes(baseline, grown[:-1], (1, 1, 1))


def _affine(image, degrees=(1.7, -1.1, 4.6), scale=(1.03, 0.98, 1.0), shift=(4.0, -3.0, 2.0)):
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    rotation = sitk.Euler3DTransform(centre, *np.deg2rad(degrees))
    a = sitk.AffineTransform(3)
    a.SetCenter(centre)
    a.SetMatrix((np.array(rotation.GetMatrix()).reshape(3, 3) @ np.diag(scale)).ravel().tolist())
    a.SetTranslation(shift)
    return a


def test_registration_recovers_a_known_rigid_plus_affine_transform_within_a_voxel():
    from PatientFineTuneLib.synth import generate_pair
    from PatientFineTuneLib.synth.common import to_image

    pair = generate_pair("brain-wmh", 1)
    visit = pair["visits"]["baseline"]
    fixed = to_image(visit["images"]["FLAIR"], pair["grid"])
    mask = to_image(visit["organ"].astype(np.uint8), pair["grid"], sitk.sitkUInt8)
    known = _affine(fixed)
    moving = sitk.Resample(fixed, fixed, known, sitk.sitkLinear, 0.0)  # moving(x) = fixed(known(x))
    result = register_followup(fixed, moving, mask)
    truth = known.GetInverse()
    points = [
        fixed.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]])
        for idx in np.argwhere(sitk.GetArrayFromImage(mask) > 0)[::997]
    ]
    errors = np.abs([np.subtract(result.transform.TransformPoint(p), truth.TransformPoint(p)) for p in points])
    assert (errors.max(axis=0) < np.array(fixed.GetSpacing())).all(), errors.max(axis=0)
    assert result.correlation_after > result.correlation_before + 0.3 and result.warning is None


@pytest.mark.realdata
@pytest.mark.parametrize("patient", ["patient01", "patient12"])
@pytest.mark.parametrize("mask", ["reference", "automatic"])
def test_real_longitudinal_pair_aligns_as_well_as_the_supplied_transforms(patient, mask):
    """Raw skull-on FLAIRs of two studies, registered inside the supplied brain mask, or as
    a user without one would: inside the automatic (deepbet) brain mask after N4. Judged
    on the raw FLAIRs inside the reference brain against the supplied transforms."""
    from PatientFineTuneLib.brainmask import head_pair_for_registration

    folder = SHARED_DATA / "ljubljana_ms_longitudinal" / patient
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (real data lives in ../shared/data, outside the repository)")
    study1 = sitk.ReadImage(str(folder / "study1_FLAIR.nii.gz"), sitk.sitkFloat32)
    study2 = sitk.ReadImage(str(folder / "study2_FLAIR.nii.gz"), sitk.sitkFloat32)
    to_common1 = sitk.ReadTransform(str(folder / "study1_FLAIR_to_common_space.txt"))
    to_common2 = sitk.ReadTransform(str(folder / "study2_FLAIR_to_common_space.txt"))
    brain = sitk.Resample(
        sitk.ReadImage(str(folder / "brainmask_common.nii.gz")),
        study1,
        to_common1.GetInverse(),
        sitk.sitkNearestNeighbor,
        0,
    )
    reference = sitk.CompositeTransform([to_common2, to_common1.GetInverse()])  # study1 -> common -> study2
    reference_corr = masked_correlation(study1, sitk.Resample(study2, study1, reference, sitk.sitkLinear, 0.0), brain)
    if mask == "reference":
        result = register_followup(study1, study2, brain)
    else:
        result = register_followup(*head_pair_for_registration(study1, study2))
    after = masked_correlation(study1, sitk.Resample(study2, study1, result.transform, sitk.sitkLinear, 0.0), brain)
    assert after >= reference_corr - 0.01, (after, reference_corr)


def test_compare_cli_registers_and_writes_the_change_table(tmp_path):
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.normal(size=(24, 64, 64)).astype(np.float32))
    baseline_img = sitk.SmoothingRecursiveGaussian(noise, 2.0) * 50 + 100
    baseline_img.SetSpacing((1.5, 1.5, 3.0))

    def label_image(*cubes):
        mask = np.zeros((24, 64, 64), bool)
        for centre, half in cubes:
            cube(mask, centre, half)
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.CopyInformation(baseline_img)
        return image

    baseline_lesions = label_image(((12, 20, 20), 2), ((12, 40, 40), 1))
    # in the follow-up the first lesion is unchanged, the second resolved, one is new, and
    # the whole head has moved
    shift = sitk.TranslationTransform(3, (3.0, -1.5, 0.0))
    followup_img = sitk.Resample(baseline_img, baseline_img, shift, sitk.sitkLinear, 100.0)
    followup_lesions = sitk.Resample(
        label_image(((12, 20, 20), 2), ((12, 10, 50), 1)), baseline_img, shift, sitk.sitkNearestNeighbor, 0
    )
    paths = {}
    for name, image in (
        ("b_img", baseline_img),
        ("f_img", followup_img),
        ("b_les", baseline_lesions),
        ("f_les", followup_lesions),
    ):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "PatientFineTuneLib.cli",
        "compare",
        "--baseline-image",
        paths["b_img"],
        "--followup-image",
        paths["f_img"],
        "--baseline-lesions",
        paths["b_les"],
        "--followup-lesions",
        paths["f_les"],
        "--out",
        out,
    ]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "changes.json").read_text())["summary"]
    assert (summary["stable"], summary["resolved"], summary["new"], summary["enlarged"]) == (1, 1, 1, 0), summary
    print(summary)
    assert summary["registration"]["correlation_after"] > 0.95 > summary["registration"]["correlation_before"]
    assert (out / "changes.csv").read_text().splitlines()[0].startswith("change,baseline_ids")
    again = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_compare_cli_registers_skull_on_heads_inside_the_automatic_brain_mask(tmp_path):
    """A synthetic skull-on head and the same head moved (3 degrees, 4 mm): with
    ``--baseline-organ brain`` the registration looks inside deepbet's brain mask of the
    baseline (after N4), every lesion comes back onto itself (all stable), and the inputs
    stay as they were."""
    from PatientFineTuneLib.synth import generate_pair
    from PatientFineTuneLib.synth.common import to_image

    pair = generate_pair("brain-wmh", 2)
    baseline = sitk.Cast(to_image(pair["visits"]["baseline"]["images"]["FLAIR"], pair["grid"]), sitk.sitkFloat32)
    lesions = to_image(pair["visits"]["baseline"]["lesions"], pair["grid"], sitk.sitkUInt8)
    moved = sitk.Euler3DTransform(
        baseline.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in baseline.GetSize()]),
        0.0,
        0.0,
        np.deg2rad(3.0),
        (4.0, -2.0, 1.0),
    )
    followup = sitk.Resample(baseline, baseline, moved, sitk.sitkLinear, 0.0)
    followup_lesions = sitk.Resample(lesions, baseline, moved, sitk.sitkNearestNeighbor, 0)
    paths = {}
    for name, image in (("b_img", baseline), ("f_img", followup), ("b_les", lesions), ("f_les", followup_lesions)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image, str(paths[name]))
    before = {name: path.read_bytes() for name, path in paths.items()}
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "PatientFineTuneLib.cli",
        "compare",
        "--baseline-image",
        paths["b_img"],
        "--followup-image",
        paths["f_img"],
        "--baseline-lesions",
        paths["b_les"],
        "--followup-lesions",
        paths["f_les"],
        "--baseline-organ",
        "brain",
        "--out",
        out,
    ]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "changes.json").read_text())["summary"]
    # inside the brain, image noise against its interpolated copy caps the correlation near 0.9
    assert summary["registration"]["correlation_after"] > 0.85 > 0.5 > summary["registration"]["correlation_before"]
    assert summary["new"] == summary["resolved"] == 0 and summary["stable"] > 0, summary
    carried = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "followup_lesions_on_baseline.nii.gz"))) > 0
    truth = sitk.GetArrayFromImage(lesions) > 0
    assert 2 * (carried & truth).sum() / (carried.sum() + truth.sum()) > 0.85
    assert {name: path.read_bytes() for name, path in paths.items()} == before
