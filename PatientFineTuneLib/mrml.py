"""The bridge between the library and a Slicer MRML scene (imports ``slicer``, never ``qt``).

Volume nodes become SimpleITK images with the node's exact geometry, so everything else
in the library runs unchanged on them; results come back as nodes on the reference
volume's grid. Slicer stores geometry as an IJK-to-RAS matrix, ITK/SimpleITK as origin,
spacing and direction in LPS; the two differ by the sign of the first two physical axes,
and nothing here assumes an identity direction.

Works in the Slicer application and with the ``slicer-core`` wheel (the tests build a
scene with ``vtkSlicerApplicationLogic`` and the Volumes, Segmentations and Colors module
logics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtkmodules.util import numpy_support

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: Colour of the lesion segment (a saturated yellow that reads well on FLAIR and T1c).
LESION_COLOUR = (1.0, 0.86, 0.0)
PROBABILITY_COLOURS = "PatientFineTune probability"
UNCERTAINTY_COLOURS = "PatientFineTune uncertainty"
#: Control points (value in 0..1, r, g, b) of the two colour maps: perceptually ordered
#: dark-to-bright ramps (viridis-like for probability, inferno-like for uncertainty),
#: defined here so they exist in every scene, with or without Slicer's colour files.
COLOUR_RAMPS = {
    PROBABILITY_COLOURS: (
        (0.0, 0.267, 0.005, 0.329),
        (0.25, 0.229, 0.322, 0.546),
        (0.5, 0.128, 0.567, 0.551),
        (0.75, 0.369, 0.789, 0.383),
        (1.0, 0.993, 0.906, 0.144),
    ),
    UNCERTAINTY_COLOURS: (
        (0.0, 0.001, 0.0, 0.014),
        (0.25, 0.342, 0.062, 0.429),
        (0.5, 0.735, 0.216, 0.330),
        (0.75, 0.978, 0.557, 0.035),
        (1.0, 0.988, 1.0, 0.644),
    ),
}


# ---------------------------------------------------------------------------------------
# Geometry and voxels


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as a numpy array."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def same_grid(a, b, tolerance: float = 1e-4) -> bool:
    """True if two volume nodes have the same voxel grid (dimensions and IJK-to-RAS)."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    return a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions() and np.allclose(
        ijk_to_ras_matrix(a), ijk_to_ras_matrix(b), atol=tolerance
    )


def _voxels(volume_node) -> np.ndarray:
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {volume_node.GetName()} has no voxels loaded")
    shape = tuple(reversed(image_data.GetDimensions()))
    components = image_data.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    return array.reshape(shape + ((components,) if components > 1 else ()))


def volume_to_image(volume_node) -> sitk.Image:
    """A copy of a scalar or vector volume node as a SimpleITK image (LPS geometry).

    A node under a (linear) parent transform is refused: its voxels are not where its
    IJK-to-RAS matrix says, and silently ignoring the transform would misplace results.
    """
    if volume_node.GetParentTransformNode() is not None:
        raise ValueError(
            f"volume {volume_node.GetName()} is under a transform; harden the transform "
            "(Data module: right-click > Harden transform) before using it here"
        )
    voxels = _voxels(volume_node).copy()
    image = sitk.GetImageFromArray(voxels, isVector=voxels.ndim == 4)
    matrix = ijk_to_ras_matrix(volume_node)
    spacing = np.array(volume_node.GetSpacing(), dtype=float)
    direction_ras = matrix[:3, :3] / spacing  # columns: unit vectors of i, j, k in RAS
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(LPS_TO_RAS @ matrix[:3, 3]))
    image.SetDirection(tuple((LPS_TO_RAS @ direction_ras).ravel()))
    return image


def _set_geometry(volume_node, image: sitk.Image) -> None:
    direction_lps = np.array(image.GetDirection()).reshape(3, 3)
    volume_node.SetSpacing(image.GetSpacing())
    volume_node.SetOrigin(tuple(LPS_TO_RAS @ np.array(image.GetOrigin())))
    matrix = vtk.vtkMatrix4x4()
    direction_ras = LPS_TO_RAS @ direction_lps
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction_ras[r, c])
    volume_node.SetIJKToRASDirectionMatrix(matrix)


def _set_voxels(volume_node, array_zyx: np.ndarray) -> None:
    array_zyx = np.ascontiguousarray(array_zyx)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*reversed(array_zyx.shape[:3]))
    vtk_array = numpy_support.numpy_to_vtk(
        array_zyx.reshape(-1, array_zyx.shape[3] if array_zyx.ndim == 4 else 1), deep=True
    )
    image_data.GetPointData().SetScalars(vtk_array)
    volume_node.SetAndObserveImageData(image_data)


def image_to_volume(image: sitk.Image, scene, name: str, node=None, node_class: str = "vtkMRMLScalarVolumeNode"):
    """Put a SimpleITK image into a (new or given) volume node with its exact geometry."""
    if node is None:
        node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    _set_geometry(node, image)
    _set_voxels(node, sitk.GetArrayFromImage(image))
    node.CreateDefaultDisplayNodes()
    return node


def array_to_volume(
    array_zyx: np.ndarray, reference_node, scene, name: str, node=None, node_class: str = "vtkMRMLScalarVolumeNode"
):
    """A (z, y, x) array on ``reference_node``'s grid as a volume node."""
    expected = tuple(reversed(reference_node.GetImageData().GetDimensions()))
    if array_zyx.shape[:3] != expected:
        raise ValueError(
            f"array of shape {array_zyx.shape[:3]} does not fit volume {reference_node.GetName()} ({expected})"
        )
    if node is None:
        node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    m = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    _set_voxels(node, array_zyx)
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------------------------
# Segmentations


def segment_to_array(segmentation_node, segment_id: str, reference_node) -> np.ndarray:
    """One segment as a boolean (z, y, x) array on ``reference_node``'s grid."""
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(f"segmentation {segmentation_node.GetName()} has no segment {segment_id!r}")
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__PatientFineTune_export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, reference_node
        )
        if not ok:
            raise ValueError(
                f"could not export segment {segment_id!r} of {segmentation_node.GetName()} onto {reference_node.GetName()}"
            )
        return _voxels(labelmap) > 0
    finally:
        scene.RemoveNode(labelmap)


def set_segment_from_array(
    segmentation_node, segment_name: str, mask_zyx: np.ndarray, reference_node, colour=LESION_COLOUR
) -> str:
    """Replace (or create) the segment called ``segment_name`` with a boolean (z, y, x)
    mask on ``reference_node``'s grid; returns the segment id."""
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    if segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole()) is None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    labelmap = array_to_volume(
        mask_zyx.astype(np.uint8),
        reference_node,
        scene,
        "__PatientFineTune_import",
        node_class="vtkMRMLLabelMapVolumeNode",
    )
    try:
        existing = segmentation.GetSegmentIdBySegmentName(segment_name)
        if existing:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(existing)
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation_node, ids
            )
            segment_id = existing
        else:
            before = set(_segment_ids(segmentation))
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation_node)
            new = [s for s in _segment_ids(segmentation) if s not in before]
            if not new:  # an empty mask imports no segment: add an empty one
                segment_id = segmentation.AddEmptySegment("", segment_name)
            else:
                segment_id = new[0]
        if not ok:
            raise ValueError(f"could not import the mask into segmentation {segmentation_node.GetName()}")
    finally:
        scene.RemoveNode(labelmap)
    segment = segmentation.GetSegment(segment_id)
    segment.SetName(segment_name)
    segment.SetColor(*colour)
    return segment_id


def _segment_ids(segmentation) -> list[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def add_lesion_segmentation(
    scene, mask_zyx: np.ndarray, reference_node, name: str, segment_name: str = "Lesion", colour=LESION_COLOUR
):
    """A new segmentation node holding one lesion segment."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    set_segment_from_array(node, segment_name, mask_zyx, reference_node, colour)
    return node


# ---------------------------------------------------------------------------------------
# Probability and uncertainty maps


def colour_table(scene, name: str):
    """The project's colour map ``name`` (created once per scene, then reused)."""
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLProceduralColorNode"):
        return existing
    node = scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", name)
    transfer = vtk.vtkColorTransferFunction()
    for value, r, g, b in COLOUR_RAMPS[name]:
        transfer.AddRGBPoint(value, r, g, b)
    node.SetAndObserveColorTransferFunction(transfer)
    node.SetAttribute("Category", "PatientFineTune")
    return node


#: Below this fraction of its window a map is transparent in the slice views: where the
#: probability or the uncertainty is near zero (most of the scan) it carries no
#: information, and an overlay there would only dim the scan under it.
MAP_THRESHOLD_FRACTION = 0.05


def add_map_volume(scene, values_zyx: np.ndarray, reference_node, name: str, colours: str, window_max: float):
    """A float map (probability or uncertainty) as a scalar volume shown with ``colours``
    over the window 0..``window_max``, transparent below
    :data:`MAP_THRESHOLD_FRACTION` of the window."""
    node = array_to_volume(values_zyx.astype(np.float32), reference_node, scene, name)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colour_table(scene, colours).GetID())
    display.AutoWindowLevelOff()
    top = float(window_max) if window_max > 0 else 1.0
    display.SetWindowLevelMinMax(0.0, top)
    display.AutoThresholdOff()
    display.SetThreshold(MAP_THRESHOLD_FRACTION * top, max(top, float(np.max(values_zyx, initial=0.0))))
    display.ApplyThresholdOn()
    return node


def add_probability_volume(scene, probability_zyx: np.ndarray, reference_node, name: str = "Lesion probability"):
    return add_map_volume(scene, probability_zyx, reference_node, name, PROBABILITY_COLOURS, 1.0)


def add_uncertainty_volume(scene, sd_zyx: np.ndarray, reference_node, name: str = "Uncertainty (SD)"):
    return add_map_volume(
        scene, sd_zyx, reference_node, name, UNCERTAINTY_COLOURS, float(np.max(sd_zyx)) if sd_zyx.size else 1.0
    )


def show_as_foreground(scene, volume_node, opacity: float = 0.5) -> int:
    """Show ``volume_node`` as the foreground layer of every slice view; returns how many."""
    composites = [
        scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]
    for composite in composites:
        composite.SetForegroundVolumeID(volume_node.GetID())
        composite.SetForegroundOpacity(opacity)
    return len(composites)


# ---------------------------------------------------------------------------------------
# Lesion table


@dataclass(frozen=True)
class TableColumn:
    name: str
    key: str
    unit: str = ""


LESION_TABLE_COLUMNS = (
    TableColumn("Lesion", "id"),
    TableColumn("Volume", "volume_mm3", "mm3"),
    TableColumn("Centroid R", "centroid_r_mm", "mm"),
    TableColumn("Centroid A", "centroid_a_mm", "mm"),
    TableColumn("Centroid S", "centroid_s_mm", "mm"),
    TableColumn("Mean probability", "mean_probability"),
    TableColumn("Mean uncertainty (SD)", "mean_sd"),
)


def lesion_rows_in_ras(lesions: Sequence[dict]) -> list[dict]:
    """Rows of :func:`~PatientFineTuneLib.postprocess.lesion_table` (LPS centroids) with
    RAS centroids, as Slicer shows positions."""
    rows = []
    for row in lesions:
        r, a, s = lps_to_ras([row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]])
        rows.append(dict(row, centroid_r_mm=r, centroid_a_mm=a, centroid_s_mm=s))
    return rows


def add_lesion_table(scene, lesions: Sequence[dict], name: str = "Lesions"):
    """A table node with one row per lesion: id, volume (mm3), RAS centroid, mean
    probability and mean uncertainty (empty where not computed)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    rows = lesion_rows_in_ras(lesions)
    table = node.GetTable()
    for column in LESION_TABLE_COLUMNS:
        array = vtk.vtkIntArray() if column.key == "id" else vtk.vtkDoubleArray()
        array.SetName(column.name)
        for row in rows:
            array.InsertNextValue(row.get(column.key, float("nan")))
        table.AddColumn(array)
        if column.unit:
            node.SetColumnUnitLabel(column.name, column.unit)
    node.Modified()
    return node


# ---------------------------------------------------------------------------------------
# Jumping to a slice


def lps_to_ras(point_lps: Sequence[float]) -> tuple[float, float, float]:
    return tuple(float(c) for c in LPS_TO_RAS @ np.asarray(point_lps, dtype=float))


#: The slice view of Slicer's default layout whose planes are normal to R (sagittal), A
#: (coronal) and S (axial).
VIEW_NORMAL_TO_RAS_AXIS = ("Yellow", "Green", "Red")


def slice_view_for_axis(volume_node, axis: int) -> str:
    """The slice view (of Slicer's default layout) that shows ``volume_node``'s slices
    along index axis ``axis`` (as :class:`~PatientFineTuneLib.suggest.SliceSuggestion`
    gives it): the view normal to the anatomical axis closest to that index axis."""
    direction = ijk_to_ras_matrix(volume_node)[:3, axis]
    return VIEW_NORMAL_TO_RAS_AXIS[int(np.argmax(np.abs(direction)))]


def jump_to_suggestion(slice_node, suggestion) -> float:
    """Move ``slice_node`` (e.g. the Red view) through the centre of a suggested slice
    (:class:`~PatientFineTuneLib.suggest.SliceSuggestion`) and return the slice offset (mm
    along the view's normal) it ends at."""
    slice_node.JumpSliceByOffsetting(*lps_to_ras(suggestion.centre_mm))
    return slice_node.GetSliceOffset()
