"""New-lesion segmentation from the FLAIR subtraction (Wahlig et al. 2023): the case builders
of the evaluation scripts (Testing/benchmarks/newlesions.py) and a model of the preset."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PatientFineTuneLib.modelfile import load_model
from PatientFineTuneLib.postprocess import label_lesions
from PatientFineTuneLib.synth import generate_pair, write_pair

from conftest import SHARED_DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from newlesions import ljubljana_case, new_lesion_mask, synthetic_pair_case  # noqa: E402

LJUBLJANA_LONG = SHARED_DATA / "ljubljana_ms_longitudinal"


def test_new_lesions_are_follow_up_lesions_that_touch_no_baseline_lesion():
    baseline = np.zeros((10, 20, 20), bool)
    followup = np.zeros_like(baseline)
    baseline[2:4, 2:4, 2:4] = True
    followup[2:5, 2:5, 2:5] = True  # grown: not new
    followup[7:9, 12:15, 12:15] = True  # new
    baseline[7, 2, 15] = True  # resolved: nothing on the follow-up
    followup[5, 16:18, 16:18] = True  # new, touching nothing
    new = new_lesion_mask(followup, baseline)
    assert label_lesions(new)[1] == 2
    assert new[7:9, 12:15, 12:15].all() and new[5, 16:18, 16:18].all() and not new[2:5, 2:5, 2:5].any()


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    """A small pair whose new lesions stay apart from the old ones at this coarse grid
    (seed 2: 13 of them)."""
    folder = tmp_path_factory.mktemp("synth-new") / "patient002"
    write_pair(generate_pair("brain-wmh", 2, small=True), folder, preview=False)
    return folder


@pytest.fixture(scope="module")
def new_lesion_case(pair_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("newlesions") / "patient002"
    quality = synthetic_pair_case(pair_dir, out)
    return out, quality


def test_synthetic_case_has_the_generator_s_new_lesions_bright_in_the_subtraction(new_lesion_case, pair_dir):
    out, quality = new_lesion_case
    assert quality["correlation_after"] > quality["correlation_before"]
    evolution = json.loads((pair_dir / "patient.json").read_text())["evolution"]
    assert quality["new_lesions"] >= 1 and any(e["fate"] == "new" for e in evolution)
    subtraction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "FLAIR_subtraction.nii.gz")))
    target = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesions.nii.gz"))) > 0
    followup_lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(pair_dir / "followup" / "lesions.nii.gz"))) > 0
    old = followup_lesions & ~target
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "organ.nii.gz"))) > 0
    # new lesions stand out in the subtraction; lesions present at baseline much less
    assert (
        subtraction[target].mean() > subtraction[old].mean() + 0.5 > subtraction[brain & ~followup_lesions].mean() + 0.5
    )
    for name in ("FLAIR", "organ", "lesions"):
        assert (
            sitk.ReadImage(str(out / f"{name}.nii.gz")).GetSize()
            == sitk.ReadImage(str(pair_dir / "followup" / "FLAIR.nii.gz")).GetSize()
        )


def test_train_base_and_segment_read_the_subtraction_preset(new_lesion_case, tmp_path):
    out, _ = new_lesion_case
    model = tmp_path / "new-lesions.pt"
    cli = [sys.executable, "-m", "PatientFineTuneLib.cli"]
    train = subprocess.run(
        [
            *cli,
            "train-base",
            "--preset",
            "brain-new-lesions",
            "--train",
            str(out.parent),
            "--out",
            str(model),
            "--iterations",
            "3",
            "--width",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    bundle = load_model(model)
    assert bundle.preset.name == "brain-new-lesions" and [s["name"] for s in bundle.sequences] == [
        "FLAIR",
        "FLAIR_subtraction",
    ]
    segment = subprocess.run(
        [*cli, "segment", "--model", str(model), "--case", str(out), "--out", str(tmp_path / "seg")],
        capture_output=True,
        text=True,
    )
    assert segment.returncode == 0, segment.stderr[-2000:]
    segmentation = sitk.ReadImage(str(tmp_path / "seg" / "segmentation.nii.gz"))
    assert segmentation.GetSize() == sitk.ReadImage(str(out / "FLAIR.nii.gz")).GetSize()


@pytest.mark.realdata
@pytest.mark.skipif(not LJUBLJANA_LONG.is_dir(), reason="../shared/data not present")
def test_ljubljana_studies_meet_on_the_change_mask_grid(tmp_path):
    ljubljana_case(LJUBLJANA_LONG / "patient12", tmp_path / "p12")
    gt = sitk.ReadImage(str(LJUBLJANA_LONG / "patient12" / "gt.nii.gz"))
    subtraction = sitk.ReadImage(str(tmp_path / "p12" / "FLAIR_subtraction.nii.gz"))
    assert subtraction.GetSize() == gt.GetSize() and np.allclose(subtraction.GetOrigin(), gt.GetOrigin())
    values = sitk.GetArrayFromImage(subtraction)
    change = sitk.GetArrayFromImage(gt) > 0
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p12" / "organ.nii.gz"))) > 0
    # the studies are aligned: the difference is small in the brain and stands out in the change voxels
    assert (
        np.abs(values[brain & ~change]).mean() < 0.6
        and np.abs(values[change]).mean() > 2 * np.abs(values[brain & ~change]).mean()
    )
