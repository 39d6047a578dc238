"""Base vs fine-tuned (shipped defaults: 100 iterations, the preset's weighting, the never-worse check) on real scans.

Two protocols, per case:

  cross-time   Brain-Tumor-Progression 01-03 (brain-tumor): fine-tune on the Pre scan's
               annotation, score base and patient model on the Post scan: "all-lesion" (the
               full annotation, all lesion slices) and "suggested-2" (the 2 suggested among
               the Pre scan's lesion slices, the interactive route).
  within-scan  Ljubljana MS cross 07, 19, 26 (brain-wmh) and BraTS 2015 05, 06 (brain-tumor;
               01-04 trained that base model, so they are left out): annotate a subset
               of one scan's slices, fine-tune on them, score both models on the slices
               not used: "every-other" (the even lesion slices) and "suggested-2" (the 2
               suggested among the lesion slices, the interactive route).

Dice, AVD and lesion F1 (26-connected, in 3D) of base and fine-tuned, whether the check kept
the base model, and at the end the paper's statistics over all runs (mean ± SD and paired
t-test for Dice and AVD, median [IQR] and Wilcoxon for lesion F1), the promise count and
the mean Dice gain. The case loading is that of ``eval_real_base_models.py``.
``--masks DIR`` keeps what was scored, for analysis after the run: per run
``<case>_<route>_{base,finetuned,reference}.nii.gz`` on the scan's grid, each limited to
the scored slices (within-scan: the slices not annotated). ``--pick`` changes how the
2-slice route picks its lesion slices (:data:`PICKS`: the product's suggestion by default);
every run prints the picked slices' mean lesion probability and lesion count.

``--model PRESET=FILE`` (repeatable) replaces a preset's shipped base model; given several
files for a preset (the leave-out folds of ``Resources/Models/train_anatomy.py``), each
case is fine-tuned from the one whose training scans leave it out (its metadata's
``train_cases``), so the base model never saw the scan it is scored on. A case every
candidate trained on still runs, marked ``base_in_sample`` in its row and its printout.

    python Testing/benchmarks/eval_real_finetune.py --threads 2 --json real_finetune.json
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from PatientFineTuneLib import caseload, images, inference, metrics, modelcard, modelfile  # noqa: E402
from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model, shipped_config  # noqa: E402
from PatientFineTuneLib.finetune.head import toward_base  # noqa: E402
from PatientFineTuneLib.suggest import suggest_slices  # noqa: E402

from eval_real_base_models import DATA, ground_truth, real_cases  # noqa: E402


def load(spec: dict, bundle) -> images.Case:
    options = caseload.ScanOptions(lesion_labels=tuple(spec["labels"]) if spec["labels"] else None)
    return caseload.load_for_model(
        bundle.sequences,
        [str(p) for p in spec["sequences"]],
        spec["organ"],
        str(spec["lesions"]),
        auto_organ=bundle.auto_organ_mask,
        options=options,
        name=spec["case"],
    ).case


def scores(
    bundle,
    case: images.Case,
    gt_stored: np.ndarray,
    spacing_zyx,
    keep_slices: np.ndarray | None = None,
    save_as: Path | None = None,
) -> dict:
    """Dice, AVD and lesion F1 of ``bundle`` on ``case`` (only the slices in ``keep_slices``);
    the scored mask is written to ``save_as`` when given."""
    pred = inference.predict_mask(bundle, case, device="cpu")
    if save_as is not None:
        write_scored(case, pred, keep_slices, save_as)
    return mask_scores(pred, case, gt_stored, spacing_zyx, keep_slices)


def write_scored(case: images.Case, slices: np.ndarray, keep_slices: np.ndarray | None, path: Path) -> None:
    """The (slices, rows, cols) mask ``slices``, limited to ``keep_slices``, on the case's grid."""
    if keep_slices is not None:
        slices = slices & keep_slices[:, None, None]
    images.write_image(case.to_image(slices.astype(np.uint8)), path, overwrite=True)


def mask_scores(
    pred: np.ndarray, case: images.Case, gt_stored: np.ndarray, spacing_zyx, keep_slices: np.ndarray | None = None
) -> dict:
    """Dice, AVD and lesion F1 of the (slices, rows, cols) mask ``pred`` of ``case``."""
    gt = case.layout.to_slices(gt_stored)
    if keep_slices is not None:
        pred, gt = pred & keep_slices[:, None, None], gt & keep_slices[:, None, None]
    m = metrics.evaluate_case(case.layout.from_slices(pred), case.layout.from_slices(gt), spacing_zyx)
    return {"dice": float(m["dice"]), "avd_percent": float(m["avd_percent"]), "lesion_f1": float(m["lesion_f1"])}


#: FinetuneConfig settings on top of the shipped defaults (``--set name=value``).
OVERRIDES: dict = {}


#: ``--anchors K``: K evenly spaced unannotated organ slices join the annotated ones,
#: labelled with the base model's own mask (the fine-tuned head is held to the base
#: model's answer there; an experiment, not the product's route).
ANCHORS = {"k": 0}


def with_anchors(base, case: images.Case, slices):
    """``case`` and ``slices`` with :data:`ANCHORS` anchor slices added (a new case; the
    caller's is left as it is); unchanged for 0 anchors or a named selection."""
    if ANCHORS["k"] == 0 or isinstance(slices, str):
        return case, slices
    annotated = set(slices)
    free = [int(s) for s in np.flatnonzero(case.organ.any(axis=(1, 2))) if s not in annotated]
    spaced = np.linspace(0, len(free) - 1, ANCHORS["k"] + 2)[1:-1].round().astype(int)
    anchors = [free[i] for i in spaced]
    own = inference.predict_mask(base, case, device="cpu")
    lesions = case.lesions.copy()
    lesions[anchors] = own[anchors]
    print(f"    anchors {anchors}: base-model lesion pixels {[int(own[a].sum()) for a in anchors]}", flush=True)
    return dataclasses.replace(case, lesions=lesions), list(slices) + anchors


#: ``--blend A``: the fine-tuned weights moved back towards the base model's,
#: ``base + A * (fine-tuned - base)`` (a weight-space ensemble, as in Wortsman et al.
#: 2022's WiSE-FT; an experiment, not the product's route). 1: the fine-tuned model.
BLEND = {"a": 1.0}


def blended(base, patient):
    """``patient`` with its floating-point weights and statistics at :data:`BLEND` of the
    way from the base model's (in place; the base model is left as it is)."""
    if BLEND["a"] != 1.0:
        patient.model.load_state_dict(toward_base(base, patient.model.state_dict(), BLEND["a"]))
    return patient


def finetune(base, case, slices):
    case, slices = with_anchors(base, case, slices)
    config = shipped_config(base, **OVERRIDES)
    patient = blended(base, finetune_patient_model(base, case, slices, config, device="cpu", allow_empty=True))
    # with the check off (--set holdout_check=False) the fine-tuned model is always kept
    return patient, patient.metadata["finetune"].get("holdout_check", {"kept": True, "skipped": "the check is off"})


#: The within-scan routes: every other lesion slice annotated, or the 2 suggested ones.
WITHIN_SCAN_ROUTES = ("every-other", "suggested-2")
#: The cross-time routes: the whole Pre annotation, or its 2 suggested lesion slices.
CROSS_TIME_ROUTES = ("all-lesion", "suggested-2")
ROUTES = ("all-lesion", "every-other", "suggested-2")


@dataclasses.dataclass(frozen=True)
class BaseModels:
    """A preset's candidate base-model files; :meth:`for_cases` picks the one that never
    trained on the scans a run scores."""

    files: tuple[Path, ...]

    def for_cases(self, *cases: str):
        """The base model for a run on ``cases`` (folder names such as ``02_Post``), loaded,
        and whether it trained on one of them (only where every candidate did)."""
        for path in self.files:  # the metadata alone says which scans a file trained on
            trained = modelcard.read_model_metadata(path).get("training", {}).get("train_cases", [])
            if not {c.rsplit("/", 1)[-1] for c in trained} & set(cases):
                return modelfile.load_model(path), False
        return modelfile.load_model(self.files[0]), True


def cross_time(
    bases: BaseModels, specs: dict, routes: tuple[str, ...] = CROSS_TIME_ROUTES, masks: Path | None = None
) -> list[dict]:
    rows = []
    for n, route in [(n, route) for n in ("01", "02", "03") for route in routes]:
        pre, post = specs[f"{n}_Pre"], specs[f"{n}_Post"]
        base, in_sample = bases.for_cases(f"{n}_Pre", f"{n}_Post")
        baseline = load(pre, base)
        chosen = "all-lesion" if route == "all-lesion" else annotated_slices(route, baseline, base)
        start = time.perf_counter()
        patient, check = finetune(base, baseline, chosen)
        follow = load(post, base)
        gt, spacing = ground_truth(post)
        saved = kept_masks(masks, n, route, follow, gt)
        row = {
            "protocol": "cross-time",
            "case": n,
            "route": route,
            "base_model": base.metadata.get("sha256", "")[:8],
            "base_in_sample": in_sample,
            "base": scores(base, follow, gt, spacing, save_as=saved["base"]),
            "finetuned": scores(patient, follow, gt, spacing, save_as=saved["finetuned"]),
            "kept": check["kept"],
            "check": check,
            "seconds": round(time.perf_counter() - start, 1),
            "hard_negative_slices": patient.metadata["finetune"].get("hard_negative_slices", []),
        }
        rows.append(row)
        report(row)
    return rows


#: Single-visit real scans of the within-scan protocol, per shipped model (BraTS 01-04
#: trained the brain-tumor model).
WITHIN_SCAN = {
    "brain-wmh": ("patient07", "patient19", "patient26"),
    "brain-tumor": ("brats_2013_pat0005_1", "brats_2013_pat0006_1"),
}


#: How the 2-slice route picks its slices among the lesion slices (``--pick``):
#: "suggested" (the product's suggestion: the mean lesion probability nearest 0.5, the
#: paper's rule), "entropy" (the most uncertain), "largest" (the most annotated lesion),
#: "worst" (where the base model errs most: needs the whole annotation, an oracle).
PICKS = ("suggested", "entropy", "largest", "worst")
PICK = {"rule": "suggested"}


def annotated_slices(route: str, case: images.Case, base) -> list[int]:
    """The slices a run annotates: every other lesion slice, or 2 lesion slices picked by
    :data:`PICK`; the picked slices' facts are printed."""
    if route == "every-other":
        return case.lesion_slices()[::2]
    rule = PICK["rule"]
    probability = inference.predict_probability(base, case, device="cpu")
    if rule in ("suggested", "entropy"):
        ranking = "softmax" if rule == "suggested" else "entropy"
        ranked = suggest_slices(base, case, k=2, candidates="lesion", ranking=ranking, probability=probability)
        chosen = [s.index for s in ranked]
    else:
        lesion_slices = np.array(case.lesion_slices())
        if rule == "largest":
            amount = case.lesions[lesion_slices].sum(axis=(1, 2))
        else:
            errors = (probability[lesion_slices] >= 0.5) != case.lesions[lesion_slices].astype(bool)
            amount = (errors & case.organ[lesion_slices]).sum(axis=(1, 2))
        chosen = sorted(int(s) for s in lesion_slices[np.argsort(-amount, kind="stable")[:2]])
    for s in chosen:
        lesions = int(ndimage.label(case.lesions[s] > 0)[1])
        print(
            f"    picked ({rule}) slice {s}: mean lesion probability {probability[s][case.organ[s]].mean():.3f}, "
            f"{lesions} lesion(s), {int((case.lesions[s] > 0).sum())} lesion pixels",
            flush=True,
        )
    return chosen


def within_scan(
    bases: BaseModels,
    specs: dict,
    names: tuple[str, ...],
    routes: tuple[str, ...] = WITHIN_SCAN_ROUTES,
    masks: Path | None = None,
) -> list[dict]:
    rows = []
    for name in names:
        spec = specs[name]
        base, in_sample = bases.for_cases(name)
        case = load(spec, base)
        gt, spacing = ground_truth(spec)
        for route in routes:
            chosen = annotated_slices(route, case, base)
            start = time.perf_counter()
            keep = np.ones(case.organ.shape[0], bool)
            keep[list(chosen)] = False  # score only on the slices not annotated for fine-tuning
            patient, check = finetune(base, case, list(chosen))
            saved = kept_masks(masks, name, route, case, gt, keep)
            row = {
                "protocol": "within-scan",
                "case": name,
                "route": route,
                "base_model": base.metadata.get("sha256", "")[:8],
                "base_in_sample": in_sample,
                "slices": len(chosen),
                "base": scores(base, case, gt, spacing, keep, saved["base"]),
                "finetuned": scores(patient, case, gt, spacing, keep, saved["finetuned"]),
                "kept": check["kept"],
                "check": check,
                "seconds": round(time.perf_counter() - start, 1),
            }
            rows.append(row)
            report(row)
    return rows


def kept_masks(
    folder: Path | None,
    name: str,
    route: str,
    case: images.Case,
    gt_stored: np.ndarray,
    keep_slices: np.ndarray | None = None,
) -> dict:
    """Where ``--masks`` keeps one run's base and fine-tuned masks (None: not kept); the
    scored reference is written there now."""
    paths = {
        kind: None if folder is None else folder / f"{name}_{route}_{kind}.nii.gz"
        for kind in ("base", "finetuned", "reference")
    }
    if folder is not None:
        write_scored(case, case.layout.to_slices(gt_stored), keep_slices, paths["reference"])
    return paths


def report(row: dict) -> None:
    b, f = row["base"], row["finetuned"]
    print(
        f"{row['protocol']:<12} {row['case']:<10} {row['route']:<12} Dice {b['dice']:.3f} -> {f['dice']:.3f}  "
        f"lesion F1 {b['lesion_f1']:.3f} -> {f['lesion_f1']:.3f}  "
        f"{'fine-tuned kept' if row['kept'] else 'BASE kept'}  {row['seconds']:.0f} s  "
        f"base {row['base_model']}{' (trained on this scan)' if row['base_in_sample'] else ''}",
        flush=True,
    )
    check = row["check"]
    for k, (b_fold, f_fold) in enumerate(zip(check.get("per_fold_base", []), check.get("per_fold_finetuned", []))):
        print(
            f"    check, fold {k + 1} ({check['iterations']} iterations): held-out Dice {f_fold['dice']:.3f} vs base {b_fold['dice']:.3f}, "
            f"F1 {f_fold['lesion_f1']:.3f} vs {b_fold['lesion_f1']:.3f}",
            flush=True,
        )
    for c in row["check"].get("compared") or []:
        print(
            f"    check, {c['iterations']} iterations: held-out Dice {c['dice']:.3f} vs base {row['check']['dice_base']:.3f}, "
            f"F1 {c['lesion_f1']:.3f} vs {row['check']['lesion_f1_base']:.3f}"
            f"{'' if c['passes'] else ' (fails: too narrow a win where the asked count failed)' if c.get('beats_base') else ' (fails)'}"
            f"{'  <- chosen' if c['iterations'] == row['check']['iterations'] and row['kept'] else ''}",
            flush=True,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a FinetuneConfig setting to change, e.g. head_norm=frozen or iterations=200 (repeatable)",
    )
    parser.add_argument(
        "--protocols", nargs="+", choices=["cross-time", "within-scan"], default=["cross-time", "within-scan"]
    )
    parser.add_argument(
        "--routes",
        nargs="+",
        choices=ROUTES,
        default=list(ROUTES),
        help="the routes to run (default: all; all-lesion is cross-time only, every-other within-scan only)",
    )
    parser.add_argument(
        "--masks", type=Path, help="folder for each run's scored base, fine-tuned and reference masks (NIfTI)"
    )
    parser.add_argument(
        "--pick",
        choices=PICKS,
        default="suggested",
        help="how the 2-slice route picks its lesion slices (default: the product's suggestion)",
    )
    parser.add_argument(
        "--anchors",
        type=int,
        default=0,
        metavar="K",
        help="experiment: add K unannotated organ slices labelled with the base model's own mask",
    )
    parser.add_argument(
        "--blend",
        type=float,
        default=1.0,
        metavar="A",
        help="experiment: the fine-tuned weights at A of the way from the base model's (after the check)",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PRESET=FILE",
        help="a base model instead of the preset's shipped one (repeatable: several files for a preset are "
        "leave-out folds, each case runs from the one that never trained on it)",
    )
    args = parser.parse_args(argv)
    files: dict[str, list[Path]] = {}
    for item in args.model:
        preset, _, file = item.partition("=")
        if preset not in WITHIN_SCAN or not Path(file).is_file():
            parser.error(
                f"--model {item}: give PRESET=FILE with PRESET one of {sorted(WITHIN_SCAN)} and an existing file"
            )
        files.setdefault(preset, []).append(Path(file))
    bases = {
        preset: BaseModels(tuple(files.get(preset, [modelcard.resolve_model_path(preset)]))) for preset in WITHIN_SCAN
    }
    PICK["rule"] = args.pick
    BLEND["a"] = args.blend
    ANCHORS["k"] = args.anchors
    for item in args.set:
        name, value = item.split("=", 1)
        default = getattr(FinetuneConfig(), name)
        literal = default is None or isinstance(default, (bool, tuple))  # e.g. weighting='segmentation' (default None)
        OVERRIDES[name] = ast.literal_eval(value) if literal else type(default)(value)
    print(f"fine-tuning settings changed from the shipped defaults: {OVERRIDES or 'none'}")
    if not args.data.is_dir():
        print(f"no real data at {args.data}; nothing to do")
        return 0
    torch.set_num_threads(args.threads)
    specs = {s["case"]: s for s in real_cases(args.data)}
    if args.masks is not None:
        args.masks.mkdir(parents=True, exist_ok=True)
    rows = []
    if "cross-time" in args.protocols:
        routes = tuple(r for r in CROSS_TIME_ROUTES if r in args.routes)
        rows += cross_time(bases["brain-tumor"], specs, routes, args.masks)
    if "within-scan" in args.protocols:
        for model, names in WITHIN_SCAN.items():
            routes = tuple(r for r in WITHIN_SCAN_ROUTES if r in args.routes)
            rows += within_scan(bases[model], specs, names, routes, args.masks)
    summarise(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def summarise(rows: list[dict]) -> None:
    """The paper's statistics over the runs, the promise and the mean Dice gain."""
    print(f"\nover {len(rows)} runs, base vs fine-tuned:")
    for metric, fmt, test in (
        ("dice", metrics.format_mean_sd, "ttest"),
        ("avd_percent", metrics.format_mean_sd, "ttest"),
        ("lesion_f1", metrics.format_median_iqr, "wilcoxon"),
    ):
        a, b = [r["base"][metric] for r in rows], [r["finetuned"][metric] for r in rows]
        t = metrics.paired_test(b, a, test)
        print(f"  {metric:<12} {fmt(a, 3)} -> {fmt(b, 3)}   {test} p = {t['p']:.3g}")
    promise = [
        r
        for r in rows
        if r["finetuned"]["dice"] >= r["base"]["dice"] and r["finetuned"]["lesion_f1"] >= r["base"]["lesion_f1"] - 0.02
    ]
    room = [r for r in rows if r["base"]["dice"] < 0.85]
    gain = np.mean([r["finetuned"]["dice"] - r["base"]["dice"] for r in room]) if room else float("nan")
    print(
        f"  promise (Dice not lower, lesion F1 not lower by > 0.02) held in {len(promise)} of {len(rows)}; "
        f"mean Dice gain {gain:+.3f} over the {len(room)} runs with base Dice < 0.85; base model kept in {sum(not r['kept'] for r in rows)}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
