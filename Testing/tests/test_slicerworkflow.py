"""The Slicer module's three steps on real MRML nodes (slicer-core): the same numbers as
the file-based library, results on the follow-up's grid."""

import json
import shlex
import tempfile
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # noqa: F401  (slicer-core, a pinned test dependency: these tests must run in CI, never skip)

from PatientFineTuneLib import mrml
from PatientFineTuneLib.cases import find_cases
from PatientFineTuneLib.images import load_case, prepare_case
from PatientFineTuneLib.inference import segment_case
from PatientFineTuneLib.modelcard import describe_patient_model, shipped_models
from PatientFineTuneLib.modelfile import ModelBundle, load_model, make_metadata
from PatientFineTuneLib.slicerworkflow import (
    MaskSource,
    ModelChoice,
    PatientSession,
    baseline_nodes_from_job,
    save_patient_model,
    show_followup_results,
    write_job_inputs,
)
from PatientFineTuneLib.workflow import analyse_job

from conftest import tiny_model
from test_mrml import scene  # noqa: F401  (the MRML scene fixture)


@pytest.fixture
def bundle():
    model = tiny_model()
    return ModelBundle(
        model,
        make_metadata(
            model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], (2.0, 2.0), preset="brain-wmh"
        ),
    )


def _nodes(scene, folder):  # noqa: F811
    nodes = [
        mrml.image_to_volume(sitk.ReadImage(str(folder / f"{s}.nii.gz")), scene, f"{folder.name} {s}")
        for s in ("FLAIR", "T1")
    ]
    organ = mrml.image_to_volume(
        sitk.ReadImage(str(folder / "organ.nii.gz")), scene, "organ", node_class="vtkMRMLLabelMapVolumeNode"
    )
    return nodes, MaskSource(organ)


def _file_case(folder, lesions=True):
    f = find_cases(folder, ["FLAIR", "T1"])[0]
    return prepare_case(load_case(f.sequences, f.organ, f.lesions if lesions else None))


def test_bad_selections_are_refused_before_a_job_starts(scene, small_pair_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    session = PatientSession(scene)
    session.choose_base_model("brain-wmh")
    nodes, organ = _nodes(scene, small_pair_dir / "baseline")
    # the shipped model's T1 is optional: the FLAIR is not, nor a T1 without it
    with pytest.raises(ValueError, match=r"\(T1 optional\); select a volume for FLAIR, and for T1 only after it"):
        session.start_analyse([None, nodes[1]], organ, device="cpu")
    with pytest.raises(ValueError, match="select a volume for FLAIR"):
        session.start_analyse([], organ, device="cpu")
    with pytest.raises(ValueError, match="select one volume per sequence"):
        session.start_analyse([nodes[0], nodes[0]], organ, device="cpu")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(ValueError, match="no segments"):
        session.start_finetune(nodes, organ, MaskSource(empty), "all-lesion", device="cpu")
    with pytest.raises(ValueError, match="no suggested slices yet"):
        session.start_finetune(nodes, organ, MaskSource(empty), "suggested", device="cpu")
    assert not list(tmp_path.glob("PatientFineTune-*-*/inputs"))  # no step folder is left behind
    session.close()


def test_a_flair_only_visit_runs_where_the_models_t1_is_optional(scene, small_pair_dir, tmp_path, bundle):  # noqa: F811
    """The commonest MS follow-up is a FLAIR alone. With the shipped brain-wmh model (T1
    optional) the Slicer module takes a visit whose T1 selector is empty: the job reads
    the FLAIR alone and segments it on the FLAIR's grid. A model that needs T1 refuses the
    same selection before any job starts."""
    nodes, organ = _nodes(scene, small_pair_dir / "baseline")
    session = PatientSession(scene)
    session.choose_base_model("brain-wmh")
    assert session.required_sequence_count() == 1
    inputs = write_job_inputs(tmp_path / "in", [nodes[0], None], ["FLAIR", "T1"], organ, required=1)
    assert [p.rsplit("/", 1)[1] for p in inputs["images"]] == ["FLAIR.nii.gz"]
    analysis = session.run_step(session.start_analyse([nodes[0], None], organ, k=2, device="cpu"))
    segment = mrml.segment_to_array(analysis.segmentation_node, analysis.segment_id, nodes[0])
    assert segment.shape == sitk.GetArrayFromImage(mrml.volume_to_image(nodes[0])).shape and segment.any()
    assert len(analysis.suggestions) == 2
    session.close()

    needs_t1 = tmp_path / "needs-t1.pt"
    from PatientFineTuneLib.modelfile import save_model

    save_model(bundle, needs_t1)
    strict = PatientSession(scene)
    strict.choose_base_model(str(needs_t1))
    assert strict.required_sequence_count() == 2
    with pytest.raises(ValueError, match=r"reads 2 sequence\(s\) \(FLAIR, T1\); select a volume for each"):
        strict.start_analyse([nodes[0], None], organ, device="cpu")
    strict.close()


# ---------------------------------------------------------------------------------------
# The Slicer module's way: each step a patient-finetune job in a subprocess, files in and out


@pytest.mark.slow
def test_the_three_steps_as_jobs_round_trip_through_the_scene(scene, small_pair_dir, tmp_path, monkeypatch):  # noqa: F811
    # the Slicer module's whole path: a patient session in the scene, each step a real
    # patient-finetune job, the results loaded back; then File > Close Scene and a second
    # patient, who gets nothing of the first. The step folders go to a private temporary
    # folder, so that what is left behind can be counted.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    left_behind = lambda: sorted(p.name for p in tmp_path.glob("PatientFineTune-*"))  # noqa: E731
    session = PatientSession(scene)
    assert "FLAIR" in session.choose_base_model("brain-wmh") and session.sequence_names() == ["FLAIR", "T1"]
    baseline_nodes, organ = _nodes(scene, small_pair_dir / "baseline")
    analysis = session.run_step(session.start_analyse(baseline_nodes, organ, k=2, device="cpu"))
    assert session.suggestions == analysis.suggestions and left_behind() == []
    # the job's segmentation is the in-process one, on the baseline node's grid
    base = load_model(shipped_models()["brain-wmh"])
    file_case = _file_case(small_pair_dir / "baseline")
    expected = segment_case(base, file_case, opening=base.opening, device="cpu")
    segment = mrml.segment_to_array(analysis.segmentation_node, analysis.segment_id, baseline_nodes[0])
    assert np.array_equal(segment, file_case.layout.from_slices(expected.mask))
    assert len(analysis.suggestions) == 2 and analysis.suggestions[0].axis == file_case.axis

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(small_pair_dir / "baseline" / "lesions.nii.gz"))) > 0
    mrml.set_segment_from_array(analysis.segmentation_node, "Lesion", truth, baseline_nodes[0])
    selection = "suggested" if any(file_case.lesions[s.index].any() for s in analysis.suggestions) else "all-lesion"
    description = session.run_step(
        session.start_finetune(
            baseline_nodes,
            organ,
            MaskSource(analysis.segmentation_node, analysis.segment_id),
            selection,
            iterations=5,
            device="cpu",
        )
    )
    assert "5 iterations on slices" in description and "held out in turn" in description
    assert session.models.patient_description == description and session.models.patient_model.is_file()
    assert left_behind() == [f"PatientFineTune-patient-{session.models.patient_model.parent.name.rsplit('-', 1)[1]}"]

    followup_nodes, followup_organ = _nodes(scene, small_pair_dir / "followup")
    with pytest.raises(ValueError, match="a volume of the other visit; select this visit's scan"):
        session.start_followup([baseline_nodes[0], followup_nodes[1]], followup_organ, device="cpu")
    with pytest.raises(ValueError, match="selected for both FLAIR and T1; select one volume per sequence"):
        session.start_followup([followup_nodes[0], followup_nodes[0]], followup_organ, device="cpu")
    # the radiologist segments the follow-up twice: one job's results loaded twice take the
    # same path onto the scene as a second job's would (a second job is started and loaded
    # after Close Scene below)
    step = session.start_followup(followup_nodes, followup_organ, mc_samples=2, device="cpu")
    try:
        assert step.job.wait(300) and step.job.succeeded, step.job.error
        runs = session.finish_step(step) + session.finish_step(step)
    finally:
        session.discard_step(step)
    assert [r.label for r in runs] == ["base", "fine-tuned", "base", "fine-tuned"]
    assert runs[2].segmentation.GetName() != runs[0].segmentation.GetName()  # a unique-name suffix ...
    main = show_followup_results(runs, "fine-tuned")  # ... does not hide the second run's results
    assert main is runs[3]
    assert [r.segmentation.GetDisplayNode().GetVisibility() for r in runs] == [0, 0, 0, 1]
    assert show_followup_results(runs, "both") is runs[3]
    assert [r.segmentation.GetDisplayNode().GetVisibility() for r in runs] == [0, 0, 1, 1]
    fine = runs[3]
    colours = [r.segmentation.GetSegmentation().GetNthSegment(0).GetColor() for r in runs[2:]]
    assert colours[0] != colours[1]  # base and fine-tuned results are told apart in the views
    assert fine.uncertainty is not None and fine.summary["mc_samples"] == 2
    assert np.allclose(mrml.ijk_to_ras_matrix(fine.probability), mrml.ijk_to_ras_matrix(followup_nodes[0]))
    assert fine.table.GetNumberOfRows() == len(fine.lesions)

    saved = save_patient_model(session.models, tmp_path / "kept" / "patient-model.pt")
    assert saved.read_bytes() == session.models.patient_model.read_bytes()
    with pytest.raises(ValueError, match="never overwritten"):
        save_patient_model(session.models, shipped_models()["brain-wmh"])

    # File > Close Scene; the next patient
    scene.Clear(False)
    assert session.models.patient_model is None and session.suggestions == [] and left_behind() == []
    assert session.models.base_model == "brain-wmh"
    second, second_organ = _nodes(scene, small_pair_dir / "followup")
    step = session.start_followup(second, second_organ, mc_samples=0, compare_with_base=False, device="cpu")
    assert step.labels == ["base"]  # no patient model: never the previous patient's
    (result,) = session.run_step(step)
    assert result.label == "base" and result.uncertainty is None
    session.close()
    assert left_behind() == [] and saved.is_file()  # the saved copy is the user's


def test_a_step_of_the_previous_patient_never_reaches_the_next(scene, small_pair_dir, tmp_path):  # noqa: F811
    # File > Close Scene while a step runs (the console's runStep keeps Slicer responsive,
    # so the user can), then the next patient: the scene gives the new volumes the IDs the
    # previous patient's had, so the step's results would land on the next patient. The
    # job here is a stand-in that prints a fine-tuning result (what the step would load)
    result = {
        "event": "result",
        "outputs": {"model": str(tmp_path / "previous-patient.pt")},
        "description": "fine-tuned 5 iterations",
    }

    def job_python(delay_s):
        script = tmp_path / f"python-{delay_s}"
        script.write_text(f"#!/bin/sh\nsleep {delay_s}\necho {shlex.quote(json.dumps(result))}\n")
        script.chmod(0o755)
        return str(script)

    def start(session):
        nodes, organ = _nodes(scene, small_pair_dir / "baseline")
        lesions = mrml.image_to_volume(
            sitk.ReadImage(str(small_pair_dir / "baseline" / "lesions.nii.gz")),
            scene,
            "lesions",
            node_class="vtkMRMLLabelMapVolumeNode",
        )
        return nodes, session.start_finetune(nodes, organ, MaskSource(lesions), "all-lesion", device="cpu")

    # the step ended before the scene was closed, its results not yet loaded
    session = PatientSession(scene, job_python(0))
    session.choose_base_model("brain-wmh")
    first, step = start(session)
    assert step.job.wait(timeout=60) and step.job.succeeded, (step.job.error, list(step.job.log))
    scene.Clear(False)
    second, _organ = _nodes(scene, small_pair_dir / "baseline")
    assert second[0].GetID() == first[0].GetID()  # what makes it dangerous
    with pytest.raises(RuntimeError, match="scene was closed"):
        session.finish_step(step)
    assert session.models.patient_model is None
    session.discard_step(step)
    session.close()

    # the step still runs when the scene is closed: it is cancelled, not waited for
    session = PatientSession(scene, job_python(20))
    session.choose_base_model("brain-wmh")
    _first, step = start(session)
    closed = []

    def close_scene_once():
        if not closed:
            closed.append(True)
            scene.Clear(False)

    begin = time.monotonic()
    with pytest.raises(RuntimeError):
        session.run_step(step, timeout=60, idle=close_scene_once)
    assert closed and step.job.cancelled and time.monotonic() - begin < 10
    assert session.models.patient_model is None
    session.close()


def test_a_mask_with_several_segments_is_refused(scene, small_pair_dir):  # noqa: F811
    nodes, _organ = _nodes(scene, small_pair_dir / "baseline")
    masks = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain and ventricles")
    mask = np.zeros(tuple(reversed(nodes[0].GetImageData().GetDimensions())), bool)
    mask[2:4, 5:9, 5:9] = True
    mrml.set_segment_from_array(masks, "brain", mask, nodes[0])
    mrml.set_segment_from_array(masks, "ventricles", mask[::-1], nodes[0])
    with pytest.raises(ValueError, match="brain and ventricles has 2 segments; select a segmentation"):
        MaskSource(masks).image(nodes[0])
    assert (
        MaskSource(masks, masks.GetSegmentation().GetSegmentIdBySegmentName("brain")).image(nodes[0]).GetSize()
        == mrml.volume_to_image(nodes[0]).GetSize()
    )


def test_choosing_the_same_base_model_again_keeps_the_patient_model(tmp_path):
    choice = ModelChoice()
    assert choice.choose_base_model("brain-wmh")
    choice.set_patient_model(tmp_path / "patient.pt", "100 iterations")
    # re-entering the module sets the same model again, by name or by its file
    assert not choice.choose_base_model("brain-wmh")
    assert not choice.choose_base_model(str(shipped_models()["brain-wmh"]))
    assert choice.patient_model == tmp_path / "patient.pt"
    assert choice.choose_base_model("brain-tumor")
    assert choice.patient_model is None


def test_a_patient_model_is_described_for_both_networks():
    assert (
        describe_patient_model({"config": {"iterations": 100}, "slices": [12, 20], "method": "fast"})
        == "fine-tuned 100 iterations on slices 12, 20 (fast path)"
    )
    sampled = {
        "config": {"iterations": 100, "layers": "head", "pixel_fraction": 0.25},
        "slices": [12, 20],
        "method": "fast",
    }
    assert (
        describe_patient_model(sampled)
        == "fine-tuned 100 iterations on slices 12, 20 (fast path, 25% of each patch's pixels per iteration)"
    )
    every = {
        **sampled,
        "config": {**sampled["config"], "layers": "all"},
        "method": "naive",
    }  # every layer uses every pixel
    assert describe_patient_model(every) == "fine-tuned every layer, 100 iterations on slices 12, 20 (naive path)"
    unet = describe_patient_model({"config": {"iterations": 50, "layers": "decoder"}, "strategy": "decoder"})
    assert unet == "fine-tuned 50 iterations on the whole baseline volume (decoder layers)"
    kept = describe_patient_model(
        {
            "config": {"iterations": 100},
            "slices": [3],
            "method": "base model kept",
            "holdout_check": {"kept": False, "dice_base": 0.8, "dice_finetuned": 0.7},
        }
    )
    assert kept.startswith("the BASE MODEL was kept") and "0.700" in kept and "0.800" in kept


def test_sequences_on_different_grids_are_resampled_onto_the_first(scene, small_pair_dir, tmp_path):  # noqa: F811
    # FLAIR and T1 from separate series: the T1 on a coarser, shifted grid, as a loaded
    # series would be; the organ mask a labelmap on the T1's grid
    flair = mrml.image_to_volume(
        sitk.ReadImage(str(small_pair_dir / "baseline" / "FLAIR.nii.gz")), scene, "FLAIR series"
    )
    t1_image = sitk.ReadImage(str(small_pair_dir / "baseline" / "T1.nii.gz"))
    grid = sitk.Image([max(4, n * 3 // 4) for n in t1_image.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([s * 4 / 3 for s in t1_image.GetSpacing()])
    grid.SetDirection(t1_image.GetDirection())
    grid.SetOrigin(t1_image.TransformContinuousIndexToPhysicalPoint([0.7, 0.4, 0.2]))
    t1 = mrml.image_to_volume(sitk.Resample(t1_image, grid, sitk.Transform(), sitk.sitkLinear), scene, "T1 series")
    organ_image = sitk.Resample(
        sitk.ReadImage(str(small_pair_dir / "baseline" / "organ.nii.gz")),
        grid,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
    )
    organ = mrml.image_to_volume(organ_image, scene, "brain", node_class="vtkMRMLLabelMapVolumeNode")
    assert not mrml.same_grid(flair, t1)

    inputs = write_job_inputs(tmp_path / "in", [flair, t1], ["FLAIR", "T1"], MaskSource(organ))
    job = analyse_job("brain-wmh", inputs["arguments"], tmp_path / "analysis", k=1, device="cpu").start()
    assert job.wait(timeout=300) and job.succeeded, (job.error, list(job.log))
    # the status line says so
    assert inputs["notes"] == ["T1 series (T1) is resampled onto the grid of FLAIR series (FLAIR)"]
    analysis = baseline_nodes_from_job(scene, tmp_path / "analysis", flair)
    assert analysis.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1 and len(analysis.suggestions) == 1
    # sequences on one grid: nothing to say
    same = mrml.image_to_volume(mrml.volume_to_image(flair), scene, "FLAIR again")
    assert write_job_inputs(tmp_path / "same", [flair, same], ["FLAIR", "T1"])["notes"] == []
