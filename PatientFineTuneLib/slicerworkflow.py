"""The workflow's three steps (:mod:`.workflow`) on MRML nodes, without any GUI (imports
``slicer`` through :mod:`.mrml`, never ``qt``), so that the Slicer module's logic and the
web app are thin callers and all of it is tested against real MRML classes.

Each step runs as a ``patient-finetune`` job in a subprocess, so that the front end's own
process never imports PyTorch (nor the packages installed after it).
:func:`write_job_inputs` writes the nodes a job reads; :func:`baseline_nodes_from_job` and
:func:`followup_nodes_from_job` load its results back into the scene. :class:`ModelChoice`
holds the chosen base model and the patient model, and :class:`PatientSession` one
patient's work in a scene (what the module's logic holds: the model choice, the suggested
slices, the steps as jobs and their folders).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from . import mrml
from .files import atomic_write
from .jobs import CliJob
from .outputs import read_segment_outputs
from .suggest import SliceSuggestion
from .workflow import (
    SUGGESTED_SLICES,
    analyse_job,
    finetune_job,
    followup_job,
    input_arguments,
    job_description,
    read_suggestions,
)


@dataclass
class MaskSource:
    """Where a mask comes from in the scene: one segment of a segmentation node, or a
    labelmap volume node (any label > 0)."""

    node: object
    segment_id: str | None = None

    def image(self, reference_node) -> sitk.Image:
        """The mask on ``reference_node``'s grid for a segment; a labelmap volume on its
        own grid (the jobs resample it: ``--resample-to``)."""
        if self.node.IsA("vtkMRMLSegmentationNode"):
            segmentation = self.node.GetSegmentation()
            if self.segment_id is None and segmentation.GetNumberOfSegments() > 1:
                # which segment is the organ is not ours to guess
                raise ValueError(
                    f"segmentation {self.node.GetName()} has {segmentation.GetNumberOfSegments()} segments; "
                    "select a segmentation (or labelmap) holding only the mask"
                )
            segment_id = self.segment_id or segmentation.GetNthSegmentID(0)
            if not segment_id:
                raise ValueError(f"segmentation {self.node.GetName()} has no segments")
            mask = mrml.segment_to_array(self.node, segment_id, reference_node)
            image = sitk.GetImageFromArray(mask.astype(np.uint8))
            image.CopyInformation(mrml.volume_to_image(reference_node))
            return image
        return mrml.volume_to_image(self.node)


# ---------------------------------------------------------------------------------------
# The steps' results in the scene


@dataclass
class BaselineAnalysis:
    segmentation_node: object
    segment_id: str
    suggestions: list[SliceSuggestion]


@dataclass
class FollowupNodes:
    """The scene nodes of one follow-up result. ``label`` says which model made it
    ("base", "fine-tuned"): kept here because node names get suffixes (``_1``) when a
    result is made again."""

    label: str
    segmentation: object
    probability: object
    uncertainty: object | None
    table: object
    lesions: list[dict] = field(repr=False)
    summary: dict | None = None  # uncertainty summary (max SD, mean SD in lesions) or None


#: Segment colour per result label, so base and fine-tuned results can be told apart when
#: shown together (anything else: the lesion yellow).
RESULT_COLOURS = {"base": (0.3, 0.75, 1.0)}


def _followup_nodes(scene, reference_node, label, mask_zyx, probability_zyx, sd_zyx, lesions, summary) -> FollowupNodes:
    segmentation = mrml.add_lesion_segmentation(
        scene,
        mask_zyx,
        reference_node,
        f"Follow-up lesions ({label})",
        colour=RESULT_COLOURS.get(label, mrml.LESION_COLOUR),
    )
    probability = mrml.add_probability_volume(scene, probability_zyx, reference_node, f"Lesion probability ({label})")
    uncertainty = (
        None
        if sd_zyx is None
        else mrml.add_uncertainty_volume(scene, sd_zyx, reference_node, f"Uncertainty SD ({label})")
    )
    table = mrml.add_lesion_table(scene, lesions, f"Lesions ({label})")
    return FollowupNodes(label, segmentation, probability, uncertainty, table, list(lesions), summary)


def show_followup_results(runs: Sequence[FollowupNodes], shown: str) -> FollowupNodes | None:
    """Show the segmentations of the latest run of each label that ``shown`` names
    ("base", "fine-tuned" or "both"; a run with a single result always shows it) and hide
    every other result, earlier runs included. Returns the result whose table and maps
    go with the choice (the named one, or the last)."""
    latest: dict[str, FollowupNodes] = {}
    for run in runs:
        latest[run.label] = run
    main = latest.get(shown) or (list(latest.values())[-1] if latest else None)
    for run in runs:
        visible = latest.get(run.label) is run and (shown == "both" or run.label == shown or len(latest) == 1)
        display = run.segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(visible)
    return main


def describe_followup(nodes: FollowupNodes) -> str:
    """One line: lesion count, total volume and, with uncertainty, the maximum SD and the
    mean SD inside the lesions."""
    volume = sum(float(row["volume_mm3"]) for row in nodes.lesions) / 1000.0
    text = f"Follow-up ({nodes.label}): {len(nodes.lesions)} lesions, {volume:.1f} ml"
    if nodes.summary and nodes.summary.get("max_sd") is not None:
        text += f"; max SD {nodes.summary['max_sd']:.3f}, mean SD in lesions {nodes.summary['mean_sd_in_lesions']:.3f}"
    return text


# ---------------------------------------------------------------------------------------
# The steps as patient-finetune jobs (files in, files out)


@dataclass
class ModelChoice:
    """The base model chosen in the module and the patient model made from it.

    Choosing the same base model again (re-entering the module, reloading the parameter
    node) keeps the patient model; choosing another one drops it, since a patient model
    only goes with the base model it was fine-tuned from.
    """

    base_model: str | None = None  # preset name or model file path, as the CLI takes it
    patient_model: Path | None = None  # the job's output file (not yet saved by the user)
    patient_description: str = ""

    def choose_base_model(self, model: str) -> bool:
        """Returns True if the choice changed (and the patient model was dropped)."""
        if self.base_model is not None and _same_model(self.base_model, model):
            return False
        self.base_model, self.patient_model, self.patient_description = model, None, ""
        return True

    def set_patient_model(self, path: str | Path, description: str = "") -> None:
        self.patient_model, self.patient_description = Path(path), description

    def forget_patient_model(self) -> None:
        """A new patient: the base model stays chosen, the patient model goes."""
        self.patient_model, self.patient_description = None, ""

    def base_model_metadata(self) -> dict:
        """The chosen base model's metadata, read without PyTorch."""
        from .modelcard import read_model_metadata

        if self.base_model is None:
            raise ValueError("no base model is chosen")
        return read_model_metadata(self.base_model)


def _same_model(a: str, b: str) -> bool:
    from .modelcard import resolve_model_path

    try:
        return resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
    except (FileNotFoundError, ValueError):
        return a == b


def write_job_inputs(
    folder: str | Path,
    volume_nodes: Sequence,
    sequence_names: Sequence[str],
    organ: MaskSource | None = None,
    lesions: MaskSource | None = None,
    required: int | None = None,
) -> dict:
    """Write what a job reads (main thread): one NIfTI per sequence given, in the model's
    order (the trailing optional ones may be absent: ``required``, see :func:`check_volumes`),
    and the organ and lesion masks (a segment exported onto the first volume's grid, a
    labelmap as it is). The job resamples every other sequence and a labelmap onto the
    first volume's grid (``--resample-to``): sequences from separate series are rarely on
    one grid. Returns the command-line arguments (``arguments``: ``--images``, ``--organ``,
    ``--lesions``, ``--resample-to``), the sequences' files (``images``), the ``folder``
    and the ``notes`` to show the user (which volumes are resampled)."""
    volume_nodes = check_volumes(volume_nodes, sequence_names, required=required)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for name, node in zip(sequence_names, volume_nodes):
        path = folder / f"{_file_name(name)}.nii.gz"
        _write_nifti(mrml.volume_to_image(node), path)
        images.append(str(path))
    masks = {}
    for role, source in (("organ", organ), ("lesions", lesions)):
        if source is not None:
            masks[role] = folder / f"{role}.nii.gz"
            _write_nifti(source.image(volume_nodes[0]), masks[role])
    first = volume_nodes[0]
    notes = [
        f"{node.GetName()} ({name}) is resampled onto the grid of {first.GetName()} ({sequence_names[0]})"
        for name, node in zip(sequence_names[1:], volume_nodes[1:])
        if not mrml.same_grid(node, first)
    ]
    return {"arguments": input_arguments(images, **masks), "images": images, "folder": folder, "notes": notes}


def check_volumes(
    volume_nodes: Sequence, sequence_names: Sequence[str], other_visit: Sequence = (), required: int | None = None
) -> list:
    """The volumes given, in the model's order: refuse a missing volume, one volume
    selected for two sequences, and a volume of the other visit (``other_visit``: e.g. the
    baseline volumes when segmenting the follow-up). Only the first ``required`` sequences
    must be given (all by default): a model trained to read scans without its trailing
    optional sequences (``modelcard.required_sequences``) takes a FLAIR-only visit."""
    required = len(sequence_names) if required is None else required
    given = list(volume_nodes) + [None] * (len(sequence_names) - len(volume_nodes))
    count = next((i for i, node in enumerate(given) if node is None), len(given))
    if len(given) != len(sequence_names) or count < required or any(n is not None for n in given[count:]):
        optional = list(sequence_names[required:])
        raise ValueError(
            f"the model reads {len(sequence_names)} sequence(s) ({', '.join(sequence_names)}); select a volume for each"
            if not optional
            else f"the model reads {', '.join(sequence_names)} ({', '.join(optional)} optional); select a volume for "
            f"{', '.join(sequence_names[:required])}, and for {', '.join(optional)} only after it"
        )
    volume_nodes = given[:count]
    seen = {}
    for name, node in zip(sequence_names, volume_nodes):
        if node.GetID() in seen:
            raise ValueError(
                f"{node.GetName()} is selected for both {seen[node.GetID()]} and {name}; select one volume per sequence"
            )
        seen[node.GetID()] = name
    earlier = {node.GetID() for node in other_visit if node is not None}
    for name, node in zip(sequence_names, volume_nodes):
        if node.GetID() in earlier:
            raise ValueError(f"{node.GetName()} ({name}) is a volume of the other visit; select this visit's scan")
    return volume_nodes


def _write_nifti(image: sitk.Image, path: Path) -> None:
    # as images.write_image does, without importing that module (it needs PyTorch)
    atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True), overwrite=True)


def _file_name(sequence: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in sequence) or "sequence"


def baseline_nodes_from_job(scene, out: str | Path, reference_node) -> BaselineAnalysis:
    """Step 1's results (an :func:`analyse_job` folder) as the editable "Baseline lesions"
    segmentation and the suggested slices (main thread)."""
    out = Path(out)
    mask = sitk.GetArrayFromImage(read_segment_outputs(out)["segmentation"]) > 0
    node = mrml.add_lesion_segmentation(scene, mask, reference_node, "Baseline lesions")
    return BaselineAnalysis(node, node.GetSegmentation().GetSegmentIdBySegmentName("Lesion"), read_suggestions(out))


def followup_nodes_from_job(scene, out: str | Path, reference_node, label: str) -> FollowupNodes:
    """One model's follow-up results (``out/<label>`` of a :func:`followup_job`) as scene
    nodes on the reference volume's grid (main thread)."""
    outputs = read_segment_outputs(Path(out) / label)
    sd = outputs["uncertainty"]
    return _followup_nodes(
        scene,
        reference_node,
        label,
        sitk.GetArrayFromImage(outputs["segmentation"]) > 0,
        sitk.GetArrayFromImage(outputs["probability"]),
        None if sd is None else sitk.GetArrayFromImage(sd),
        outputs["lesions"],
        outputs["summary"],
    )


def save_patient_model(choice: ModelChoice, path: str | Path) -> Path:
    """Copy the patient model to ``path`` (atomically; never over a shipped base model or
    the chosen base model)."""
    from .modelcard import resolve_model_path, shipped_models

    if choice.patient_model is None or not choice.patient_model.is_file():
        raise ValueError("there is no patient model yet: fine-tune first")
    target = Path(path).resolve()
    protected = {p.resolve() for p in shipped_models().values()}
    if choice.base_model:
        protected.add(resolve_model_path(choice.base_model).resolve())
    if target in protected:
        raise ValueError(f"{path} is a base model; the base model is never overwritten, choose another file name")
    atomic_write(target, lambda tmp: shutil.copyfile(choice.patient_model, tmp), overwrite=True)
    return target


# ---------------------------------------------------------------------------------------
# One patient's work in a scene: what the Slicer module's logic holds


class RunningStep:
    """A step's job and what its results bind to: the kind of step, the ID of the volume
    its results go onto, its private folder (removed when it ends), the result labels (the
    follow-up's models), the notes on its inputs (e.g. a resampled sequence), the patient
    it was started for (the session's count of new patients) and the files it reads the
    sequences from (as they were in the scene: e.g. for the patient's report)."""

    def __init__(
        self,
        kind: str,
        job: CliJob,
        folder: Path,
        reference_node_id: str,
        labels=(),
        notes=(),
        patient: int = 0,
        images=(),
    ):
        self.kind, self.job, self.folder = kind, job, Path(folder)
        self.reference_node_id, self.labels, self.notes = reference_node_id, list(labels), list(notes)
        self.patient, self.images = patient, [Path(p) for p in images]


class PatientSession:
    """The patient being worked on in ``scene``: the chosen base model, the patient model
    fine-tuned from it, the suggested slices, and the steps as jobs.

    Closing the scene (File > Close Scene: the scene's ``StartCloseEvent``) starts a new
    patient: no patient model and no suggestions, and the unsaved patient models are
    removed with their folder, so the next patient is never segmented with the previous
    one's model; the previous patient's running steps are cancelled and their results
    never loaded (the new scene gives its volumes the IDs the old one's had). Every folder with patient data is removed: a step's when it ends or fails
    to start, the patient models' by :meth:`close` (or when the session is collected).

    Parameters
    ----------
    scene : the MRML scene (``slicer.mrmlScene``).
    python : interpreter for the jobs (in Slicer: ``PythonSlicer``).
    max_sequences : most sequences the caller's GUI offers (a model reading more is refused).
    """

    def __init__(self, scene, python: str | None = None, max_sequences: int = 4):
        self.scene, self.python, self.max_sequences = scene, python, max_sequences
        self.models = ModelChoice()
        self.suggestions: list[SliceSuggestion] = []
        self.base_metadata: dict | None = None
        self._baseline_volumes: list = []
        self._patient_folder: Path | None = None
        self._remove_patient_folder = None
        self._patient = 0  # counts new patients: a step belongs to the one it started for
        self._running: weakref.WeakSet[RunningStep] = weakref.WeakSet()
        # a weak reference: the scene's observer must not keep a discarded session alive
        session = weakref.ref(self)

        def scene_closed(caller, event):
            if session() is not None:
                session().new_patient()

        # at the start of the close: whatever shows the patient when it ends (the module's
        # panel) already sees the new one
        self._observer = scene.AddObserver(scene.StartCloseEvent, scene_closed)
        self._unobserve = weakref.finalize(self, scene.RemoveObserver, self._observer)

    def close(self) -> None:
        """Stop following the scene and remove the unsaved patient models."""
        self._unobserve()
        self.new_patient()

    def new_patient(self) -> None:
        self._patient += 1
        for step in list(self._running):
            step.job.cancel()
        self.models.forget_patient_model()
        self.suggestions = []
        self._baseline_volumes = []
        if self._remove_patient_folder is not None:
            self._remove_patient_folder()
        self._patient_folder = self._remove_patient_folder = None

    # -- the base model ----------------------------------------------------------------------

    def choose_base_model(self, model: str) -> str:
        """Choose the base model (a preset name or a file); the patient model is kept when
        it is the same model as before. Returns a line describing it (no PyTorch needed)."""
        from .modelcard import describe_base_model

        if self.models.choose_base_model(model) or self.base_metadata is None:
            self.base_metadata = None  # until read: no sequences, no step can start
            metadata = self.models.base_model_metadata()
            if len(metadata["sequences"]) > self.max_sequences:
                raise ValueError(
                    f"{model} reads {len(metadata['sequences'])} sequences; this module offers at most "
                    f"{self.max_sequences}. Use the command line."
                )
            self.base_metadata = metadata
        return describe_base_model(self.base_metadata, Path(model).name)

    def sequence_names(self) -> list[str]:
        return [s["name"] for s in self.base_metadata["sequences"]] if self.base_metadata else []

    def required_sequence_count(self) -> int:
        """How many of the base model's sequences a visit must have (a FLAIR alone where the
        model's T1 is optional)."""
        from .modelcard import required_sequences

        return required_sequences(self.base_metadata["sequences"]) if self.base_metadata else 0

    # -- the three steps as jobs -------------------------------------------------------------

    def _start(
        self,
        kind: str,
        volume_nodes: Sequence,
        make_job: Callable,
        organ=None,
        lesions=None,
        labels=(),
        other_visit: Sequence = (),
    ) -> RunningStep:
        """Write the inputs into a new step folder and start ``make_job(inputs, folder)``;
        the folder is removed if either fails."""
        required = self.required_sequence_count()
        volume_nodes = check_volumes(volume_nodes, self.sequence_names(), other_visit, required)
        folder = Path(tempfile.mkdtemp(prefix=f"PatientFineTune-{kind}-"))
        try:
            inputs = write_job_inputs(folder / "inputs", volume_nodes, self.sequence_names(), organ, lesions, required)
            job = make_job(inputs, folder).start()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        step = RunningStep(
            kind, job, folder, volume_nodes[0].GetID(), labels, inputs["notes"], self._patient, inputs["images"]
        )
        self._running.add(step)
        return step

    def start_analyse(
        self, volume_nodes: Sequence, organ: MaskSource | None = None, k: int = SUGGESTED_SLICES, device: str = "auto"
    ) -> RunningStep:
        """Step 1: segment the baseline with the base model and suggest ``k`` slices."""
        self._baseline_volumes = list(volume_nodes)
        return self._start(
            "analyse",
            volume_nodes,
            lambda inputs, folder: analyse_job(
                self.models.base_model, inputs["arguments"], folder / "analysis", k, device, self.python
            ),
            organ,
        )

    def start_finetune(
        self,
        volume_nodes: Sequence,
        organ: MaskSource | None,
        annotation: MaskSource,
        selection: str,
        iterations: int = 100,
        weighting: str = "preset",
        device: str = "auto",
    ) -> RunningStep:
        """Step 2: fine-tune on the (edited) baseline segment: the suggested slices
        (``selection`` "suggested"; a suggested slice left without lesions is a valid
        annotation) or "all-lesion"."""
        if selection == "suggested" and not self.suggestions:
            raise ValueError("no suggested slices yet: run 'Analyse baseline' first, or train on all lesion slices")
        slices = ",".join(str(s.index) for s in self.suggestions) if selection == "suggested" else selection
        self._baseline_volumes = list(volume_nodes)
        if self._patient_folder is None:
            self._patient_folder = Path(tempfile.mkdtemp(prefix="PatientFineTune-patient-"))
            self._remove_patient_folder = weakref.finalize(self, shutil.rmtree, self._patient_folder, True)
        out = self._patient_folder / f"patient-model-{len(list(self._patient_folder.iterdir()))}.pt"
        return self._start(
            "finetune",
            volume_nodes,
            lambda inputs, folder: finetune_job(
                self.models.base_model,
                inputs["arguments"],
                out,
                slices,
                iterations,
                weighting,
                device=device,
                python=self.python,
            ),
            organ,
            annotation,
        )

    def start_followup(
        self,
        volume_nodes: Sequence,
        organ: MaskSource | None = None,
        mc_samples: int = 25,
        compare_with_base: bool = True,
        device: str = "auto",
    ) -> RunningStep:
        """Step 3: segment the follow-up with the base model (if asked, or if there is no
        patient model) and the patient model; ``mc_samples`` 0 for no uncertainty map."""
        models = []
        if compare_with_base or self.models.patient_model is None:
            models.append(("base", self.models.base_model))
        if self.models.patient_model is not None:
            models.append(("fine-tuned", str(self.models.patient_model)))
        return self._start(
            "followup",
            volume_nodes,
            lambda inputs, folder: followup_job(
                models, inputs["arguments"], folder / "results", mc_samples, device=device, python=self.python
            ),
            organ,
            labels=[label for label, _model in models],
            other_visit=self._baseline_volumes,
        )

    def finish_step(self, step: RunningStep):
        """Load a finished step's results onto the volume it started from: the analysis
        (its suggestions become the session's), the patient model's description, or the
        follow-up results (one :class:`FollowupNodes` per model)."""
        self._running.discard(step)
        if step.patient != self._patient:
            raise RuntimeError(
                "the scene was closed while this step ran; its results, of the previous patient, were discarded"
            )
        reference = self.scene.GetNodeByID(step.reference_node_id)
        if reference is None:
            raise RuntimeError("the volume this step read is no longer in the scene; its results were discarded")
        if step.kind == "analyse":
            analysis = baseline_nodes_from_job(self.scene, step.folder / "analysis", reference)
            self.suggestions = analysis.suggestions
            return analysis
        if step.kind == "finetune":
            self.models.set_patient_model(step.job.results[-1]["outputs"]["model"], job_description(step.job))
            return job_description(step.job)
        return [followup_nodes_from_job(self.scene, step.folder / "results", reference, label) for label in step.labels]

    def discard_step(self, step: RunningStep) -> None:
        """Remove the step's folder (its inputs and, once loaded, its results)."""
        self._running.discard(step)
        shutil.rmtree(step.folder, ignore_errors=True)

    def run_step(self, step: RunningStep, timeout: float | None = None, idle: Callable | None = None):
        """Wait for a step and load its results (console, self-test); ``idle`` is called
        while waiting (see :meth:`CliJob.wait`)."""
        try:
            if not step.job.wait(timeout, idle=idle):
                step.job.cancel()
                raise RuntimeError(f"the step did not finish within {timeout} s and was cancelled")
            if not step.job.succeeded:
                raise RuntimeError(step.job.error or "cancelled")
            return self.finish_step(step)
        finally:
            self.discard_step(step)
