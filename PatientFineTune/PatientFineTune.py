"""PatientFineTune: baseline -> suggested slices -> edit -> fine-tune -> follow-up with
uncertainty, in 3D Slicer.

Thin by design: the work happens in ``PatientFineTuneLib`` (pure Python) and its MRML
bridge ``PatientFineTuneLib.slicerworkflow`` / ``.mrml`` (tested in CI against the real
MRML classes of the slicer-core wheel). Long work (analysis, fine-tuning, follow-up
segmentation) runs as ``patient-finetune`` jobs in a subprocess started with Slicer's own
Python (``PythonSlicer``), as SlicerMONAIAuto3DSeg does: the module writes the inputs it
reads from nodes to a temporary folder, a QTimer polls the job's JSON progress lines, Cancel
terminates the process, and the results are loaded back into nodes on the main thread.
This file holds the Qt widget, the parameter node, dependency installation and the
self-test; PyTorch is never imported here (the jobs report the device they run on), so
Slicer's own process holds no GPU memory.
"""

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# A developer who adds this folder to Slicer's additional module paths runs from a source
# checkout, where the library sits next to this folder at the repository root (an
# installed extension has it in qt-scripted-modules, already on sys.path).
_REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
if (_REPOSITORY_ROOT / "PatientFineTuneLib" / "__init__.py").is_file() and str(_REPOSITORY_ROOT) not in sys.path:
    sys.path.append(str(_REPOSITORY_ROOT))

#: Oldest PyTorch the library runs on.
TORCH_MINIMUM = (2, 1)
#: Python packages the library needs beyond what Slicer ships (import name: pip
#: requirement). Installed after PyTorch, so deepbet's torch requirement is already met.
EXTRA_PACKAGES = {"skimage": "scikit-image", "tqdm": "tqdm", "nibabel": "nibabel", "deepbet": "deepbet==1.0.2"}
SAMPLE_CATEGORY = "PatientFineTune"
SAMPLE_NAME = "PatientFineTuneSyntheticWMH"
#: Sequences a model may read (one volume selector per sequence and visit in the .ui).
MAX_SEQUENCES = 4
#: How often a running job's output is read (ms).
POLL_INTERVAL_MS = 200

#: Every widget this file looks up in Resources/UI/PatientFineTune.ui, with its class.
#: Checked when the widget is built, and by the CI test that parses the .ui file.
WIDGET_CLASSES = {
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "baseModelComboBox": "QComboBox",
    "browseModelButton": "QPushButton",
    "modelInfoLabel": "QLabel",
    **{f"{visit}Volume{i}Label": "QLabel" for visit in ("baseline", "followup") for i in range(1, MAX_SEQUENCES + 1)},
    **{f"{visit}Volume{i}Selector": "qMRMLNodeComboBox" for visit in ("baseline", "followup") for i in range(1, MAX_SEQUENCES + 1)},
    "baselineOrganSelector": "qMRMLNodeComboBox",
    "followupOrganSelector": "qMRMLNodeComboBox",
    "deviceLabel": "QLabel",
    "forceCpuCheckBox": "QCheckBox",
    "suggestedSliceCountSpinBox": "QSpinBox",
    "analyseButton": "QPushButton",
    "suggestionsListWidget": "QListWidget",
    "editSegmentButton": "QPushButton",
    "iterationsSpinBox": "QSpinBox",
    "sliceSelectionComboBox": "QComboBox",
    "weightingComboBox": "QComboBox",
    "finetuneButton": "QPushButton",
    "uncertaintyCheckBox": "QCheckBox",
    "mcSamplesSpinBox": "QSpinBox",
    "compareWithBaseCheckBox": "QCheckBox",
    "segmentButton": "QPushButton",
    "overlayComboBox": "QComboBox",
    "resultComboBox": "QComboBox",
    "lesionTableView": "qMRMLTableView",
    "patientModelLabel": "QLabel",
    "saveModelButton": "QPushButton",
    "loadPatientModelButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
}


#
# Module
#


class PatientFineTune(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Patient Fine-Tune")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["PatientFineTune developers"]
        self.parent.helpText = _(
            "Fine-tune a lesion-segmentation network to one patient with the patient's baseline scan, then segment "
            "the follow-up with a voxel-wise uncertainty map. 1) Analyse the baseline, 2) correct the lesion segment on "
            "the suggested slices and fine-tune, 3) segment the follow-up. "
            "See <a href='https://github.com/PatientFineTune/SlicerPatientFineTune'>the documentation</a>."
        )
        self.parent.acknowledgementText = _(
            "Method: Jansen et al., patient-specific fine-tuning of convolutional neural networks for follow-up lesion "
            "quantification. Base models were trained on synthetic data and public data sets listed in their model cards."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A synthetic brain-WMH patient (baseline + follow-up, FLAIR + T1, true lesion masks),
    generated on first use into Slicer's cache. Only the Sample Data module's button can
    load it (``SampleData.downloadSample`` handles downloadable files only); scripts call
    ``PatientFineTuneLogic().loadSamplePatient()``."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources/Icons/PatientFineTune.png"),
        uris=[],
        fileNames=[],
        nodeNames=[],
        customDownloader=_downloadSamplePatient,
    )


def _downloadSamplePatient(source):
    """Sample Data's button (a module-level function, so that registering again after a
    module reload does not add a second entry)."""
    return PatientFineTuneLogic().loadSamplePatient()


#
# Parameter node
#

#: Concrete node classes only: connectGui instantiates each class to name it in the node
#: selector, and the abstract vtkMRMLVolumeNode / vtkMRMLNode cannot be instantiated.
VolumeNode = Union[slicer.vtkMRMLScalarVolumeNode, slicer.vtkMRMLVectorVolumeNode, None]
MaskNode = Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode, None]


@parameterNodeWrapper
class PatientFineTuneParameterNode:
    baselineVolume1: VolumeNode
    baselineVolume2: VolumeNode
    baselineVolume3: VolumeNode
    baselineVolume4: VolumeNode
    followupVolume1: VolumeNode
    followupVolume2: VolumeNode
    followupVolume3: VolumeNode
    followupVolume4: VolumeNode
    baselineOrgan: MaskNode
    followupOrgan: MaskNode
    forceCpu: bool = False
    suggestedSliceCount: Annotated[int, WithinRange(1, 10)] = 2
    iterations: Annotated[int, WithinRange(10, 5000)] = 100
    sliceSelection: Annotated[str, Choice(["suggested", "all-lesion"])] = "suggested"
    weighting: Annotated[str, Choice(["preset", "none", "segmentation", "detection"])] = "preset"
    computeUncertainty: bool = True
    #: MC-dropout samples; at least 2, as the library requires (an SD needs two samples).
    mcSamples: Annotated[int, WithinRange(2, 200)] = 25
    compareWithBase: bool = True
    #: Base model: a preset name (shipped model) or a model file path.
    baseModel: str = "brain-wmh"
    #: The baseline lesion segmentation the radiologist edits (made by step 1).
    baselineSegmentation: Union[slicer.vtkMRMLSegmentationNode, None]
    #: Comma-separated suggested slice indices (from step 1).
    suggestedSlices: str = ""
    #: Where the current patient model was saved or loaded from ("" = not saved).
    patientModelPath: str = ""


#
# Widget
#


class PatientFineTuneWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None  # the running RunningStep, or None
        self._suggestions = {}
        self._results = []
        self._timer = qt.QTimer()  # polls the running job (made here: cleanup() stops it even if setup failed)
        self._timer.setInterval(POLL_INTERVAL_MS)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PatientFineTune.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        for name, className in WIDGET_CLASSES.items():
            widget = getattr(self.ui, name, None)
            if widget is None or not widget.inherits(className):
                raise RuntimeError(f"PatientFineTune.ui is out of date: {name} should be a {className}")
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PatientFineTuneLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        for name in self.logic.shippedModels():
            self.ui.baseModelComboBox.addItem(name, name)
        self.ui.baseModelComboBox.connect("activated(int)", self.onBaseModelActivated)
        self.ui.browseModelButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.analyseButton.connect("clicked(bool)", self.onAnalyse)
        self.ui.suggestionsListWidget.connect("itemClicked(QListWidgetItem*)", self.onSuggestionClicked)
        self.ui.editSegmentButton.connect("clicked(bool)", self.onEditSegment)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", lambda index: self.showOverlay())
        self.ui.resultComboBox.connect("currentIndexChanged(int)", lambda index: self.showOverlay())
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadPatientModelButton.connect("clicked(bool)", self.onLoadPatientModel)
        self._timer.connect("timeout()", self._pollJob)
        self.ui.deviceLabel.text = _("shown when a step runs (a GPU if PyTorch finds one)")
        self.initializeParameterNode()

    def cleanup(self) -> None:
        # Reload or application exit: no job may outlive the widget, nor its timer
        self._cancelJob()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()  # its results would belong to nodes that are going away
        self._results = []
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.showBaseModel()
        self.updateButtons()

    # -- state shown in the GUI ----------------------------------------------------------

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._job is not None
        sequences = self.logic.sequenceNames()
        ready = p is not None and bool(sequences)
        baseline = ready and all(getattr(p, f"baselineVolume{i + 1}") for i in range(len(sequences)))
        followup = ready and all(getattr(p, f"followupVolume{i + 1}") for i in range(len(sequences)))
        for button, enabled in (
            (self.ui.analyseButton, baseline),
            (self.ui.editSegmentButton, ready and p.baselineSegmentation is not None),
            (self.ui.finetuneButton, baseline and p.baselineSegmentation is not None),
            (self.ui.segmentButton, followup),
            (self.ui.saveModelButton, self.logic.models.patient_model is not None),
            (self.ui.loadPatientModelButton, ready),
        ):
            button.enabled = enabled and (not busy or button is self._job.button)
        # the inputs a job read stay as they were until it ends
        self.ui.inputsCollapsibleButton.enabled = not busy
        self.ui.mcSamplesSpinBox.enabled = p is not None and p.computeUncertainty

    def showBaseModel(self) -> None:
        """Select the parameter node's base model in the chooser and show what it reads;
        keeps the patient model when the model did not change (re-entering the module)."""
        p = self._parameterNode
        index = self.ui.baseModelComboBox.findData(p.baseModel)
        if index < 0:
            self.ui.baseModelComboBox.addItem(Path(p.baseModel).name, p.baseModel)
            index = self.ui.baseModelComboBox.count - 1
        self.ui.baseModelComboBox.setCurrentIndex(index)
        try:
            self.ui.modelInfoLabel.text = self.logic.chooseBaseModel(p.baseModel)
        except (OSError, ValueError) as exc:  # shown in the panel: this runs whenever the panel opens
            self.ui.modelInfoLabel.text = _("Cannot use this model: {error}").format(error=exc)
        sequences = self.logic.sequenceNames()
        for i in range(1, MAX_SEQUENCES + 1):
            used = i <= len(sequences)
            for visit in ("baseline", "followup"):
                label = getattr(self.ui, f"{visit}Volume{i}Label")
                label.text = f"{visit.capitalize()} {sequences[i - 1]}:" if used else ""
                label.visible = used
                getattr(self.ui, f"{visit}Volume{i}Selector").visible = used
        self.ui.patientModelLabel.text = self.logic.patientModelText()
        self.updateButtons()

    def onBaseModelActivated(self, index) -> None:
        """The user picked another base model."""
        self._parameterNode.baseModel = self.ui.baseModelComboBox.itemData(index)
        self.showBaseModel()

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Base model"), "", _("PatientFineTune model (*.pt)"))
        if path:
            self._parameterNode.baseModel = path
            self.showBaseModel()

    # -- the three steps -------------------------------------------------------------------

    def onAnalyse(self) -> None:
        if self._job:  # the button reads "Cancel" while a step runs
            self._cancelJob()
            return
        p = self._parameterNode
        self._startStep(self.ui.analyseButton, _("Analyse baseline"), lambda: self.logic.startAnalyse(
            self._volumes("baseline"), p.baselineOrgan, p.suggestedSliceCount, p.forceCpu))

    def onAnalyseDone(self, analysis) -> None:
        p = self._parameterNode
        p.baselineSegmentation = analysis.segmentation_node
        p.suggestedSlices = ",".join(str(s.index) for s in analysis.suggestions)
        self.ui.suggestionsListWidget.clear()
        for s in analysis.suggestions:
            item = qt.QListWidgetItem(_("Slice {index}: mean lesion probability {p:.2f}").format(index=s.index, p=s.mean_probability))
            item.setData(qt.Qt.UserRole, s.index)
            self.ui.suggestionsListWidget.addItem(item)
        self._suggestions = {s.index: s for s in analysis.suggestions}
        slicer.util.setSliceViewerLayers(background=p.baselineVolume1, fit=True)
        if analysis.suggestions:
            self.logic.jumpToSuggestion(analysis.suggestions[0])
        self.ui.statusLabel.text = _("Check and correct the lesion segment on the suggested slices (a slice without lesions "
                                     "is a valid answer: leave it empty), then fine-tune.")

    def onSuggestionClicked(self, item) -> None:
        suggestion = self._suggestions.get(item.data(qt.Qt.UserRole))
        if suggestion is not None:
            self.logic.jumpToSuggestion(suggestion)

    def onEditSegment(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.baselineSegmentation)
        editor.setSourceVolumeNode(p.baselineVolume1)

    def onFinetune(self) -> None:
        if self._job:
            self._cancelJob()
            return
        p = self._parameterNode
        suggested = [int(s) for s in p.suggestedSlices.split(",") if s]
        self._startStep(self.ui.finetuneButton, _("Fine-tune"), lambda: self.logic.startFinetune(
            self._volumes("baseline"), p.baselineOrgan, p.baselineSegmentation, p.sliceSelection, suggested, p.iterations,
            p.weighting, p.forceCpu))

    def onFinetuneDone(self, description) -> None:
        self._parameterNode.patientModelPath = ""
        self.ui.patientModelLabel.text = self.logic.patientModelText()
        self.ui.statusLabel.text = description[:1].upper() + description[1:] + "."

    def onSegment(self) -> None:
        if self._job:
            self._cancelJob()
            return
        p = self._parameterNode
        self._startStep(self.ui.segmentButton, _("Segment follow-up"), lambda: self.logic.startFollowup(
            self._volumes("followup"), p.followupOrgan, p.mcSamples if p.computeUncertainty else 0, p.compareWithBase, p.forceCpu))

    def onSegmentDone(self, runs) -> None:
        self._results += runs
        self.showOverlay()
        self.ui.statusLabel.text = "\n".join(self.logic.describeResults(runs))

    def showOverlay(self) -> None:
        """Show the chosen result of the latest run (fine-tuned, base, or both), hide the
        rest, and its uncertainty or probability map over the follow-up."""
        if not self._results:
            return
        main = self.logic.showResults(self._results, self.ui.resultComboBox.currentText)
        self.ui.lesionTableView.setMRMLTableNode(main.table)
        node = {"uncertainty": main.uncertainty, "probability": main.probability}.get(self.ui.overlayComboBox.currentText)
        self.logic.showOverlay(node, [r.uncertainty for r in self._results] + [r.probability for r in self._results],
                               self._volumes("followup")[0])

    # -- patient model files -------------------------------------------------------------

    def onSaveModel(self) -> None:
        default = str(Path(slicer.mrmlScene.GetRootDirectory()) / "patient-model.pt")
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save patient model"), default, _("PatientFineTune model (*.pt)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Saving the patient model failed."), waitCursor=True):
                self._parameterNode.patientModelPath = str(self.logic.savePatientModel(path))
                self.ui.patientModelLabel.text = _("Patient model saved to {path}").format(path=path)

    def onLoadPatientModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Load patient model"), "", _("PatientFineTune model (*.pt)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Loading the patient model failed."), waitCursor=True):
                self.logic.loadPatientModel(path)
                self._parameterNode.patientModelPath = path
                self.ui.patientModelLabel.text = self.logic.patientModelText()
        self.updateButtons()

    # -- jobs ------------------------------------------------------------------------------

    def _volumes(self, visit):
        return [getattr(self._parameterNode, f"{visit}Volume{i + 1}") for i in range(len(self.logic.sequenceNames()))]

    def _startStep(self, button, label, start) -> None:
        """Check the dependencies, then ``start()`` the step's job (it reads the nodes now)
        and poll it until it ends."""
        with slicer.util.tryWithErrorDisplay(_("{what} could not start.").format(what=label), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._job = start()
            self._job.button, self._job.label = button, label
            button.text = _("Cancel")
            self.ui.progressBar.visible = True
            self.ui.progressBar.maximum = 1000
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("{what}: starting...").format(what=label)
            self._timer.start()
        self.updateButtons()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        job.job.poll()
        if job.job.device:
            self.ui.deviceLabel.text = job.job.device
        self.ui.progressBar.value = int(1000 * job.job.fraction())
        progress = job.job.progress
        if progress and progress.get("loss") is not None:
            self.ui.statusLabel.text = _("Iteration {i} of {n}: loss {loss:.4f}").format(i=progress["done"], n=progress["total"], loss=progress["loss"])
        elif progress:
            self.ui.statusLabel.text = _("{what}: {step} {done} of {total}").format(what=job.label, step=progress["step"], done=progress["done"], total=progress["total"])
        if job.job.finished:
            self._endJob()

    def _cancelJob(self) -> None:
        if self._job is not None:
            self._job.job.cancel()
            self._endJob()

    def _endJob(self) -> None:
        job, self._job = self._job, None
        self._timer.stop()
        job.button.text = job.label
        self.ui.progressBar.visible = False
        try:
            if job.job.cancelled:
                self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            elif not job.job.succeeded:
                self.ui.statusLabel.text = ""
                slicer.util.errorDisplay(_("{what} failed: {error}").format(what=job.label, error=job.job.error))
            else:
                with slicer.util.tryWithErrorDisplay(_("Loading the results failed."), waitCursor=True):
                    {"analyse": self.onAnalyseDone, "finetune": self.onFinetuneDone, "followup": self.onSegmentDone}[job.kind](
                        self.logic.finishStep(job))
                if job.job.notes:  # what was done to the inputs, e.g. the automatic brain mask and N4
                    self.ui.statusLabel.text = "\n".join([self.ui.statusLabel.text, *job.job.notes]).strip()
        finally:
            self.logic.discardStep(job)
            self.updateButtons()


#
# Logic
#


class RunningStep:
    """A step's job and what its results bind to: the kind of step, the IDs of the input
    nodes it read when it started, and its private folder (removed when it ends)."""

    def __init__(self, kind, job, folder, referenceNodeId, labels=()):
        self.kind, self.job, self.folder = kind, job, Path(folder)
        self.referenceNodeId, self.labels = referenceNodeId, list(labels)
        self.button = self.label = None


class PatientFineTuneLogic(ScriptedLoadableModuleLogic):
    """The module's logic without any widget: holds the chosen base model and the patient
    model, starts the steps as jobs and loads their results into the scene. Usable from
    the Python console and the self-test (``runStep`` waits for a step)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from PatientFineTuneLib.slicerworkflow import ModelChoice

        self.models = ModelChoice()
        self._baseMetadata = None
        #: Where patient models made in this session are kept until saved.
        self._patientFolder = Path(tempfile.mkdtemp(prefix="PatientFineTune-patient-"))

    def getParameterNode(self):
        return PatientFineTuneParameterNode(super().getParameterNode())

    # -- dependencies and device ---------------------------------------------------------

    @staticmethod
    def torchVersion():
        """The installed PyTorch version as a tuple, or None (read without importing it)."""
        import importlib.metadata

        try:
            version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return None
        return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())

    def ensureDependencies(self) -> bool:
        """Install PyTorch (through the PyTorch extension) and the other packages after
        asking, when a step first needs them (never when the panel opens). False if the
        user declined."""
        version = self.torchVersion()
        if version is None or version < TORCH_MINIMUM:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("This module needs the PyTorch extension. Install 'PyTorch' from the Extensions Manager and restart Slicer.")) from None
            requirement = ">={0}.{1}".format(*TORCH_MINIMUM)
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=requirement) is None:
                return False
        import importlib.util

        missing = [pip for module, pip in EXTRA_PACKAGES.items() if importlib.util.find_spec(module) is None]
        if missing:
            if not slicer.util.confirmOkCancelDisplay(_("PatientFineTune needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(missing)
        return True

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python for jobs (the launcher sets up its environment)."""
        return shutil.which("PythonSlicer") or sys.executable

    # -- models --------------------------------------------------------------------------

    @staticmethod
    def shippedModels() -> dict:
        """Shipped base models by preset; found without importing torch."""
        from PatientFineTuneLib.modelcard import shipped_models

        return shipped_models()

    def chooseBaseModel(self, model: str) -> str:
        """Choose the base model (a preset name or a file); the patient model is kept when
        it is the same model as before. Returns a line describing it. No PyTorch needed."""
        from PatientFineTuneLib.modelcard import describe_base_model

        if self.models.choose_base_model(model) or self._baseMetadata is None:
            self._baseMetadata = None  # until read: no sequences, no step can start
            metadata = self.models.base_model_metadata()
            if len(metadata["sequences"]) > MAX_SEQUENCES:
                raise ValueError(_("{model} reads {n} sequences; this module offers at most {max}. Use the command line.").format(
                    model=model, n=len(metadata["sequences"]), max=MAX_SEQUENCES))
            self._baseMetadata = metadata
        return describe_base_model(self._baseMetadata, Path(model).name)

    def sequenceNames(self) -> list:
        return [s["name"] for s in self._baseMetadata["sequences"]] if self._baseMetadata else []

    def patientModelText(self) -> str:
        if self.models.patient_model is None:
            return _("No patient model yet.")
        return _("Patient model: {what}.").format(what=self.models.patient_description)

    def savePatientModel(self, path) -> Path:
        from PatientFineTuneLib.slicerworkflow import save_patient_model

        return save_patient_model(self.models, path)

    def loadPatientModel(self, path) -> None:
        from PatientFineTuneLib.modelcard import describe_patient_model, read_model_metadata

        finetune = read_model_metadata(path).get("finetune")
        if finetune is None:
            raise ValueError(_("{path} is a base model, not a patient model (no fine-tuning record).").format(path=path))
        if finetune.get("base_model_sha256") != (self._baseMetadata or {}).get("sha256"):
            logging.warning("patient model %s was fine-tuned from another base model than the one selected", path)
        self.models.set_patient_model(path, describe_patient_model(finetune))

    # -- the three steps as jobs ---------------------------------------------------------

    def _stepFolder(self, kind) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"PatientFineTune-{kind}-"))

    @staticmethod
    def _mask(node):
        from PatientFineTuneLib.slicerworkflow import MaskSource

        return MaskSource(node) if node is not None else None

    @staticmethod
    def _device(forceCpu) -> str:
        return "cpu" if forceCpu else "auto"

    def startAnalyse(self, volumes, organNode=None, k=2, forceCpu=False) -> RunningStep:
        """Step 1: segment the baseline with the base model and suggest ``k`` slices."""
        from PatientFineTuneLib.slicerworkflow import analyse_job, write_job_inputs

        folder = self._stepFolder("analyse")
        inputs = write_job_inputs(folder / "inputs", volumes, self.sequenceNames(), self._mask(organNode))
        job = analyse_job(self.models.base_model, inputs, folder / "analysis", k, self._device(forceCpu), self.pythonExecutable())
        return RunningStep("analyse", job.start(), folder, volumes[0].GetID())

    def startFinetune(self, volumes, organNode, segmentationNode, selection, suggested, iterations, weighting="preset", forceCpu=False) -> RunningStep:
        """Step 2: fine-tune on the (edited) baseline segment: the suggested slices (a
        suggested slice left without lesions is a valid annotation) or all lesion slices."""
        from PatientFineTuneLib.slicerworkflow import MaskSource, finetune_job, write_job_inputs

        if selection == "suggested" and not suggested:
            raise ValueError(_("No suggested slices yet: run 'Analyse baseline' first, or train on all lesion slices."))
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Lesion") or None
        folder = self._stepFolder("finetune")
        inputs = write_job_inputs(folder / "inputs", volumes, self.sequenceNames(), self._mask(organNode), MaskSource(segmentationNode, segmentId))
        slices = ",".join(map(str, suggested)) if selection == "suggested" else "all-lesion"
        out = self._patientFolder / f"patient-model-{len(list(self._patientFolder.iterdir()))}.pt"
        job = finetune_job(self.models.base_model, inputs, out, slices, iterations, weighting, device=self._device(forceCpu),
                           python=self.pythonExecutable())
        return RunningStep("finetune", job.start(), folder, volumes[0].GetID())

    def startFollowup(self, volumes, organNode=None, mcSamples=25, compareWithBase=True, forceCpu=False) -> RunningStep:
        """Step 3: segment the follow-up with the base model (if asked, or if there is no
        patient model) and the patient model; ``mcSamples`` 0 for no uncertainty map."""
        from PatientFineTuneLib.slicerworkflow import followup_job, write_job_inputs

        models = []
        if compareWithBase or self.models.patient_model is None:
            models.append(("base", self.models.base_model))
        if self.models.patient_model is not None:
            models.append(("fine-tuned", str(self.models.patient_model)))
        folder = self._stepFolder("followup")
        inputs = write_job_inputs(folder / "inputs", volumes, self.sequenceNames(), self._mask(organNode))
        job = followup_job(models, inputs, folder / "results", mcSamples, self._device(forceCpu), self.pythonExecutable())
        return RunningStep("followup", job.start(), folder, volumes[0].GetID(), [label for label, _model in models])

    def finishStep(self, step: RunningStep):
        """Load a finished step's results onto the input node it started from."""
        from PatientFineTuneLib.slicerworkflow import baseline_nodes_from_job, followup_nodes_from_job

        reference = slicer.mrmlScene.GetNodeByID(step.referenceNodeId)
        if reference is None:
            raise RuntimeError(_("the volume this step read is no longer in the scene; its results were discarded"))
        if step.kind == "analyse":
            return baseline_nodes_from_job(slicer.mrmlScene, step.folder / "analysis", reference)
        if step.kind == "finetune":
            result = step.job.results[-1]
            self.models.set_patient_model(result["outputs"]["model"], result["description"])
            return result["description"]
        return [followup_nodes_from_job(slicer.mrmlScene, step.folder / "results", reference, label) for label in step.labels]

    @staticmethod
    def discardStep(step: RunningStep) -> None:
        """Remove the step's folder (its inputs and, once loaded, its results)."""
        shutil.rmtree(step.folder, ignore_errors=True)

    def runStep(self, step: RunningStep, timeout=None):
        """Wait for a step and load its results (console, self-test)."""
        try:
            if not step.job.wait(timeout):
                step.job.cancel()
                raise RuntimeError(_("the step did not finish within {timeout} s and was cancelled").format(timeout=timeout))
            if not step.job.succeeded:
                raise RuntimeError(step.job.error or _("cancelled"))
            return self.finishStep(step)
        finally:
            self.discardStep(step)

    @staticmethod
    def describeResults(runs) -> list:
        from PatientFineTuneLib.slicerworkflow import describe_followup

        return [describe_followup(run) for run in runs]

    # -- views ---------------------------------------------------------------------------

    @staticmethod
    def showResults(runs, shown):
        from PatientFineTuneLib.slicerworkflow import show_followup_results

        return show_followup_results(runs, shown)

    @staticmethod
    def jumpToSuggestion(suggestion) -> None:
        from PatientFineTuneLib.mrml import jump_to_suggestion

        jump_to_suggestion(slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode(), suggestion)

    @staticmethod
    def showOverlay(node, overlays, backgroundVolume) -> None:
        """``node`` over the background, with its colour legend; the legends of the other
        ``overlays`` hidden, so they do not pile up."""
        slicer.util.setSliceViewerLayers(background=backgroundVolume, foreground=node, foregroundOpacity=0.5 if node else 0.0)
        colorLogic = slicer.modules.colors.logic()
        for other in overlays:
            legend = colorLogic.GetColorLegendDisplayNode(other) if other is not None and other is not node else None
            if legend is not None:
                legend.SetVisibility(False)
        if node is not None:
            legend = colorLogic.AddDefaultColorLegendDisplayNode(node)
            if legend is not None:
                legend.SetVisibility(True)

    # -- sample data ---------------------------------------------------------------------

    def loadSamplePatient(self, seed: int = 0):
        """Generate (once, into Slicer's cache) and load the synthetic sample patient.
        Returns the loaded nodes by role."""
        if not self.ensureDependencies():
            return None
        from PatientFineTuneLib.synth import generate_pair, write_pair

        folder = Path(slicer.app.cachePath) / "PatientFineTune" / f"sample-wmh-{seed}"
        if not (folder / "followup" / "lesions.nii.gz").is_file():
            with slicer.util.WaitCursor():
                write_pair(generate_pair("brain-wmh", seed), folder, overwrite=True)
        nodes = {}
        for visit in ("baseline", "followup"):
            for sequence in ("FLAIR", "T1"):
                nodes[f"{visit} {sequence}"] = slicer.util.loadVolume(str(folder / visit / f"{sequence}.nii.gz"), {"name": f"{visit} {sequence}"})
            nodes[f"{visit} lesions"] = slicer.util.loadSegmentation(str(folder / visit / "lesions.nii.gz"), {"name": f"{visit} true lesions"})
        slicer.util.setSliceViewerLayers(background=nodes["baseline FLAIR"], fit=True)
        return nodes


#
# Test
#


class PatientFineTuneTest(ScriptedLoadableModuleTest):
    """In a real Slicer: the sample patient through all three steps, each a job in a
    subprocess; the fine-tuned model must beat the base model on the follow-up."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WholeWorkflowOnSamplePatient()

    def test_WholeWorkflowOnSamplePatient(self):
        import numpy as np

        from PatientFineTuneLib import mrml
        from PatientFineTuneLib.images import slice_layout
        from PatientFineTuneLib.metrics import dice

        self.delayDisplay("Loading the sample patient")
        logic = PatientFineTuneLogic()
        nodes = logic.loadSamplePatient()
        self.assertIsNotNone(nodes)
        logic.chooseBaseModel("brain-wmh")
        baseline = [nodes["baseline FLAIR"], nodes["baseline T1"]]
        followup = [nodes["followup FLAIR"], nodes["followup T1"]]

        self.delayDisplay("Step 1: analyse the baseline")
        analysis = logic.runStep(logic.startAnalyse(baseline, k=2, forceCpu=True))
        self.assertEqual(len(analysis.suggestions), 2)
        self.assertEqual(analysis.segmentation_node.GetSegmentation().GetNumberOfSegments(), 1)

        self.delayDisplay("Step 2: correct the suggested slices (with the truth) and fine-tune")
        truthNode = nodes["baseline lesions"]
        truth = mrml.segment_to_array(truthNode, truthNode.GetSegmentation().GetNthSegmentID(0), baseline[0])
        edited = mrml.segment_to_array(analysis.segmentation_node, analysis.segment_id, baseline[0])
        layout = slice_layout(mrml.volume_to_image(baseline[0]))
        editedSlices, truthSlices = layout.to_slices(edited), layout.to_slices(truth)
        for s in analysis.suggestions:
            editedSlices[s.index] = truthSlices[s.index]
        mrml.set_segment_from_array(analysis.segmentation_node, "Lesion", layout.from_slices(editedSlices), baseline[0])
        logic.runStep(logic.startFinetune(baseline, None, analysis.segmentation_node, "suggested", [s.index for s in analysis.suggestions],
                                          iterations=100, forceCpu=True))
        self.assertIsNotNone(logic.models.patient_model)

        self.delayDisplay("Step 3: segment the follow-up with both models")
        results = logic.runStep(logic.startFollowup(followup, mcSamples=3, compareWithBase=True, forceCpu=True))
        self.assertEqual([r.label for r in results], ["base", "fine-tuned"])
        followTruthNode = nodes["followup lesions"]
        followTruth = mrml.segment_to_array(followTruthNode, followTruthNode.GetSegmentation().GetNthSegmentID(0), followup[0])
        scores = []
        for r in results:
            lesion = mrml.segment_to_array(r.segmentation, r.segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lesion"), followup[0])
            scores.append(dice(lesion, followTruth))
            self.assertIsNotNone(r.uncertainty)
            self.assertEqual(r.table.GetNumberOfRows(), len(r.lesions))
            self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(r.uncertainty)).all())
        self.assertGreater(scores[1], scores[0], f"fine-tuned Dice {scores[1]:.3f} should beat base Dice {scores[0]:.3f}")
        self.delayDisplay(f"Dice base {scores[0]:.3f} -> fine-tuned {scores[1]:.3f}")
