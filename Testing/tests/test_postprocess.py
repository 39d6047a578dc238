import numpy as np
import pytest
import SimpleITK as sitk

from PatientFineTuneLib.images import SliceLayout
from PatientFineTuneLib.postprocess import (
    close_cube,
    label_lesions,
    lesion_table,
    open_plus_per_slice,
    postprocess,
    remove_small_lesions,
)


def test_closing_fills_a_hole_and_keeps_lesions_on_the_border():
    mask = np.zeros((7, 9, 9), bool)
    mask[2:5, 2:7, 2:7] = True
    mask[3, 4, 4] = False
    mask[0:2, 0:3, 0:3] = True  # touches the volume border
    closed = close_cube(mask)
    assert closed[3, 4, 4]
    assert closed[0:2, 0:3, 0:3].all()


def test_plus_opening_removes_specks_per_slice_only():
    mask = np.zeros((3, 10, 10), bool)
    mask[1, 2, 2] = True  # isolated pixel: removed
    mask[1, 5:8, 5:8] = True  # 3x3 square survives as a plus-covered region
    opened = open_plus_per_slice(mask)
    assert not opened[1, 2, 2]
    assert opened[1, 6, 6]
    # a single-slice structure is not removed for lacking neighbours in other slices
    assert opened[0].sum() == 0 and opened[1].sum() > 0


def test_26_connected_voxels_form_one_lesion():
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # corner neighbours
    mask[3, 3, 3] = True
    labels, n = label_lesions(mask)
    assert n == 2 and labels[0, 0, 0] == labels[1, 1, 1]


def test_postprocess_thresholds_inside_the_organ():
    p = np.zeros((5, 10, 10), np.float32)
    p[2, 4:7, 4:7] = 0.8
    p[2, 0, 0] = 0.9
    organ = np.ones_like(p, bool)
    organ[:, 0, :] = False
    mask = postprocess(p, organ)
    assert mask[2, 5, 5] and not mask[2, 0, 0]
    assert postprocess(np.full_like(p, 0.5), organ).sum() == 0  # strictly above 0.5


def test_lesion_table_volumes_and_physical_centroids():
    grid = sitk.Image(10, 8, 6, sitk.sitkUInt8)  # x, y, z
    grid.SetSpacing((0.5, 2.0, 3.0))
    grid.SetOrigin((10.0, 20.0, 30.0))
    labels = np.zeros((6, 8, 10), np.int32)  # z, y, x with slices along z (axis 2)
    labels[1:3, 2, 4:6] = 1  # 4 voxels, centre index (x=4.5, y=2, z=1.5)
    rows = lesion_table(
        labels, grid, SliceLayout(axis=2, row_axis=1, col_axis=0), extra_maps={"probability": labels * 0.7}
    )
    assert len(rows) == 1
    r = rows[0]
    assert r["voxels"] == 4 and r["volume_mm3"] == pytest.approx(4 * 0.5 * 2 * 3)
    assert (r["centroid_x_mm"], r["centroid_y_mm"], r["centroid_z_mm"]) == pytest.approx(
        (10 + 4.5 * 0.5, 20 + 2 * 2.0, 30 + 1.5 * 3)
    )
    assert r["mean_probability"] == pytest.approx(0.7)


def test_remove_small_lesions_drops_specks_and_keeps_26_connected_pairs():
    mask = np.zeros((5, 8, 8), bool)
    mask[0, 0, 0] = True  # a single voxel: dropped
    mask[2, 2, 2] = mask[3, 3, 3] = True  # two voxels touching at a corner: one 2-voxel lesion
    mask[1, 6, 5:8] = True  # three voxels
    kept = remove_small_lesions(mask, 2)
    assert not kept[0, 0, 0] and kept[2, 2, 2] and kept[3, 3, 3] and kept[1, 6, 5:8].all()
    assert kept.sum() == mask.sum() - 1
    assert remove_small_lesions(mask, 3).sum() == 3
    assert remove_small_lesions(mask, 1) is mask  # 1 keeps every lesion


def test_postprocess_drops_lesions_under_the_minimum_after_closing():
    p = np.zeros((5, 12, 12), np.float32)
    p[2, 2, 2] = 0.9  # a 1-voxel speck
    p[2, 6:9, 6:9] = 0.9  # a 9-voxel lesion
    organ = np.ones_like(p, bool)
    assert postprocess(p, organ)[2, 2, 2]  # by default every lesion is kept
    kept = postprocess(p, organ, min_lesion_voxels=2)
    assert not kept[2, 2, 2] and kept[2, 6:9, 6:9].all()
