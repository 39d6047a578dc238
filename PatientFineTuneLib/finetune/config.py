"""Settings of patient-specific fine-tuning: :class:`FinetuneConfig` (the paper's defaults)
and the configuration every front end ships (:func:`shipped_config`), with the route taken
where the annotation is large (:func:`large_annotation_route`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..modelfile import ModelBundle
from ..training import PatchTrainingConfig
from ..training_loop import resolved_precision

#: What trains: "head" (the paper's last two layers; the 3D U-Net's output layer), "all"
#: (FT_All); for the 3D U-Net also "decoder" and "last-layers" (Kaur et al. 2019).
LAYER_CHOICES = ("head", "all", "decoder", "last-layers")


#: Momentum of the head's BatchNorm running statistics per ``head_norm`` (None: frozen at
#: the base model's). PyTorch's default 0.1 replaces the base statistics within 100
#: iterations on one patient's patches; Keras, the paper's framework, keeps 0.99 of them
#: per step (0.01 here).
HEAD_NORM_MOMENTUM = {"batch": 0.1, "slow": 0.01, "frozen": None}


@dataclass
class FinetuneConfig(PatchTrainingConfig):
    """Settings of patient-specific fine-tuning; defaults are the paper's."""

    iterations: int = 100
    n_angles: int = 8
    weighting: str | None = None  # None, "segmentation" or "detection"
    method: str = "auto"  # "fast", "naive" or "auto"
    layers: str = "head"  # see LAYER_CHOICES
    #: Approximate mode: the head runs, and the loss is taken, on this uniform random
    #: fraction of each patch's pixels per iteration (1 = exact, the paper; the shipped
    #: configuration's 0.25 saves most where the head trains, less where every layer
    #: does (the backbone still runs on every pixel), and decided the same on the real
    #: scans, see :data:`SHIPPED_PIXEL_FRACTION`).
    pixel_fraction: float = 1.0
    #: Never worse than the base model: check on held-out blocks of the annotation first
    #: (see the module docstring; twice the training time). The 2D network only.
    holdout_check: bool = False
    #: Folds of the check: 2 holds each half of the annotation out in turn and pools the
    #: scores (the default); 1 holds out one half only. With 2 annotated slices one fold's
    #: verdict depends on which slice is held out (on a real MS scan one choice passed a
    #: model that lost Dice on the rest of the scan: docs/results.md).
    holdout_folds: int = 2
    #: Iteration counts the check compares on the held-out part (its model trains to the
    #: largest and is scored at each); the patient model trains the count that did best
    #: there (:func:`choose_iterations`). None: ``iterations`` only.
    holdout_iterations: tuple[int, ...] | None = None
    #: With the "all-lesion" selection (every lesion of the baseline annotated, so every
    #: other organ slice is known to be lesion-free): also train on this many lesion-free
    #: organ slices where the base model finds the most lesion, i.e. its false positives
    #: (:func:`find_hard_negatives`). The check never holds them out.
    hard_negative_slices: int = 0
    #: Counts above ``iterations`` are compared only when each fold of the check holds out
    #: at least this many whole slices: with fewer annotated slices the head overfits
    #: sooner and one held-out slice is too little evidence to tell (on a real MS scan
    #: with 2 slices, twice the iterations looked best on the held-out slice and lost Dice
    #: on the rest: docs/results.md).
    extend_min_held_out_slices: int = 3
    #: Settings that replace these where the annotation is large: each fold of the check
    #: holds out at least ``extend_min_held_out_slices`` whole slices (the rule that also
    #: allows longer training), e.g. ``{"layers": "all"}``; None: these everywhere. The
    #: shipped route (:data:`LARGE_ANNOTATION_ROUTE`): every layer gains far more than the
    #: head on real scans where many slices are annotated, and overfits two
    #: (docs/results.md). See :meth:`for_held_out_slices`.
    large_annotation: dict | None = None
    #: The head's BatchNorm (see :data:`HEAD_NORM_MOMENTUM`): "batch" (PyTorch's training
    #: mode: batch statistics, running statistics updated at momentum 0.1), "slow" (the
    #: same at momentum 0.01, the paper's Keras default of 0.99 in PyTorch's terms) or
    #: "frozen" (the base model's statistics kept; its scale and shift still train).
    head_norm: str = "batch"
    #: How far the patient model moves from the base model: its weights (and BatchNorm
    #: statistics) are ``base + finetuned_share * (fine-tuned - base)`` after training, a
    #: weight-space ensemble of the two (Wortsman et al. 2022, "WiSE-FT"); the check scores
    #: the models so blended. 1: the fine-tuned model itself (the paper).
    finetuned_share: float = 1.0
    #: Where each fold of the check holds out fewer than ``extend_min_held_out_slices``
    #: whole slices (2 annotated slices: one each; or checkerboard blocks), the check keeps
    #: the fine-tuned model unless its pooled held-out Dice is lower than the base model's
    #: by more than this; lesion F1 and the per-fold rule are not judged there (one
    #: slice's few lesions make them noise: on the 8 real two-slice runs they refused 5
    #: models that gained on the rest of the scan, docs/results.md). None: the full
    #: promise (:func:`~.check.choose_iterations`) wherever the check runs.
    few_slice_dice_tolerance: float | None = None
    #: With one fold of the check: the patient model continues the fold's model at the
    #: chosen count, on the whole annotation, for this fraction of that count (None: it
    #: trains the chosen count afresh from the base model, as the folds did).
    final_continues_check: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)}, not {self.layers!r}")
        if not 0 < self.pixel_fraction <= 1:
            raise ValueError(f"pixel_fraction must be in (0, 1], not {self.pixel_fraction}")
        if self.holdout_folds not in (1, 2):
            raise ValueError(f"holdout_folds must be 1 or 2, not {self.holdout_folds!r}")
        if self.final_continues_check is not None and not self.final_continues_check > 0:
            raise ValueError(
                f"final_continues_check must be a positive fraction of the chosen count, not {self.final_continues_check!r}"
            )
        if self.large_annotation is not None:
            self.large_annotation = dict(self.large_annotation)
            fields = {f.name for f in dataclasses.fields(self)} - {"large_annotation"}
            unknown = sorted(set(self.large_annotation) - fields)
            if unknown:
                raise ValueError(f"large_annotation sets unknown fine-tuning settings: {', '.join(unknown)}")
            dataclasses.replace(self, **self.large_annotation, large_annotation=None)  # the route's settings are valid
        if not 0 < self.finetuned_share <= 1:
            raise ValueError(f"finetuned_share must be in (0, 1], not {self.finetuned_share!r}")
        if self.head_norm not in HEAD_NORM_MOMENTUM:
            raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORM_MOMENTUM)}, not {self.head_norm!r}")
        if self.holdout_iterations is not None:
            self.holdout_iterations = tuple(sorted({int(n) for n in self.holdout_iterations}))
            if not self.holdout_iterations or self.holdout_iterations[0] < 1:
                raise ValueError(
                    f"holdout_iterations must be positive iteration counts, not {self.holdout_iterations!r}"
                )

    def for_device(self, device) -> FinetuneConfig:
        """These settings with an "auto" precision decided for ``device``
        (:func:`~PatientFineTuneLib.training_loop.resolved_precision`), here and in
        ``large_annotation``."""
        route = self.large_annotation
        if route and "precision" in route:
            route = {**route, "precision": resolved_precision(route["precision"], device)}
        return dataclasses.replace(self, precision=resolved_precision(self.precision, device), large_annotation=route)

    def check_iterations(self, held_out_slices: int | None = None) -> tuple[int, ...]:
        """The iteration counts the never-worse check compares; with ``held_out_slices``
        (whole slices the check holds out, 0 for blocks) only those it may compare there."""
        counts = self.holdout_iterations or (self.iterations,)
        if held_out_slices is not None and held_out_slices < self.extend_min_held_out_slices:
            counts = tuple(c for c in counts if c <= self.iterations) or (self.iterations,)
        return counts

    def for_held_out_slices(self, held_out_slices: int) -> FinetuneConfig:
        """The settings the check (and then the patient model) uses where each fold holds
        out ``held_out_slices`` whole slices (0 for blocks): ``large_annotation``'s where
        that is at least ``extend_min_held_out_slices``, these otherwise."""
        if self.large_annotation and held_out_slices >= self.extend_min_held_out_slices:
            return dataclasses.replace(self, **self.large_annotation, large_annotation=None)
        return dataclasses.replace(self, large_annotation=None)

    def progress_total(self) -> int:
        """Iterations a progress bar counts before the check has split the annotation: the
        most any route may take (the check's largest count once per fold, then the final
        model's at most that many); :func:`finetune_patient_model` reports the route's own
        total once it is known."""
        if not self.holdout_check:
            return self.iterations
        routes = [self] + ([self.for_held_out_slices(self.extend_min_held_out_slices)] if self.large_annotation else [])
        return max(r.check_total() for r in routes)

    def check_total(self) -> int:
        """Iterations of the check's folds and the final model (at most the largest count,
        or that fraction of it where the patient model continues the check's)."""
        largest = max(self.check_iterations())
        return self.holdout_folds * largest + (
            self.continued_iterations(largest) if self.holdout_folds == 1 else largest
        )

    def continued_iterations(self, count: int) -> int:
        """Iterations the patient model trains after the check chose ``count``, where it
        continues the check's model (``final_continues_check``); ``count`` otherwise."""
        return max(1, round(self.final_continues_check * count)) if self.final_continues_check else count

    def angles(self) -> np.ndarray:
        """The fixed angle set; with ``n_angles=0`` one uniform angle per draw of the run,
        in draw order (iteration-major), from the seed."""
        if self.n_angles == 0:
            rng = np.random.default_rng([self.seed, 0xA9])
            return rng.uniform(-self.max_rotation_deg, self.max_rotation_deg, self.iterations * self.batch_size)
        if self.n_angles == 1:
            return np.zeros(1)
        return np.linspace(-self.max_rotation_deg, self.max_rotation_deg, self.n_angles)


def default_weighting(preset_name: str | None, volume_model: bool = False) -> str | None:
    """The fine-tuning weighting a model gets unless one is chosen: its preset's for the
    2D network (:attr:`~PatientFineTuneLib.presets.Preset.weighting`), none for the 3D
    U-Net (the schemes weight 2D slices) or a model without a preset."""
    from ..presets import PRESETS

    preset = PRESETS.get(preset_name or "")
    if volume_model or preset is None or preset.weighting == "none":
        return None
    return preset.weighting


#: The shipped configuration's approximate mode. Where the head trains (the 2-suggested-
#: slice route): on the real scans of that route the check made the same decisions as
#: with exact training, and the fine-tuned model it kept scored the same follow-up Dice,
#: in a fraction of the time. Where every layer trains, it is part of
#: :func:`large_annotation_route` (docs/results.md, docs/benchmarks.md).
SHIPPED_PIXEL_FRACTION = 0.25


def shipped_config(bundle: ModelBundle, **settings) -> FinetuneConfig:
    """The fine-tuning every front end (command line, Slicer, web app, demo) runs unless
    told otherwise: the preset's weighting (:func:`default_weighting`) and, for the 2D
    network, the preset's hard negatives and the never-worse check comparing 1, 2 and 4
    times ``iterations`` and training the head as :data:`HEAD_ROUTE` says (on a quarter
    of each patch's pixels per iteration, :data:`SHIPPED_PIXEL_FRACTION`), or where at
    least 3 whole slices would be held out in each fold, :func:`large_annotation_route`
    (every layer trains): chosen on the real scans, see docs/results.md; ``settings``
    override any field (``layers`` or ``large_annotation`` set there replace the large
    annotation's route)."""
    defaults = {
        "weighting": default_weighting(bundle.preset.name if bundle.preset else None, bundle.is_volume_model),
        "holdout_check": not bundle.is_volume_model,
        "hard_negative_slices": bundle.preset.hard_negative_slices
        if bundle.preset and not bundle.is_volume_model
        else 0,
        "pixel_fraction": 1.0 if bundle.is_volume_model else SHIPPED_PIXEL_FRACTION,
        **({} if bundle.is_volume_model else HEAD_ROUTE),
    }
    config = FinetuneConfig(**{**defaults, **settings})
    if config.holdout_check and "holdout_iterations" not in settings:
        config = dataclasses.replace(
            config, holdout_iterations=(config.iterations, 2 * config.iterations, 4 * config.iterations)
        )
    if config.holdout_check and not bundle.is_volume_model and not {"layers", "large_annotation"} & set(settings):
        # settings given explicitly hold on that route too (e.g. --check-iterations, --pixel-fraction)
        route = {k: v for k, v in large_annotation_route(config.iterations).items() if k not in settings}
        config = dataclasses.replace(config, large_annotation=route)
    return config


#: The shipped route where the annotation is large (:func:`large_annotation_route`).
LARGE_ANNOTATION_LEARNING_RATE = 2e-4

#: How the shipped 2D fine-tuning trains the head (the route of a few annotated slices,
#: e.g. the 2 suggested ones): twice the paper's learning rate, the head's BatchNorm
#: statistics at the paper's Keras momentum ("slow"), and the patient model half-way from
#: the base model to the fine-tuned one (``finetuned_share``, a weight-space ensemble),
#: judged by the check on its held-out Dice alone where one slice per fold is held out
#: (``few_slice_dice_tolerance``). On the 8 real two-slice runs Dice gained on every one
#: (mean +0.035, lesion F1 within 0.02 everywhere); the fine-tuned model itself at either
#: rate lost up to 0.14 Dice on some (docs/results.md, 2026-12-07).
HEAD_ROUTE = {
    "learning_rate": 2e-4,
    "head_norm": "slow",
    "finetuned_share": 0.5,
    "few_slice_dice_tolerance": 0.05,
}


def large_annotation_route(iterations: int) -> dict:
    """The shipped settings where each fold of the check would hold out at least 3 whole
    slices: every layer trains, at twice the paper's learning rate, on a quarter of each
    patch's pixels; the check trains one fold (its half holds out 3 slices or more)
    comparing 1/2, 1 and 2 times ``iterations``, and the patient model continues that
    fold's model at the chosen count on the whole annotation for half as many iterations.
    Chosen on the real scans against two folds on every pixel at the paper's rate
    comparing 1, 2 and 4 times, then the final model afresh: a fraction of the time, the
    same verdicts and, all but once, Dice as good or better (docs/results.md,
    docs/benchmarks.md). The precision is "auto": bfloat16 on a CPU with AMX (0.6-0.8x
    the time per iteration there; on the 8 real every-layer rows the same verdicts and
    Dice within 0.01), float32 elsewhere."""
    return {
        "layers": "all",
        "learning_rate": LARGE_ANNOTATION_LEARNING_RATE,
        "holdout_folds": 1,
        "pixel_fraction": SHIPPED_PIXEL_FRACTION,
        "holdout_iterations": (max(1, iterations // 2), iterations, 2 * iterations),
        "final_continues_check": 0.5,
        "precision": "auto",
        # as chosen with the route (HEAD_ROUTE is the head's)
        "head_norm": "batch",
        "finetuned_share": 1.0,
    }
