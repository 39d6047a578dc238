"""The Slicer module's three steps on real MRML nodes (slicer-core): the same numbers as
the file-based library, results on the follow-up's grid."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import slicer  # noqa: F401  (slicer-core, a pinned test dependency: these tests must run in CI, never skip)

from PatientFineTuneLib import mrml  
from PatientFineTuneLib.cases import find_cases  
from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model  
from PatientFineTuneLib.images import load_case, prepare_case  
from PatientFineTuneLib.inference import Cancelled, segment_case  
from PatientFineTuneLib.modelfile import ModelBundle, make_metadata  
from PatientFineTuneLib.slicerworkflow import MaskSource, analyse_baseline, finetune_from_nodes, segment_followup  

from conftest import tiny_model  
from test_mrml import scene  # noqa: F401  (the MRML scene fixture)


@pytest.fixture
def bundle():
    model = tiny_model()
    return ModelBundle(model, make_metadata(model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], (2.0, 2.0), preset="brain-wmh"))


def _nodes(scene, folder):  # noqa: F811
    nodes = [mrml.image_to_volume(sitk.ReadImage(str(folder / f"{s}.nii.gz")), scene, f"{folder.name} {s}") for s in ("FLAIR", "T1")]
    organ = mrml.image_to_volume(sitk.ReadImage(str(folder / "organ.nii.gz")), scene, "organ", node_class="vtkMRMLLabelMapVolumeNode")
    return nodes, MaskSource(organ)


def _file_case(folder, lesions=True):
    f = find_cases(folder, ["FLAIR", "T1"])[0]
    return prepare_case(load_case(f.sequences, f.organ, f.lesions if lesions else None))


def test_three_steps_on_nodes_match_the_file_workflow(scene, bundle, small_pair_dir):  # noqa: F811
    baseline_nodes, organ = _nodes(scene, small_pair_dir / "baseline")

    analysis = analyse_baseline(scene, bundle, baseline_nodes, organ, k=2, device="cpu")
    file_case = _file_case(small_pair_dir / "baseline")
    expected = segment_case(bundle, file_case, device="cpu")
    segment = mrml.segment_to_array(analysis.segmentation_node, analysis.segment_id, baseline_nodes[0])
    assert np.array_equal(segment, file_case.layout.from_slices(expected.mask))
    assert len(analysis.suggestions) == 2 and all(0.0 <= s.mean_probability <= 1.0 for s in analysis.suggestions)

    # the radiologist corrects the segment (here: to the truth) and fine-tunes on the suggested slices
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(small_pair_dir / "baseline" / "lesions.nii.gz"))) > 0
    mrml.set_segment_from_array(analysis.segmentation_node, "Lesion", truth, baseline_nodes[0])
    lesion_slices = file_case.lesion_slices()[:2]
    config = FinetuneConfig(iterations=3, patch_size=64, seed=1)
    annotation = MaskSource(analysis.segmentation_node, analysis.segment_id)
    patient = finetune_from_nodes(bundle, baseline_nodes, annotation, lesion_slices, organ, config, device="cpu")
    reference = finetune_patient_model(bundle, file_case, lesion_slices, config, device="cpu")
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, patient.model.state_dict()[k]), k
    assert patient.metadata["finetune"]["slices"] == lesion_slices

    followup_nodes, followup_organ = _nodes(scene, small_pair_dir / "followup")
    nodes = segment_followup(scene, patient, followup_nodes, followup_organ, mc_samples=3, device="cpu")
    for node in (nodes.probability, nodes.uncertainty):
        assert np.allclose(mrml.ijk_to_ras_matrix(node), mrml.ijk_to_ras_matrix(followup_nodes[0]))
    seg = nodes.segmentation.GetSegmentation()
    lesion = mrml.segment_to_array(nodes.segmentation, seg.GetSegmentIdBySegmentName("Lesion"), followup_nodes[0])
    assert np.array_equal(lesion, file_case.layout.from_slices(nodes.result.mask))
    assert nodes.table.GetNumberOfRows() == len(nodes.result.lesions)
    assert nodes.segmentation.GetName() == "Follow-up lesions (fine-tuned)"
    base = segment_followup(scene, bundle, followup_nodes, followup_organ, mc_samples=0, label="base", device="cpu")
    colours = [n.segmentation.GetSegmentation().GetNthSegment(0).GetColor() for n in (nodes, base)]
    assert colours[0] != colours[1]  # base and fine-tuned results are told apart in the views
    assert base.uncertainty is None


def test_bad_inputs_give_clear_errors_and_cancel_stops(scene, bundle, small_pair_dir):  # noqa: F811
    nodes, organ = _nodes(scene, small_pair_dir / "baseline")
    with pytest.raises(ValueError, match="select a volume for each"):
        analyse_baseline(scene, bundle, nodes[:1], organ, device="cpu")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="no segments"):
        finetune_from_nodes(bundle, nodes, MaskSource(empty), [3], organ, device="cpu")
    before = scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        segment_followup(scene, bundle, nodes, organ, mc_samples=0, device="cpu", cancel=lambda: True)
    assert scene.GetNumberOfNodes() == before  # nothing half-made left in the scene
