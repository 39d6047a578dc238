import json

import numpy as np
import pytest
from scipy import ndimage

from PatientFineTuneLib.synth import generate_pair


@pytest.mark.parametrize("preset", ["brain-wmh", "brain-tumor", "liver-metastases"])
def test_generator_is_deterministic_by_seed(preset):
    a = generate_pair(preset, 7, small=True)
    b = generate_pair(preset, 7, small=True)
    c = generate_pair(preset, 8, small=True)
    for visit in ("baseline", "followup"):
        for seq, img in a["visits"][visit]["images"].items():
            assert np.array_equal(img, b["visits"][visit]["images"][seq])
        assert np.array_equal(a["visits"][visit]["lesions"], b["visits"][visit]["lesions"])
    first = next(iter(a["visits"]["baseline"]["images"]))
    assert not np.array_equal(a["visits"]["baseline"]["images"][first], c["visits"]["baseline"]["images"][first])


@pytest.mark.parametrize(
    "preset,channels",
    [("brain-wmh", {"FLAIR": 1, "T1": 1}), ("brain-tumor", {"T1c": 1}), ("liver-metastases", {"DCE": 16, "DWI": 3})],
)
def test_sequences_masks_and_lesions_in_the_organ(preset, channels):
    pair = generate_pair(preset, 1, small=True)
    for visit in pair["visits"].values():
        for seq, n in channels.items():
            img = visit["images"][seq]
            assert (img.shape[0] if img.ndim == 4 else 1) == n
            assert np.isfinite(img).all() and img.min() >= 0  # magnitude images
        assert visit["organ"].any() and visit["lesions"].any()
        assert not (visit["lesions"] & ~visit["organ"]).any()


def test_lesions_evolve_between_visits():
    pair = generate_pair("brain-wmh", 2, small=True)
    fates = [e["fate"] for e in pair["info"]["evolution"]]
    assert "new" in fates and "resolve" in fates and "grow" in fates
    base, follow = pair["visits"]["baseline"]["lesions"], pair["visits"]["followup"]["lesions"]
    assert base.sum() != follow.sum()
    # at least one follow-up lesion does not touch any baseline lesion (a new lesion;
    # the small head-position change between visits is a few millimetres)
    labels, n = ndimage.label(follow, structure=np.ones((3, 3, 3)))
    touching = set(np.unique(labels[ndimage.binary_dilation(base, iterations=2)])) - {0}
    assert n > len(touching)


def test_patients_differ_in_appearance_and_visits_share_it():
    """The premise of patient-specific fine-tuning: lesion contrast varies between
    patients far more than between the two visits of one patient."""
    ratios = {}
    for seed in range(6):
        pair = generate_pair("brain-wmh", seed, small=True)
        per_visit = []
        for v in pair["visits"].values():
            flair = v["images"]["FLAIR"]
            brain = v["organ"] & ~v["lesions"]
            per_visit.append(np.percentile(flair[v["lesions"]], 90) / np.median(flair[brain]))
        ratios[seed] = per_visit
    between_visits = np.mean([abs(a - b) for a, b in ratios.values()])
    between_patients = np.std([np.mean(r) for r in ratios.values()])
    assert between_patients > 3 * between_visits


def test_full_size_brain_grid_matches_the_paper(tmp_path):
    import SimpleITK as sitk

    from PatientFineTuneLib.synth import write_pair

    pair = generate_pair("brain-wmh", 0)
    write_pair(pair, tmp_path / "p")
    image = sitk.ReadImage(str(tmp_path / "p" / "baseline" / "FLAIR.nii.gz"))
    assert image.GetSize() == (240, 240, 48)
    assert image.GetSpacing() == pytest.approx((0.958, 0.958, 3.0))
    info = json.loads((tmp_path / "p" / "patient.json").read_text())
    assert info["preset"] == "brain-wmh" and (tmp_path / "p" / "preview.png").is_file()
    with pytest.raises(FileExistsError):
        write_pair(pair, tmp_path / "p")


def test_anatomy_coordinates_are_the_written_physical_coordinates():
    """Anatomy is placed in LPS millimetres; a viewer reading the header must find it
    there (left is left, anterior is anterior)."""
    from PatientFineTuneLib.synth.common import Grid, Pose, coordinates, to_image

    grid = Grid((5, 7, 9), (3.0, 1.5, 0.8))
    xyz = coordinates(grid, Pose())
    image = to_image(np.zeros(grid.shape, np.float32), grid)
    for k, j, i in [(0, 0, 0), (4, 6, 8), (2, 1, 7)]:
        assert np.allclose(image.TransformIndexToPhysicalPoint((i, j, k)), xyz[:, k, j, i], atol=1e-4)


def test_liver_is_on_the_patients_right(tmp_path):
    import SimpleITK as sitk

    from PatientFineTuneLib.synth import write_pair

    write_pair(generate_pair("liver-metastases", 0, small=True), tmp_path / "liver", preview=False)
    organ = sitk.ReadImage(str(tmp_path / "liver" / "baseline" / "organ.nii.gz"))
    centre = np.argwhere(sitk.GetArrayFromImage(organ) > 0).mean(axis=0)[::-1]
    x_lps = organ.TransformContinuousIndexToPhysicalPoint(centre.tolist())[0]
    assert x_lps < -20  # LPS: negative x is the patient's right


def test_rician_magnitude_is_the_exactly_rounded_square_root():
    """The noisy magnitude is sqrt((s + n1)^2 + n2^2) rounded as IEEE rounds a square root
    (numpy's); torch's multi-threaded sqrt on a CPU was not, and in some processes was off
    by 3e-4 on one thread's half, so one seed gave different patients run to run."""
    import torch

    from PatientFineTuneLib.synth.common import add_rician_noise

    signal = np.random.default_rng(0).uniform(0, 1000, (2, 24, 120, 120)).astype(np.float32)
    noisy = add_rician_noise(signal.copy(), 30.0, np.random.default_rng(5))
    # the same draws, by the same generator in the same order
    generator = torch.Generator().manual_seed(int(np.random.default_rng(5).integers(2**62)))
    expected = []
    for row in signal.reshape(2, -1):
        first = torch.empty(row.size).normal_(0.0, 30.0, generator=generator).numpy()
        second = torch.empty(row.size).normal_(0.0, 30.0, generator=generator).numpy()
        expected.append(np.sqrt(np.square(row + first) + np.square(second)))
    assert np.array_equal(noisy.reshape(2, -1), np.stack(expected))
