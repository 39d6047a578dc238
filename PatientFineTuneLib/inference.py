"""Whole-volume prediction: slice batches, in-plane resampling to the model's spacing,
and halo tiling so large slices fit a memory budget with results identical to one pass."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .arrays import resample_array, resampled_shape
from .model import LesionNet, inference_copy
from .modelfile import ModelBundle
from .postprocess import label_lesions, lesion_table, postprocess
from .runtime import Cancelled, Uncertainty, resolve_device
from .volume_inference import predict_volume

if TYPE_CHECKING:
    from .images import Case  # reading images needs SimpleITK; running a network does not

#: Default activation memory allowed for one forward pass (bytes).
DEFAULT_MEMORY_BUDGET = 1 << 30


def activation_bytes_per_pixel(model: LesionNet) -> int:
    """Rough peak float32 activation memory per pixel of one forward pass: the
    concatenated features and their copy, one pathway's working layers, and the head."""
    return 4 * (2 * model.feature_channels + 2 * model.width + 2 * model.head_width + sum(model.in_channels))


def _tiles(length: int, core: int):
    for start in range(0, length, core):
        yield start, min(start + core, length)


def windows(model: LesionNet, h: int, w: int, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """In-plane windows covering an (h, w) slice within the activation budget.

    Yields ``(window, crop, target)`` slice pairs: run the network on ``x[..., window]``,
    keep ``out[..., crop]`` and store it at ``result[..., target]``. Windows carry a halo of
    half the receptive field, so every kept pixel sees exactly the inputs it would see in
    one whole-slice pass (zero padding only at the true slice border): tiled and untiled
    results agree to float rounding.
    """
    per_pixel = activation_bytes_per_pixel(model)
    if h * w * per_pixel <= memory_budget:
        whole = (slice(0, h), slice(0, w))
        yield whole, whole, whole
        return
    halo = (model.receptive_field() - 1) // 2
    # largest square core whose haloed window fits the budget (at least 32 px)
    core = max(32, int((memory_budget / per_pixel) ** 0.5) - 2 * halo)
    for r0, r1 in _tiles(h, core):
        for c0, c1 in _tiles(w, core):
            wr0, wr1 = max(0, r0 - halo), min(h, r1 + halo)
            wc0, wc1 = max(0, c0 - halo), min(w, c1 + halo)
            yield (
                (slice(wr0, wr1), slice(wc0, wc1)),
                (slice(r0 - wr0, r1 - wr0), slice(c0 - wc0, c1 - wc0)),
                (slice(r0, r1), slice(c0, c1)),
            )


@torch.no_grad()
def predict_logits(model: LesionNet, x: torch.Tensor, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """Logits of (N, C, H, W) slices, tiling in-plane when a slice exceeds the budget."""
    n, _, h, w = x.shape
    if n * h * w * activation_bytes_per_pixel(model) <= memory_budget:
        return model(x)
    out = torch.empty((n, model.n_classes, h, w), dtype=x.dtype, device=x.device)
    for i in range(n):
        for window, crop, target in windows(model, h, w, memory_budget):
            out[i : i + 1, :, target[0], target[1]] = model(x[i : i + 1, :, window[0], window[1]])[
                :, :, crop[0], crop[1]
            ]
    return out


def inference_network(model: LesionNet, device: torch.device) -> LesionNet:
    """The copy of ``model`` prediction runs: BatchNorm folded (:func:`inference_copy`),
    channels-last (faster on a CPU than contiguous tensors), on ``device``."""
    return inference_copy(model).to(device, memory_format=torch.channels_last)


def organ_slices(case: Case) -> np.ndarray:
    return np.flatnonzero(case.organ.any(axis=(1, 2)))


@torch.no_grad()
def predict_probability(
    bundle: ModelBundle,
    case: Case,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    slices: Sequence[int] | None = None,
) -> np.ndarray:
    """Lesion probability (S, H, W) of a normalised case, zero outside the organ.

    Only slices containing organ are run (of ``slices`` only, when given: the others stay
    zero; each slice is predicted on its own, so those are exactly as in a whole pass).
    Each batch is resampled in-plane to the model's training spacing, predicted, and the
    lesion softmax resampled back (bilinear) to the case's grid. ``batch_size`` defaults to
    1 slice on the CPU (larger batches cost more per slice there) and 8 on a GPU. The
    network runs channels-last (faster on a CPU than contiguous tensors; both measured in
    docs/benchmarks.md). A 3D U-Net is run
    by :func:`~PatientFineTuneLib.volume_inference.predict_volume` instead. The bundle's
    model is left as it was (mode, layout, device): a folded copy runs.
    """
    device = resolve_device(device)
    if bundle.is_volume_model:
        if slices is not None:
            raise ValueError("a 3D U-Net predicts the whole volume at once, not chosen slices")
        return predict_volume(bundle, case, device=device, progress=progress, cancel=cancel)[0]
    if batch_size is None:
        batch_size = 1 if device.type == "cpu" else 8
    model = inference_network(bundle.model, device)
    _, n_slices, h, w = case.images.shape
    size = resampled_shape((h, w), case.spacing, bundle.training_spacing)
    probability = np.zeros((n_slices, h, w), dtype=np.float32)
    todo = organ_slices(case)
    if slices is not None:
        todo = np.intersect1d(todo, np.asarray(slices, dtype=int))
    # Keep each batch inside the memory budget too, not only each slice.
    per_slice = size[0] * size[1] * activation_bytes_per_pixel(model)
    batch_size = max(1, min(batch_size, memory_budget // max(per_slice, 1)))
    for start in range(0, len(todo), batch_size):
        if cancel is not None and cancel():
            raise Cancelled("prediction cancelled")
        idx = todo[start : start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(case.images[:, idx], 1, 0))).to(device)
        logits = predict_logits(model, resample_array(x, size), memory_budget)
        p = torch.softmax(logits.float(), dim=1)[:, 1:2]
        probability[idx] = resample_array(p, (h, w))[:, 0].clamp_(0, 1).cpu().numpy()
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    probability[~case.organ] = 0.0
    return probability


@torch.no_grad()
def predict_with_uncertainty(
    bundle: ModelBundle,
    case: Case,
    n_samples: int = 25,
    seed: int = 0,
    method: str = "fast",
    device: str | torch.device = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, Uncertainty]:
    """Deterministic lesion probability plus MC-dropout mean and SD, per voxel.

    Only the Dropout layers sample (BatchNorm stays in evaluation mode). A sample is one
    thinned network: each dropout layer's mask over its input channels is drawn once per
    sample and slice and shared by every pixel (dropping inputs of a 1x1 convolution =
    zeroing columns of its weight matrix, the weight-sampling view of MC dropout of Gal
    and Ghahramani). For any one voxel the samples have exactly the distribution of the
    paper's element-wise masks (every channel dropped independently with the same
    probability, independently between samples), so the per-voxel mean and SD estimate
    the same quantities; only the correlation between neighbouring voxels' samples
    differs, which no output uses. Masks come from a generator seeded by (seed, slice).

    ``"fast"`` computes the backbone features once per slice and, per sample, only the
    correction of the dropped channels: with 20 % dropped that is a fifth of the head's
    first product (:func:`mc_head_samples`). ``"naive"`` runs the whole network per sample
    (the reference); both agree to float rounding.

    Returns
    -------
    probability : (S, H, W) deterministic lesion probability (as :func:`predict_probability`)
    uncertainty : :class:`Uncertainty` with the MC mean and SD (population SD over samples)
    """
    if method not in ("fast", "naive"):
        raise ValueError(f"method must be 'fast' or 'naive', got {method!r}")
    if n_samples < 2:
        raise ValueError("MC dropout needs at least 2 samples")
    device = resolve_device(device)
    if bundle.is_volume_model:  # the U-Net's dropout is at its end: every sample is a full pass
        return predict_volume(
            bundle, case, n_samples=n_samples, seed=seed, device=device, progress=progress, cancel=cancel
        )
    # the naive reference runs the network as stored (BatchNorm not folded)
    model = (
        inference_network(bundle.model, device) if method == "fast" else copy.deepcopy(bundle.model).to(device).eval()
    )
    _, n_slices, h, w = case.images.shape
    size = resampled_shape((h, w), case.spacing, bundle.training_spacing)
    outputs = {k: np.zeros((n_slices, h, w), dtype=np.float32) for k in ("probability", "mean", "sd")}
    todo = organ_slices(case)
    for done, s in enumerate(todo):
        if cancel is not None and cancel():
            raise Cancelled("prediction cancelled")
        _uncertainty_of_slice(model, case, s, size, n_samples, seed, method, memory_budget, outputs, device)
        if progress is not None:
            progress(done + 1, len(todo))
    for v in outputs.values():
        v[~case.organ] = 0.0
    return outputs["probability"], Uncertainty(outputs["mean"], outputs["sd"], n_samples)


def _bilinear_support(organ: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Model-grid pixels (``size``) that resampling back to the case grid reads for some
    organ pixel of the slice, as a bool map: the only predictions that are kept."""
    with torch.enable_grad():
        v = torch.zeros((1, 1, *size), requires_grad=True)
        (resample_array(v, organ.shape)[0, 0] * torch.from_numpy(organ.astype(np.float32))).sum().backward()
    return v.grad[0, 0] > 0


def _gather_rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Feature vectors of the flat pixel ``index`` of one slice's (1, C, H, W) features, as
    rows (P, C) for the pixel-wise head."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).index_select(0, index)


def mc_masks(
    model: LesionNet, n_samples: int, seed: int, slice_index: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel masks of the head's two dropout layers, (n_samples, C) and
    (n_samples, head_width), from (seed, slice)."""
    drop1, drop2 = model.classifier[0], model.classifier[4]
    return (
        drop1.keep((n_samples, model.feature_channels), device, seed=[seed, slice_index, 1]),
        drop2.keep((n_samples, model.head_width), device, seed=[seed, slice_index, 2]),
    )


def mc_head_samples(
    model: LesionNet, rows: torch.Tensor, keep: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic lesion probability (P,) and MC samples (n_samples, P) of a folded
    head (:func:`inference_copy`) on feature rows (P, C), with per-sample channel masks.

    With the first layer's weights W (BatchNorm folded in) and bias b, a sample that drops
    the channels D computes ``s * W[:, ~D] x[~D] + b = s * (W x - W[:, D] x[D]) + b``: the
    full product ``W x`` is computed once (it also gives the deterministic result) and
    each sample subtracts the product over its dropped channels only. Softmax over two
    classes is the sigmoid of the logit difference, so the second layer reduces to one
    weight vector, masked per sample.
    """
    drop1, conv1, _, _, drop2, conv2 = model.classifier
    w1, b1 = conv1.weight.flatten(1), conv1.bias
    w2, b2 = conv2.weight.flatten(1), conv2.bias
    difference, offset = w2[1] - w2[0], float(b2[1] - b2[0])
    product = rows @ w1.t()
    deterministic = torch.sigmoid(torch.relu(product + b1) @ difference + offset)
    shifted = product.mul_(drop1.scale).add_(b1)  # s * W x + b, reused by every sample
    samples = torch.empty((len(keep[0]), len(rows)), device=rows.device)
    for k, (kept, kept2) in enumerate(zip(*keep)):
        dropped = torch.nonzero(kept == 0)[:, 0]
        hidden = torch.addmm(
            shifted, rows.index_select(1, dropped), w1.index_select(1, dropped).t(), alpha=-drop1.scale
        ).relu_()
        torch.mv(hidden, difference * kept2 * drop2.scale, out=samples[k])
    return deterministic, torch.sigmoid(samples.add_(offset))


def _uncertainty_of_slice(model, case, s, size, n_samples, seed, method, memory_budget, outputs, device) -> None:
    """Deterministic, MC mean and MC SD of one slice into ``outputs`` (see
    :func:`predict_with_uncertainty`).

    The head, run once per sample, is pixel-wise: it runs only on the pixels whose result
    is kept (the organ's footprint on the model grid), which on a brain slice is about a
    third of them. Every window of a tiled slice uses the slice's masks, so values inside
    the organ are those of a whole-slice pass.
    """
    h, w = case.images.shape[-2:]
    x = resample_array(case.slice_tensor(s)[None].to(device), size)
    needed = _bilinear_support(case.organ[s], size).to(device)
    keep = mc_masks(model, n_samples, seed, int(s), device)
    result = {k: torch.zeros((1, 1, *size), device=device) for k in outputs}
    for window, crop, target in windows(model, *size, memory_budget):
        xw = x[:, :, window[0], window[1]]
        inside = torch.zeros(xw.shape[-2:], dtype=torch.bool, device=device)
        inside[crop] = needed[target]
        index = torch.nonzero(inside.reshape(-1))[:, 0]
        if len(index) == 0:
            continue
        if method == "fast":
            deterministic, samples = mc_head_samples(model, _gather_rows(model.features(xw), index), keep)
        else:
            deterministic = torch.softmax(model.head_rows(_gather_rows(model.features(xw), index)), 1)[:, 1]
            samples = torch.stack(
                [
                    torch.softmax(
                        model.head_rows(_gather_rows(model.features(xw), index), keep=(k1[None], k2[None])), 1
                    )[:, 1]
                    for k1, k2 in zip(*keep)
                ]
            )
        column = {"probability": deterministic, "mean": samples.mean(0), "sd": samples.std(0, unbiased=False)}
        rows = index // xw.shape[-1] + window[0].start
        cols = index % xw.shape[-1] + window[1].start
        for k, v in column.items():
            result[k].view(-1)[rows * size[1] + cols] = v
    for k, v in result.items():
        outputs[k][s] = resample_array(v, (h, w))[0, 0].clamp_(min=0).cpu().numpy()


def uncertainty_summary(sd: np.ndarray, lesions: np.ndarray, organ: np.ndarray) -> dict:
    """The paper's summary numbers: mean SD inside detected lesions (detection) and the
    maximum SD over the organ (segmentation); NaN when there is nothing to measure."""
    return {
        "mean_sd_in_lesions": float(sd[lesions].mean()) if lesions.any() else float("nan"),
        "max_sd": float(sd[organ].max()) if organ.any() else float("nan"),
    }


@dataclass
class Segmentation:
    """Result of segmenting one case (slice-first arrays on the case's grid)."""

    probability: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    lesions: list[dict]
    uncertainty: Uncertainty | None = None
    summary: dict | None = None


def predict_mask(bundle: ModelBundle, case: Case, min_lesion_voxels: int | None = None, **predict_kwargs) -> np.ndarray:
    """The model's post-processed lesion mask (S, H, W) of a normalised case, with its
    preset's post-processing (:func:`segment_case` without the lesion table);
    ``min_lesion_voxels`` replaces the preset's smallest lesion."""
    minimum = bundle.min_lesion_voxels if min_lesion_voxels is None else min_lesion_voxels
    return postprocess(
        predict_probability(bundle, case, **predict_kwargs),
        case.organ,
        opening=bundle.opening,
        min_lesion_voxels=minimum,
    )


def segment_case(
    bundle: ModelBundle,
    case: Case,
    opening: bool | None = None,
    threshold: float = 0.5,
    min_lesion_voxels: int | None = None,
    mc_samples: int = 0,
    seed: int = 0,
    **predict_kwargs,
) -> Segmentation:
    """Predict, post-process (threshold, 3x3x3 closing, the plus opening where
    ``opening`` says, lesions of fewer than ``min_lesion_voxels`` voxels dropped; ``None``
    for either: what the model's preset says, i.e. the opening for liver and 2 voxels
    for the brain presets) and label the lesions of a normalised case; with
    ``mc_samples`` > 0 also the MC-dropout uncertainty (fast path), its summary, and
    each lesion's mean SD."""
    uncertainty = None
    if mc_samples:
        probability, uncertainty = predict_with_uncertainty(
            bundle, case, n_samples=mc_samples, seed=seed, **predict_kwargs
        )
    else:
        probability = predict_probability(bundle, case, **predict_kwargs)
    mask = postprocess(
        probability,
        case.organ,
        opening=bundle.opening if opening is None else opening,
        threshold=threshold,
        min_lesion_voxels=bundle.min_lesion_voxels if min_lesion_voxels is None else min_lesion_voxels,
    )
    labels, _ = label_lesions(mask)
    maps = {"probability": probability}
    summary = None
    if uncertainty is not None:
        maps["sd"] = uncertainty.sd
        summary = uncertainty_summary(uncertainty.sd, mask, case.organ)
    table = lesion_table(labels, case.grid, case.layout, extra_maps=maps)
    return Segmentation(
        probability=probability, mask=mask, labels=labels, lesions=table, uncertainty=uncertainty, summary=summary
    )
