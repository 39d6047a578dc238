"""Where a model's false positives lie (the real-data benchmark's count of dura and sinus
false positives): at the brain's edge or inside it, measured in millimetres."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eval_real_base_models import false_positive_sites  # noqa: E402


def test_false_positives_are_told_apart_by_their_depth_in_the_brain_in_mm():
    z, y, x = np.indices((20, 64, 64))
    # a brain 18 mm deep in z (2-mm slices) and 50 mm wide in-plane (1-mm pixels)
    brain = ((z * 2.0 - 19) / 18) ** 2 + ((y - 31.5) / 25) ** 2 + ((x - 31.5) / 25) ** 2 < 1
    truth = np.zeros_like(brain)
    truth[9:11, 30:34, 30:34] = True
    pred = np.zeros_like(brain)
    pred[9:11, 30:36, 30:36] = True  # overlaps the true lesion: not a false positive
    pred[9:11, 8:10, 31:33] = True  # 2-3 mm from the brain's surface: edge (a sinus's place)
    pred[9:11, 20:22, 45:47] = True  # about 12 mm deep: inside
    pred[9:11, 0:2, 0:2] = True  # outside the brain mask: edge
    sites = false_positive_sites(pred, truth, brain, (2.0, 1.0, 1.0))
    assert (sites["fp_edge"], sites["fp_inside"]) == (2, 1)
    assert sites["edge"][9, 8, 31] and sites["edge"][9, 0, 0] and sites["inside"][9, 20, 45]
    assert not (sites["edge"] | sites["inside"])[9, 31, 31]
    # the depth is in mm, not voxels: with 0.4-mm slices the same voxels lie within 4 mm of
    # the top of the brain, so the deep one is at the edge too
    thin = false_positive_sites(pred, truth, brain, (0.4, 1.0, 1.0))
    assert thin["fp_edge"] == 3 and thin["fp_inside"] == 0
