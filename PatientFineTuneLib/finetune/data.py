"""What fine-tuning learns from: the chosen baseline slices at the model's spacing
(:func:`prepare_finetune_data`), how they are chosen (:func:`select_slices`, hard
negatives), and the seeded draws of each iteration (patches, angles, pixels)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..arrays import resample_array, resampled_shape
from ..images import Case
from ..inference import predict_mask
from ..modelfile import ModelBundle
from ..patches import corner_and_centre_patch_centres, extract_patches
from ..weighting import weight_map
from .config import FinetuneConfig


@dataclass
class FinetuneData:
    """The chosen slices at the model's spacing, with their patch centres."""

    slices: list[int]
    images: list[torch.Tensor]  # (C, H, W)
    labels: list[torch.Tensor]  # (1, H, W) 0/1
    weights: list[torch.Tensor] | None  # (1, H, W) pixel weights, or None for class weights
    centres: list[np.ndarray]  # (5, 2)
    angles: np.ndarray
    organs: list[torch.Tensor]  # (H, W) bool
    #: slices added as hard negatives (:func:`find_hard_negatives`): they train, never held out
    negatives: frozenset[int] = frozenset()


def select_slices(
    spec: str | Sequence[int], case: Case, bundle: ModelBundle | None = None, **predict_kwargs
) -> list[int]:
    """Slice indices from a selection: ``"all-lesion"`` (default of the paper),
    ``"all-organ"``, ``"suggested:K"`` (K suggested among organ slices),
    ``"suggested-lesion:K"`` (K suggested among annotated lesion slices), explicit indices
    (``"3,7"`` or a list)."""
    from ..suggest import suggest_slices

    if not isinstance(spec, str):
        return [int(s) for s in spec]
    if spec == "all-lesion":
        return case.lesion_slices()
    if spec == "all-organ":
        return [int(s) for s in np.flatnonzero(case.organ.any(axis=(1, 2)))]
    for prefix, candidates in (("suggested:", "organ"), ("suggested-lesion:", "lesion")):
        if spec.startswith(prefix):
            if bundle is None:
                raise ValueError("suggested slices need the base model")
            k = int(spec[len(prefix) :])
            return [s.index for s in suggest_slices(bundle, case, k=k, candidates=candidates, **predict_kwargs)]
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(
            f"unknown slice selection {spec!r}: use all-lesion, all-organ, suggested:K, suggested-lesion:K or indices like 3,7"
        ) from None


def find_hard_negatives(base_prediction: np.ndarray, case: Case, k: int) -> list[int]:
    """Up to ``k`` organ slices without annotated lesion where the base model found the
    most lesion (its false positives there, largest first); only slices where it found any."""
    lesion_free = ~case.lesions.any(axis=(1, 2)) & case.organ.any(axis=(1, 2))
    area = np.where(lesion_free, base_prediction.sum(axis=(1, 2)), 0)
    largest = [s for s in np.argsort(-area, kind="stable")[:k] if area[s] > 0]
    return sorted(int(s) for s in largest)


def network_mask(bundle: ModelBundle, case: Case, device, near: Sequence[int] | None = None) -> np.ndarray:
    """The base model's lesion mask of the baseline with every lesion it finds, however
    small (no minimum lesion size): where the network errs, specks included, is what the
    weighting and the hard negatives teach it.

    ``near``: only the mask on these slices is needed; the network then runs on them and
    the two slices either side, all that the 3x3x3 closing reaches from them (the opening
    works per slice, and nothing is removed by size), so the mask is exact there and empty
    far from them."""
    reach = None if near is None else sorted({s + d for s in near for d in range(-2, 3)})
    return predict_mask(bundle, case, device=device, min_lesion_voxels=1, slices=reach)


def prepare_finetune_data(
    bundle: ModelBundle,
    case: Case,
    slices: Sequence[int],
    config: FinetuneConfig,
    allow_empty: bool = False,
    device: str | torch.device = "cpu",
    base_prediction: np.ndarray | None = None,
    negatives: Sequence[int] = (),
) -> FinetuneData:
    """Check the chosen slices and cut them out at the model's spacing.

    Raises ValueError before any training for: no annotation, a slice outside the volume,
    a slice without organ, or (unless ``allow_empty``) no annotated lesion on any chosen
    slice. A chosen slice without lesion is a valid annotation. ``base_prediction``: the
    base model's post-processed result on the case, if already computed (the weighting
    needs it); ``negatives``: which chosen slices are hard negatives.
    """
    if case.lesions is None:
        raise ValueError("fine-tuning needs the baseline annotation (lesion mask)")
    if not slices:
        raise ValueError("no slice chosen for fine-tuning (the baseline annotation has no lesion slice?)")
    n = case.organ.shape[0]
    for s in slices:
        if not 0 <= s < n:
            raise ValueError(f"slice {s} is outside the volume (slices 0..{n - 1})")
        if not case.organ[s].any():
            raise ValueError(f"slice {s} has no organ pixels; choose a slice inside the organ")
    # a chosen slice without lesion is a valid annotation ("nothing here"), but with no
    # lesion on any of them there is nothing to learn a lesion from
    if not allow_empty and not any(case.lesions[s].any() for s in slices):
        raise ValueError(
            f"none of the chosen slices ({', '.join(map(str, slices))}) has an annotated lesion; annotate the lesions "
            "on them (or choose slices with lesions) before fine-tuning"
        )
    pixel_weights = None
    if config.weighting:
        # the base model's own result on the baseline decides where it must learn most
        if base_prediction is None:
            # the segmentation scheme weighs a pixel by the prediction there alone: only the
            # chosen slices need it (2 chosen of 44: 10 slices predicted instead of 44)
            base_prediction = network_mask(
                bundle, case, device, near=slices if config.weighting == "segmentation" else None
            )
        pixel_weights = weight_map(config.weighting, base_prediction, case.lesions)
    size = resampled_shape(case.images.shape[-2:], case.spacing, bundle.training_spacing)
    data = FinetuneData(
        list(slices), [], [], [] if pixel_weights is not None else None, [], config.angles(), [], frozenset(negatives)
    )
    for s in slices:
        data.images.append(resample_array(case.slice_tensor(s)[None], size)[0])
        masks = [case.lesions[s], case.organ[s]] + ([pixel_weights[s]] if pixel_weights is not None else [])
        resized = resample_array(torch.from_numpy(np.stack(masks).astype(np.float32))[None], size, label=True)[0]
        data.labels.append(resized[0:1])
        if data.weights is not None:
            data.weights.append(resized[2:3])
        data.centres.append(corner_and_centre_patch_centres(resized[1].numpy() > 0, config.patch_size))
        data.organs.append(resized[1] > 0)
    return data


def draw_batch(data: FinetuneData, config: FinetuneConfig, iteration: int) -> list[tuple[int, int, int]]:
    """(slice, patch, angle) index triples of one iteration, from (seed, iteration)."""
    rng = np.random.default_rng([config.seed, iteration, 0xF1])
    picks = []
    for b in range(config.batch_size):
        k, j, a = (
            int(rng.integers(len(data.images))),
            int(rng.integers(len(data.centres[0]))),
            int(rng.integers(len(data.angles))),
        )
        if config.n_angles == 0:  # continuous: this draw's own angle
            a = iteration * config.batch_size + b
        picks.append((k, j, a))
    return picks


def rotated_patch(data: FinetuneData, pick: tuple[int, int, int], size: int, what: str) -> torch.Tensor:
    """The (1, C, size, size) patch of a (slice, patch, angle) pick: of the ``"image"``,
    its ``"label"`` or its ``"weight"`` map (the masks sampled as labels)."""
    k, j, a = pick
    source = {"image": data.images, "label": data.labels, "weight": data.weights}[what][k]
    return extract_patches(source, data.centres[k][j], [data.angles[a]], size, label=what != "image")


def sample_pixels(config: FinetuneConfig, iteration: int, patches: int) -> torch.Tensor:
    """Approximate mode: flat indices into the (patches, patch, patch) batch of the pixels
    the loss uses in ``iteration``, the same fraction of every patch, from (seed, iteration)."""
    rng = np.random.default_rng([config.seed, iteration, 0x5A])
    n = config.patch_size**2
    k = max(1, int(round(config.pixel_fraction * n)))
    return torch.from_numpy(np.concatenate([b * n + np.sort(rng.choice(n, k, replace=False)) for b in range(patches)]))
