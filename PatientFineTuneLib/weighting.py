"""Pixel weight maps for fine-tuning (Jansen et al. 2020, "Weighting"), computed from the base
model's segmentation of the baseline against the baseline annotation. They replace the
class weights in the loss.

Both maps work on whole volumes (lesion objects are 26-connected in 3D); fine-tuning then
cuts the chosen slices out of them.
"""

from __future__ import annotations

import numpy as np

from .postprocess import label_lesions

SCHEMES = ("segmentation", "detection")


def segmentation_weights(prediction: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """WMH (segmentation) scheme: false positive and false negative pixels 5, true
    positives 2, true negatives 1."""
    pred, gt = prediction.astype(bool), annotation.astype(bool)
    weights = np.ones(gt.shape, dtype=np.float32)
    weights[pred & gt] = 2.0
    weights[pred ^ gt] = 5.0
    return weights


def detection_weights(prediction: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """Liver (detection) scheme: pixels of missed lesions (annotated objects that no
    predicted pixel touches) 5; true-positive pixels of detected lesions 2; false-negative
    pixels of detected lesions and false-positive pixels of predicted objects that touch a
    detected lesion 0 (over- or under-segmenting a found lesion is not penalised);
    background and false-positive objects 1."""
    pred, gt = prediction.astype(bool), annotation.astype(bool)
    gt_labels, _ = label_lesions(gt)
    pred_labels, _ = label_lesions(pred)
    detected = np.unique(gt_labels[pred & (gt_labels > 0)])
    detected_gt = np.isin(gt_labels, detected) & (gt_labels > 0)
    touching = np.unique(pred_labels[gt & (pred_labels > 0)])
    touching_pred = np.isin(pred_labels, touching) & (pred_labels > 0)

    weights = np.ones(gt.shape, dtype=np.float32)
    weights[gt & ~detected_gt] = 5.0  # missed lesions
    weights[detected_gt & ~pred] = 0.0  # under-segmented part of a found lesion
    weights[touching_pred & ~gt] = 0.0  # over-segmented part of a found lesion
    weights[detected_gt & pred] = 2.0
    return weights


def weight_map(scheme: str, prediction: np.ndarray, annotation: np.ndarray) -> np.ndarray:
    """The weight map of a scheme: ``"segmentation"`` or ``"detection"``."""
    if scheme == "segmentation":
        return segmentation_weights(prediction, annotation)
    if scheme == "detection":
        return detection_weights(prediction, annotation)
    raise ValueError(f"unknown weighting scheme {scheme!r}; choose one of {', '.join(SCHEMES)} (or none)")
