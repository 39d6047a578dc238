"""Training a copy of the base model on the prepared slices, in the one training loop: the
head on cached backbone features (the fast path) or the whole network on every draw (the
naive path, and every layer)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..modelfile import ModelBundle
from ..training_loop import Adam, training_loop
from .config import HEAD_NORM_MOMENTUM, FinetuneConfig
from .data import FinetuneData, draw_batch, rotated_patch, sample_pixels

#: Default upper bound for the fast path's feature cache (bytes).
DEFAULT_CACHE_BUDGET = 4 << 30


def choose_method(
    data: FinetuneData, config: FinetuneConfig, feature_bytes: int, cache_budget: int = DEFAULT_CACHE_BUDGET
) -> str:
    """``"fast"`` when caching is worth it and fits in memory, else ``"naive"``.

    The fast path computes each distinct (slice, patch, angle) input once; the naive path
    computes one per draw. With many slices most draws are distinct, the cache gains
    nothing and would need memory for every input.
    """
    if config.layers == "all":
        return "naive"
    if config.method in ("fast", "naive"):
        return config.method
    distinct = len(data.images) * len(data.centres[0]) * len(data.angles)
    draws = config.iterations * config.batch_size
    expected_distinct = distinct * (1 - (1 - 1 / distinct) ** draws)
    if expected_distinct * feature_bytes > cache_budget or expected_distinct > 0.7 * draws:
        return "naive"
    return "fast"


def progress_in_steps_of(progress, offset: int, planned: int, iterations: int):
    """``progress(iteration, loss)`` of a run of ``iterations``, reported as ``offset`` plus
    its share of ``planned``: the check may compare fewer counts, or the final model train
    fewer iterations, than the bar was sized for (:meth:`FinetuneConfig.progress_total`),
    and the bar still moves evenly to its end."""
    if progress is None:
        return None
    return lambda iteration, loss: progress(offset + round(iteration * planned / iterations), loss)


class LiveFeatures:
    """Feature source of the naive path: the backbone runs on every draw (with gradients
    when every layer trains)."""

    def __init__(self, model, data: FinetuneData, config: FinetuneConfig, device):
        self.model, self.data, self.config, self.device = model, data, config, device

    def __call__(self, picks, index: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone output (B, C, H, W) of the picked (slice, patch, angle) inputs; with
        ``index`` (:func:`sample_pixels`) only those pixels' (:func:`sampled_pixel_features`)."""
        x = torch.cat([rotated_patch(self.data, p, self.config.patch_size, "image") for p in picks]).to(self.device)
        with torch.set_grad_enabled(self.config.layers == "all"):
            features = self.model.features(x)
        return features if index is None else sampled_pixel_features(features, index)


class CachedFeatures:
    """Feature source of the fast path: the frozen backbone runs once per distinct
    (slice, patch, angle) input; each batch is copied into one reused channels-last
    buffer (a fresh 170 MB tensor per iteration costs more in page faults than the copy),
    or only its sampled pixels into another."""

    def __init__(self, model, data: FinetuneData, config: FinetuneConfig, device, cache: dict | None = None):
        self.model, self.data, self.config, self.device = model, data, config, device
        self.cache: dict[tuple[int, int, int], torch.Tensor] = {} if cache is None else cache
        shape = (config.batch_size, model.feature_channels, config.patch_size, config.patch_size)
        self.batch = torch.empty(shape, device=device, memory_format=torch.channels_last)
        self.sampled: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, picks, index: torch.Tensor | None = None) -> torch.Tensor:
        """Backbone output (B, C, H, W) of the picks, in the reused buffer (the caller may
        overwrite it); with ``index`` only the sampled pixels', as
        :func:`sampled_pixel_features` gives them, gathered straight from the cache."""
        missing = list(dict.fromkeys(p for p in picks if p not in self.cache))
        if missing:
            x = torch.cat([rotated_patch(self.data, p, self.config.patch_size, "image") for p in missing]).to(
                self.device
            )
            with torch.autocast(self.device.type, enabled=False):  # cached once, kept exact
                features = self.model.features(x).contiguous(memory_format=torch.channels_last)
            for p, f in zip(missing, features):
                self.cache[p] = f
        if index is not None:
            return self._gather(picks, index)
        for i, p in enumerate(picks):
            self.batch[i].copy_(self.cache[p])
        return self.batch

    def _gather(self, picks, index: torch.Tensor) -> torch.Tensor:
        """The rows ``index`` of the picks' features, without copying whole patches: a
        channels-last feature map is its pixels' rows already."""
        channels, pixels = self.batch.shape[1], self.config.patch_size**2
        if self.sampled is None or self.sampled.shape[0] != len(index):
            self.sampled = torch.empty((len(index), channels), device=self.device)
        per_patch = len(index) // len(picks)  # sample_pixels: as many from every patch, patch by patch
        for i, p in enumerate(picks):
            block = slice(i * per_patch, (i + 1) * per_patch)
            feature_rows = self.cache[p].permute(1, 2, 0).reshape(pixels, channels)
            torch.index_select(feature_rows, 0, index[block] - i * pixels, out=self.sampled[block])
        return self.sampled.t()[None, :, :, None]


def sampled_pixel_features(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Approximate mode: the feature vectors of the pixels at flat ``index`` into the
    (B, H, W) batch (:func:`sample_pixels`), as one (1, C, P, 1) column for the head."""
    rows = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return rows.index_select(0, index).t()[None, :, :, None]


class HeadDropoutMasks:
    """The head's two element-wise dropout masks of each iteration, from (seed, iteration),
    drawn into reused buffers (fresh ones cost more in page faults)."""

    def __init__(self, model, seed: int, device):
        self.layers = ((model.classifier[0], model.feature_channels), (model.classifier[4], model.head_width))
        self.seed, self.device = seed, device
        self.buffers: dict[tuple, torch.Tensor] = {}

    def __call__(self, n_rows: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        masks = []
        for which, (drop, channels) in enumerate(self.layers, start=1):
            shape = (n_rows, channels)
            if shape not in self.buffers:
                self.buffers[shape] = torch.empty(shape, device=self.device)
            masks.append(drop.keep(shape, self.device, seed=[self.seed, iteration, which], out=self.buffers[shape]))
        return masks[0], masks[1]


def weighted_loss(
    logits: torch.Tensor, target: torch.Tensor, pixel_weights: torch.Tensor | None, class_weights: torch.Tensor
) -> torch.Tensor:
    """Fine-tuning's loss: cross-entropy with the class weights, or with per-pixel weights
    (the weighting schemes of Jansen et al. 2020; also the check's masking of held-out pixels)."""
    if pixel_weights is None:
        return F.cross_entropy(logits, target, weight=class_weights)
    return (F.cross_entropy(logits, target, reduction="none") * pixel_weights).sum() / pixel_weights.sum().clamp_min(
        1e-6
    )


def _trainable_copy(bundle: ModelBundle, config: FinetuneConfig, device) -> tuple[torch.nn.Module, list]:
    """A copy of the base model with the head (or every layer) trainable; returns it and
    the parameters to optimise. Channels-last (faster for the backbone on a CPU);
    the backbone's BatchNorm keeps its statistics (evaluation mode), the head's follow
    ``head_norm``."""
    model = copy.deepcopy(bundle.model).to(device, memory_format=torch.channels_last).eval()
    train_all = config.layers == "all"
    for p in model.parameters():
        p.requires_grad_(train_all)
    head = model.head_modules()
    head.train()
    momentum = HEAD_NORM_MOMENTUM[config.head_norm]
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            if momentum is None:
                m.eval()
            else:
                m.momentum = momentum
    for p in head.parameters():
        p.requires_grad_(True)
    return model, list((model if train_all else head).parameters())


def train_patient_copy(
    bundle: ModelBundle,
    data: FinetuneData,
    config: FinetuneConfig,
    device,
    progress,
    cancel,
    keep_states_at: Sequence[int] = (),
    feature_cache: dict | None = None,
    start_state: dict | None = None,
):
    """Fine-tune a copy of the base model on ``data`` (the head, or every layer) in the
    one training loop; returns (model, losses, method, states): ``states`` the model's
    state after each iteration count of ``keep_states_at``. ``feature_cache``: the fast
    path's backbone outputs, shared between runs on the same slices (the check's folds
    and the final model: the frozen backbone is the base model's in each)."""
    model, parameters = _trainable_copy(bundle, config, device)
    if start_state is not None:  # continue a model trained before (the check's)
        model.load_state_dict(start_state)
    optimizer = Adam(parameters, lr=config.learning_rate)
    class_weights = torch.tensor(config.class_weights, dtype=torch.float32, device=device)
    method = choose_method(data, config, feature_bytes=4 * model.feature_channels * config.patch_size**2)
    features_of = (
        CachedFeatures(model, data, config, device, feature_cache)
        if method == "fast"
        else LiveFeatures(model, data, config, device)
    )
    dropout_masks = HeadDropoutMasks(model, config.seed, device)
    # each pick's rotated label and weight patches; kept where its features are (the fast
    # path: few distinct picks, each drawn many times)
    annotations: dict[tuple[int, int, int], tuple] = {}

    def annotation(pick) -> tuple:
        if pick in annotations:
            return annotations[pick]
        found = (
            rotated_patch(data, pick, config.patch_size, "label"),
            rotated_patch(data, pick, config.patch_size, "weight") if data.weights is not None else None,
        )
        if method == "fast":
            annotations[pick] = found
        return found

    def loss_of(iteration: int) -> torch.Tensor:
        picks = draw_batch(data, config, iteration)
        index = sample_pixels(config, iteration, len(picks)).to(device) if config.pixel_fraction < 1 else None
        features = features_of(picks, index)
        labels, pixel_weights = zip(*(annotation(p) for p in picks))
        target = torch.cat(labels)[:, 0].round().long().to(device)
        weights = torch.cat(pixel_weights)[:, 0].to(device) if data.weights is not None else None
        if index is not None:
            target = target.reshape(-1)[index][None, :, None]
            weights = weights.reshape(-1)[index][None, :, None] if weights is not None else None
        n_rows = features.shape[0] * features.shape[2] * features.shape[3]
        # the features are this iteration's own (a copy, a gathered column or a fresh
        # backbone output): dropout may overwrite them
        logits = model.head(features, keep=dropout_masks(n_rows, iteration), overwrite=True)
        return weighted_loss(logits.float(), target, weights, class_weights)

    states = {}

    def after_step(done: int, loss: float) -> None:
        if done in keep_states_at:
            states[done] = toward_base(bundle, model.state_dict(), config.finetuned_share)
        if progress is not None:
            progress(done, loss)

    losses = training_loop(
        loss_of,
        optimizer,
        range(config.iterations),
        seed=config.seed,
        device=device,
        precision=config.precision,
        after_step=after_step,
        cancel=cancel,
        what="fine-tuning",
    )
    if config.finetuned_share != 1:
        model.load_state_dict(toward_base(bundle, model.state_dict(), config.finetuned_share))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, losses, method, states


def toward_base(bundle: ModelBundle, state: dict, share: float) -> dict:
    """A copy of the fine-tuned ``state`` at ``share`` of the way from the base model's
    weights and BatchNorm statistics (``base + share * (state - base)``; integer entries,
    the batch counters, are the fine-tuned model's): the patient model as
    ``FinetuneConfig.finetuned_share`` asks."""
    if share == 1:
        return copy.deepcopy(state)
    base = bundle.model.state_dict()
    return {
        k: torch.lerp(base[k].to(v.device, v.dtype), v, share) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }
