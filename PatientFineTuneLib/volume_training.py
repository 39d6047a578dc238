"""Training the 3D U-Net on whole volumes (Wahlig et al. 2023) and transferring a trained one to
another disease or site with a few studies (Kaur et al. 2019).

Patches are cubes of ``patch_mm`` (Wahlig et al. 2023: 96 mm) at the model's isotropic spacing.
Half of the patches of a batch, on average, are lesion-inclusive (centred on a random
lesion voxel) and half lesion-exclusive (centred on a random organ voxel, redrawn until
the cube holds no lesion, or 20 times): the expectation of Wahlig et al. 2023's 30 + 30 patches
per volume.
Augmentation: a random flip along each axis and a random intensity scale and shift per
patch. Their elastic deformations are left out (not cheap enough on a CPU).
Cross-entropy, Adam.

Every random draw of iteration ``i`` (patches, flips, intensity, dropout masks) comes from
``(seed, i)``, so a run depends only on its inputs and seed.

Transfer (Kaur et al. 2019): a copy of a trained model trains only the modules of a strategy
(:meth:`UNet3D.trainable_modules`: ``all``, ``decoder``, ``last-layers``, ``head``);
``reset_last_layers`` first replaces the last three layers with new ones, as Kaur et al. 2019
do for their FT_LastThree / FT_Decoder / FT_All.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .images import Case
from .modelfile import ModelBundle, derived_metadata
from .runtime import private_rng, resolve_device
from .training_loop import Adam, check_precision, training_loop
from .unet3d import UNet3D
from .volume_inference import case_on_model_grid


@dataclass
class VolumeTrainingConfig:
    """Settings of 3D U-Net training and transfer. Defaults follow Wahlig et al. 2023 where they give
    them, except the spacing: 2 mm (theirs 1 mm) keeps a 96 mm patch at 48^3 voxels, which
    a laptop CPU can train."""

    iterations: int = 1000
    batch_size: int = 2
    learning_rate: float = 1e-4
    spacing_mm: float = 2.0
    patch_mm: float = 96.0
    lesion_fraction: float = 0.5
    class_weights: tuple[float, float] = (1.0, 1.0)
    strategy: str = "all"
    reset_last_layers: bool = False
    seed: int = 0
    #: "fp32", or "amp": mixed precision (see :data:`~PatientFineTuneLib.training_loop.PRECISIONS`).
    precision: str = "fp32"

    def __post_init__(self):
        check_precision(self.precision)

    def patch_voxels(self, multiple: int) -> int:
        """Patch edge in voxels: ``patch_mm`` at ``spacing_mm``, rounded to a multiple of
        the network's size multiple, at least two of them (instance normalisation needs
        more than one voxel at the coarsest level)."""
        return max(2 * multiple, int(round(self.patch_mm / self.spacing_mm / multiple)) * multiple)


@dataclass
class TrainingVolume:
    """One case on the model's grid, padded by half a patch on every side so that any
    organ voxel can centre a patch."""

    image: torch.Tensor  # (C, D, H, W)
    label: torch.Tensor  # (D, H, W) int64 0/1
    lesion_voxels: np.ndarray  # (N, 3) patch corners of lesion-centred patches
    organ_voxels: np.ndarray  # (M, 3) patch corners of organ-centred patches


def prepare_volumes(cases: Sequence[Case], spacing: Sequence[float], patch: int) -> list[TrainingVolume]:
    """Normalised cases with lesion masks, resampled to ``spacing`` and padded."""
    volumes = []
    for case in cases:
        if case.lesions is None:
            raise ValueError(f"case {case.name or '?'} has no lesion mask; training needs one")
        images, organ, lesions = case_on_model_grid(case, spacing)
        if not organ.any():
            raise ValueError(f"case {case.name or '?'} has no organ voxels at {spacing} mm")
        half = patch // 2
        pad = [half, patch - half] * 3
        volumes.append(
            TrainingVolume(
                image=F.pad(images, pad),
                label=F.pad(lesions.long(), pad),
                # a patch centred on voxel v of the unpadded grid starts at v in the padded one
                lesion_voxels=np.argwhere(lesions.numpy()),
                organ_voxels=np.argwhere((organ & ~lesions).numpy()),
            )
        )
    return volumes


def sample_volume_batch(
    volumes: Sequence[TrainingVolume], config: VolumeTrainingConfig, patch: int, iteration: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented mini-batch of ``iteration``: (B, C, P, P, P) images, (B, P, P, P) labels."""
    rng = np.random.default_rng([config.seed, iteration, 0x3D])
    xs, ys = [], []
    for _ in range(config.batch_size):
        v = volumes[int(rng.integers(len(volumes)))]
        lesion_patch = len(v.lesion_voxels) > 0 and rng.random() < config.lesion_fraction
        for _attempt in range(20):
            pool = v.lesion_voxels if lesion_patch or not len(v.organ_voxels) else v.organ_voxels
            d, h, w = pool[int(rng.integers(len(pool)))]
            region = (slice(d, d + patch), slice(h, h + patch), slice(w, w + patch))
            y = v.label[region]
            if lesion_patch or not bool(y.any()):
                break
        x = v.image[(slice(None), *region)]
        flips = [axis for axis in range(3) if rng.random() < 0.5]
        if flips:
            x, y = x.flip([a + 1 for a in flips]), y.flip(flips)
        xs.append(x * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1))
        ys.append(y)
    return torch.stack(xs).float(), torch.stack(ys)


def new_volume_model(in_channels: Sequence[int], width: int = 16, depth: int = 4, seed: int = 0) -> UNet3D:
    """A freshly initialised 3D U-Net (He-uniform from ``seed``)."""
    with private_rng(torch.device("cpu")):
        torch.manual_seed(seed)
        return UNet3D(in_channels, width=width, depth=depth)


def train_volume_model(
    model: UNet3D,
    cases: Sequence[Case],
    config: VolumeTrainingConfig,
    device: str | torch.device = "auto",
    progress: Callable[[int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[float]:
    """Train ``model`` in place on normalised cases; only the strategy's modules learn.

    Returns the loss of every iteration. ``cancel`` is checked before every iteration and
    raises :class:`Cancelled` (the model is then half-trained: callers train a copy).
    """
    device = resolve_device(device)
    patch = config.patch_voxels(model.size_multiple)
    spacing = (config.spacing_mm,) * 3
    volumes = prepare_volumes(cases, spacing, patch)
    model.to(device)
    if config.reset_last_layers:
        with private_rng(device):
            torch.manual_seed(config.seed)
            model.reset_last_layers()
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for m in model.trainable_modules(config.strategy) for p in m.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = Adam(trainable, lr=config.learning_rate)
    weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    model.train()

    def loss_of(iteration: int) -> torch.Tensor:
        x, y = sample_volume_batch(volumes, config, patch, iteration)
        return F.cross_entropy(model(x.to(device)).float(), y.to(device), weight=weights)

    losses = training_loop(
        loss_of,
        optimizer,
        range(config.iterations),
        seed=config.seed,
        device=device,
        precision=config.precision,
        after_step=progress,
        cancel=cancel,
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


def volume_model_metadata(config: VolumeTrainingConfig, model: UNet3D) -> dict:
    """The model-file fields a 3D U-Net needs beyond :func:`make_metadata`'s."""
    return {"patch_voxels": config.patch_voxels(model.size_multiple)}


def finetune_volume_model(
    bundle: ModelBundle,
    cases: Sequence[Case],
    config: VolumeTrainingConfig,
    device: str | torch.device = "auto",
    progress: Callable[[int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ModelBundle:
    """Transfer a trained 3D U-Net to ``cases`` (one patient's baseline, or N studies of
    a new disease or site); the given model is untouched. The model's own spacing and
    patch size are kept whatever ``config`` says."""
    if not bundle.is_volume_model:
        raise ValueError(
            "finetune_volume_model needs a 3D U-Net model; the 2D network fine-tunes with finetune_patient_model"
        )
    spacing = bundle.training_spacing
    config = copy.copy(config)
    config.spacing_mm = float(spacing[0])
    config.patch_mm = float(bundle.metadata["patch_voxels"]) * config.spacing_mm
    model = copy.deepcopy(bundle.model)
    losses = train_volume_model(model, cases, config, device, progress, cancel)
    metadata = derived_metadata(bundle, config, losses, strategy=config.strategy, cases=[c.name for c in cases])
    return ModelBundle(model.cpu(), metadata)
