"""The shipped base models install with the package: a wheel built from the project holds
them, their cards and the registry; a non-editable install resolves ``brain-wmh`` to its
own copy and loads it; and the Slicer extension copies the same files."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from PatientFineTuneLib.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [name for name, preset in PRESETS.items() if preset.ships_base_model]
MODELS = "PatientFineTuneLib/models"


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """``pip wheel .`` of a copy of the project (a build in the checkout would leave build/
    and an egg-info there), offline, with the setuptools of this environment."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "PatientFineTuneLib",
        source / "PatientFineTuneLib",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    dist = tmp_path_factory.mktemp("dist")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            source,
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            dist,
        ]
    )
    (path,) = dist.glob("*.whl")
    return path


def test_the_wheel_holds_the_shipped_models_their_cards_and_the_registry(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        expected = {f"{MODELS}/{name}{suffix}" for name in SHIPPED for suffix in (".pt", ".md")} | {
            f"{MODELS}/registry.json"
        }
        assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
        registry = json.loads(archive.read(f"{MODELS}/registry.json"))
        assert [entry["name"] for entry in registry["models"]] == SHIPPED
        for entry in registry["models"]:
            assert archive.read(f"{MODELS}/{entry['file']}") == (ROOT / MODELS / entry["file"]).read_bytes()


def test_a_non_editable_install_resolves_the_preset_to_its_own_model(wheel, tmp_path):
    """Installed from the wheel into a folder of its own and run from outside the
    checkout, the package (not the checkout's editable install of this environment) finds
    ``brain-wmh`` in its own files, reads its metadata without torch, and its command
    line loads and verifies it."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", target, wheel])
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import json, sys; sys.modules['torch'] = None; import PatientFineTuneLib; "
        "from PatientFineTuneLib.modelcard import read_model_metadata, resolve_model_path, shipped_models; "
        "print(json.dumps({'package': PatientFineTuneLib.__file__, 'path': str(resolve_model_path('brain-wmh')), "
        "'shipped': list(shipped_models()), 'metadata': read_model_metadata('brain-wmh')}))"
    )
    found = json.loads(run([sys.executable, "-c", code], cwd=elsewhere, env=env))
    package = target / "PatientFineTuneLib"
    assert Path(found["package"]) == package / "__init__.py"  # the installed copy ran
    assert Path(found["path"]) == package / "models" / "brain-wmh.pt"
    assert found["shipped"] == SHIPPED
    assert found["metadata"]["preset"] == "brain-wmh" and [s["name"] for s in found["metadata"]["sequences"]] == [
        "FLAIR",
        "T1",
    ]
    # the installed console script: load_model verifies the file's own sha256 as well
    info = json.loads(run([target / "bin" / "patient-finetune", "info", "brain-wmh"], cwd=elsewhere, env=env))
    assert info["preset"] == "brain-wmh" and info["sha256"] == found["metadata"]["sha256"]


def test_the_slicer_extension_copies_the_models_their_cards_and_the_registry():
    """PatientFineTune/CMakeLists.txt globs the files the extension copies next to the
    library; they include every file the registry names and the registry itself."""
    text = (ROOT / "PatientFineTune" / "CMakeLists.txt").read_text()
    glob = re.search(r"file\(GLOB BASE_MODELS RELATIVE \$\{REPOSITORY_ROOT\}(.*?)\)", text, re.S)
    assert glob and "RESOURCES ${BASE_MODELS}" in text
    patterns = [p.replace("${REPOSITORY_ROOT}/", "") for p in glob.group(1).split()]
    copied = {path.relative_to(ROOT).as_posix() for pattern in patterns for path in ROOT.glob(pattern)}
    registry = json.loads((ROOT / MODELS / "registry.json").read_text())
    named = {f"{MODELS}/{entry[key]}" for entry in registry["models"] for key in ("file", "card")}
    assert named | {f"{MODELS}/registry.json"} <= copied
