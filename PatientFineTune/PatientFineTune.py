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
self-test; one patient's state (base model, patient model, suggested slices, job
folders) is a ``slicerworkflow.PatientSession`` that a new scene resets. Nothing this
module imports, at load time or later, imports PyTorch or the packages installed after
it (the jobs do, and report the device they run on): the panel opens in a fresh Slicer
before they are installed, and Slicer's own process holds no GPU memory and no torch DLL
(except in the session where the PyTorch extension's ``installTorch`` installs it: that
installer imports it, see ``ensureDependencies``).
"""

import logging
import os
import shutil
import sys
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
#: Python packages the jobs need beyond what Slicer ships, as pyproject.toml requires them
#: (distribution: (oldest version, pip requirement)). Installed after PyTorch.
EXTRA_PACKAGES = {
    "scikit-image": ((0, 21), "scikit-image>=0.21"),
    "tqdm": ((4, 60), "tqdm>=4.60"),
    "nibabel": ((5,), "nibabel>=5"),
    "deepbet": ((1, 0, 2), "deepbet==1.0.2"),
}
#: What deepbet imports when it runs. deepbet itself is installed without its declared
#: requirements, which include customtkinter for its own GUI (Tk, unused here).
DEEPBET_RUNTIME = ["pandas", "fill_voids", "connected-components-3d"]
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
    **{
        f"{visit}Volume{i}Selector": "qMRMLNodeComboBox"
        for visit in ("baseline", "followup")
        for i in range(1, MAX_SEQUENCES + 1)
    },
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
            "the suggested slices and fine-tune, 3) segment the follow-up. The README shipped with the extension "
            "describes each step."
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
    module reload does not add a second entry). Errors are shown, not only logged."""
    logic = PatientFineTuneLogic()
    try:
        with slicer.util.tryWithErrorDisplay(_("Loading the PatientFineTune sample patient failed."), waitCursor=True):
            return logic.loadSamplePatient()
    finally:
        logic.cleanup()


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
        self._job = None  # the running step (a slicerworkflow.RunningStep), or None
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
        # Reload or application exit: no job may outlive the widget, nor its timer, nor
        # the patient models that were not saved
        self._cancelJob()
        self._timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # a new scene is a new patient (the logic drops the patient model and suggestions)
        self._cancelJob()  # its results would belong to nodes that are going away
        self._results = []
        self.ui.suggestionsListWidget.clear()
        self.ui.statusLabel.text = ""
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
        # a model's trailing optional sequences (a T1 it can do without) may stay empty
        required = self.logic.requiredSequenceCount()
        baseline = ready and all(getattr(p, f"baselineVolume{i + 1}") for i in range(required))
        followup = ready and all(getattr(p, f"followupVolume{i + 1}") for i in range(required))
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
        required = self.logic.requiredSequenceCount()
        for i in range(1, MAX_SEQUENCES + 1):
            used = i <= len(sequences)
            for visit in ("baseline", "followup"):
                label = getattr(self.ui, f"{visit}Volume{i}Label")
                optional = _(" (optional)") if i > required else ""
                label.text = f"{visit.capitalize()} {sequences[i - 1]}{optional}:" if used else ""
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
        self._startStep(
            self.ui.analyseButton,
            _("Analyse baseline"),
            lambda: self.logic.startAnalyse(
                self._volumes("baseline"), p.baselineOrgan, p.suggestedSliceCount, p.forceCpu
            ),
        )

    def onAnalyseDone(self, analysis) -> None:
        p = self._parameterNode
        p.baselineSegmentation = analysis.segmentation_node
        self.ui.suggestionsListWidget.clear()
        for s in analysis.suggestions:
            item = qt.QListWidgetItem(
                _("Slice {index}: mean lesion probability {p:.2f}").format(index=s.index, p=s.mean_probability)
            )
            item.setData(qt.Qt.UserRole, s.index)
            self.ui.suggestionsListWidget.addItem(item)
        slicer.util.setSliceViewerLayers(background=p.baselineVolume1, fit=True)
        if analysis.suggestions:
            self.logic.jumpToSuggestion(analysis.suggestions[0], p.baselineVolume1)
        self.ui.statusLabel.text = _(
            "Check and correct the lesion segment on the suggested slices (a slice without lesions "
            "is a valid answer: leave it empty), then fine-tune."
        )

    def onSuggestionClicked(self, item) -> None:
        suggestion = next((s for s in self.logic.suggestions if s.index == item.data(qt.Qt.UserRole)), None)
        if suggestion is not None:
            self.logic.jumpToSuggestion(suggestion, self._parameterNode.baselineVolume1)

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
        self._startStep(
            self.ui.finetuneButton,
            _("Fine-tune"),
            lambda: self.logic.startFinetune(
                self._volumes("baseline"),
                p.baselineOrgan,
                p.baselineSegmentation,
                p.sliceSelection,
                p.iterations,
                p.weighting,
                p.forceCpu,
            ),
        )

    def onFinetuneDone(self, description) -> None:
        self._parameterNode.patientModelPath = ""
        self.ui.patientModelLabel.text = self.logic.patientModelText()
        self.ui.statusLabel.text = description[:1].upper() + description[1:] + "."

    def onSegment(self) -> None:
        if self._job:
            self._cancelJob()
            return
        p = self._parameterNode
        self._startStep(
            self.ui.segmentButton,
            _("Segment follow-up"),
            lambda: self.logic.startFollowup(
                self._volumes("followup"),
                p.followupOrgan,
                p.mcSamples if p.computeUncertainty else 0,
                p.compareWithBase,
                p.forceCpu,
            ),
        )

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
        node = {"uncertainty": main.uncertainty, "probability": main.probability}.get(
            self.ui.overlayComboBox.currentText
        )
        self.logic.showOverlay(
            node,
            [r.uncertainty for r in self._results] + [r.probability for r in self._results],
            self._volumes("followup")[0],
        )

    # -- patient model files -------------------------------------------------------------

    def onSaveModel(self) -> None:
        default = str(Path(slicer.mrmlScene.GetRootDirectory()) / "patient-model.pt")
        path = qt.QFileDialog.getSaveFileName(
            self.parent, _("Save patient model"), default, _("PatientFineTune model (*.pt)")
        )
        if path:
            with slicer.util.tryWithErrorDisplay(_("Saving the patient model failed."), waitCursor=True):
                self._parameterNode.patientModelPath = str(self.logic.savePatientModel(path))
                self.ui.patientModelLabel.text = _("Patient model saved to {path}").format(path=path)

    def onLoadPatientModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Load patient model"), "", _("PatientFineTune model (*.pt)")
        )
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
            # e.g. "T1 is resampled onto the grid of FLAIR": said while it runs and after
            self.ui.statusLabel.text = "\n".join([_("{what}: starting...").format(what=label), *self._job.notes])
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
        if progress and job.kind == "finetune" and progress.get("loss") is not None:
            # the job's iteration count includes the never-worse check's runs (more than
            # was asked): say what was asked, the phase and how far the whole job is
            self.ui.statusLabel.text = "\n".join(
                [
                    _(
                        "Fine-tuning, {n} iterations asked ({phase}; checked on held-out parts of the "
                        "annotation first): {percent}% done, loss {loss:.4f}"
                    ).format(
                        n=self._parameterNode.iterations,
                        phase=progress.get("phase") or _("training"),
                        percent=int(100 * job.job.fraction()),
                        loss=progress["loss"],
                    ),
                    *job.notes,
                ]
            )
        elif progress:
            self.ui.statusLabel.text = "\n".join(
                [
                    _("{what}: {step} {done} of {total}").format(
                        what=job.label, step=progress["step"], done=progress["done"], total=progress["total"]
                    ),
                    *job.notes,
                ]
            )
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
                    {"analyse": self.onAnalyseDone, "finetune": self.onFinetuneDone, "followup": self.onSegmentDone}[
                        job.kind
                    ](self.logic.finishStep(job))
                # what was done to the inputs: resampling, the automatic brain mask and N4
                notes = job.notes + job.job.notes
                if notes:
                    self.ui.statusLabel.text = "\n".join([self.ui.statusLabel.text, *notes]).strip()
        finally:
            self.logic.discardStep(job)
            self.updateButtons()


#
# Logic
#


class PatientFineTuneLogic(ScriptedLoadableModuleLogic):
    """The module's logic without any widget: one patient's work in the scene (a
    ``PatientFineTuneLib.slicerworkflow.PatientSession``: the chosen base model, the
    patient model, the suggested slices, the steps as jobs), dependency installation, the
    views and the sample patient. Closing the scene starts a new patient. Usable from the
    Python console and the self-test (``runStep`` waits for a step); ``cleanup()`` removes
    the patient models that were not saved."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from PatientFineTuneLib.slicerworkflow import PatientSession

        self.session = PatientSession(slicer.mrmlScene, self.pythonExecutable(), MAX_SEQUENCES)

    def getParameterNode(self):
        return PatientFineTuneParameterNode(super().getParameterNode())

    def cleanup(self) -> None:
        self.session.close()

    @property
    def models(self):
        """The chosen base model and the patient model (a ``ModelChoice``)."""
        return self.session.models

    @property
    def suggestions(self) -> list:
        """The slices suggested by the last analysis of this patient's baseline."""
        return self.session.suggestions

    # -- dependencies and device ---------------------------------------------------------

    @staticmethod
    def installedVersion(distribution):
        """An installed package's version as a tuple of its leading numbers, or None (read
        without importing it)."""
        import importlib.metadata
        import re

        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None
        return tuple(int(part) for part in re.match(r"[0-9.]*", version).group(0).split(".") if part)

    def missingPackages(self) -> list:
        """The pip requirements of EXTRA_PACKAGES that are absent or too old."""
        return [
            requirement
            for distribution, (minimum, requirement) in EXTRA_PACKAGES.items()
            if (self.installedVersion(distribution) or (-1,)) < minimum
        ]

    def ensureDependencies(self) -> bool:
        """Install PyTorch (through the PyTorch extension) and the other packages after
        asking, when a step first needs them (never when the panel opens); in testing mode
        (the self-test) without asking. False if the user declined."""
        ask = not slicer.app.testingEnabled()
        version = self.installedVersion("torch")
        if version is None or version < TORCH_MINIMUM:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(
                    _(
                        "This module needs the PyTorch extension. Install 'PyTorch' from the Extensions Manager and restart Slicer."
                    )
                ) from None
            requirement = ">={}.{}".format(*TORCH_MINIMUM)
            # installTorch imports torch once it is installed (it returns the module): the
            # one session where Slicer's process holds torch, until Slicer restarts
            if (
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask, torchVersionRequirement=requirement)
                is None
            ):
                return False
        missing = self.missingPackages()
        if missing:
            if ask and not slicer.util.confirmOkCancelDisplay(
                _("PatientFineTune needs these Python packages: {packages}. Install them now?").format(
                    packages=", ".join(missing)
                )
            ):
                return False
            with slicer.util.WaitCursor():
                others = [r for r in missing if r != EXTRA_PACKAGES["deepbet"][1]]
                if others:
                    slicer.util.pip_install(others)
                if len(others) < len(missing):
                    slicer.util.pip_install(DEEPBET_RUNTIME)
                    slicer.util.pip_install([EXTRA_PACKAGES["deepbet"][1], "--no-deps"])
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
        return self.session.choose_base_model(model)

    def sequenceNames(self) -> list:
        return self.session.sequence_names()

    def requiredSequenceCount(self) -> int:
        """How many of the sequences a visit must have (a FLAIR alone where T1 is optional)."""
        return self.session.required_sequence_count()

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
            raise ValueError(
                _("{path} is a base model, not a patient model (no fine-tuning record).").format(path=path)
            )
        if finetune.get("base_model_sha256") != (self.session.base_metadata or {}).get("sha256"):
            logging.warning("patient model %s was fine-tuned from another base model than the one selected", path)
        self.models.set_patient_model(path, describe_patient_model(finetune))

    # -- the three steps as jobs ---------------------------------------------------------

    @staticmethod
    def _mask(node, segmentName=None):
        """A mask node as the library takes it (a segmentation's segment by name)."""
        from PatientFineTuneLib.slicerworkflow import MaskSource

        if node is None:
            return None
        segmentId = node.GetSegmentation().GetSegmentIdBySegmentName(segmentName) or None if segmentName else None
        return MaskSource(node, segmentId)

    @staticmethod
    def _device(forceCpu) -> str:
        return "cpu" if forceCpu else "auto"

    def startAnalyse(self, volumes, organNode=None, k=2, forceCpu=False):
        """Step 1: segment the baseline with the base model and suggest ``k`` slices."""
        return self.session.start_analyse(volumes, self._mask(organNode), k, self._device(forceCpu))

    def startFinetune(
        self,
        volumes,
        organNode,
        segmentationNode,
        selection="suggested",
        iterations=100,
        weighting="preset",
        forceCpu=False,
    ):
        """Step 2: fine-tune on the (edited) "Lesion" segment of ``segmentationNode``: on
        the suggested slices (a suggested slice left without lesions is a valid
        annotation) or, ``selection`` "all-lesion", on every slice with a lesion."""
        return self.session.start_finetune(
            volumes,
            self._mask(organNode),
            self._mask(segmentationNode, "Lesion"),
            selection,
            iterations,
            weighting,
            self._device(forceCpu),
        )

    def startFollowup(self, volumes, organNode=None, mcSamples=25, compareWithBase=True, forceCpu=False):
        """Step 3: segment the follow-up with the base model (if asked, or if there is no
        patient model) and the patient model; ``mcSamples`` 0 for no uncertainty map."""
        return self.session.start_followup(
            volumes, self._mask(organNode), mcSamples, compareWithBase, self._device(forceCpu)
        )

    def finishStep(self, step):
        """Load a finished step's results onto the volume it started from."""
        return self.session.finish_step(step)

    def discardStep(self, step) -> None:
        self.session.discard_step(step)

    def runStep(self, step, timeout=None):
        """Wait for a step, keeping the application responsive, and load its results
        (console, self-test)."""
        return self.session.run_step(step, timeout, idle=slicer.app.processEvents)

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
    def jumpToSuggestion(suggestion, volume) -> None:
        """Show a suggested slice of ``volume`` in the slice view whose planes are the
        model's slices (Red for axial slices, Yellow for sagittal, Green for coronal)."""
        from PatientFineTuneLib.mrml import jump_to_suggestion, slice_view_for_axis

        view = slicer.app.layoutManager().sliceWidget(slice_view_for_axis(volume, suggestion.axis))
        jump_to_suggestion(view.mrmlSliceNode(), suggestion)

    @staticmethod
    def showOverlay(node, overlays, backgroundVolume) -> None:
        """``node`` over the background, with its colour legend; the legends of the other
        ``overlays`` hidden, so they do not pile up. The maps are transparent where they
        carry no information (below their display threshold), so the overlay does not
        dim the whole follow-up."""
        slicer.util.setSliceViewerLayers(
            background=backgroundVolume, foreground=node, foregroundOpacity=0.6 if node else 0.0
        )
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
        """Generate (once, into Slicer's cache; as a ``patient-finetune synth`` job, like
        every step: it needs PyTorch) and load the synthetic sample patient. Returns the
        loaded nodes by role, or None if the user declined to install the dependencies."""
        from PatientFineTuneLib.jobs import CliJob

        folder = Path(slicer.app.cachePath) / "PatientFineTune" / f"sample-wmh-{seed}"
        patient = folder / f"patient{seed:03d}"
        if not (patient / "followup" / "lesions.nii.gz").is_file():
            if not self.ensureDependencies():
                return None
            job = CliJob(
                [["synth", "--preset", "brain-wmh", "--seed", str(seed), "--out", str(folder), "--overwrite"]],
                self.pythonExecutable(),
            ).start()
            with slicer.util.WaitCursor():
                job.wait(idle=slicer.app.processEvents)
            if not job.succeeded:
                raise RuntimeError(_("Generating the sample patient failed: {error}").format(error=job.error))
        nodes = {}
        for visit in ("baseline", "followup"):
            for sequence in ("FLAIR", "T1"):
                nodes[f"{visit} {sequence}"] = slicer.util.loadVolume(
                    str(patient / visit / f"{sequence}.nii.gz"), {"name": f"{visit} {sequence}"}
                )
            nodes[f"{visit} lesions"] = slicer.util.loadSegmentation(
                str(patient / visit / "lesions.nii.gz"), {"name": f"{visit} true lesions"}
            )
        slicer.util.setSliceViewerLayers(background=nodes["baseline FLAIR"], fit=True)
        self.selectSampleInputs(nodes)
        return nodes

    def selectSampleInputs(self, nodes) -> None:
        """Select the sample's volumes ("<visit> <sequence>" in ``nodes``) for the sequences
        the chosen base model reads; each selector would otherwise show the volume loaded
        last, the same one in all of them."""
        parameters = self.getParameterNode()
        self.chooseBaseModel(parameters.baseModel)
        for visit in ("baseline", "followup"):
            for i, sequence in enumerate(self.sequenceNames()):
                setattr(parameters, f"{visit}Volume{i + 1}", nodes.get(f"{visit} {sequence}"))


#
# Test
#


class PatientFineTuneTest(ScriptedLoadableModuleTest):
    """In a real Slicer (also under ctest, in testing mode: the dependencies are installed
    without asking): the sample patient through all three steps, each a job in a
    subprocess; the fine-tuned model must beat the base model on the follow-up."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WholeWorkflowOnSamplePatient()

    def test_WholeWorkflowOnSamplePatient(self):
        import numpy as np

        from PatientFineTuneLib import mrml
        from PatientFineTuneLib.metrics import dice

        self.delayDisplay("Loading the sample patient")
        logic = PatientFineTuneLogic()
        self.addCleanup(logic.cleanup)
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
        for s in analysis.suggestions:
            # the suggestion's axis is an IJK axis; the arrays are indexed (k, j, i)
            plane = [slice(None)] * 3
            plane[2 - s.axis] = s.index
            edited[tuple(plane)] = truth[tuple(plane)]
        mrml.set_segment_from_array(analysis.segmentation_node, "Lesion", edited, baseline[0])
        logic.runStep(
            logic.startFinetune(baseline, None, analysis.segmentation_node, "suggested", iterations=100, forceCpu=True)
        )
        self.assertIsNotNone(logic.models.patient_model)

        self.delayDisplay("Step 3: segment the follow-up with both models")
        results = logic.runStep(logic.startFollowup(followup, mcSamples=3, compareWithBase=True, forceCpu=True))
        self.assertEqual([r.label for r in results], ["base", "fine-tuned"])
        followTruthNode = nodes["followup lesions"]
        followTruth = mrml.segment_to_array(
            followTruthNode, followTruthNode.GetSegmentation().GetNthSegmentID(0), followup[0]
        )
        scores = []
        for r in results:
            lesion = mrml.segment_to_array(
                r.segmentation, r.segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lesion"), followup[0]
            )
            scores.append(dice(lesion, followTruth))
            self.assertIsNotNone(r.uncertainty)
            self.assertEqual(r.table.GetNumberOfRows(), len(r.lesions))
            self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(r.uncertainty)).all())
        self.assertGreater(
            scores[1], scores[0], f"fine-tuned Dice {scores[1]:.3f} should beat base Dice {scores[0]:.3f}"
        )
        self.delayDisplay(f"Dice base {scores[0]:.3f} -> fine-tuned {scores[1]:.3f}")
