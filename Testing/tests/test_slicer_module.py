"""Static checks of the Slicer module (its Qt widget needs the Slicer application): the .ui
file has every widget the Python code looks up, with the expected class; parameter-node
bindings name real parameters; the module byte-compiles; CMake lists existing files."""

import ast
import py_compile
import re
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


def widget_classes() -> dict:
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WIDGET_CLASSES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("WIDGET_CLASSES not found in PatientFineTune.py")


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
    # the dynamically built names (f"{prefix}Volume{i}Selector") are all declared
    for prefix in ("baseline", "followup"):
        for i in (1, 2):
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
