"""Shipped base models on the real MRI cases that have expert lesion masks.

Segments every real case with a full ground-truth lesion mask using the shipped base
model of its preset, through the library API (``load_case`` + ``prepare_case`` +
``segment_case`` on the CPU), and scores the prediction against the mask read directly
from its file in stored (z, y, x) order with ``metrics.evaluate_case``:

  ljubljana_ms_cross       brain-wmh    patients 07, 19, 26: FLAIR + T1, lesions.nii.gz,
                                        automatic brain mask (the data has none)
  brats2015_subset         brain-tumor  6 cases: T1c, brainmask.nii.gz as organ, lesion =
                                        OTMultiClass labels 1 + 4 (necrosis + enhancing)
  brain_tumor_progression  brain-tumor  01-03 Pre and Post: *_Scan_T1 (T1c, skull on),
                                        *_Mask, automatic brain mask

Prints one row per case (Dice, AVD %, lesion F1 / recall / precision, the false-positive
lesions at the brain's edge and inside it, wall time) and the mean of each set; ``--json`` also writes the rows. Works with the current library and
with older versions whose ``Case`` has no ``layout`` (``PYTHONPATH`` pointing at an old
checkout), so the two can be compared:

    python Testing/benchmarks/eval_real_base_models.py --json /tmp/real_new.json

``--model PRESET=FILE`` scores another model of a preset (e.g. a candidate base model
before it is shipped). ``--first-sequence-only`` reads only the first sequence and gives
the model the others as absent (``images.with_absent_sequences``, as ``segment`` does for
a model trained with sequence dropout): the FLAIR-only MS follow-up. ``--thick N``
turns every N consecutive slices into one thick slice (their mean; the masks where at
least half the slab is inside) before segmenting and scores against the thick lesion
mask: the 1-mm Ljubljana scans as the 5-mm 2D FLAIR a routine MS follow-up often is.

A false-positive lesion (one that touches no true lesion) is "at the brain's edge" when
most of it lies within 5 mm of the brain mask's surface or outside the mask: there lie the
dura and the venous sinuses, which enhance on T1c; the others ("inside") are deep vessels,
choroid plexus, grey matter. ``--figure FILE.png`` draws, for each case, the slice with the
most false-positive voxels with the true lesions and both kinds outlined.

The ljubljana_ms_longitudinal set is left out: its ``gt.nii.gz`` is a lesion change
mask, not a full lesion mask. The brain_tumor_progression header spacing (1 mm) is not
the true spacing (see the data README); Dice, AVD and the lesion-wise rates do not
depend on it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import PatientFineTuneLib
from PatientFineTuneLib import images, inference, metrics, modelcard, modelfile

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
COLUMNS = ["dice", "avd_percent", "lesion_f1", "lesion_recall", "lesion_precision", "fp_edge", "fp_inside", "seconds"]
#: A false-positive lesion lies "at the brain's edge" when most of it is within this many mm
#: of the brain mask's surface: where the dura and the venous sinuses are.
EDGE_MM = 5.0


def real_cases(data: Path) -> list[dict]:
    """The real cases with full lesion masks.

    Returns
    -------
    list of dict with set, case, preset, sequences, organ, lesions, labels.
    """
    cases = []
    for n in ("07", "19", "26"):
        folder = data / "ljubljana_ms_cross" / f"patient{n}"
        cases.append(
            {
                "set": "ljubljana_ms_cross",
                "case": f"patient{n}",
                "preset": "brain-wmh",
                "sequences": [folder / "FLAIR.nii.gz", folder / "T1.nii.gz"],
                "organ": None,
                "lesions": folder / "lesions.nii.gz",
                "labels": None,
            }
        )
    for folder in sorted((data / "brats2015_subset").glob("brats_*")):
        cases.append(
            {
                "set": "brats2015_subset",
                "case": folder.name,
                "preset": "brain-tumor",
                "sequences": [folder / "T1c_subtrMeanDivStd.nii.gz"],
                "organ": folder / "brainmask.nii.gz",
                "lesions": folder / "OTMultiClass.nii.gz",
                "labels": [1, 4],
            }
        )
    for n in ("01", "02", "03"):
        folder = data / "brain_tumor_progression" / n
        for when in ("Pre", "Post"):
            cases.append(
                {
                    "set": "brain_tumor_progression",
                    "case": f"{n}_{when}",
                    "preset": "brain-tumor",
                    "sequences": [folder / f"{when}_Scan_T1.nii.gz"],
                    "organ": None,
                    "lesions": folder / f"{when}_Mask.nii.gz",
                    "labels": None,
                }
            )
    return cases


def needs_resample(spec: dict) -> bool:
    """Whether any sequence or mask of a case is off the first sequence's grid."""
    readers = []
    for path in [*spec["sequences"], spec["organ"], spec["lesions"]]:
        if path is not None:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            readers.append(reader)
    first = readers[0]
    for r in readers[1:]:
        if (
            r.GetSize()[:3] != first.GetSize()[:3]
            or not np.allclose(r.GetSpacing()[:3], first.GetSpacing()[:3], atol=1e-4)
            or not np.allclose(r.GetOrigin()[:3], first.GetOrigin()[:3], atol=1e-3)
            or not np.allclose(r.GetDirection()[:9], first.GetDirection()[:9], atol=1e-4)
        ):
            return True
    return False


def to_stored(case, slices: np.ndarray) -> np.ndarray:
    """A slice-first array back in the stored (z, y, x) order, for new and old ``Case``."""
    if hasattr(case, "layout"):
        return case.layout.from_slices(slices)
    return images.from_slices(slices, case.axis)


def ground_truth(spec: dict, grid: sitk.Image | None = None) -> tuple[np.ndarray, tuple[float, ...]]:
    """The lesion mask as stored (z, y, x) and its (z, y, x) spacing, read with SimpleITK
    (resampled onto ``grid`` first when given)."""
    image = sitk.ReadImage(str(spec["lesions"]))
    if grid is not None:
        image = images.resample_onto(image, grid, label=True)
    arr = sitk.GetArrayFromImage(image)
    gt = np.isin(arr, spec["labels"]) if spec["labels"] else arr > 0
    return gt, tuple(image.GetSpacing()[::-1])


def thicken(case, factor: int):
    """``case`` with every ``factor`` consecutive slices averaged into one slice of
    ``factor`` times the thickness, on a grid whose slice positions are the slabs' centres."""
    import dataclasses

    n = case.images.shape[1] // factor
    if n < 1:
        raise ValueError(f"{case.name}: {case.images.shape[1]} slices cannot make slabs of {factor}")

    def slabs(a):
        return (
            a[..., : n * factor, :, :].reshape(*a.shape[:-3], n, factor, *a.shape[-2:]).astype(np.float32).mean(axis=-3)
        )

    axis = case.layout.axis
    size, spacing = list(case.grid.GetSize()), list(case.grid.GetSpacing())
    direction = np.array(case.grid.GetDirection()).reshape(3, 3)
    origin = np.array(case.grid.GetOrigin()) + direction[:, axis] * spacing[axis] * (factor - 1) / 2
    size[axis], spacing[axis] = n, spacing[axis] * factor
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(case.grid.GetDirection())
    grid.SetOrigin(tuple(origin))
    return dataclasses.replace(
        case, images=slabs(case.images), organ=slabs(case.organ) >= 0.5, lesions=slabs(case.lesions) >= 0.5, grid=grid
    )


def load_real_case(spec: dict, channels, scan_options: dict | None = None) -> tuple:
    """One real case of :func:`real_cases`, loaded and normalised for a model whose
    sequences have ``channels``; returns (case, whether it had to be resampled)."""
    resample = needs_resample(spec)
    case = images.load_case(
        [str(p) for p in spec["sequences"]],
        organ_path=None if spec["organ"] is None else str(spec["organ"]),
        lesion_path=str(spec["lesions"]),
        expected_channels=list(channels),
        resample_to_first=resample,
        lesion_labels=spec["labels"],
        name=f"{spec['set']}/{spec['case']}",
        **(scan_options or {}),
    )
    return images.prepare_case(case), resample


def evaluate(
    spec: dict,
    bundle,
    scan_options: dict | None = None,
    first_sequence_only: bool = False,
    thick: int = 1,
    panel: dict | None = None,
) -> dict:
    """Segment one case with ``bundle`` and score it against its ground truth (and fill
    ``panel``, when given, with the slice of :func:`false_positive_figure`).

    Returns
    -------
    dict : the case's identity, ``evaluate_case``'s metrics and the wall time (s).
    """
    start = time.perf_counter()
    channels = [s["channels"] for s in bundle.sequences]
    if first_sequence_only:  # loaded as a scan of the first sequence alone is, then as the model sees it
        spec = {**spec, "sequences": spec["sequences"][:1]}
        case, resample = load_real_case(spec, channels[:1], scan_options)
        case = images.with_absent_sequences(case, sum(channels))
    else:
        case, resample = load_real_case(spec, channels, scan_options)
    if thick > 1:
        case = thicken(case, thick)
    seg = inference.segment_case(bundle, case, device="cpu")
    pred = to_stored(case, seg.mask).astype(bool)
    if thick > 1:
        gt, spacing_zyx = to_stored(case, case.lesions), tuple(case.grid.GetSpacing()[::-1])
    else:
        gt, spacing_zyx = ground_truth(spec, case.grid if resample else None)
    scores = metrics.evaluate_case(pred, gt, spacing_zyx)
    # where the false positives lie, on the slice-first arrays (radiological order, for the
    # figure); an old library's Case has no layout to give their spacing
    sites = (
        false_positive_sites(seg.mask.astype(bool), case.lesions.astype(bool), case.organ, case.volume_spacing)
        if hasattr(case, "layout")
        else {"fp_edge": math.nan, "fp_inside": math.nan}
    )
    scores.update(fp_edge=sites["fp_edge"], fp_inside=sites["fp_inside"])
    row = {k: spec[k] for k in ("set", "case", "preset")}
    row.update({k: float(v) if isinstance(v, (float, np.floating)) else int(v) for k, v in scores.items()})
    row["resampled"] = resample
    row["seconds"] = time.perf_counter() - start
    if panel is not None and "edge" in sites:
        s = int(np.argmax((sites["edge"] | sites["inside"]).sum(axis=(1, 2))))
        panel.update(
            image=case.images[0, s],
            truth=case.lesions[s],
            edge=sites["edge"][s],
            inside=sites["inside"][s],
            title=f"{spec['case']}, slice {s}\n{sites['fp_edge']} at the edge, {sites['fp_inside']} inside",
        )
    return row


def false_positive_sites(pred: np.ndarray, truth: np.ndarray, organ: np.ndarray, spacing) -> dict:
    """The predicted lesions that touch no true lesion, split by where they lie: at the
    brain's edge (most voxels within ``EDGE_MM`` of the brain mask's surface: dura, venous
    sinuses, cortical veins on the surface) or inside (deep vessels, choroid plexus, grey
    matter). Arrays on one grid, ``spacing`` its (axis 0, 1, 2) spacing in mm.

    Returns
    -------
    dict with ``fp_edge`` and ``fp_inside`` (counts) and the masks ``edge`` and ``inside``.
    """
    from scipy import ndimage

    from PatientFineTuneLib.postprocess import label_lesions

    depth = ndimage.distance_transform_edt(organ, sampling=spacing)
    near_edge = organ & (depth <= EDGE_MM) | ~organ
    labels, n = label_lesions(pred)
    hit = np.unique(labels[truth & (labels > 0)])
    false = np.setdiff1d(np.arange(1, n + 1), hit)
    share = ndimage.mean(near_edge, labels, false) if false.size else np.zeros(0)
    edge_ids, inside_ids = false[share > 0.5], false[share <= 0.5]
    return {
        "fp_edge": int(edge_ids.size),
        "fp_inside": int(inside_ids.size),
        "edge": np.isin(labels, edge_ids),
        "inside": np.isin(labels, inside_ids),
    }


def false_positive_figure(panels: list[dict], path: Path, columns: int = 6) -> None:
    """One panel per case: the slice with the most false-positive voxels, the true lesions
    and the false positives at the brain's edge and inside outlined."""
    from PatientFineTuneLib import plots

    for start in range(0, len(panels), columns):
        row = panels[start : start + columns]
        figure = plots.outline_figure(
            [p["image"] for p in row],
            {
                "truth": [p["truth"] for p in row],
                "false positive, brain edge": [p["edge"] for p in row],
                "false positive, inside": [p["inside"] for p in row],
            },
            [p["title"] for p in row],
        )
        target = path if len(panels) <= columns else path.with_name(f"{path.stem}-{start // columns + 1}{path.suffix}")
        figure.savefig(target, dpi=100)
        print(f"wrote {target}")


def fmt(value: float) -> str:
    return (
        "nan"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.3f}"
        if abs(value) < 10
        else f"{value:.1f}"
    )


def print_row(row: dict) -> None:
    print(
        f"{row['set']:<24} {row['case']:<22} {row['preset']:<12} " + " ".join(f"{fmt(row[k]):>9}" for k in COLUMNS),
        flush=True,
    )


def print_means(rows: list[dict]) -> None:
    """One line per set with the mean of each column (NaN-aware)."""
    print("-" * 120)
    for name in dict.fromkeys(r["set"] for r in rows):
        subset = [r for r in rows if r["set"] == name]
        means = {
            k: float(np.nanmean([r[k] for r in subset])) if any(not math.isnan(r[k]) for r in subset) else math.nan
            for k in COLUMNS
        }
        print_row({"set": name, "case": f"mean of {len(subset)}", "preset": subset[0]["preset"], **means})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared real-data folder (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--sets", help="comma-separated sets to run (default: all)")
    parser.add_argument(
        "--cases",
        help="comma-separated cases to run (default: all of the sets), e.g. a leave-out fold's held-out scans: "
        "patient07, or brats_2013_pat0005_1,03 where 03 is both visits of that patient",
    )
    parser.add_argument(
        "--skull-stripped", choices=("auto", "yes", "no"), help="load_case's skull_stripped (default: the library's)"
    )
    parser.add_argument(
        "--bias-correction", choices=("auto", "on", "off"), help="load_case's bias_correction (default: the library's)"
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PRESET=FILE",
        help="score FILE instead of PRESET's shipped model (repeatable)",
    )
    parser.add_argument(
        "--first-sequence-only",
        action="store_true",
        help="blank every sequence after the first (FLAIR-only for brain-wmh)",
    )
    parser.add_argument(
        "--thick", type=int, default=1, metavar="N", help="average every N slices into one thick slice first"
    )
    parser.add_argument(
        "--figure",
        type=Path,
        help="also draw each case's slice with the most false-positive voxels into this PNG (6 cases a file)",
    )
    args = parser.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    if not args.data.is_dir():
        print(f"no real data at {args.data}; nothing to do")
        return 0
    torch.set_num_threads(args.threads)
    print(f"PatientFineTuneLib from {Path(PatientFineTuneLib.__file__).parent}")
    print(
        f"{'set':<24} {'case':<22} {'preset':<12} "
        + " ".join(
            f"{c[:9]:>9}" for c in ["Dice", "AVD %", "les F1", "les rec", "les prec", "FP edge", "FP inside", "seconds"]
        )
    )
    bundles, rows, panels = {}, [], []
    scan_options = {
        k: v for k, v in (("skull_stripped", args.skull_stripped), ("bias_correction", args.bias_correction)) if v
    }
    for spec in real_cases(args.data):
        if args.sets and spec["set"] not in args.sets.split(","):
            continue
        if args.cases and not any(
            spec["case"] == name or spec["case"].startswith(name + "_") for name in args.cases.split(",")
        ):
            continue
        try:
            if spec["preset"] not in bundles:
                bundles[spec["preset"]] = modelfile.load_model(
                    modelcard.resolve_model_path(models.get(spec["preset"], spec["preset"]))
                )
            panel = {} if args.figure else None
            row = evaluate(spec, bundles[spec["preset"]], scan_options, args.first_sequence_only, args.thick, panel)
            if panel:
                panels.append(panel)
        except Exception as error:  # noqa: BLE001 - report and go on to the next case
            print(
                f"{spec['set']:<24} {spec['case']:<22} {spec['preset']:<12} FAILED: {type(error).__name__}: {error}",
                flush=True,
            )
            continue
        rows.append(row)
        print_row(row)
    if rows:
        print_means(rows)
    if panels:
        false_positive_figure(panels, args.figure)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
