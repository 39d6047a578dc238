"""Geometry: the one resampling helper is pixel-centre aligned on non-integer spacing
ratios, fine-tuning patches stay on the slice, and the storage orientation of a volume
does not change what the network sees."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PatientFineTuneLib.images import load_case, resample_array, resampled_shape
from PatientFineTuneLib.patches import PATCH_SIZE, corner_and_centre_patch_centres

from conftest import rotation_direction, write_volume

#: (source spacing, model spacing) pairs of real data: Ljubljana 1.0 mm, BraTS-like
#: 0.72 mm and a coarse 1.5 mm slice, each to the shipped models' 0.958 mm.
RATIOS = [(1.0, 0.958), (0.72, 0.958), (1.5, 0.958)]


def _centroid_mm(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Physical centroid (field-of-view coordinates: pixel i's centre at (i + 0.5) * spacing)."""
    return (np.argwhere(mask).mean(axis=0) + 0.5) * spacing


def _random_boxes(shape, n, rng):
    for _ in range(n):
        size = rng.integers(3, 30, size=len(shape))
        start = [int(rng.integers(0, s - d)) for s, d in zip(shape, size)]
        box = np.zeros(shape, bool)
        box[tuple(slice(a, a + d) for a, d in zip(start, size))] = True
        yield box


@pytest.mark.parametrize("source, target", RATIOS)
def test_resampled_masks_keep_their_centroid_on_non_integer_ratios(source, target):
    rng = np.random.default_rng(7)
    shape = (97, 113)
    model_shape = resampled_shape(shape, (source, source), (target, target))
    model_spacing = np.array(shape) * source / np.array(model_shape)  # same field of view
    shifts = []
    for box in _random_boxes(shape, 200, rng):
        resized = resample_array(torch.from_numpy(box.astype(np.float32))[None, None], model_shape, label=True)[0, 0]
        assert set(resized.unique().tolist()) <= {0.0, 1.0}
        shifts.append((_centroid_mm(resized.numpy() > 0, model_spacing) - _centroid_mm(box, source)) / model_spacing)
    shifts = np.array(shifts)
    # no systematic shift (nearest-neighbour without centre alignment gives +0.5 pixel)
    assert np.abs(shifts.mean(axis=0)).max() < 0.1
    assert np.abs(shifts).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("source, target", RATIOS)
def test_resampled_images_and_back_resampled_outputs_stay_in_place(source, target):
    shape = (97, 113)
    model_shape = resampled_shape(shape, (source, source), (target, target))
    model_spacing = np.array(shape) * source / np.array(model_shape)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for centre in [(30.3, 41.7), (40.0, 50.5), (25.5, 20.2)]:  # inside every field of view
        blob = np.exp(
            -(((rows + 0.5) * source - centre[0]) ** 2 + ((cols + 0.5) * source - centre[1]) ** 2) / (2 * 6.0**2)
        )
        resized = resample_array(torch.from_numpy(blob.astype(np.float32))[None, None], model_shape)[0, 0].numpy()
        grid = np.stack(np.mgrid[: model_shape[0], : model_shape[1]]).astype(float)
        weighted = [((grid[a] + 0.5) * model_spacing[a] * resized).sum() / resized.sum() for a in range(2)]
        assert weighted == pytest.approx(centre, abs=0.05 * target)
    # a mask taken to the model grid as a label, its "prediction" brought back as a probability
    rng = np.random.default_rng(3)
    shifts, dices = [], []
    for box in _random_boxes(shape, 100, rng):
        on_model = resample_array(torch.from_numpy(box.astype(np.float32))[None, None], model_shape, label=True)
        back = resample_array(on_model, shape)[0, 0].numpy() >= 0.5
        shifts.append((_centroid_mm(back, source) - _centroid_mm(box, source)) / source)
        dices.append(2 * (back & box).sum() / (back.sum() + box.sum()))
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.1
    assert np.mean(dices) > 0.95


def test_volumes_resample_through_the_same_helper():
    rng = np.random.default_rng(1)
    shape = (40, 51, 47)
    spacing, target = (1.5, 1.0, 0.72), (2.0, 2.0, 2.0)
    model_shape = resampled_shape(shape, spacing, target)
    model_spacing = np.array(shape) * np.array(spacing) / np.array(model_shape)
    shifts = []
    for box in _random_boxes(shape, 60, rng):
        resized = (
            resample_array(torch.from_numpy(box.astype(np.float32))[None, None], model_shape, label=True)[0, 0].numpy()
            > 0
        )
        if not resized.any():
            continue
        shifts.append((_centroid_mm(resized, model_spacing) - _centroid_mm(box, np.array(spacing))) / model_spacing)
    # 1.5 -> 2 mm keeps 3 of every 4 slices (0, 2, 3): about 0.13 voxel of aliasing
    # bias for small boxes, against 0.37-0.5 voxel with nearest-neighbour flooring
    assert np.abs(np.mean(shifts, axis=0)).max() < 0.2


def test_spacings_within_tolerance_keep_the_size():
    assert resampled_shape((240, 240), (0.958, 0.958), (0.958, 0.958)) == (240, 240)
    assert resampled_shape((240, 240), (0.96, 0.958), (0.958, 0.958)) == (240, 240)
    assert resampled_shape((100, 50), (2.0, 1.0), (1.0, 1.0)) == (200, 50)
    assert resampled_shape((48, 100, 50), (3.0, 2.0, 1.0), (2.0, 2.0, 2.0)) == (72, 100, 25)
    x = torch.rand(1, 2, 20, 30)
    assert resample_array(x, (20, 30)) is x


# ---------------------------------------------------------------------------------------
# Fine-tuning patch positions


def _patch_inside(centre, shape, size=PATCH_SIZE):
    half = size / 2
    return all(half - 1e-9 <= c <= n - half + 1e-9 for c, n in zip(centre, shape))


def test_a_small_organ_box_gets_patches_centred_on_it():
    organ = np.zeros((256, 256), bool)
    organ[100:156, 90:160] = True  # 56 x 70 px, smaller than a 128 px patch
    centres = corner_and_centre_patch_centres(organ)
    assert np.allclose(centres, [[128.0, 125.0]] * 5)


@pytest.mark.parametrize("box", [(200, 256, 0, 70), (0, 30, 0, 256), (10, 250, 230, 256), (0, 256, 0, 256)])
def test_patch_centres_keep_the_patch_on_the_slice(box):
    organ = np.zeros((256, 256), bool)
    r0, r1, c0, c1 = box
    organ[r0:r1, c0:c1] = True
    for centre in corner_and_centre_patch_centres(organ):
        assert _patch_inside(centre, organ.shape), centre
    # a slice smaller than a patch: the patch is centred on the slice
    small = np.zeros((100, 300), bool)
    small[10:90, 250:300] = True
    for row, col in corner_and_centre_patch_centres(small):
        assert row == 50.0 and 64 <= col <= 300 - 64


def test_large_boxes_keep_the_papers_corner_patches():
    organ = np.zeros((256, 256), bool)
    organ[40:220, 30:230] = True
    centres = corner_and_centre_patch_centres(organ)
    assert np.allclose(centres, [[104, 94], [104, 166], [156, 94], [156, 166], [130, 130]])


# ---------------------------------------------------------------------------------------
# Storage orientation


def _head(shape=(12, 40, 44), seed=0):
    """An asymmetric FLAIR/T1-like test volume (z, y, x) with bright blobs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    organ = ((y - 19) / 16) ** 2 + ((x - 22) / 19) ** 2 < 1
    flair = np.where(organ, 100 + 3 * x - 2 * y, 0).astype(np.float32) + rng.normal(0, 2, shape).astype(np.float32)
    for cz, cy, cx in [(4, 12, 14), (7, 25, 30), (9, 20, 10)]:
        flair += 120 * np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / 6.0)
    t1 = np.where(organ, 300 - 2 * x, 0).astype(np.float32)
    return flair, t1, organ.astype(np.uint8)


def _stored_differently(array_zyx, spacing, origin, direction, how):
    """The same physical image stored with a flipped or permuted index order."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    if how == "flip-x":
        return sitk.Flip(image, [True, False, False])
    if how == "flip-y":
        return sitk.Flip(image, [False, True, False])
    if how == "swap-xy":
        return sitk.PermuteAxes(image, [1, 0, 2])
    if how == "flip-swap":
        return sitk.Flip(sitk.PermuteAxes(image, [1, 0, 2]), [True, True, False])
    return image


@pytest.mark.parametrize("how", ["flip-x", "flip-y", "swap-xy", "flip-swap"])
def test_storage_order_does_not_change_the_network_input_or_the_segmentation(tmp_path, how):
    from PatientFineTuneLib.images import prepare_case
    from PatientFineTuneLib.inference import predict_probability
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata

    from conftest import tiny_model

    flair, t1, organ = _head()
    spacing, origin, direction = (0.9, 1.1, 3.0), (10.0, -20.0, 5.0), rotation_direction(10)
    paths = {}
    for name, arr in [("flair", flair), ("t1", t1), ("organ", organ)]:
        for variant in ("stored", how):
            image = _stored_differently(arr, spacing, origin, direction, variant)
            paths[name, variant] = tmp_path / f"{name}-{variant}.nii.gz"
            sitk.WriteImage(image, str(paths[name, variant]))
    cases = {
        v: prepare_case(load_case([paths["flair", v], paths["t1", v]], organ_path=paths["organ", v]))
        for v in ("stored", how)
    }
    # the network sees the same slices
    assert np.array_equal(cases["stored"].images, cases[how].images)
    assert cases["stored"].spacing == pytest.approx(cases[how].spacing)
    # and its result, written on each input's own grid, is the same physical image
    model = tiny_model()
    bundle = ModelBundle(
        model,
        make_metadata(
            model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], (1.0, 1.0), preset="brain-wmh"
        ),
    )
    results = {v: cases[v].to_image(predict_probability(bundle, cases[v])) for v in cases}
    moved = sitk.Resample(results[how], results["stored"], sitk.Transform(), sitk.sitkNearestNeighbor)
    assert np.allclose(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(results["stored"]), atol=1e-6)
    assert results[how].GetDirection() == pytest.approx(sitk.ReadImage(str(paths["flair", how])).GetDirection())


def test_the_canonical_slice_is_in_radiological_display_order(tmp_path):
    # storage with both in-plane axes reversed (RAS-like storage in LPS): the slice array
    # still has patient left to the right of the columns and posterior down the rows
    flair, _, organ = _head()
    direction = (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    path = write_volume(tmp_path / "f.nii.gz", flair, (1.0, 1.0, 3.0), direction=direction)
    opath = write_volume(tmp_path / "o.nii.gz", organ, (1.0, 1.0, 3.0), direction=direction)
    case = load_case([path], organ_path=opath)
    s = 5
    left = case.physical_point(s, 10, 30)[0] - case.physical_point(s, 10, 10)[0]
    posterior = case.physical_point(s, 30, 10)[1] - case.physical_point(s, 10, 10)[1]
    assert left > 0 and posterior > 0
    assert case.images.shape[-2:] == flair.shape[-2:]
