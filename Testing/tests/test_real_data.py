"""The real public data in ../shared/data loads and segments onto its own grid.

Skipped with a message when the data is absent (it is never copied into the repository).
A small untrained network is enough here: this checks geometry handling, not accuracy.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.inference import segment_case
from PatientFineTuneLib.modelfile import ModelBundle

from conftest import SHARED_DATA, tiny_model

pytestmark = pytest.mark.realdata

CASES = {
    "ljubljana_ms_cross": (["patient07/FLAIR.nii.gz", "patient07/T1.nii.gz"], None, "patient07/lesions.nii.gz", False),
    "ljubljana_ms_longitudinal": (["patient01/study1_FLAIR.nii.gz"], None, None, False),
    "brats2015_subset": (
        ["brats_2013_pat0001_1/T1c_subtrMeanDivStd.nii.gz"],
        "brats_2013_pat0001_1/brainmask.nii.gz",
        "brats_2013_pat0001_1/OTMultiClass.nii.gz",
        False,
    ),
    "brain_tumor_progression": (["01/Post_Scan_T1.nii.gz"], None, "01/Post_Mask.nii.gz", False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_real_case_segments_onto_its_own_grid(name):
    root = SHARED_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent (real data lives in ../shared/data, outside the repository)")
    sequences, organ, lesions, _ = CASES[name]
    case = load_case(
        [root / s for s in sequences],
        organ_path=root / organ if organ else None,
        lesion_path=root / lesions if lesions else None,
        lesion_labels=[1, 4] if name == "brats2015_subset" else None,
    )
    case = prepare_case(case)
    assert case.organ.sum() > 0.02 * case.organ.size  # the (automatic) brain mask found a brain
    bundle = ModelBundle(tiny_model([1] * len(sequences)), {"training_spacing_mm": [1.0, 1.0]})
    result = segment_case(bundle, case, device="cpu")
    image = case.to_image(result.probability)
    reference = sitk.ReadImage(str(root / sequences[0]))
    assert image.GetSize() == reference.GetSize()[:3]
    assert image.GetOrigin() == pytest.approx(reference.GetOrigin()[:3])
    assert image.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-6)
    assert np.isfinite(result.probability).all()
