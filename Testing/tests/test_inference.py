import numpy as np
import pytest
import torch

from PatientFineTuneLib.cases import find_cases
from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.inference import activation_bytes_per_pixel, predict_logits, predict_probability, segment_case
from PatientFineTuneLib.modelfile import ModelBundle
from PatientFineTuneLib.runtime import Cancelled

from conftest import tiny_model


def test_tiled_prediction_equals_one_pass():
    model = tiny_model((1, 1), width=4)
    x = torch.randn(2, 2, 150, 170)
    whole = predict_logits(model, x)
    # a budget that forces tiles of 32 px cores with 61 px halos
    budget = 160 * 160 * activation_bytes_per_pixel(model)
    tiled = predict_logits(model, x, memory_budget=budget)
    assert torch.allclose(whole, tiled, atol=1e-4)


@pytest.fixture(scope="module")
def case(small_pair_dir):
    f = find_cases(small_pair_dir / "followup", ["FLAIR", "T1"])[0]
    return prepare_case(load_case(f.sequences, f.organ, f.lesions))


def test_probability_is_on_the_case_grid_and_zero_outside_the_organ(case):
    # the model's spacing differs from the case's 2 mm: slices are resampled and back
    bundle = ModelBundle(tiny_model(), {"training_spacing_mm": [0.958, 0.958]})
    calls = []
    p = predict_probability(bundle, case, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert p.shape == case.organ.shape and p.dtype == np.float32
    assert np.all(p[~case.organ] == 0) and 0 <= p.min() and p.max() <= 1
    assert calls[-1][0] == calls[-1][1]
    with pytest.raises(Cancelled):
        predict_probability(bundle, case, device="cpu", cancel=lambda: True)


def test_segment_case_produces_mask_labels_and_table(case):
    bundle = ModelBundle(tiny_model(), {"training_spacing_mm": [2.0, 2.0]})
    result = segment_case(bundle, case, device="cpu", threshold=0.3)
    assert result.mask.shape == case.organ.shape
    assert not (result.mask & ~case.organ).any()
    assert len(result.lesions) == result.labels.max()
    assert sum(r["voxels"] for r in result.lesions) == result.mask.sum()


def test_segment_case_applies_the_presets_opening_unless_told(case):
    """``opening=None`` (the default) is the preset's choice: the liver preset's plus
    opening removes thin structures that the brain presets keep (the old default was no
    opening whatever the preset)."""
    from PatientFineTuneLib.modelfile import make_metadata

    model = tiny_model()
    with torch.no_grad():  # a noisy head: speckled, thin predictions the opening removes
        model.classifier[-1].bias.copy_(torch.tensor([0.0, 0.0]))
    sequences = [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}]
    liver = ModelBundle(model, make_metadata(model, sequences, (2.0, 2.0), preset="liver-metastases"))
    brain = ModelBundle(model, make_metadata(model, sequences, (2.0, 2.0), preset="brain-wmh"))
    opened = segment_case(liver, case, device="cpu", opening=True).mask
    closed_only = segment_case(liver, case, device="cpu", opening=False).mask
    assert not np.array_equal(opened, closed_only)  # the test can tell them apart
    assert np.array_equal(segment_case(liver, case, device="cpu").mask, opened)
    assert np.array_equal(segment_case(brain, case, device="cpu", min_lesion_voxels=1).mask, closed_only)


def test_segment_case_drops_the_presets_smallest_lesions_unless_told(case):
    """The brain presets drop lesions of one voxel (``min_lesion_voxels=None`` is the
    preset's 2), the liver preset keeps every lesion; so does predict_mask."""
    from PatientFineTuneLib.inference import predict_mask
    from PatientFineTuneLib.modelfile import make_metadata

    model = tiny_model()
    with torch.no_grad():  # a noisy head: many single-voxel lesions
        model.classifier[-1].bias.copy_(torch.tensor([0.0, -0.3]))
    sequences = [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}]
    brain = ModelBundle(model, make_metadata(model, sequences, (2.0, 2.0), preset="brain-wmh"))
    liver = ModelBundle(model, make_metadata(model, sequences, (2.0, 2.0), preset="liver-metastases"))
    every = segment_case(brain, case, device="cpu", min_lesion_voxels=1)
    sizes = [r["voxels"] for r in every.lesions]
    assert 1 in sizes and max(sizes) > 1  # the test can tell the rule from no rule
    default = segment_case(brain, case, device="cpu")
    assert sorted(r["voxels"] for r in default.lesions) == sorted(v for v in sizes if v >= 2)
    assert np.array_equal(predict_mask(brain, case, device="cpu"), default.mask)
    assert np.array_equal(segment_case(liver, case, device="cpu", opening=False).mask, every.mask)
