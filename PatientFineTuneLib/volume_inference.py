"""Whole-volume prediction with the 3D U-Net: resampling to the model's isotropic grid,
overlapping sliding windows of the training patch size, optional Monte-Carlo dropout.

The U-Net normalises each window by its own statistics (instance normalisation), so it
is run on windows the size of its training patches, not on the whole volume at once:
windows overlap by half and their lesion probabilities are averaged. Windows that do not
touch the organ are skipped (their voxels stay at probability 0).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .arrays import resample_array, resampled_shape
from .modelfile import ModelBundle
from .runtime import Cancelled, Uncertainty, mc_dropout_mode, private_rng, reseed

if TYPE_CHECKING:
    from .images import Case  # reading images needs SimpleITK; running a network does not


def case_on_model_grid(case: Case, spacing: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A normalised case's images (C, D, H, W), organ (D, H, W) and lesions (or None) at
    the model's voxel spacing (slices, rows, cols)."""
    shape = resampled_shape(case.organ.shape, case.volume_spacing, spacing)
    images = resample_array(torch.from_numpy(np.ascontiguousarray(case.images))[None], shape)[0]
    masks = [case.organ] + ([case.lesions] if case.lesions is not None else [])
    masks_t = resample_array(torch.from_numpy(np.stack(masks).astype(np.float32))[None], shape, label=True)[0] > 0.5
    return images, masks_t[0], (masks_t[1] if case.lesions is not None else None)


def window_starts(length: int, window: int) -> list[int]:
    """Starts of windows of ``window`` voxels overlapping by half and covering ``length``
    (which is at least ``window``: volumes are padded first)."""
    step = max(1, window // 2)
    starts = list(range(0, length - window + 1, step))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@torch.no_grad()
def predict_volume(
    bundle: ModelBundle,
    case: Case,
    n_samples: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, Uncertainty | None]:
    """Lesion probability (S, H, W) on the case's grid, zero outside the organ; with
    ``n_samples`` >= 2 also the MC-dropout mean and SD (every sample a full pass through
    the windows; dropout masks seeded by (seed, window))."""
    device = torch.device(device)
    # a copy in evaluation mode on the device: the caller's model keeps its mode and device
    model = copy.deepcopy(bundle.model).to(device).eval()
    spacing = bundle.training_spacing
    window = int(bundle.metadata["patch_voxels"])
    images, organ, _ = case_on_model_grid(case, spacing)
    shape = images.shape[1:]
    padded = [max(window, n) for n in shape]  # windows cover larger axes by overlapping
    x = F.pad(images, [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]]).to(device)
    organ_p = F.pad(organ, [0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]])
    sums = torch.zeros((1 + n_samples, *padded))
    counts = torch.zeros(padded)
    boxes = [
        (d, h, w)
        for d in window_starts(padded[0], window)
        for h in window_starts(padded[1], window)
        for w in window_starts(padded[2], window)
        if organ_p[d : d + window, h : h + window, w : w + window].any()
    ]
    with private_rng(device):
        for i, (d, h, w) in enumerate(boxes):
            if cancel is not None and cancel():
                raise Cancelled("prediction cancelled")
            region = (slice(d, d + window), slice(h, h + window), slice(w, w + window))
            xw = x[(slice(None), *region)][None]
            sums[(0, *region)] += torch.softmax(model(xw), 1)[0, 1].cpu()
            if n_samples:
                reseed(seed, i)
                with mc_dropout_mode(model):
                    for k in range(n_samples):
                        sums[(1 + k, *region)] += torch.softmax(model(xw), 1)[0, 1].cpu()
            counts[region] += 1
            if progress is not None:
                progress(i + 1, len(boxes))
    maps = (sums / counts.clamp_min(1))[:, : shape[0], : shape[1], : shape[2]]
    outputs = [maps[0]]
    if n_samples:
        outputs += [maps[1:].mean(0), maps[1:].std(0, unbiased=False)]
    back = resample_array(torch.stack(outputs)[None], case.organ.shape)[0].clamp_(min=0).numpy()
    back[:, ~case.organ] = 0.0
    probability = np.minimum(back[0], 1.0)
    if not n_samples:
        return probability, None
    return probability, Uncertainty(back[1], back[2], n_samples)
