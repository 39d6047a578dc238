"""The MRML bridge against the real MRML classes of the slicer-core wheel: a scene with the
application logic and the Volumes, Segmentations and Colors module logics."""

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # (slicer-core, a pinned test dependency: these tests must run in CI, never skip)
import vtk  # from slicer-core's vtk

from PatientFineTuneLib import mrml
from PatientFineTuneLib.images import Case, slice_layout
from PatientFineTuneLib.postprocess import label_lesions, lesion_table
from PatientFineTuneLib.suggest import SliceSuggestion

from conftest import rotation_direction


@pytest.fixture
def scene():
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)  # Colors logic: no colour files outside Slicer
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = [slicer.vtkSlicerColorLogic(), slicer.vtkSlicerVolumesLogic(), slicer.vtkSlicerSegmentationsModuleLogic()]
    for logic in logics:
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
    scene.logics = (app, *logics)  # keep them alive with the scene
    return scene


def oblique_image(array=None, components=1):
    """Anisotropic, rotated, axis-flipped (left-handed) geometry: nothing is identity."""
    rng = np.random.default_rng(0)
    shape = (7, 11, 13) + ((components,) if components > 1 else ())
    array = rng.normal(size=shape).astype(np.float32) if array is None else array
    image = sitk.GetImageFromArray(array, isVector=components > 1)
    image.SetSpacing((0.7, 0.9, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(rotation_direction(30))
    return image


def test_volume_round_trip_is_voxel_for_voxel_and_point_for_point(scene):
    image = oblique_image()
    node = mrml.image_to_volume(image, scene, "oblique")
    matrix = mrml.ijk_to_ras_matrix(node)
    for ijk in [(0, 0, 0), (12, 0, 0), (0, 10, 0), (0, 0, 6), (5, 7, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(matrix @ np.append(ijk, 1.0), np.append(lps * [-1, -1, 1], 1.0), atol=1e-6)
    back = mrml.volume_to_image(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert np.allclose(back.GetOrigin(), image.GetOrigin()) and np.allclose(back.GetSpacing(), image.GetSpacing())
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-7)


def test_agrees_with_slicers_own_file_reader(scene, tmp_path):
    image = oblique_image()
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(path))
    loaded = scene.logics[2].AddArchetypeVolume(str(path), "from file")
    # Slicer makes the left-handed grid right-handed (k flipped); physically it is the
    # same volume: every voxel lands on the same point with the same value
    back = mrml.volume_to_image(loaded)
    on_file_grid = sitk.Resample(back, image, sitk.Transform(), sitk.sitkNearestNeighbor, np.nan)
    assert np.array_equal(sitk.GetArrayFromImage(on_file_grid), sitk.GetArrayFromImage(image))


def test_vector_volume_keeps_its_channels(scene):
    image = oblique_image(components=3)
    node = mrml.image_to_volume(image, scene, "dce", node_class="vtkMRMLVectorVolumeNode")
    back = mrml.volume_to_image(node)
    assert back.GetNumberOfComponentsPerPixel() == 3
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_transformed_volume_is_refused(scene):
    node = mrml.image_to_volume(oblique_image(), scene, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(ValueError, match="Harden transform"):
        mrml.volume_to_image(node)


def test_lesion_segment_round_trip_on_an_oblique_grid(scene):
    reference = mrml.image_to_volume(oblique_image(), scene, "reference")
    mask = sitk.GetArrayFromImage(mrml.volume_to_image(reference)) > 1.0
    segmentation = mrml.add_lesion_segmentation(scene, mask, reference, "Follow-up lesions")
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1
    segment_id = seg.GetSegmentIdBySegmentName("Lesion")
    assert np.allclose(seg.GetSegment(segment_id).GetColor(), mrml.LESION_COLOUR)
    assert np.array_equal(mrml.segment_to_array(segmentation, segment_id, reference), mask)

    # editing: replacing the segment's content keeps one segment with the new voxels
    edited = np.zeros_like(mask)
    edited[3, 4:6, 5:9] = True
    assert mrml.set_segment_from_array(segmentation, "Lesion", edited, reference) == segment_id
    assert seg.GetNumberOfSegments() == 1
    assert np.array_equal(mrml.segment_to_array(segmentation, segment_id, reference), edited)
    with pytest.raises(ValueError, match="no segment"):
        mrml.segment_to_array(segmentation, "missing", reference)


def test_empty_mask_gives_an_empty_named_segment(scene):
    reference = mrml.image_to_volume(oblique_image(), scene, "reference")
    segmentation = mrml.add_lesion_segmentation(scene, np.zeros((7, 11, 13), bool), reference, "nothing found")
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lesion")
    assert segment_id and not mrml.segment_to_array(segmentation, segment_id, reference).any()


def test_probability_and_uncertainty_volumes_are_displayed_as_maps(scene):
    reference = mrml.image_to_volume(oblique_image(), scene, "reference")
    values = np.abs(sitk.GetArrayFromImage(mrml.volume_to_image(reference))) / 10
    probability = mrml.add_probability_volume(scene, np.clip(values, 0, 1), reference)
    sd = mrml.add_uncertainty_volume(scene, values / 4, reference)
    for node, top, colours in (
        (probability, 1.0, mrml.PROBABILITY_COLOURS),
        (sd, values.max() / 4, mrml.UNCERTAINTY_COLOURS),
    ):
        display = node.GetDisplayNode()
        assert not display.GetAutoWindowLevel()
        assert display.GetWindowLevelMin() == pytest.approx(0.0) and display.GetWindowLevelMax() == pytest.approx(
            top, rel=1e-6
        )
        assert display.GetColorNode().GetName() == colours
        assert np.allclose(mrml.ijk_to_ras_matrix(node), mrml.ijk_to_ras_matrix(reference))
    # the colour maps are created once per scene and run dark to bright
    again = mrml.add_probability_volume(scene, np.clip(values, 0, 1), reference)
    assert again.GetDisplayNode().GetColorNodeID() == probability.GetDisplayNode().GetColorNodeID()
    for colours in (mrml.PROBABILITY_COLOURS, mrml.UNCERTAINTY_COLOURS):
        assert scene.GetNodesByName(colours).GetNumberOfItems() == 1
    ramp = probability.GetDisplayNode().GetColorNode().GetColorTransferFunction()
    assert sum(ramp.GetColor(0.0)) < sum(ramp.GetColor(1.0))

    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    assert mrml.show_as_foreground(scene, sd, opacity=0.4) == 1
    assert composite.GetForegroundVolumeID() == sd.GetID() and composite.GetForegroundOpacity() == pytest.approx(0.4)


def _case(image):
    layout = slice_layout(image)
    array = sitk.GetArrayFromImage(image)
    return Case(layout.to_slices(array[None]), layout.to_slices(np.ones(array.shape, bool)), None, image, layout)


def test_lesion_table_holds_ras_centroids_of_the_lesions(scene):
    image = oblique_image()
    reference = mrml.image_to_volume(image, scene, "reference")
    mask = np.zeros((7, 11, 13), bool)
    mask[2:4, 2:5, 3:6] = True
    mask[5, 8, 10] = True
    case = _case(image)
    labels, n = label_lesions(case.layout.to_slices(mask))
    rows = lesion_table(labels, image, case.layout, extra_maps={"sd": np.full(labels.shape, 0.25, np.float32)})
    table = mrml.add_lesion_table(scene, rows)
    assert table.GetNumberOfRows() == n == 2
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == [c.name for c in mrml.LESION_TABLE_COLUMNS]
    assert table.GetColumnUnitLabel("Volume") == "mm3"
    matrix = mrml.ijk_to_ras_matrix(reference)
    for r, row in enumerate(rows):
        component = case.layout.from_slices(labels) == row["id"]
        centre_ijk = np.argwhere(component).mean(axis=0)[::-1]
        expected_ras = (matrix @ np.append(centre_ijk, 1.0))[:3]
        got = [float(table.GetCellText(r, c)) for c in (2, 3, 4)]
        assert np.allclose(got, expected_ras, atol=0.01)
        assert float(table.GetCellText(r, 1)) == pytest.approx(component.sum() * 0.7 * 0.9 * 3.0, rel=1e-3)
        assert float(table.GetCellText(r, 6)) == pytest.approx(0.25)


def test_jumping_to_a_suggested_slice(scene):
    image = oblique_image()
    case = _case(image)
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetOrientationToAxial()
    for index in (0, 4, 6):
        centre = case.physical_point(index, 5.0, 6.0)
        suggestion = SliceSuggestion(index=index, score=0.0, mean_probability=0.5, centre_mm=centre, axis=case.axis)
        offset = mrml.jump_to_suggestion(red, suggestion)
        # axial view: the offset is the slice's S coordinate (LPS z = RAS S)
        assert offset == pytest.approx(30.0 + 3.0 * index, abs=1e-6)


def test_maps_are_transparent_where_they_carry_no_information(scene):
    # an overlay over the whole follow-up would dim it: below a small fraction of its
    # window the map is not drawn (the slice views make thresholded voxels transparent)
    reference = mrml.image_to_volume(oblique_image(), scene, "reference")
    sd = np.zeros((7, 11, 13), np.float32)
    sd[3, 4:6, 5:9] = 0.2
    node = mrml.add_uncertainty_volume(scene, sd, reference)
    display = node.GetDisplayNode()
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == pytest.approx(mrml.MAP_THRESHOLD_FRACTION * 0.2, rel=1e-6)
    assert display.GetUpperThreshold() >= 0.2
    probability = mrml.add_probability_volume(scene, sd * 5, reference).GetDisplayNode()
    assert probability.GetApplyThreshold() and probability.GetLowerThreshold() == pytest.approx(
        mrml.MAP_THRESHOLD_FRACTION
    )


@pytest.mark.parametrize(
    "axis_order, view",
    [((0, 1, 2), "Red"), ((1, 2, 0), "Yellow"), ((0, 2, 1), "Green")],
    ids=["axial", "sagittal", "coronal"],
)
def test_the_view_that_shows_the_slices_of_an_acquisition(scene, axis_order, view):
    # slices along index axis 2 of an axial, a sagittal and a coronal acquisition: the
    # plane they lie in is the Red, Yellow or Green view's
    permutation = np.eye(3)[:, axis_order]  # index axis k runs along anatomical axis axis_order[k]
    image = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    image.SetDirection(tuple((np.diag([-1.0, -1.0, 1.0]) @ permutation).ravel()))  # RAS columns, as LPS
    node = mrml.image_to_volume(image, scene, view)
    assert mrml.slice_view_for_axis(node, 2) == view
    # an oblique (30 degrees about S) axial acquisition is still shown in Red
    assert mrml.slice_view_for_axis(mrml.image_to_volume(oblique_image(), scene, "oblique"), 2) == "Red"
