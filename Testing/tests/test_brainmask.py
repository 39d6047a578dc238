"""Brain masks of skull-on and skull-stripped heads, and N4 bias-field correction.

deepbet's real networks run here (their weights ship inside its wheel); the synthetic
heads have scalp, marrow and skull, and the real scans are read from ../shared/data.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from PatientFineTuneLib.brainmask import (
    BrainMask,
    brain_mask,
    correct_bias_field,
    deepbet_brain_mask,
    tissue_outside_brain,
)
from PatientFineTuneLib.images import load_case
from PatientFineTuneLib.synth import generate_pair
from PatientFineTuneLib.synth.common import to_image

from conftest import SHARED_DATA, save_tiny_model


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def head():
    """A synthetic skull-on FLAIR at full field of view, and its true brain mask."""
    pair = generate_pair("brain-wmh", 5)
    visit = pair["visits"]["baseline"]
    return sitk.Cast(to_image(visit["images"]["FLAIR"], pair["grid"]), sitk.sitkFloat32), visit["organ"]


@pytest.fixture(scope="module")
def head_mask(head):
    return brain_mask(head[0])


def test_a_skull_on_head_is_detected_and_masked_by_deepbet(head, head_mask):
    image, truth = head
    assert isinstance(head_mask, BrainMask)
    assert not head_mask.skull_stripped and head_mask.method == "deepbet"
    assert head_mask.shell_fraction > 0.2
    assert head_mask.mask.shape == truth.shape
    assert dice(head_mask.mask, truth) > 0.93
    assert "skull on" in head_mask.describe() and "deepbet" in head_mask.describe()


def test_a_skull_stripped_head_is_detected_and_left_to_its_foreground(head):
    image, truth = head
    volume = sitk.GetArrayFromImage(image) * truth
    stripped = sitk.GetImageFromArray(volume.astype(np.float32))
    stripped.CopyInformation(image)
    result = brain_mask(stripped)
    assert result.skull_stripped and result.method == "foreground heuristic"
    assert result.shell_fraction < 0.05
    assert dice(result.mask, truth) > 0.95
    declared = brain_mask(stripped, skull_stripped="yes")
    assert declared.skull_stripped and declared.shell_fraction is None
    assert np.array_equal(declared.mask, result.mask)


def test_declaring_skull_on_skips_detection_and_bad_choices_are_refused(head, head_mask):
    declared = brain_mask(head[0], skull_stripped="no")
    assert declared.method == "deepbet" and declared.shell_fraction is None
    assert np.array_equal(declared.mask, head_mask.mask)
    with pytest.raises(ValueError, match="skull_stripped must be one of auto, yes, no"):
        brain_mask(head[0], skull_stripped="maybe")


def _restored(image_mask: np.ndarray, stored: sitk.Image, original: sitk.Image) -> np.ndarray:
    """A mask on ``stored``'s grid taken back onto ``original``'s (nearest neighbour)."""
    mask = sitk.GetImageFromArray(image_mask.astype(np.uint8))
    mask.CopyInformation(stored)
    return sitk.GetArrayFromImage(sitk.Resample(mask, original, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0


@pytest.mark.parametrize("storage", ["flipped rows", "permuted axes", "oblique"])
def test_the_mask_does_not_depend_on_how_the_scan_is_stored(head, head_mask, storage):
    image = head[0]
    if storage == "flipped rows":
        stored = sitk.Flip(image, [False, True, False])  # same physical image, rows stored the other way
    elif storage == "permuted axes":
        stored = sitk.PermuteAxes(image, [1, 0, 2])
    else:
        # the same voxels under a direction 12 degrees off the axes: deepbet sees the same
        # array, so the mask's voxels must be the same ones
        a = np.deg2rad(12)
        stored = sitk.Image(image)
        stored.SetDirection(
            tuple(
                (
                    np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
                    @ np.reshape(image.GetDirection(), (3, 3))
                ).ravel()
            )
        )
        mask = deepbet_brain_mask(stored)
        assert np.array_equal(mask, head_mask.mask)
        return
    mask = deepbet_brain_mask(stored)
    assert np.array_equal(_restored(mask, stored, image), head_mask.mask)


def test_bias_correction_flattens_a_smooth_field_and_leaves_the_input_alone(head, head_mask):
    image, truth = head
    volume = sitk.GetArrayFromImage(image)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in volume.shape], indexing="ij")
    field = np.exp(0.35 * x - 0.25 * y + 0.15 * z * y)  # up to 1.9x from one side to the other
    biased = (volume * field).astype(np.float32)
    before = biased.copy()
    corrected = correct_bias_field(biased, head_mask.mask, image.GetSpacing()[::-1])
    assert np.array_equal(biased, before)
    assert corrected.dtype == np.float32 and corrected.shape == biased.shape
    inside = truth & head_mask.mask
    # how much of the imposed field is left: correlation of log(corrected/true) with log(field)
    left = np.log(np.maximum(corrected[inside], 1e-3) / np.maximum(volume[inside], 1e-3))
    imposed = np.log(field[inside])
    assert (
        np.corrcoef(left, imposed)[0, 1]
        < 0.5 * np.corrcoef(np.log(biased[inside] / np.maximum(volume[inside], 1e-3)), imposed)[0, 1]
    )
    # white-matter-like spread: the coefficient of variation inside the brain falls
    cv = lambda v: v[inside].std() / v[inside].mean()  # noqa: E731
    assert cv(corrected) < cv(biased) - 0.03


def test_load_case_masks_and_corrects_a_raw_head_but_not_a_given_organ(tmp_path, head):
    image, truth = head
    path = tmp_path / "FLAIR.nii.gz"
    sitk.WriteImage(image, str(path))
    organ = tmp_path / "organ.nii.gz"
    organ_image = sitk.GetImageFromArray(truth.astype(np.uint8))
    organ_image.CopyInformation(image)
    sitk.WriteImage(organ_image, str(organ))
    raw = load_case([path])
    assert raw.sources["bias_corrected"] and raw.sources["organ"].startswith(
        "automatic brain mask (deepbet; scan skull on"
    )
    given = load_case([path], organ_path=organ)
    assert not given.sources["bias_corrected"] and given.sources["organ"] == str(organ)
    assert not np.array_equal(raw.images, given.images)
    off = load_case([path], bias_correction="off", skull_stripped="no")
    assert not off.sources["bias_corrected"]
    assert np.array_equal(off.organ, raw.organ)
    with pytest.raises(ValueError, match="bias_correction must be one of auto, on, off"):
        load_case([path], bias_correction="yes")


def test_an_image_without_a_head_gets_a_clear_error():
    volume = np.zeros((20, 64, 64), np.float32)
    volume[10, 30, 30] = 1.0
    with pytest.raises(ValueError, match=r"automatic brain mask \(deepbet\) found no brain .*--organ"):
        brain_mask(sitk.GetImageFromArray(volume))


def test_tissue_outside_brain_does_not_depend_on_intensity_units():
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 5, (20, 40, 40)).astype(np.float32)
    brain = np.zeros(volume.shape, bool)
    brain[5:15, 10:30, 10:30] = True
    volume[~brain] = 0
    volume[:, :4] = 90  # a band of "scalp" in the shell
    a = tissue_outside_brain(volume, brain, (1.0, 1.0, 1.0))
    assert 0 < a < 1
    assert tissue_outside_brain(3 * volume - 40, brain, (1.0, 1.0, 1.0)) == pytest.approx(a)


# ---------------------------------------------------------------------------------------
# Real scans


def _skip_without(folder):
    if not folder.is_dir():
        pytest.skip(f"real data not found at {folder} (read from ../shared/data, never copied into the repository)")


@pytest.mark.realdata
@pytest.mark.parametrize("sequence", ["FLAIR", "T1W"])
def test_real_skull_on_scans_match_the_reference_brain_mask(sequence):
    folder = SHARED_DATA / "ljubljana_ms_longitudinal" / "patient12"
    _skip_without(folder)
    image = sitk.ReadImage(str(folder / f"study1_{sequence}.nii.gz"), sitk.sitkFloat32)
    result = brain_mask(image)
    assert not result.skull_stripped
    mask = sitk.GetImageFromArray(result.mask.astype(np.uint8))
    mask.CopyInformation(image)
    flair = sitk.ReadImage(str(folder / "study1_FLAIR.nii.gz"))
    if sequence == "T1W":
        mask = sitk.Resample(
            mask,
            flair,
            sitk.ReadTransform(str(folder / "study1_T1W_intrastudy_to_FLAIR.txt")),
            sitk.sitkNearestNeighbor,
        )
    reference = sitk.ReadImage(str(folder / "brainmask_common.nii.gz"))
    common = sitk.Resample(
        mask, reference, sitk.ReadTransform(str(folder / "study1_FLAIR_to_common_space.txt")), sitk.sitkNearestNeighbor
    )
    assert dice(sitk.GetArrayFromImage(common) > 0, sitk.GetArrayFromImage(reference) > 0) >= 0.94


@pytest.mark.realdata
def test_real_skull_stripped_scans_are_detected():
    cross = SHARED_DATA / "ljubljana_ms_cross" / "patient26" / "FLAIR.nii.gz"
    btp = SHARED_DATA / "brain_tumor_progression" / "03" / "Pre_Scan_T1.nii.gz"
    _skip_without(cross.parent)
    _skip_without(btp.parent)
    assert brain_mask(sitk.ReadImage(str(cross), sitk.sitkFloat32)).skull_stripped
    tumour_scan = brain_mask(sitk.ReadImage(str(btp), sitk.sitkFloat32))
    assert not tumour_scan.skull_stripped
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(btp.parent / "Pre_Mask.nii.gz"))) > 0
    assert (tumour & tumour_scan.mask).sum() == tumour.sum()  # the enhancing tumour stays inside


def test_segment_cli_masks_a_raw_head_and_says_how(tmp_path):
    """The shipped brain-wmh model on a skull-on synthetic head given without an organ
    mask: the CLI says which brain mask it made and that it bias-corrected (on stderr, or
    as note events for a job), and writes the mask, which covers the true brain."""
    import subprocess
    import sys

    from PatientFineTuneLib.synth import write_pair

    write_pair(generate_pair("brain-wmh", 7), tmp_path / "pair", preview=False)
    visit = tmp_path / "pair" / "baseline"
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "PatientFineTuneLib.cli",
        "segment",
        "--model",
        "brain-wmh",
        "--images",
        visit / "FLAIR.nii.gz",
        visit / "T1.nii.gz",
        "--out",
        out,
    ]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "automatic brain mask (deepbet; scan skull on" in proc.stderr and "bias field corrected (N4)" in proc.stderr
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "organ_mask.nii.gz"))) > 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(visit / "organ.nii.gz"))) > 0
    assert dice(mask, truth) > 0.93
    # as a job (what the Slicer module runs): the same two facts arrive as note events. The
    # notes come from the model's preset and sequences, not its weights: a tiny brain-wmh
    # model spares a second full-size pass of the shipped network
    from PatientFineTuneLib.jobs import CliJob

    job = CliJob(
        [
            [
                "segment",
                "--model",
                save_tiny_model(tmp_path / "tiny.pt"),
                "--images",
                visit / "FLAIR.nii.gz",
                visit / "T1.nii.gz",
                "--out",
                tmp_path / "job",
            ]
        ]
    ).start()
    assert job.wait(300) and job.succeeded, job.error
    assert (
        len(job.notes) == 2
        and job.notes[0].startswith("automatic brain mask (deepbet; scan skull on")
        and "N4" in job.notes[1]
    )
