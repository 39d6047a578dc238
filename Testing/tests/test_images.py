import numpy as np
import pytest
import SimpleITK as sitk

from PatientFineTuneLib.images import (
    GeometryError,
    ImageError,
    load_case,
    normalise,
    slice_axis,
    write_image,
)

from conftest import rotation_direction, write_volume


def _labelled(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(100, 20, shape).astype(np.float32)


def test_oblique_anisotropic_round_trip_keeps_voxels_and_geometry(tmp_path):
    # storage order (z, y, x) with the thick axis stored as y: slices must go along y
    arr = _labelled((20, 9, 24))
    spacing, origin, direction = (0.8, 4.0, 0.7), (12.5, -30.0, 7.25), rotation_direction(25)
    path = write_volume(tmp_path / "t.nrrd", arr, spacing, origin, direction)
    organ = write_volume(tmp_path / "organ.nii.gz", np.ones(arr.shape, np.uint8), spacing, origin, direction)
    case = load_case([path], organ_path=organ)
    assert case.axis == 1  # ITK j axis has the 4 mm spacing
    assert case.images.shape == (1, 9, 20, 24)  # slices first
    assert case.spacing == (0.7, 0.8)  # rows (z, 0.7 mm), cols (x, 0.8 mm)
    out = case.to_image(case.images[0])
    assert np.array_equal(sitk.GetArrayFromImage(out), arr)
    assert out.GetSpacing() == pytest.approx(spacing)
    assert out.GetOrigin() == pytest.approx(origin)
    assert out.GetDirection() == pytest.approx(direction)
    write_image(out, tmp_path / "back.nii.gz")
    again = sitk.ReadImage(str(tmp_path / "back.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(again), arr)
    assert again.GetDirection() == pytest.approx(direction, abs=1e-5)


def test_isotropic_volumes_are_sliced_axially_whatever_the_storage_order():
    image = sitk.Image(10, 12, 14, sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 1.0))
    assert slice_axis(image) == 2  # identity: k is superior-inferior
    # stored sagittally: index axis i points along S
    image.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # column 0 = (0, 0, 1)
    assert slice_axis(image) == 0


def test_mismatched_sequences_name_the_difference_and_can_be_resampled(tmp_path):
    a = write_volume(tmp_path / "FLAIR.nii.gz", _labelled((6, 16, 16)), (1.0, 1.0, 3.0))
    b = write_volume(tmp_path / "T1.nii.gz", _labelled((6, 16, 16), 1), (1.0, 1.0, 3.0), origin=(2.0, 0, 0))
    organ = write_volume(tmp_path / "organ.nii.gz", np.ones((6, 16, 16), np.uint8), (1.0, 1.0, 3.0))
    with pytest.raises(GeometryError, match=r"T1 .* origin .*--resample-to"):
        load_case([a, b], organ, sequence_names=["FLAIR", "T1"])
    case = load_case([a, b], organ, sequence_names=["FLAIR", "T1"], resample_to_first=True)
    assert case.images.shape == (2, 6, 16, 16)
    # shifted by 2 mm along x: the resampled T1 column c equals the original at c - 2
    t1 = sitk.GetArrayFromImage(sitk.ReadImage(str(b)))
    assert np.allclose(case.images[1][:, :, 4:], t1[:, :, 2:-2])


def test_mask_on_another_grid_is_refused(tmp_path):
    a = write_volume(tmp_path / "FLAIR.nii.gz", _labelled((6, 16, 16)))
    organ = write_volume(tmp_path / "organ.nii.gz", np.ones((6, 16, 15), np.uint8))
    with pytest.raises(GeometryError, match=r"organ mask .*size"):
        load_case([a], organ)


def test_four_d_sequence_gives_channels_and_counts_are_checked(tmp_path):
    vols = [sitk.GetImageFromArray(_labelled((5, 8, 8), k)) for k in range(3)]
    path = tmp_path / "DWI.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))
    organ = write_volume(tmp_path / "organ.nii.gz", np.ones((5, 8, 8), np.uint8))
    case = load_case([path], organ, expected_channels=[3])
    assert case.images.shape == (3, 5, 8, 8)
    assert np.array_equal(case.images[2], sitk.GetArrayFromImage(vols[2]))
    with pytest.raises(ImageError, match="has 3 channel"):
        load_case([path], organ, expected_channels=[16], sequence_names=["DWI"])
    with pytest.raises(ImageError, match="expects 2 sequences"):
        load_case([path], organ, expected_channels=[16, 3], sequence_names=["DCE", "DWI"])


def test_nan_voxels_are_refused(tmp_path):
    arr = _labelled((4, 8, 8))
    arr[1, 2, 3] = np.nan
    path = write_volume(tmp_path / "FLAIR.nrrd", arr)  # NRRD keeps NaN as stored
    with pytest.raises(ImageError, match="1 NaN"):
        load_case([path], write_volume(tmp_path / "o.nii.gz", np.ones((4, 8, 8), np.uint8)))


def test_lesion_labels_select_classes(tmp_path):
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[2, 2, 2] = 1, 2, 4
    img = write_volume(tmp_path / "T1c.nii.gz", _labelled((4, 8, 8)))
    organ = write_volume(tmp_path / "o.nii.gz", np.ones((4, 8, 8), np.uint8))
    les = write_volume(tmp_path / "l.nii.gz", labels)
    case = load_case([img], organ, les, lesion_labels=[1, 4])
    assert case.lesions.sum() == 2 and not case.lesions[1, 1, 1]


def test_robust_normalisation_inside_the_organ():
    rng = np.random.default_rng(0)
    organ = np.zeros((4, 30, 30), bool)
    organ[:, 5:25, 5:25] = True
    x = rng.normal(500, 40, (1, 4, 30, 30)).astype(np.float32)
    x[0, 0, 10, 10] = 1e6  # an outlier must not set the scale
    z = normalise(x, organ)
    inside = z[0][organ]
    assert abs(np.median(inside)) < 0.05
    q1, q3 = np.percentile(inside, [25, 75])
    assert (q3 - q1) / 1.349 == pytest.approx(1.0, abs=0.05)
    assert np.all(z[0][~organ] == 0)
    assert z.max() == 10.0  # the outlier is clipped
    # units do not matter: an affine change of intensities gives the same result
    assert np.allclose(normalise(3 * x + 70, organ), z, atol=1e-4)


def test_foreground_brain_mask_on_a_skull_on_head():
    from PatientFineTuneLib.brainmask import foreground_brain_mask
    from PatientFineTuneLib.synth import generate_pair

    visit = generate_pair("brain-wmh", 3, small=True)["visits"]["baseline"]
    mask = foreground_brain_mask(visit["images"]["FLAIR"], (3.0, 2.0, 2.0))
    truth = visit["organ"]
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.93


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize(
    "swap, flip_rows, flip_cols", [(False, False, False), (True, True, False), (False, False, True), (True, True, True)]
)
def test_physical_point_of_a_slice_first_index(axis, swap, flip_rows, flip_cols):
    from PatientFineTuneLib.images import Case, SliceLayout

    high, low = sorted((a for a in range(3) if a != axis), reverse=True)
    layout = SliceLayout(axis, low if swap else high, high if swap else low, flip_rows, flip_cols)
    grid = sitk.Image(7, 9, 11, sitk.sitkUInt8)
    grid.SetSpacing((0.5, 1.5, 2.5))
    grid.SetOrigin((3.0, 4.0, 5.0))
    grid.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    shape = layout.to_slices(np.zeros((11, 9, 7))).shape
    case = Case(np.zeros((1, *shape), np.float32), np.ones(shape, bool), None, grid, layout)
    marker = np.zeros(shape, bool)
    marker[2, 3, 4] = True
    assert np.array_equal(layout.to_slices(layout.from_slices(marker)), marker)
    z, y, x = np.argwhere(layout.from_slices(marker))[0]
    assert case.physical_point(2, 3, 4) == pytest.approx(grid.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]))


@pytest.mark.parametrize("shear", [0.3, 0.6])
def test_sheared_voxel_axes_are_refused_alike_in_nrrd_nifti_and_metaimage(tmp_path, shear):
    """Non-orthogonal axes have no place on the slice grid: results would land elsewhere
    (a corner voxel 23 mm away). NRRD was read as it is, NIfTI coerced to orthogonal or
    refused by ITK in its own words; every format now gets one message."""
    import nibabel

    from PatientFineTuneLib.images import ImageError, read_image

    direction = np.eye(3)
    direction[0, 1] = shear  # the j axis leans towards x
    values = np.random.default_rng(0).random((6, 8, 10), dtype=np.float32)
    # SimpleITK's NIfTI writer makes the axes perpendicular on the way out: write that one with nibabel (x, y, z order, RAS)
    nibabel.save(
        nibabel.Nifti1Image(
            values.T, np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block([[direction, np.zeros((3, 1))], [0, 0, 0, 1]])
        ),
        tmp_path / "sheared.nii.gz",
    )
    messages = []
    for suffix in ("nrrd", "nii.gz", "mha"):
        path = tmp_path / f"sheared.{suffix}"
        if suffix != "nii.gz":
            write_volume(path, values, direction=tuple(direction.ravel()))
        with pytest.raises(ImageError, match="sheared") as refused:
            read_image(path)
        messages.append(str(refused.value).replace(str(path), "PATH"))
    assert len(set(messages)) == 1 and "\n" not in messages[0], messages
    write_volume(tmp_path / "oblique.nrrd", np.ones((6, 8, 10), np.float32), direction=rotation_direction(30))
    assert read_image(tmp_path / "oblique.nrrd").GetSize() == (10, 8, 6)  # oblique but orthogonal: fine


def test_preparing_a_case_returns_a_new_one_and_leaves_the_callers_as_read(tmp_path):
    """Normalisation gives a new case; the one read stays in the scan's intensities (the old
    prepare_case normalised in place)."""
    from PatientFineTuneLib.images import load_case, normalise, prepare_case

    image = np.linspace(100, 900, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    organ = np.zeros_like(image, dtype=np.uint8)
    organ[1:3, 2:6, 2:6] = 1
    write_volume(tmp_path / "flair.nii.gz", image, spacing=(1.0, 1.0, 2.0))
    write_volume(tmp_path / "organ.nii.gz", organ, spacing=(1.0, 1.0, 2.0))
    read = load_case([tmp_path / "flair.nii.gz"], organ_path=tmp_path / "organ.nii.gz")
    as_read = read.images.copy()
    prepared = prepare_case(read)
    assert prepared is not read and np.array_equal(read.images, as_read)
    assert not np.array_equal(prepared.images, as_read)
    assert np.array_equal(prepared.images, normalise(as_read, read.organ, read.sources.get("channel_names")))
