"""One file format for base and patient models: weights plus JSON metadata.

A model file is a ``torch.save`` of a plain dict::

    {"format": "PatientFineTune-model", "format_version": 1,
     "metadata_json": "<JSON text>", "state_dict": {name: tensor}}

It is read with ``torch.load(weights_only=True)``, so loading never runs code from the
file. The metadata carries a sha256 of the metadata and the weights together; a file whose
content no longer matches it (edited, tampered, partly overwritten) is refused.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import json
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .files import atomic_write
from .model import LesionNet
from .presets import PRESETS, Preset
from .unet3d import ARCHITECTURE_TYPE as UNET3D
from .unet3d import UNet3D

FORMAT_NAME = "PatientFineTune-model"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file is missing, unreadable, foreign or fails its integrity check."""


@dataclass
class ModelBundle:
    """A network together with what is needed to apply it correctly."""

    model: LesionNet | UNet3D
    metadata: dict = field(default_factory=dict)

    @property
    def is_volume_model(self) -> bool:
        """Whether the network is the 3D U-Net (whole-volume windows) rather than the 2D
        slice network."""
        return isinstance(self.model, UNet3D)

    @property
    def sequences(self) -> list[dict]:
        """``[{"name": "FLAIR", "channels": 1}, ...]`` in pathway order."""
        return self.metadata["sequences"]

    @property
    def training_spacing(self) -> tuple[float, ...]:
        """Spacing (mm) the model was trained at: in-plane (row, column) for the 2D
        network, (slice, row, column) for the 3D U-Net."""
        return tuple(float(s) for s in self.metadata["training_spacing_mm"])

    @property
    def sha256(self) -> str:
        return self.metadata.get("sha256", "")

    @property
    def preset(self) -> Preset | None:
        """The task preset the model was trained for (None for a model without one)."""
        return PRESETS.get(self.metadata.get("preset") or "")

    @property
    def opening(self) -> bool:
        """Whether segmentations get the preset's per-slice opening (liver)."""
        return bool(self.preset and self.preset.opening)

    @property
    def min_lesion_voxels(self) -> int:
        """Smallest lesion (voxels) a segmentation keeps: the preset's (1, every lesion,
        for a model without a preset)."""
        return self.preset.min_lesion_voxels if self.preset else 1

    @property
    def auto_organ_mask(self) -> bool:
        """Whether a missing organ mask may be computed (brain presets; models without a
        preset are treated as brain models, as before presets existed)."""
        return self.preset.auto_organ_mask if self.preset else True


def build_network(architecture: dict) -> LesionNet | UNet3D:
    """The network a model file's ``architecture`` describes (files without a ``type``
    predate the 3D U-Net and hold the 2D network)."""
    arguments = dict(architecture)
    kind = arguments.pop("type", "lesionnet")
    if kind == UNET3D:
        return UNet3D(**arguments)
    if kind == "lesionnet":
        return LesionNet(**arguments)
    raise ModelFileError(f"unknown network type {kind!r}; this software knows 'lesionnet' and '{UNET3D}'")


def _content_hash(metadata: dict, state_dict: dict) -> str:
    h = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != "sha256"}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def make_metadata(
    model: LesionNet | UNet3D,
    sequences: list[dict],
    training_spacing_mm: Sequence[float],
    preset: str | None = None,
    **extra,
) -> dict:
    """Metadata for a model file. ``extra`` holds training provenance (command, data, ...);
    a 3D U-Net's also its window size, ``patch_voxels``."""
    meta = {
        "architecture": model.architecture(),
        **({"receptive_field_px": model.receptive_field()} if isinstance(model, LesionNet) else {}),
        "sequences": [
            {
                "name": str(s["name"]),
                "channels": int(s["channels"]),
                **({"optional": True} if s.get("optional") else {}),
            }
            for s in sequences
        ],
        "normalisation": "robust z-score per channel inside the organ mask, clipped to [-5, 10]",
        "training_spacing_mm": [float(s) for s in training_spacing_mm],
        "preset": preset,
        "software_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(extra)
    problem = metadata_problem(meta, model)
    if problem:
        raise ValueError(f"the model's metadata does not fit its network: {problem}")
    return meta


def metadata_problem(metadata: dict, model: LesionNet | UNet3D) -> str | None:
    """What makes ``metadata`` unfit to apply ``model`` with, or None. The sha256 only
    proves a file unchanged since it was saved; a model re-saved with edited metadata
    (spacing -2 segmented "0 lesions", spacing 0 divided by zero, a sequence list that does
    not match the pathways failed only after skull stripping) is caught here, on save and
    on load."""
    sequences = metadata.get("sequences")
    if not (
        isinstance(sequences, list)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and s["name"]
            and type(s.get("channels")) is int
            and s["channels"] >= 1
            for s in sequences
        )
    ):
        return f"sequences {json.dumps(sequences)[:120]} must be a list of {{name, channels}}, one per pathway"
    if any(not isinstance(s.get("optional", False), bool) for s in sequences) or (
        sequences and sequences[0].get("optional")
    ):
        return "a sequence's optional flag must be true or false, and the first sequence cannot be optional"
    if [s["channels"] for s in sequences] != list(model.in_channels):
        return (
            f"sequences give {len(sequences)} pathway(s) with channels {[s['channels'] for s in sequences]}, "
            f"the network has {len(model.in_channels)} with {list(model.in_channels)}"
        )
    volume = isinstance(model, UNet3D)
    spacing = metadata.get("training_spacing_mm")
    if not (
        isinstance(spacing, (list, tuple))
        and len(spacing) == (3 if volume else 2)
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in spacing)
    ):
        return f"training_spacing_mm {spacing} needs {3 if volume else 2} values, each a positive number of mm, for this network"
    preset = metadata.get("preset")
    if preset is not None and preset not in PRESETS:
        return f"preset {preset!r} is unknown (known: {', '.join(PRESETS)})"
    patch = metadata.get("patch_voxels")
    if volume and not (type(patch) is int and patch >= model.size_multiple and patch % model.size_multiple == 0):
        return (
            f"a 3D U-Net's metadata needs patch_voxels, the window it was trained on, a multiple of {model.size_multiple} "
            f"(see volume_model_metadata), not {patch}"
        )
    return None


def config_record(config) -> dict:
    """A settings dataclass as JSON-ready metadata (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}


def derived_metadata(bundle: ModelBundle, config, losses: Sequence[float], **provenance) -> dict:
    """Metadata of a model trained further from ``bundle`` (a patient or transferred
    model): the base model's, without its sha256 and card (they describe the base model),
    plus a ``finetune`` record of the base, the settings, the final loss, the date and
    ``provenance``."""
    metadata = copy.deepcopy(bundle.metadata)
    metadata.pop("sha256", None)
    metadata.pop("card", None)
    metadata["finetune"] = {
        "base_model_sha256": bundle.sha256,
        "config": config_record(config),
        "final_loss": losses[-1] if losses else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "software_version": __version__,
        **provenance,
    }
    return metadata


def _nonfinite_tensors(state_dict: dict) -> list[str]:
    return [
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]


def write_torch_file(payload, path: str | os.PathLike, overwrite: bool = False) -> None:
    """``torch.save(payload)`` to ``path``, atomically. Serialised in memory and written by
    Python, whose writes raise on a full disk; torch.save to a file reports that only as
    "enforce fail at inline_container.cc"."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(buffer.getbuffer()), overwrite=overwrite)


def save_model(bundle: ModelBundle, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Save a model file atomically; returns its sha256. Never replaces an existing file
    unless ``overwrite`` (so a base model cannot be clobbered by accident). The file's
    metadata gains the architecture and the hash; ``bundle`` is left as it is."""
    state_dict = {k: v.detach().cpu().clone() for k, v in bundle.model.state_dict().items()}
    broken = _nonfinite_tensors(state_dict)
    if broken:
        raise ValueError(
            f"the model has non-finite weights ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): training "
            f"diverged; nothing was saved to {path}. Train again with a lower learning rate"
        )
    metadata = dict(bundle.metadata)
    metadata["architecture"] = bundle.model.architecture()
    problem = metadata_problem(metadata, bundle.model)
    if problem:
        raise ValueError(f"the model's metadata does not fit its network: {problem}; nothing was saved to {path}")
    metadata["sha256"] = _content_hash(metadata, state_dict)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata_json": json.dumps(metadata, sort_keys=True),
        "state_dict": state_dict,
    }
    write_torch_file(payload, path, overwrite=overwrite)
    return metadata["sha256"]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelBundle:
    """Load a model file safely (``weights_only=True``) and verify its sha256.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ModelFileError
        The file is not a PatientFineTune model, is truncated or corrupt, or its content
        does not match its recorded sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign/corrupt files
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in str(exc):  # it names a Python class or function
            # (torch's own text would suggest weights_only=False: never)
            raise ModelFileError(
                f"{path} is not a PatientFineTune model file: it holds Python objects other than weights, which are never "
                "loaded (nothing from it was executed). Use a model file saved by PatientFineTune (train-base / finetune)."
            ) from None
        raise ModelFileError(
            f"{path} could not be read as a PatientFineTune model file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}). It may be truncated, "
            "corrupt or written by other software; nothing from it was executed. Use a model "
            "file saved by PatientFineTune (train-base / finetune)."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path} is not a PatientFineTune model file (no '{FORMAT_NAME}' header); a bare "
            "state_dict or another tool's checkpoint cannot be used directly."
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format version {payload.get('format_version')!r}; this "
            f"software reads version {FORMAT_VERSION}. Update PatientFineTune."
        )
    try:
        metadata = json.loads(payload["metadata_json"])
        state_dict = payload["state_dict"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path} has unreadable metadata ({exc})") from None
    if (
        not isinstance(metadata, dict)
        or not isinstance(state_dict, dict)
        or not all(isinstance(v, torch.Tensor) for v in state_dict.values())
    ):
        raise ModelFileError(
            f"{path} is malformed: its header is PatientFineTune's but its metadata or weights are not; "
            "the file is damaged or was not written by PatientFineTune"
        )
    if _content_hash(metadata, state_dict) != metadata.get("sha256"):
        raise ModelFileError(
            f"{path} failed its integrity check: its weights or metadata do not match the "
            "sha256 recorded when it was saved (modified or damaged file). Do not use it; "
            "restore the original file."
        )
    broken = _nonfinite_tensors(state_dict)
    if broken:
        raise ModelFileError(
            f"{path} has non-finite weights ({', '.join(broken[:3])}): the training that made it diverged; "
            "it cannot segment anything. Use another model"
        )
    try:
        model = build_network(metadata["architecture"])
        model.load_state_dict(state_dict, strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ModelFileError(f"{path}: weights do not fit the recorded architecture ({exc})") from None
    problem = metadata_problem(metadata, model)
    if problem:
        raise ModelFileError(
            f"{path}: its metadata does not fit its network ({problem}); the file was edited after training "
            "or written by other software. Use a model file as PatientFineTune saved it"
        )
    model.to(device).eval()
    return ModelBundle(model=model, metadata=metadata)
