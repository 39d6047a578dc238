"""Checks of the Slicer module that run without the Slicer application (its Qt widget needs
it): the .ui file has every widget the Python code looks up, with the expected class;
parameter-node bindings name real parameters whose node classes the real MRML library
(slicer-core) can instantiate, as connectGui does; the module byte-compiles; CMake lists
existing files and passes what CTK's macros require."""

import ast
import py_compile
import re

import pytest
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "PatientFineTune" / "PatientFineTune.py"
UI = ROOT / "PatientFineTune" / "Resources" / "UI" / "PatientFineTune.ui"


def ui_widgets() -> dict:
    tree = ET.parse(UI)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text())


def module_constant(name: str, namespace: dict | None = None):
    """The value of a module-level constant of PatientFineTune.py (evaluated from its
    source: the module itself imports qt, which only the Slicer application has)."""
    namespace = {} if namespace is None else namespace
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return eval(compile(ast.Expression(node.value), str(MODULE), "eval"), namespace)
    raise AssertionError(f"{name} not found in PatientFineTune.py")


def widget_classes() -> dict:
    return module_constant("WIDGET_CLASSES", {"MAX_SEQUENCES": module_constant("MAX_SEQUENCES")})


def test_module_byte_compiles(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "PatientFineTune.pyc"), doraise=True)


def test_every_widget_the_code_uses_exists_with_its_class():
    declared, widgets = widget_classes(), ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the widget looks up no widgets?"
    assert used <= set(declared), f"looked up but not declared in WIDGET_CLASSES: {sorted(used - set(declared))}"
    for name, cls in declared.items():
        assert name in widgets, f"{name} is missing from PatientFineTune.ui"
        assert widgets[name] == cls, f"{name} is a {widgets[name]} in the .ui, the code expects a {cls}"
    # the dynamically built names (f"{visit}Volume{i}Selector") are all declared, for
    # every sequence a model may read
    for prefix in ("baseline", "followup"):
        for i in range(1, module_constant("MAX_SEQUENCES") + 1):
            assert f"{prefix}Volume{i}Selector" in declared and f"{prefix}Volume{i}Label" in declared


def test_only_containers_hold_widgets():
    for w in ET.parse(UI).iter("widget"):
        if w.get("class") not in ("qMRMLWidget", "ctkCollapsibleButton", "QWidget", "QGroupBox"):
            assert not w.findall(".//widget"), f"{w.get('name')} ({w.get('class')}) contains widgets"


def test_custom_widgets_are_declared():
    tree = ET.parse(UI)
    custom = {c.findtext("class") for c in tree.iter("customwidget")}
    used = set(ui_widgets().values())
    non_qt = {c for c in used if not c.startswith("Q")}
    assert non_qt <= custom, f"custom widget classes without a <customwidget> entry: {non_qt - custom}"


def test_parameter_bindings_name_parameters_of_the_parameter_node():
    fields = set()
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "PatientFineTuneParameterNode":
            fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    assert fields, "PatientFineTuneParameterNode not found"
    bound = {}
    for w in ET.parse(UI).iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[w.get("name")] = p.findtext("string")
    assert bound and set(bound.values()) <= fields, f"unknown parameters: {set(bound.values()) - fields}"
    # every volume/mask input of the GUI is saved with the scene
    for parameter in ("baselineVolume1", "followupVolume1", "baselineOrgan", "iterations", "mcSamples", "forceCpu"):
        assert parameter in bound.values()


def test_module_cmake_lists_existing_files():
    text = (ROOT / "PatientFineTune" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest" in text
    for listed in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui", "${MODULE_NAME}.py"):
        assert listed in text
        assert (ROOT / "PatientFineTune" / listed.replace("${MODULE_NAME}", "PatientFineTune")).is_file()
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(PatientFineTune)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top and 'EXTENSION_CATEGORY "Segmentation"' in top


def test_library_core_imports_neither_slicer_nor_qt():
    bridge = {"mrml.py", "slicerworkflow.py"}
    for path in (ROOT / "PatientFineTuneLib").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert "qt" not in names and "ctk" not in names, path
        if path.name not in bridge:
            assert "slicer" not in names, f"{path.name} imports slicer; only the MRML bridge may"


# ---------------------------------------------------------------------------------------
# Parameter node and node selectors, against the real MRML classes


def parameter_fields() -> dict:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "PatientFineTuneParameterNode":
            return {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("PatientFineTuneParameterNode not found")


def node_classes(annotation: ast.expr) -> list[str] | None:
    """MRML class names of a node-typed field (following the module's type aliases), or
    None for a plain field."""
    if isinstance(annotation, ast.Name):
        for node in module_tree().body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == annotation.id for t in node.targets):
                return node_classes(node.value)
        return None
    names = [n.attr for n in ast.walk(annotation) if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "slicer"]
    return names or None


def test_every_node_type_of_the_parameter_node_can_be_instantiated_and_matches_its_selector():
    import slicer

    bound = {}
    for w in ET.parse(UI).iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.findtext("string")] = w
    typed = {name: node_classes(field.annotation) for name, field in parameter_fields().items()}
    typed = {name: classes for name, classes in typed.items() if classes}
    assert {"baselineVolume1", "followupVolume4", "baselineOrgan", "baselineSegmentation"} <= set(typed)
    for name, classes in typed.items():
        for class_name in classes:
            # connectGui names each class in the node selector by instantiating it: an
            # abstract class (vtkMRMLVolumeNode, vtkMRMLNode) raises TypeError there
            node = getattr(slicer, class_name)()
            assert node.GetClassName() == class_name
        widget = bound.get(name)
        if widget is not None and widget.get("class") == "qMRMLNodeComboBox":
            node_types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            assert node_types == classes, f"{widget.get('name')}: .ui nodeTypes {node_types}, parameter node {classes}"


def test_the_mc_sample_range_is_the_one_the_library_accepts():
    import numpy as np

    from PatientFineTuneLib.images import Case, slice_layout
    from PatientFineTuneLib.inference import predict_with_uncertainty
    from PatientFineTuneLib.modelfile import ModelBundle
    import SimpleITK as sitk

    from conftest import tiny_model

    field = parameter_fields()["mcSamples"]
    within = next(n for n in ast.walk(field.annotation) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "WithinRange")
    low, high = (ast.literal_eval(a) for a in within.args)
    spin = next(w for w in ET.parse(UI).iter("widget") if w.get("name") == "mcSamplesSpinBox")
    assert int(spin.find("property[@name='minimum']/number").text) == low
    grid = sitk.Image(16, 16, 2, sitk.sitkFloat32)
    case = Case(np.random.default_rng(0).normal(size=(2, 2, 16, 16)).astype(np.float32), np.ones((2, 16, 16), bool), None, grid, slice_layout(grid))
    bundle = ModelBundle(tiny_model(), {"training_spacing_mm": [1.0, 1.0]})
    predict_with_uncertainty(bundle, case, n_samples=low)  # the lowest value the GUI allows works
    with pytest.raises(ValueError):
        predict_with_uncertainty(bundle, case, n_samples=low - 1)
    assert high >= 25


def test_categories_use_the_core_module_translation_context():
    text = MODULE.read_text()
    assert 'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]' in text
    assert "from slicer.i18n import translate" in text


def test_the_module_never_imports_torch():
    # PyTorch is installed on first use, after asking, and runs in the jobs only: Slicer's
    # own process never imports it (and so holds no GPU memory)
    importers = set()
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import) and any(a.name == "torch" for a in inner.names):
                    importers.add(node.name)
    top = [n for n in module_tree().body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names) for n in top)
    assert importers == set()


def test_every_ctk_compile_call_passes_its_mandatory_install_dir():
    for path in [ROOT / "CMakeLists.txt", *ROOT.glob("*/CMakeLists.txt")]:
        text = re.sub(r"#.*", "", path.read_text())
        for call in re.findall(r"ctkMacroCompilePythonScript\s*\((.*?)\)", text, flags=re.S):
            words = call.split()
            assert "INSTALL_DIR" in words, f"{path}: ctkMacroCompilePythonScript without INSTALL_DIR stops the configuration"
            assert "NO_INSTALL_SUBDIR" in words, f"{path}: without NO_INSTALL_SUBDIR the files install one folder too deep"
        # the macro installs what it copies: no second install rule for the same files
        assert "install(DIRECTORY" not in text, path
