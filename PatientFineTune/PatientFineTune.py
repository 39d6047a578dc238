"""PatientFineTune: baseline -> suggested slices -> edit -> fine-tune -> follow-up with
uncertainty, in 3D Slicer.

Thin by design: the work happens in ``PatientFineTuneLib`` (pure Python) and its MRML
bridge ``PatientFineTuneLib.slicerworkflow`` / ``.mrml`` (tested in CI against the real
MRML classes of the slicer-core wheel). This file holds the Qt widget, the parameter node,
dependency installation, background execution and the self-test.
"""

import logging
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
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

TORCH_REQUIREMENT = ">=2.1"
#: Python packages the library needs beyond what Slicer ships (import name: pip name).
EXTRA_PACKAGES = {"skimage": "scikit-image", "tqdm": "tqdm"}
SAMPLE_CATEGORY = "PatientFineTune"
SAMPLE_NAME = "PatientFineTuneSyntheticWMH"

#: Every widget this file looks up in Resources/UI/PatientFineTune.ui, with its class.
#: Checked when the widget is built, and by the CI test that parses the .ui file.
WIDGET_CLASSES = {
    "baseModelComboBox": "QComboBox",
    "browseModelButton": "QPushButton",
    "modelInfoLabel": "QLabel",
    "baselineVolume1Label": "QLabel",
    "baselineVolume2Label": "QLabel",
    "followupVolume1Label": "QLabel",
    "followupVolume2Label": "QLabel",
    "baselineVolume1Selector": "qMRMLNodeComboBox",
    "baselineVolume2Selector": "qMRMLNodeComboBox",
    "followupVolume1Selector": "qMRMLNodeComboBox",
    "followupVolume2Selector": "qMRMLNodeComboBox",
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
        self.parent.categories = [_("Segmentation")]
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
    generated on first use into Slicer's cache (it needs torch, which may not be installed
    at start-up)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources/Icons/PatientFineTune.png"),
        uris=[],
        fileNames=[],
        nodeNames=[],
        customDownloader=lambda source: PatientFineTuneLogic().loadSamplePatient(),
    )


#
# Parameter node
#


@parameterNodeWrapper
class PatientFineTuneParameterNode:
    baselineVolume1: slicer.vtkMRMLVolumeNode
    baselineVolume2: slicer.vtkMRMLVolumeNode
    followupVolume1: slicer.vtkMRMLVolumeNode
    followupVolume2: slicer.vtkMRMLVolumeNode
    baselineOrgan: slicer.vtkMRMLNode
    followupOrgan: slicer.vtkMRMLNode
    forceCpu: bool = False
    suggestedSliceCount: Annotated[int, WithinRange(1, 10)] = 2
    iterations: Annotated[int, WithinRange(10, 5000)] = 100
    sliceSelection: Annotated[str, Choice(["suggested", "all-lesion"])] = "suggested"
    weighting: Annotated[str, Choice(["preset", "none", "segmentation", "detection"])] = "preset"
    mcSamples: Annotated[int, WithinRange(0, 200)] = 25
    compareWithBase: bool = True
    #: Base model: a preset name (shipped model) or a model file path.
    baseModel: str = "brain-wmh"
    #: The baseline lesion segmentation the radiologist edits (made by step 1).
    baselineSegmentation: slicer.vtkMRMLSegmentationNode
    #: Comma-separated suggested slice indices (from step 1).
    suggestedSlices: str = ""
    #: Where the current patient model was saved or loaded from ("" = not saved).
    patientModelPath: str = ""


#
# Background work
#


class BackgroundTask:
    """Run ``work(progress, cancelled)`` in a worker thread; the main thread gets progress
    and the result through a queue polled by a QTimer, so Slicer stays responsive and no
    MRML call ever happens off the main thread."""

    def __init__(self, work, onProgress, onDone):
        self._queue = queue.Queue()
        self._cancel = threading.Event()
        self._onProgress, self._onDone = onProgress, onDone
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)

        def run():
            try:
                result = work(lambda *values: self._queue.put(("progress", values)), self._cancel.is_set)
                self._queue.put(("done", (result, None)))
            except BaseException as exc:  # handed to the main thread, which reports it
                self._queue.put(("done", (None, exc)))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._timer.start()

    def cancel(self):
        self._cancel.set()

    def _poll(self):
        while True:
            try:
                kind, values = self._queue.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self._onProgress(*values)
            else:
                self._timer.stop()
                self._onDone(*values)
                return


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
        self._task = None
        self._taskButton = None
        self._suggestions = {}
        self._results = []

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

        for name, path in self.logic.shippedModels().items():
            self.ui.baseModelComboBox.addItem(name, str(path))
        self.ui.baseModelComboBox.connect("currentIndexChanged(int)", self.onBaseModelChosen)
        self.ui.browseModelButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.forceCpuCheckBox.connect("toggled(bool)", lambda checked: self.updateDeviceLabel())
        self.ui.analyseButton.connect("clicked(bool)", self.onAnalyse)
        self.ui.suggestionsListWidget.connect("itemClicked(QListWidgetItem*)", self.onSuggestionClicked)
        self.ui.editSegmentButton.connect("clicked(bool)", self.onEditSegment)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", lambda index: self.showOverlay())
        self.ui.resultComboBox.connect("currentIndexChanged(int)", lambda index: self.showOverlay())
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.loadPatientModelButton.connect("clicked(bool)", self.onLoadPatientModel)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task:
            self._task.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        if self._task:
            self._task.cancel()
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
            index = self.ui.baseModelComboBox.findText(self._parameterNode.baseModel)
            if index >= 0:
                self.ui.baseModelComboBox.setCurrentIndex(index)
            self.onBaseModelChosen()
        self.updateButtons()

    # -- state shown in the GUI ----------------------------------------------------------

    def updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self._task is not None
        ready = p is not None and self.logic.baseBundleInfo is not None
        sequences = self.logic.sequenceNames()
        baseline = ready and all(getattr(p, f"baselineVolume{i + 1}") for i in range(len(sequences)))
        followup = ready and all(getattr(p, f"followupVolume{i + 1}") for i in range(len(sequences)))
        for button, enabled in (
            (self.ui.analyseButton, baseline),
            (self.ui.editSegmentButton, ready and p.baselineSegmentation is not None),
            (self.ui.finetuneButton, baseline and p.baselineSegmentation is not None),
            (self.ui.segmentButton, followup),
            (self.ui.saveModelButton, self.logic.patientBundle is not None),
        ):
            button.enabled = enabled and (not busy or button is self._taskButton)

    def onBaseModelChosen(self, index=None) -> None:
        path = self.ui.baseModelComboBox.currentData
        if not path or not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the base model."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            info = self.logic.loadBaseModel(path)
            self._parameterNode.baseModel = self.ui.baseModelComboBox.currentText
            sequences = self.logic.sequenceNames()
            for i in (1, 2):
                used = i <= len(sequences)
                name = sequences[i - 1] if used else ""
                for prefix in ("baseline", "followup"):
                    getattr(self.ui, f"{prefix}Volume{i}Label").text = f"{prefix.capitalize()} {name}:" if used else ""
                    getattr(self.ui, f"{prefix}Volume{i}Label").visible = used
                    getattr(self.ui, f"{prefix}Volume{i}Selector").visible = used
            self.ui.modelInfoLabel.text = info
            self.updateDeviceLabel()
        self.updateButtons()

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Base model"), "", _("PatientFineTune model (*.pt)"))
        if path:
            self.ui.baseModelComboBox.addItem(Path(path).name, path)
            self.ui.baseModelComboBox.setCurrentIndex(self.ui.baseModelComboBox.count - 1)

    def updateDeviceLabel(self) -> None:
        if self.logic.torchAvailable():
            self.ui.deviceLabel.text = self.logic.deviceDescription(self.ui.forceCpuCheckBox.checked)

    # -- step 1 --------------------------------------------------------------------------

    def onAnalyse(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Analysing the baseline failed."), waitCursor=True):
            analysis = self.logic.analyseBaseline(self._volumes("baseline"), p.baselineOrgan, p.suggestedSliceCount, p.forceCpu)
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
            self.ui.statusLabel.text = _("Check and correct the lesion segment on the suggested slices, then fine-tune.")

    def onSuggestionClicked(self, item) -> None:
        self.logic.jumpToSuggestion(self._suggestions[item.data(qt.Qt.UserRole)])

    def onEditSegment(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.baselineSegmentation)
        editor.setSourceVolumeNode(p.baselineVolume1)

    # -- step 2 --------------------------------------------------------------------------

    def onFinetune(self) -> None:
        if self._task:  # the button reads "Cancel" while training
            self._task.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning could not start."), waitCursor=True):
            work = self.logic.prepareFinetune(self._volumes("baseline"), p.baselineOrgan, p.baselineSegmentation, p.sliceSelection,
                                              [int(s) for s in p.suggestedSlices.split(",") if s], p.iterations, p.weighting, p.forceCpu)
            self._start(work, self.ui.finetuneButton, _("Fine-tune"), p.iterations, self.onFinetuneDone)

    def onFinetuneDone(self, bundle) -> None:
        self.logic.patientBundle = bundle
        self._parameterNode.patientModelPath = ""
        info = bundle.metadata["finetune"]
        self.ui.patientModelLabel.text = _("Patient model: {n} iterations on slices {slices} ({method} path), not saved yet.").format(
            n=info["config"]["iterations"], slices=", ".join(map(str, info["slices"])), method=info["method"])

    # -- step 3 --------------------------------------------------------------------------

    def onSegment(self) -> None:
        if self._task:
            self._task.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmenting the follow-up could not start."), waitCursor=True):
            work, total = self.logic.prepareFollowup(self._volumes("followup"), p.followupOrgan, p.mcSamples, p.compareWithBase, p.forceCpu)
            self._start(work, self.ui.segmentButton, _("Segment follow-up"), total, self.onSegmentDone)

    def onSegmentDone(self, results) -> None:
        self._results = self.logic.addFollowupNodes(results, self._volumes("followup")[0])
        self.showOverlay()
        self.ui.statusLabel.text = self.logic.describeResults(self._results)

    def showOverlay(self) -> None:
        """Show the chosen result (fine-tuned, base, or both segmentations) and its
        uncertainty or probability map over the follow-up."""
        if not self._results:
            return
        shown = self.ui.resultComboBox.currentText
        byLabel = {r.segmentation.GetName().split("(")[-1].rstrip(")"): r for r in self._results}
        main = byLabel.get(shown, self._results[-1])
        for label, r in byLabel.items():
            r.segmentation.GetDisplayNode().SetVisibility(shown == "both" or label == shown or len(byLabel) == 1)
        self.ui.lesionTableView.setMRMLTableNode(main.table)
        choice = self.ui.overlayComboBox.currentText
        node = {"uncertainty": main.uncertainty, "probability": main.probability}.get(choice)
        self.logic.showOverlay(node, self._volumes("followup")[0])

    # -- patient model files -------------------------------------------------------------

    def onSaveModel(self) -> None:
        default = str(Path(slicer.mrmlScene.GetRootDirectory()) / "patient-model.pt")
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save patient model"), default, _("PatientFineTune model (*.pt)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Saving the patient model failed."), waitCursor=True):
                self._parameterNode.patientModelPath = self.logic.savePatientModel(path)
                self.ui.patientModelLabel.text = _("Patient model saved to {path}").format(path=path)

    def onLoadPatientModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Load patient model"), "", _("PatientFineTune model (*.pt)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Loading the patient model failed."), waitCursor=True):
                self.ui.patientModelLabel.text = self.logic.loadPatientModel(path)
                self._parameterNode.patientModelPath = path
        self.updateButtons()

    # -- helpers -------------------------------------------------------------------------

    def _volumes(self, prefix):
        n = len(self.logic.sequenceNames())
        return [getattr(self._parameterNode, f"{prefix}Volume{i + 1}") for i in range(n)]

    def _start(self, work, button, label, total, onDone) -> None:
        self._taskButton, self._taskLabel = button, label
        button.text = _("Cancel")
        self.ui.progressBar.visible = True
        self.ui.progressBar.maximum = max(int(total), 1)
        self.ui.progressBar.value = 0

        def progress(done, value=None):
            self.ui.progressBar.value = int(done)
            if isinstance(value, float):
                self.ui.statusLabel.text = _("Iteration {i}: loss {loss:.4f}").format(i=int(done), loss=value)

        def finished(result, error):
            self._task = None
            button.text = self._taskLabel
            self.ui.progressBar.visible = False
            self.updateButtons()
            if error is not None:
                from PatientFineTuneLib.inference import Cancelled

                if isinstance(error, Cancelled):
                    self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
                else:
                    self.ui.statusLabel.text = ""
                    slicer.util.errorDisplay(_("{what} failed: {error}").format(what=label, error=error))
                return
            with slicer.util.tryWithErrorDisplay(_("Showing the results failed."), waitCursor=True):
                onDone(result)

        self._task = BackgroundTask(work, progress, finished)
        self.updateButtons()


#
# Logic
#


class PatientFineTuneLogic(ScriptedLoadableModuleLogic):
    """The module's logic without any widget: holds the base and patient models and calls
    PatientFineTuneLib. Usable from the Python console and the self-test."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.baseBundle = None
        self.baseBundleInfo = None
        self.patientBundle = None

    def getParameterNode(self):
        return PatientFineTuneParameterNode(super().getParameterNode())

    # -- dependencies and device ---------------------------------------------------------

    @staticmethod
    def torchAvailable() -> bool:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False
        return True

    def ensureDependencies(self) -> bool:
        """Install torch (through the PyTorch extension) and the other packages after
        asking, on the main thread, when first needed. False if the user declined."""
        if not self.torchAvailable():
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("This module needs the PyTorch extension. Install 'PyTorch' from the Extensions Manager and restart Slicer.")) from None
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        import importlib.util

        missing = [pip for module, pip in EXTRA_PACKAGES.items() if importlib.util.find_spec(module) is None]
        if missing:
            if not slicer.util.confirmOkCancelDisplay(_("PatientFineTune needs these Python packages: {packages}. Install them now?").format(packages=", ".join(missing))):
                return False
            with slicer.util.WaitCursor():
                slicer.util.pip_install(" ".join(missing))
        return True

    @staticmethod
    def device(forceCpu: bool):
        from PatientFineTuneLib.inference import resolve_device

        return resolve_device("cpu" if forceCpu else "auto")

    def deviceDescription(self, forceCpu: bool) -> str:
        import torch

        device = self.device(forceCpu)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            return _("GPU: {name}, {memory:.0f} GB").format(name=props.name, memory=props.total_memory / 2**30)
        if device.type == "mps":
            return _("Apple GPU (MPS)")
        return _("CPU ({threads} threads): fine-tuning takes about a minute, segmentation with uncertainty a few").format(threads=torch.get_num_threads())

    # -- models --------------------------------------------------------------------------

    @staticmethod
    def shippedModels() -> dict:
        """Shipped base models by preset; found without importing torch."""
        from PatientFineTuneLib.modelcard import shipped_models

        return shipped_models()

    def loadBaseModel(self, path) -> str:
        from PatientFineTuneLib.modelfile import load_model

        self.baseBundle = load_model(path)
        self.patientBundle = None
        meta = self.baseBundle.metadata
        sequences = ", ".join(s["name"] for s in meta["sequences"])
        evaluation = (meta.get("card") or {}).get("evaluation") or []
        quality = ""
        if evaluation:
            dice = evaluation[0]["metrics"]["dice"]
            quality = _("; held-out Dice {mean:.2f} on {set}").format(mean=dice["mean"], set=evaluation[0]["set"])
        self.baseBundleInfo = _("{preset}: reads {sequences}{quality}").format(preset=meta.get("preset") or Path(path).name, sequences=sequences, quality=quality)
        return self.baseBundleInfo

    def sequenceNames(self) -> list:
        return [s["name"] for s in self.baseBundle.sequences] if self.baseBundle else []

    def currentModel(self):
        return self.patientBundle or self.baseBundle

    def savePatientModel(self, path) -> str:
        from PatientFineTuneLib.modelfile import save_model

        if self.patientBundle is None:
            raise ValueError(_("There is no patient model yet: fine-tune first."))
        shipped = {str(p.resolve()) for p in self.shippedModels().values()}
        if str(Path(path).resolve()) in shipped:
            raise ValueError(_("{path} is a shipped base model; choose another file name.").format(path=path))
        save_model(self.patientBundle, path, overwrite=Path(path).exists())
        return str(path)

    def loadPatientModel(self, path) -> str:
        from PatientFineTuneLib.modelfile import load_model

        bundle = load_model(path)
        if "finetune" not in bundle.metadata:
            raise ValueError(_("{path} is a base model, not a patient model (no fine-tuning record).").format(path=path))
        if self.baseBundle is not None and bundle.metadata["finetune"].get("base_model_sha256") != self.baseBundle.sha256:
            logging.warning("patient model %s was fine-tuned from another base model than the one selected", path)
        self.patientBundle = bundle
        return _("Patient model loaded from {path}").format(path=path)

    # -- the three steps (synchronous; the widget runs the long parts in a worker) ------

    @staticmethod
    def _mask(node):
        from PatientFineTuneLib.slicerworkflow import MaskSource

        return MaskSource(node) if node is not None else None

    def analyseBaseline(self, volumes, organNode=None, k=2, forceCpu=False):
        from PatientFineTuneLib.slicerworkflow import analyse_baseline

        return analyse_baseline(slicer.mrmlScene, self.baseBundle, volumes, self._mask(organNode), k=k, device=self.device(forceCpu))

    def prepareFinetune(self, volumes, organNode, segmentationNode, selection, suggested, iterations, weighting, forceCpu):
        """Read the baseline and its edited segment now (main thread); returns the work to
        run in the background: ``work(progress, cancelled) -> patient model``."""
        from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model
        from PatientFineTuneLib.slicerworkflow import MaskSource, read_case

        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("Lesion") or None
        case = read_case(self.baseBundle, volumes, self._mask(organNode), MaskSource(segmentationNode, segmentId), name="baseline")
        slices = suggested if selection == "suggested" else "all-lesion"
        if selection == "suggested" and not suggested:
            raise ValueError(_("No suggested slices yet: run 'Analyse baseline' first, or train on all lesion slices."))
        if weighting == "preset":  # the paper's schemes weight 2D slices; a 3D U-Net trains without them
            weighting = self.baseBundle.preset.weighting if self.baseBundle.preset and not self.baseBundle.is_volume_model else "none"
        config = FinetuneConfig(iterations=iterations, weighting=None if weighting == "none" else weighting)
        base, device = self.baseBundle, self.device(forceCpu)

        def work(progress, cancelled):
            return finetune_patient_model(base, case, slices, config, device=device, progress=progress, cancel=cancelled)

        return work

    def finetune(self, volumes, organNode, segmentationNode, selection, suggested, iterations, weighting="preset", forceCpu=False):
        self.patientBundle = self.prepareFinetune(volumes, organNode, segmentationNode, selection, suggested, iterations, weighting, forceCpu)(None, None)
        return self.patientBundle

    def prepareFollowup(self, volumes, organNode, mcSamples, compareWithBase, forceCpu):
        """Read the follow-up now; returns (work, total steps). The work segments with the
        base model (if asked, or if there is no patient model) and the patient model."""
        from PatientFineTuneLib.slicerworkflow import read_case

        case = read_case(self.baseBundle, volumes, self._mask(organNode), name="follow-up")
        models = []
        if compareWithBase or self.patientBundle is None:
            models.append(("base", self.baseBundle))
        if self.patientBundle is not None:
            models.append(("fine-tuned", self.patientBundle))
        opening, device = self.baseBundle.opening, self.device(forceCpu)
        organSlices = int(case.organ.any(axis=(1, 2)).sum())

        def work(progress, cancelled):
            from PatientFineTuneLib.inference import segment_case

            results = []
            for i, (label, bundle) in enumerate(models):
                def stepProgress(done, total, offset=i * organSlices):
                    if progress:
                        progress(offset + done)

                result = segment_case(bundle, case, opening=opening, mc_samples=mcSamples, device=device, progress=stepProgress, cancel=cancelled)
                results.append((label, case, result))
            return results

        return work, organSlices * len(models)

    def segmentFollowup(self, volumes, organNode=None, mcSamples=25, compareWithBase=True, forceCpu=False):
        work, _total = self.prepareFollowup(volumes, organNode, mcSamples, compareWithBase, forceCpu)
        return self.addFollowupNodes(work(None, None), volumes[0])

    def addFollowupNodes(self, results, referenceVolume):
        from PatientFineTuneLib.slicerworkflow import add_followup_nodes

        return [add_followup_nodes(slicer.mrmlScene, case, result, referenceVolume, label) for label, case, result in results]

    @staticmethod
    def describeResults(nodes) -> str:
        parts = []
        for n in nodes:
            name = n.segmentation.GetName()
            volume = sum(row["volume_mm3"] for row in n.result.lesions) / 1000.0
            text = _("{name}: {count} lesions, {volume:.1f} ml").format(name=name, count=len(n.result.lesions), volume=volume)
            if n.result.summary:
                text += _(", max SD {sd:.2f}").format(sd=n.result.summary["max_sd"])
            parts.append(text)
        return "\n".join(parts)

    # -- views ---------------------------------------------------------------------------

    @staticmethod
    def jumpToSuggestion(suggestion) -> None:
        from PatientFineTuneLib.mrml import jump_to_suggestion

        jump_to_suggestion(slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode(), suggestion)

    @staticmethod
    def showOverlay(node, backgroundVolume) -> None:
        slicer.util.setSliceViewerLayers(background=backgroundVolume, foreground=node, foregroundOpacity=0.5 if node else 0.0)
        if node is not None:
            colorLogic = slicer.modules.colors.logic()
            colorLogic.AddDefaultColorLegendDisplayNode(node)

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
    """In a real Slicer: the sample patient through all three steps; the fine-tuned model
    must beat the base model on the follow-up."""

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
        logic.loadBaseModel(logic.shippedModels()["brain-wmh"])
        baseline = [nodes["baseline FLAIR"], nodes["baseline T1"]]
        followup = [nodes["followup FLAIR"], nodes["followup T1"]]

        self.delayDisplay("Step 1: analyse the baseline")
        analysis = logic.analyseBaseline(baseline, k=2, forceCpu=True)
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
        logic.finetune(baseline, None, analysis.segmentation_node, "suggested", [s.index for s in analysis.suggestions], iterations=100, forceCpu=True)
        self.assertIsNotNone(logic.patientBundle)

        self.delayDisplay("Step 3: segment the follow-up with both models")
        results = logic.segmentFollowup(followup, mcSamples=3, compareWithBase=True, forceCpu=True)
        self.assertEqual([r.segmentation.GetName() for r in results], ["Follow-up lesions (base)", "Follow-up lesions (fine-tuned)"])
        followTruthNode = nodes["followup lesions"]
        followTruth = mrml.segment_to_array(followTruthNode, followTruthNode.GetSegmentation().GetNthSegmentID(0), followup[0])
        scores = []
        for r in results:
            lesion = mrml.segment_to_array(r.segmentation, r.segmentation.GetSegmentation().GetSegmentIdBySegmentName("Lesion"), followup[0])
            scores.append(dice(lesion, followTruth))
            self.assertIsNotNone(r.uncertainty)
            self.assertEqual(r.table.GetNumberOfRows(), len(r.result.lesions))
            self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(r.uncertainty)).all())
        self.assertGreater(scores[1], scores[0], f"fine-tuned Dice {scores[1]:.3f} should beat base Dice {scores[0]:.3f}")
        self.delayDisplay(f"Dice base {scores[0]:.3f} -> fine-tuned {scores[1]:.3f}")
