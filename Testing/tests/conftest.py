"""Shared fixtures: real NIfTI files written by SimpleITK, real (small) torch models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PatientFineTuneLib.model import LesionNet

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MODEL_SCRIPTS = Path(__file__).resolve().parents[2] / "Resources" / "Models"


def model_script(name: str):
    """``Resources/Models/<name>.py`` as a module: the model-building scripts are not part
    of the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, MODEL_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_volume(
    path: Path, array_zyx: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None
) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def rotation_direction(degrees: float = 30.0) -> tuple:
    """An oblique direction matrix: rotation about z, then an axis flip."""
    a = np.deg2rad(degrees)
    r = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1, 1, 1])
    return tuple(r.ravel())


def tiny_model(in_channels=(1, 1), width=4, seed=0) -> LesionNet:
    torch.manual_seed(seed)
    return LesionNet(in_channels, width=width, head_width=8).eval()


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """A real brain-wmh model file (FLAIR and T1, 2 mm) with a tiny network: segments the
    small synthetic patient in a fraction of a second. For tests of what runs around the
    network (files, events, notes, job mechanics), not of what it segments."""
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata, save_model

    model = tiny_model(seed=seed)
    sequences = [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}]
    save_model(ModelBundle(model, make_metadata(model, sequences, (2.0, 2.0), preset="brain-wmh")), path)
    return path


@pytest.fixture(scope="session")
def small_pair_dir(tmp_path_factory) -> Path:
    """One small synthetic brain-wmh patient pair on disk."""
    from PatientFineTuneLib.synth import generate_pair, write_pair

    folder = tmp_path_factory.mktemp("synth") / "patient000"
    write_pair(generate_pair("brain-wmh", 0, small=True), folder)
    return folder
