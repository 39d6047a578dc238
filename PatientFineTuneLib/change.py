"""What changed between two timepoints: lesions matched by overlap and labelled new,
enlarged, stable, shrinking or resolved.

Both masks must be on one grid (the follow-up registered and resampled onto the
baseline, see :mod:`.registration`). Lesions are 26-connected components. Lesions that
overlap are matched; when lesions merge or split, every lesion of the connected group of
overlaps is compared as one (the group's volume at each timepoint), so a confluent lesion
that absorbed two old ones is "enlarged" or "stable", not "new".

Thresholds: Goodkin et al. (Arch Neurol 1992;49:261-263) measured the repeatability of
MS lesion size on MRI and found that a change below about 45 % (small lesions) to 24 %
(larger lesions) can be measurement variability. The defaults therefore call a matched
lesion enlarged or shrinking only when its volume changes by at least 50 % *and* by at
least ``min_change_mm3`` (10 mm3, about a dozen 1 mm voxels: partial-volume noise at a
lesion's border). Both are parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .postprocess import label_lesions

CATEGORIES = ("new", "enlarged", "stable", "shrinking", "resolved")


@dataclass(frozen=True)
class ChangeThresholds:
    relative_change: float = 0.5
    min_change_mm3: float = 10.0


def _groups(baseline_labels, n_baseline, followup_labels, n_followup):
    """Connected groups of the overlap graph: lists of (baseline ids, follow-up ids)."""
    both = (baseline_labels > 0) & (followup_labels > 0)
    pairs = (
        np.unique(np.stack([baseline_labels[both], followup_labels[both]]), axis=1).T
        if both.any()
        else np.zeros((0, 2), int)
    )
    parent = list(range(n_baseline + n_followup + 1))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for b, f in pairs:
        parent[find(int(b))] = find(n_baseline + int(f))
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for b in range(1, n_baseline + 1):
        groups.setdefault(find(b), ([], []))[0].append(b)
    for f in range(1, n_followup + 1):
        groups.setdefault(find(n_baseline + f), ([], []))[1].append(f)
    return list(groups.values())


def lesion_changes(
    baseline: np.ndarray,
    followup: np.ndarray,
    spacing_zyx: Sequence[float],
    thresholds: ChangeThresholds = ChangeThresholds(),
    grid=None,
) -> tuple[list[dict], dict]:
    """Per-lesion change table and summary for two boolean (z, y, x) masks on one grid.

    Returns
    -------
    rows : one per lesion group: ``change`` (one of :data:`CATEGORIES`), baseline and
        follow-up lesion ids and volumes (mm3), the volume change (mm3 and relative), and
        the centroid (physical LPS mm when ``grid`` is a SimpleITK image, else voxel index).
    summary : count per category and total lesion load at both timepoints and its change.
    """
    if baseline.shape != followup.shape:
        raise ValueError(
            f"baseline mask {baseline.shape} and follow-up mask {followup.shape} are not on one grid; register and resample first"
        )
    voxel_mm3 = float(np.prod(spacing_zyx))
    b_labels, n_b = label_lesions(baseline.astype(bool))
    f_labels, n_f = label_lesions(followup.astype(bool))
    b_sizes = np.bincount(b_labels.ravel(), minlength=n_b + 1) * voxel_mm3
    f_sizes = np.bincount(f_labels.ravel(), minlength=n_f + 1) * voxel_mm3
    rows = []
    for b_ids, f_ids in _groups(b_labels, n_b, f_labels, n_f):
        v_b, v_f = float(b_sizes[b_ids].sum()), float(f_sizes[f_ids].sum())
        delta = v_f - v_b
        relative = delta / v_b if v_b else float("inf")
        if not b_ids:
            change = "new"
        elif not f_ids:
            change = "resolved"
        elif delta >= thresholds.min_change_mm3 and relative >= thresholds.relative_change:
            change = "enlarged"
        elif -delta >= thresholds.min_change_mm3 and -relative >= thresholds.relative_change:
            change = "shrinking"
        else:
            change = "stable"
        where = np.isin(f_labels, f_ids) if f_ids else np.isin(b_labels, b_ids)
        centre = ndimage.center_of_mass(where)
        if grid is not None:
            centre = grid.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre[::-1]])
        rows.append(
            {
                "change": change,
                "baseline_ids": " ".join(map(str, b_ids)),
                "followup_ids": " ".join(map(str, f_ids)),
                "baseline_mm3": round(v_b, 3),
                "followup_mm3": round(v_f, 3),
                "change_mm3": round(delta, 3),
                "change_relative": round(relative, 4) if np.isfinite(relative) else None,
                "centroid": [round(float(c), 2) for c in centre],
            }
        )
    order = {c: i for i, c in enumerate(CATEGORIES)}
    rows.sort(key=lambda r: (order[r["change"]], -abs(r["change_mm3"])))
    load_b, load_f = float(b_sizes[1:].sum()), float(f_sizes[1:].sum())
    summary = {
        **{c: sum(r["change"] == c for r in rows) for c in CATEGORIES},
        "baseline_lesions": n_b,
        "followup_lesions": n_f,
        "baseline_load_mm3": round(load_b, 3),
        "followup_load_mm3": round(load_f, 3),
        "load_change_mm3": round(load_f - load_b, 3),
        "thresholds": {"relative_change": thresholds.relative_change, "min_change_mm3": thresholds.min_change_mm3},
    }
    return rows, summary


def write_change_files(rows: list[dict], summary: dict, folder, overwrite: bool = False) -> None:
    """``changes.csv`` and ``changes.json`` of :func:`lesion_changes` in ``folder`` (the
    centroid as one "x y z" text column, ``centroid_lps_mm``)."""
    import json
    from pathlib import Path

    from .files import atomic_write, json_ready
    from .postprocess import write_csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {k: v for k, v in r.items() if k != "centroid"}
        | {"centroid_lps_mm": " ".join(f"{c:.2f}" for c in r["centroid"])}
        for r in rows
    ]
    write_csv(
        rows,
        folder / "changes.csv",
        columns=[
            "change",
            "baseline_ids",
            "followup_ids",
            "baseline_mm3",
            "followup_mm3",
            "change_mm3",
            "change_relative",
            "centroid_lps_mm",
        ],
        overwrite=overwrite,
    )
    text = json.dumps(json_ready({"summary": summary, "lesions": rows}), indent=2)
    atomic_write(folder / "changes.json", lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)
