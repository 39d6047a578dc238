"""The verbs that compare, measure and report: ``compare`` (what changed between two
visits), ``evaluate`` (metrics against a reference), ``experiment`` (the paper's experiments
on a cohort) and ``report`` (one HTML report for a patient)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..files import check_output_file, check_output_folder, json_ready, refuse_existing, refuse_inputs_as_outputs
from ..modelcard import resolve_model_path
from .common import add_verb, count_at_least, mc_sample_count, report_result


def register(sub) -> None:
    p = add_verb(
        sub,
        "compare",
        cmd_compare,
        "What changed between baseline and follow-up: new, enlarged, stable, shrinking and resolved lesions.",
    )
    p.add_argument("--baseline-lesions", required=True, help="baseline lesion mask (any label > 0)")
    p.add_argument("--followup-lesions", required=True, help="follow-up lesion mask")
    p.add_argument("--baseline-image", help="baseline image (e.g. FLAIR) to register the follow-up onto")
    p.add_argument("--followup-image", help="follow-up image of the same sequence")
    p.add_argument(
        "--baseline-organ",
        help="organ mask on the baseline grid: registration looks only inside it; 'brain' for head "
        "scans: the automatic brain mask (deepbet on skull-on scans, which are also bias-corrected first)",
    )
    p.add_argument("--bspline", action="store_true", help="add a B-spline stage after rigid and affine")
    p.add_argument(
        "--relative-change",
        type=float,
        default=0.5,
        help="enlarged/shrinking: relative volume change at least this (default 0.5)",
    )
    p.add_argument(
        "--min-change-mm3", type=float, default=10.0, help="... and an absolute change at least this (default 10 mm3)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the registration's metric sampling")
    p.add_argument(
        "--out", required=True, help="output folder: changes.csv, changes.json, followup_lesions_on_baseline.nii.gz"
    )
    p.add_argument("--overwrite", action="store_true")
    p = add_verb(
        sub,
        "experiment",
        cmd_experiment,
        "The paper's experiments on a cohort: base vs fine-tuned follow-ups along each axis, with references.",
    )
    p.add_argument("--model", required=True, help="base model file, or a preset name for its shipped base model")
    p.add_argument(
        "--cohort",
        required=True,
        help="cohort CSV (patient, visit, sequences, lesions[, organ]), or a folder of patient/{baseline,followup}",
    )
    p.add_argument("--out", required=True, help="output folder: results.csv (resumable), summary.md")
    p.add_argument("--arms", help="comma-separated subset of the arms (default: all)")
    p.add_argument(
        "--iterations-axis",
        type=count_at_least(1),
        nargs="+",
        default=[50, 100, 500, 1000],
        help="fine-tuning iterations compared (default 50 100 500 1000)",
    )
    p.add_argument(
        "--default-iterations",
        type=count_at_least(1),
        default=100,
        help="iterations of the slice, weighting and naive arms (paper: 100)",
    )
    p.add_argument(
        "--mc-samples",
        type=mc_sample_count,
        default=0,
        help="MC-dropout samples for the uncertainty numbers (0 = off; else at least 2)",
    )
    p.add_argument(
        "--mc-arms", help="comma-separated arms that get the MC samples (default: base and ft-iter<default-iterations>)"
    )
    p.add_argument("--workers", type=count_at_least(1), default=1, help="patients run in parallel processes")
    p.add_argument("--seed", type=int, default=0)
    p = add_verb(
        sub, "evaluate", cmd_evaluate, "Dice, AVD, HD95 and lesion-wise metrics of predictions against ground truth."
    )
    p.add_argument("--pred", help="predicted label image")
    p.add_argument("--gt", help="ground-truth label image")
    p.add_argument("--pairs", help="CSV with columns case,pred,gt (paths relative to the CSV)")
    p.add_argument("--out", help="write per-case metrics CSV here")
    p.add_argument("--compare-to", help="per-case metrics CSV of another method (from --out): paired tests by case")
    p.add_argument("--overwrite", action="store_true")
    p = add_verb(
        sub,
        "report",
        cmd_report,
        "One self-contained HTML report for a patient from the outputs of segment, compare and finetune.",
    )
    p.add_argument(
        "--followup-image",
        required=True,
        help="the follow-up image the results are on (e.g. its FLAIR), for the figures",
    )
    p.add_argument(
        "--results",
        nargs="+",
        required=True,
        metavar="LABEL=FOLDER",
        help="segment output folders, e.g. base=seg/ fine-tuned=seg-ft/",
    )
    p.add_argument("--model", help="the patient model file (provenance and the never-worse check's outcome)")
    p.add_argument("--changes", help="a compare output folder (change table, lesion load over time)")
    p.add_argument("--suggestions", help="suggestions.json of the baseline (segment --suggest)")
    p.add_argument("--truth", help="a reference lesion mask on the follow-up grid, drawn beside the results")
    p.add_argument("--title", default="Patient report")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--overwrite", action="store_true")


def cmd_compare(args) -> None:
    import numpy as np
    import SimpleITK as sitk

    from ..change import ChangeThresholds, lesion_changes, write_change_files
    from ..files import output_set
    from ..images import GeometryError, grid_mismatch, read_image, write_image
    from ..registration import register_followup, resample_mask

    out = check_output_folder(args.out)
    targets = [out / n for n in ("changes.csv", "changes.json", "followup_lesions_on_baseline.nii.gz")]
    organ_file = args.baseline_organ if args.baseline_organ != "brain" else None
    refuse_inputs_as_outputs(
        [args.baseline_lesions, args.followup_lesions, args.baseline_image, args.followup_image, organ_file], targets
    )
    if any(t.exists() for t in targets) and not args.overwrite:
        raise FileExistsError(f"{out} already holds compare outputs; choose another --out or pass --overwrite")
    baseline_lesions = read_image(args.baseline_lesions) > 0
    followup_lesions = read_image(args.followup_lesions) > 0
    registration = None
    if args.baseline_image and args.followup_image:
        baseline, followup = read_image(args.baseline_image), read_image(args.followup_image)
        organ = None
        if args.baseline_organ == "brain":
            from ..brainmask import head_pair_for_registration

            baseline, followup, organ = head_pair_for_registration(baseline, followup)
        elif args.baseline_organ:
            organ = read_image(args.baseline_organ)
        try:
            registration = register_followup(baseline, followup, organ, bspline=args.bspline, seed=args.seed)
        except RuntimeError as exc:  # ITK's exception text is many lines of C++ context
            raise ValueError(
                f"registering the follow-up onto the baseline failed ({str(exc).strip().splitlines()[-1]}); check that "
                "both images show the same anatomy, or give masks already on one grid without the images"
            ) from None
        before, after = (
            f"{c:.3f}" if np.isfinite(c) else "n/a"
            for c in (registration.correlation_before, registration.correlation_after)
        )
        print(f"registered the follow-up onto the baseline: correlation {before} -> {after}")
        if registration.warning:
            print(f"warning: {registration.warning}", file=sys.stderr)
        followup_lesions = (
            resample_mask(sitk.Cast(followup_lesions, sitk.sitkUInt8), baseline_lesions, registration.transform) > 0
        )
    elif args.baseline_image or args.followup_image:
        raise ValueError(
            "give both --baseline-image and --followup-image to register, or neither (masks already on one grid)"
        )
    mismatch = grid_mismatch(baseline_lesions, followup_lesions)
    if mismatch:
        raise GeometryError(
            f"the lesion masks are on different grids ({mismatch}); give --baseline-image and --followup-image to register them"
        )
    thresholds = ChangeThresholds(args.relative_change, args.min_change_mm3)
    rows, summary = lesion_changes(
        sitk.GetArrayFromImage(baseline_lesions),
        sitk.GetArrayFromImage(followup_lesions),
        baseline_lesions.GetSpacing()[::-1],
        thresholds,
        grid=baseline_lesions,
    )
    if registration is not None:
        summary["registration"] = {
            "correlation_before": registration.correlation_before,
            "correlation_after": registration.correlation_after,
            "warning": registration.warning,
        }
    with output_set(out, args.overwrite) as stage:  # the three files appear together or not at all
        write_change_files(rows, summary, stage)
        write_image(sitk.Cast(followup_lesions, sitk.sitkUInt8), stage / "followup_lesions_on_baseline.nii.gz")
    counts = ", ".join(f"{summary[c]} {c}" for c in ("new", "enlarged", "stable", "shrinking", "resolved"))
    print(
        f"{counts}; lesion load {summary['baseline_load_mm3'] / 1000:.2f} -> {summary['followup_load_mm3'] / 1000:.2f} mL; outputs in {out}"
    )
    report_result(args, "compare", {t.name: t for t in targets}, summary=summary)


def cmd_experiment(args) -> None:
    from ..experiment import paper_arms, read_cohort, run_experiment, summary_table, write_folder_cohort
    from ..files import atomic_write
    from ..modelfile import load_model
    from ..plots import box_plots

    out = check_output_folder(args.out)
    model = resolve_model_path(args.model)
    bundle = load_model(model)
    names = [s["name"] for s in bundle.sequences]
    cohort_path = Path(args.cohort)
    if cohort_path.is_dir():
        cohort_path = write_folder_cohort(cohort_path, names, out / "cohort.csv")
    cohort = read_cohort(cohort_path, names)
    arms = paper_arms(bundle.preset.weighting if bundle.preset else None, args.iterations_axis, args.default_iterations)
    if args.arms:
        wanted = args.arms.split(",")
        unknown = [a for a in wanted if a not in {arm.name for arm in arms}]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(a.name for a in arms)}")
        arms = [a for a in arms if a.name in wanted]
    mc_arms = args.mc_arms.split(",") if args.mc_arms else ["base", f"ft-iter{args.default_iterations}"]
    print(f"{len(cohort)} patients x {len(arms)} arms ({', '.join(a.name for a in arms)}), {args.workers} worker(s)")
    rows = run_experiment(
        cohort, str(model), arms, out, workers=args.workers, seed=args.seed, mc_samples=args.mc_samples, mc_arms=mc_arms
    )
    table = summary_table(rows)
    box_plots(
        rows,
        out / "boxplots.png",
        title=f"{bundle.preset.name if bundle.preset else model.name}: {len(cohort)} patients",
    )
    text = (
        f"# Experiment\n\nModel `{model}` (sha256 {bundle.sha256[:16]}...), cohort `{cohort_path}`, {len(cohort)} patients.\n\n{table}\n\n"
        "![box plots](boxplots.png)\n\nPer patient: `results.csv`, masks in `masks/`, outlines in `overlays/`.\n"
    )
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(table)
    report_result(
        args,
        "experiment",
        {"results": out / "results.csv", "summary": out / "summary.md", "boxplots": out / "boxplots.png"},
    )


def cmd_evaluate(args) -> None:
    import csv

    from ..images import read_image
    from ..metrics import (
        DETECTION_METRICS,
        METRIC_NAMES,
        SEGMENTATION_METRICS,
        compare_cohorts,
        evaluate_images,
        format_mean_sd,
        format_median_iqr,
    )
    from ..postprocess import write_csv

    if args.out:
        check_output_file(args.out, suffix=".csv")
        refuse_inputs_as_outputs([args.pred, args.gt, args.pairs, args.compare_to], [args.out])
        refuse_existing([args.out], args.overwrite)
    if args.pairs:
        with open(args.pairs, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"case", "pred", "gt"} - set(rows[0] if rows else {})
        if missing or not rows:
            raise ValueError(
                f"{args.pairs} needs a header with the columns case,pred,gt and one row per case "
                f"(missing: {', '.join(sorted(missing)) or 'rows'})"
            )
        base = Path(args.pairs).parent
        pairs = [(r["case"], base / r["pred"], base / r["gt"]) for r in rows]
    elif args.pred and args.gt:
        pairs = [(Path(args.pred).name, Path(args.pred), Path(args.gt))]
    else:
        raise ValueError("give --pred and --gt, or --pairs CSV with columns case,pred,gt")
    results = []
    for name, pred, gt in pairs:
        metrics = evaluate_images(read_image(pred), read_image(gt))
        results.append({"case": name} | {k: metrics[k] for k in METRIC_NAMES})
    for r in results:
        print(json.dumps(json_ready({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})))
    if len(results) > 1:
        for k in SEGMENTATION_METRICS:
            print(f"{k}: mean ± SD {format_mean_sd([r[k] for r in results])}")
        for k in DETECTION_METRICS:
            print(f"{k}: median [IQR] {format_median_iqr([r[k] for r in results])}")
    if args.out:
        write_csv(results, args.out, columns=["case", *METRIC_NAMES], overwrite=args.overwrite)
    comparison = []
    if args.compare_to:
        with open(args.compare_to, newline="") as f:
            reference = list(csv.DictReader(f))
        print(f"paired comparison with {args.compare_to} (p < 0.01 marked *, as in the paper):")
        comparison = compare_cohorts(results, reference)
        for row in comparison:
            mark = "*" if row["p"] < 0.01 else ""
            print(
                f"  {row['metric']}: {row['results']} vs {row['reference']} ({row['summary']}; "
                f"{row['test']} p = {row['p']:.3g}{mark}, n = {row['n']})"
            )
    report_result(
        args,
        "evaluate",
        {"metrics": Path(args.out)} if args.out else {},
        cases=results,
        **({"comparison": comparison} if comparison else {}),
    )


def cmd_report(args) -> None:
    from ..report import ReportInputs, write_report

    out = check_output_file(args.out, suffix=".html")
    results = {}
    for item in args.results:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise ValueError(f"--results takes LABEL=FOLDER (e.g. fine-tuned=seg-ft/), not {item!r}")
        if label in results:
            raise ValueError(
                f"--results names {label!r} twice ({results[label]} and {folder}); give each result its own label"
            )
        results[label] = Path(folder)
    inputs = ReportInputs(
        Path(args.followup_image),
        results,
        title=args.title,
        truth=optional_path(args.truth),
        patient_model=optional_path(args.model),
        changes=optional_path(args.changes),
        suggestions=optional_path(args.suggestions),
    )
    refuse_inputs_as_outputs([args.followup_image, args.truth, args.model, args.suggestions], [out])
    refuse_existing([out], args.overwrite)
    write_report(inputs, out, overwrite=args.overwrite)
    print(f"wrote {out}")
    report_result(args, "report", {"report": out})


def optional_path(value):
    return Path(value) if value else None
