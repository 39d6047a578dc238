"""Patient-specific fine-tuning (Jansen et al. 2020): retrain only the last two layers of the base
network on the patient's annotated baseline slices.

From each chosen slice five 128x128 patches are taken (the four corners of the organ's
bounding box and its centre) and rotated. The backbone is frozen, so its output for a
given (slice, patch, angle) never changes: the *fast* path computes it once, caches it and
trains only the head on cached features; the *naive* path runs the whole network every
iteration and is kept as the reference. Both draw the same patches, angles and dropout
masks from (seed, iteration), so they give the same model up to float rounding.

Differences from the paper: rotation angles come from a fixed set of ``n_angles`` values
spanning [-45, 45] degrees instead of a continuous uniform draw, so that features can be
reused. (The naive path uses the same set, to stay comparable.) ``n_angles=0`` restores
the paper's continuous draw (every patch its own uniform angle; nothing repeats, so it
always runs the naive path); the evaluation compares the two. The shipped configuration
takes each iteration's loss on a random quarter of each patch's pixels (``pixel_fraction``;
the paper uses every pixel): each iteration costs less, most where only the head trains,
with the same decisions on the real scans (:data:`SHIPPED_PIXEL_FRACTION`).

``holdout_check`` (the command line's default, beyond the paper) makes fine-tuning never
worse than the base model on the patient's own annotation: the annotation is split in two
halves (every other chosen slice, or a checkerboard of blocks when that is not possible);
a model is fine-tuned with the loss on one half and scored on the other, then the halves
swap (two folds), and the held-out scores of both are pooled and compared with the base
model's on the same pixels. Only if fine-tuning is at least as good there (Dice, and
lesion F1 within 0.02), and no worse on either fold beyond a small tolerance, is the
patient model fine-tuned on the whole annotation; otherwise the base model is returned,
with the numbers in its metadata. The check can also compare longer training
(``holdout_iterations``) and choose the count; a count longer than asked replaces an
asked count that did not help only by a clear margin (:func:`choose_iterations`).

``layers="all"`` trains every layer instead (FT_All of Kaur et al. 2019, a reference the paper
lacks). Nothing is frozen, so nothing can be cached: it always runs the naive loop. The
backbone's BatchNorm layers keep their base-model statistics (a batch of 4 patches of one
patient is too small to re-estimate them); their scale and shift train. The shipped
configuration (:func:`shipped_config`) trains every layer where the annotation is large
(``large_annotation``: the check would hold out at least 3 whole slices in each fold)
and the head otherwise: on real scans every layer gained far more where many slices were
annotated, and with 2 suggested slices it overfit them (docs/results.md). There the check
trains one fold, at twice the paper's learning rate, and compares half, once and twice the
asked iterations, and the patient model continues that fold's model for half the chosen
count (:func:`large_annotation_route`): a fraction of the time of two folds at the
paper's rate comparing 1, 2 and 4 times, with the same verdicts on the real scans
(docs/results.md, docs/benchmarks.md), in bfloat16 where the CPU has AMX tiles.

Where only the head trains (a few annotated slices, e.g. the 2 suggested ones), the
shipped configuration (:data:`HEAD_ROUTE`) trains it at twice the paper's learning rate
and keeps the patient model half-way between the base and the fine-tuned weights
(``finetuned_share``, a weight-space ensemble after Wortsman et al. 2022); with one
held-out slice per fold the check then judges only its held-out Dice
(``few_slice_dice_tolerance``). On the 8 real two-slice runs this gained on every one.
"""

from .check import (
    CHECK_F1_TOLERANCE,
    FOLD_DICE_TOLERANCE,
    RESCUE_DICE_MARGIN,
    CheckOutcome,
    HeldOutScores,
    choose_iterations,
    holdout_mask,
    holdout_split,
    never_worse_check,
)
from .config import (
    HEAD_NORM_MOMENTUM,
    HEAD_ROUTE,
    LARGE_ANNOTATION_LEARNING_RATE,
    LAYER_CHOICES,
    SHIPPED_PIXEL_FRACTION,
    FinetuneConfig,
    default_weighting,
    large_annotation_route,
    shipped_config,
)
from .data import (
    FinetuneData,
    draw_batch,
    find_hard_negatives,
    network_mask,
    prepare_finetune_data,
    rotated_patch,
    sample_pixels,
    select_slices,
)
from .head import (
    DEFAULT_CACHE_BUDGET,
    CachedFeatures,
    HeadDropoutMasks,
    LiveFeatures,
    choose_method,
    sampled_pixel_features,
    train_patient_copy,
    weighted_loss,
)
from .patient import finetune_patient_model

__all__ = [
    "CHECK_F1_TOLERANCE",
    "CachedFeatures",
    "DEFAULT_CACHE_BUDGET",
    "FOLD_DICE_TOLERANCE",
    "FinetuneConfig",
    "FinetuneData",
    "HEAD_NORM_MOMENTUM",
    "HeadDropoutMasks",
    "CheckOutcome",
    "HeldOutScores",
    "HEAD_ROUTE",
    "LARGE_ANNOTATION_LEARNING_RATE",
    "LAYER_CHOICES",
    "LiveFeatures",
    "RESCUE_DICE_MARGIN",
    "SHIPPED_PIXEL_FRACTION",
    "choose_iterations",
    "choose_method",
    "default_weighting",
    "draw_batch",
    "find_hard_negatives",
    "finetune_patient_model",
    "holdout_mask",
    "holdout_split",
    "large_annotation_route",
    "network_mask",
    "never_worse_check",
    "prepare_finetune_data",
    "rotated_patch",
    "sample_pixels",
    "sampled_pixel_features",
    "select_slices",
    "shipped_config",
    "train_patient_copy",
    "weighted_loss",
]
