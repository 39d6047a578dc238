"""The paper's experiments on a cohort of patient pairs: base model vs fine-tuned on the
follow-up, one axis at a time (iterations, slices, weighting), plus references: the naive
fine-tuning loop (same accuracy as the fast path?) and copying the registered baseline
lesion mask forward.

A *cohort* is a CSV manifest, one row per visit: ``patient``, ``visit`` (``baseline`` or
``followup``), one column per sequence of the model, ``lesions`` (the follow-up's is
needed for scoring, the baseline's for fine-tuning) and optionally ``organ``; relative
paths are taken from the manifest's folder. :func:`write_folder_cohort` makes one for the
``patientNNN/{baseline,followup}`` folders that ``patient-finetune synth`` writes.

Results go to one CSV row per (patient, arm) as soon as they exist, so an interrupted run
resumes where it stopped; patients run in parallel worker processes. Each arm's follow-up
segmentation is kept as NIfTI (``masks/<patient>/<arm>.nii.gz``) and drawn with the truth
in ``overlays/<patient>.png``; :func:`.plots.box_plots` draws the box plots.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import METRIC_NAMES

VISITS = ("baseline", "followup")


@dataclass(frozen=True)
class Arm:
    """One way of producing the follow-up segmentation."""

    name: str
    kind: str  # "base", "finetune" or "copy-forward"
    slices: str = "all-lesion"
    iterations: int = 100
    weighting: str | None = None
    method: str = "auto"
    layers: str = "head"
    #: Fine-tune as the product does (:func:`finetune.shipped_config`: the preset's weighting,
    #: the never-worse check choosing the iterations, hard negatives) instead of the
    #: paper's settings; ``iterations`` is then the asked count.
    shipped: bool = False


def paper_arms(
    weighting: str | None, iterations: Sequence[int] = (50, 100, 500, 1000), default_iterations: int = 100
) -> list[Arm]:
    """The base model, fine-tuning varied one axis at a time around the paper's default
    (all lesion slices, ``default_iterations``, no weighting), the naive loop, fine-tuning
    every layer (``ft-all``), copy-forward, and the product's shipped fine-tuning on all
    lesion slices and on the 2 suggested slices (``ft-shipped``, ``ft-shipped-suggested2``)."""
    arms = [Arm("base", "base"), Arm("copy-forward", "copy-forward")]
    arms += [Arm(f"ft-iter{n}", "finetune", iterations=n) for n in iterations]
    for spec in ("suggested:1", "suggested:2", "suggested-lesion:1", "suggested-lesion:2", "all-organ"):
        arms.append(Arm(f"ft-{spec.replace(':', '')}", "finetune", slices=spec, iterations=default_iterations))
    if weighting and weighting != "none":
        arms.append(Arm(f"ft-{weighting}", "finetune", weighting=weighting, iterations=default_iterations))
    arms.append(Arm("ft-naive", "finetune", method="naive", iterations=default_iterations))
    arms.append(Arm("ft-all", "finetune", layers="all", iterations=default_iterations))
    arms.append(Arm("ft-shipped", "finetune", iterations=default_iterations, shipped=True))
    arms.append(
        Arm("ft-shipped-suggested2", "finetune", slices="suggested:2", iterations=default_iterations, shipped=True)
    )
    return arms


@dataclass
class PatientPair:
    patient: str
    visits: dict = field(
        default_factory=dict
    )  # visit -> {"sequences": [...], "lesions": path|None, "organ": path|None}


def read_cohort(manifest: str | os.PathLike, sequence_names: Sequence[str]) -> list[PatientPair]:
    """Patients of a cohort manifest, in manifest order; checks what scoring needs."""
    manifest = Path(manifest)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("patient", "visit", *sequence_names, "lesions") if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(
            f"cohort manifest {manifest} needs columns patient, visit, {', '.join(sequence_names)}, lesions[, organ]"
            + (f"; missing {', '.join(missing)}" if missing else "; it has no rows")
        )
    pairs: dict[str, PatientPair] = {}
    for row in rows:
        if row["visit"] not in VISITS:
            raise ValueError(f"{manifest}: visit must be baseline or followup, not {row['visit']!r}")

        def path(value):
            return (manifest.parent / value).resolve() if value else None

        pair = pairs.setdefault(row["patient"], PatientPair(row["patient"]))
        pair.visits[row["visit"]] = {
            "sequences": [path(row[s]) for s in sequence_names],
            "lesions": path(row["lesions"]),
            "organ": path(row.get("organ")),
        }
    for pair in pairs.values():
        if set(pair.visits) != set(VISITS):
            raise ValueError(f"patient {pair.patient} needs a baseline and a followup row in {manifest}")
        if pair.visits["followup"]["lesions"] is None:
            raise ValueError(f"patient {pair.patient}: the follow-up lesion mask is needed for scoring")
    return list(pairs.values())


def write_folder_cohort(root: str | os.PathLike, sequence_names: Sequence[str], manifest: str | os.PathLike) -> Path:
    """A cohort manifest for ``root/<patient>/{baseline,followup}/`` case folders."""
    from .cases import find_image

    root, manifest = Path(root), Path(manifest)
    rows = []
    for patient in sorted(p for p in root.iterdir() if (p / "followup").is_dir() and (p / "baseline").is_dir()):
        for visit in VISITS:
            folder = patient / visit
            row = {"patient": patient.name, "visit": visit}
            for name in (*sequence_names, "lesions", "organ"):
                found = find_image(folder, name)
                row[name] = os.path.relpath(found, manifest.parent) if found else ""
            rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no patient folder with baseline/ and followup/ under {root}")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["patient", "visit", *sequence_names, "lesions", "organ"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


# ---------------------------------------------------------------------------------------
# Running


def _load(visit: dict, bundle):
    from .caseload import ScanOptions, load_for_model

    return load_for_model(
        bundle.sequences,
        visit["sequences"],
        visit["organ"],
        visit["lesions"],
        auto_organ=bundle.auto_organ_mask,
        options=ScanOptions(resample_to_first=True),
    ).case


def _copy_forward(baseline_case, followup_case) -> tuple[np.ndarray, float]:
    """The baseline lesion mask carried onto the follow-up grid through registration (the
    trivial method fine-tuning must beat), and the registration's quality figure."""
    import SimpleITK as sitk

    from .registration import register_followup, resample_mask

    fixed = followup_case.to_image(followup_case.images[0])
    moving = baseline_case.to_image(baseline_case.images[0])
    organ = followup_case.to_image(followup_case.organ.astype(np.uint8), sitk.sitkUInt8)
    registration = register_followup(fixed, moving, organ)
    lesions = baseline_case.to_image(baseline_case.lesions.astype(np.uint8), sitk.sitkUInt8)
    carried = sitk.GetArrayFromImage(resample_mask(lesions, fixed, registration.transform)) > 0
    return followup_case.layout.to_slices(carried) & followup_case.organ, registration.correlation_after


def run_patient(
    pair: PatientPair,
    model_path: str,
    arms: Sequence[Arm],
    done: set,
    seed: int = 0,
    mc_samples: int = 0,
    mc_arms: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
) -> list[dict]:
    """Every arm not in ``done`` for one patient; one result row per arm.

    ``mc_samples`` MC-dropout samples are drawn for the arms named in ``mc_arms`` (all
    when None). With ``out``, each arm's mask goes to ``out/masks/<patient>/<arm>.nii.gz``
    and the patient's overlay to ``out/overlays/<patient>.png``.
    """
    import SimpleITK as sitk

    from .finetune import FinetuneConfig, finetune_patient_model, shipped_config
    from .images import write_image
    from .inference import segment_case
    from .metrics import evaluate_case
    from .modelfile import load_model

    base = load_model(model_path)
    baseline = _load(pair.visits["baseline"], base)
    followup = _load(pair.visits["followup"], base)
    spacing = followup.grid.GetSpacing()[::-1]
    rows = []
    for arm in arms:
        if (pair.patient, arm.name) in done:
            continue
        start = time.perf_counter()
        extra = {}
        if arm.kind == "copy-forward":
            mask, extra["registration_correlation"] = _copy_forward(baseline, followup)
            summary = None
        else:
            bundle = base
            if arm.kind == "finetune":
                if arm.shipped:
                    config = shipped_config(base, iterations=arm.iterations, seed=seed)
                else:
                    config = FinetuneConfig(
                        iterations=arm.iterations,
                        weighting=arm.weighting,
                        method=arm.method,
                        layers=arm.layers,
                        seed=seed,
                    )
                bundle = finetune_patient_model(base, baseline, arm.slices, config, device="cpu", allow_empty=True)
                finetune = bundle.metadata["finetune"]
                extra["finetune_method"] = finetune["method"]
                extra["slices"] = " ".join(map(str, finetune["slices"]))
                if finetune.get("holdout_check"):
                    extra["iterations"] = finetune["config"]["iterations"] if finetune["holdout_check"]["kept"] else 0
            samples = mc_samples if mc_arms is None or arm.name in mc_arms else 0
            result = segment_case(bundle, followup, mc_samples=samples, seed=seed, device="cpu")
            mask, summary = result.mask, result.summary
        seconds = round(time.perf_counter() - start, 2)
        metrics = evaluate_case(
            followup.layout.from_slices(mask), followup.layout.from_slices(followup.lesions), spacing
        )
        row = {"patient": pair.patient, "arm": arm.name, **metrics, "seconds": seconds, **extra}
        if summary:
            row.update({"mean_sd_in_lesions": summary["mean_sd_in_lesions"], "max_sd": summary["max_sd"]})
        rows.append(row)
        if out is not None:
            write_image(
                followup.to_image(mask.astype(np.uint8), sitk.sitkUInt8),
                _mask_path(out, pair.patient, arm.name),
                overwrite=True,
            )
    if out is not None:
        save_patient_overlay(followup, out, pair.patient, [a.name for a in arms])
    return rows


def _mask_path(out, patient: str, arm: str) -> Path:
    return Path(out) / "masks" / patient / f"{arm}.nii.gz"


def save_patient_overlay(followup, out: str | os.PathLike, patient: str, arm_names: Sequence[str]) -> Path:
    """PNG of the follow-up slice with the most true lesion: the truth's outline, then each
    arm's (from its saved mask); written to ``out/overlays/<patient>.png``."""
    import SimpleITK as sitk

    from .montage import to_uint8
    from .plots import overlay_figure

    s = int(np.argmax(followup.lesions.sum(axis=(1, 2))))
    masks = {"truth": followup.lesions[s]}
    for arm in arm_names:
        path = _mask_path(out, patient, arm)
        if path.is_file():
            masks[arm] = followup.layout.to_slices(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0)[s]
    # the case's slices are in radiological display order already (images.SliceLayout)
    image = np.where(followup.organ[s], to_uint8(followup.images[0], followup.organ)[s], 0)  # black outside the organ
    return overlay_figure(
        image, masks, Path(out) / "overlays" / f"{patient}.png", title=f"{patient}, follow-up slice {s}"
    )


RESULT_COLUMNS = [
    "patient",
    "arm",
    *METRIC_NAMES,
    "seconds",
    "mean_sd_in_lesions",
    "max_sd",
    "finetune_method",
    "slices",
    "iterations",
    "registration_correlation",
]


def _worker(job):
    import torch

    torch.set_num_threads(1)  # patients run in parallel processes: one thread each
    return run_patient(*job)


def run_experiment(
    cohort: Sequence[PatientPair],
    model_path: str,
    arms: Sequence[Arm],
    out: str | os.PathLike,
    workers: int = 1,
    seed: int = 0,
    mc_samples: int = 0,
    mc_arms: Sequence[str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every (patient, arm) not yet in ``out/results.csv``, appending rows as patients
    finish; returns all rows. ``workers`` > 1 runs patients in parallel processes (one
    torch thread each). Masks and overlays go under ``out`` (see :func:`run_patient`)."""
    from tqdm.auto import tqdm

    results_csv = Path(out) / "results.csv"
    existing = read_results(results_csv) if results_csv.is_file() else []
    done = {(r["patient"], r["arm"]) for r in existing}
    todo = [p for p in cohort if any((p.patient, a.name) not in done for a in arms)]
    jobs = [(p, str(model_path), list(arms), done, seed, mc_samples, mc_arms, str(out)) for p in todo]
    results_csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not results_csv.is_file()
    with open(results_csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        bar = tqdm(total=len(jobs), desc="patients", unit="patient", disable=not progress)
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for rows in pool.imap_unordered(_worker, jobs):
                    writer.writerows(rows)
                    f.flush()
                    bar.update()
        else:
            for job in jobs:
                writer.writerows(run_patient(*job))
                f.flush()
                bar.update()
        bar.close()
    return read_results(results_csv)


def read_results(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_table(rows: Sequence[dict], reference_arm: str = "base") -> str:
    """Markdown table in the paper's form: every arm against ``reference_arm`` (mean ± SD
    and paired t-test for segmentation metrics, median [IQR] and Wilcoxon for detection;
    * marks p < 0.01 as in the paper). Without results for the reference arm (a run of
    extra arms only) the arms are summarised without tests."""
    from .metrics import DETECTION_METRICS, compare_cohorts, format_mean_sd, format_median_iqr

    by_arm: dict[str, list[dict]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(dict(r, case=r["patient"]))
    metrics = ["dice", "avd_percent", "hd95_mm", "lesion_recall", "fp_count", "lesion_precision", "lesion_f1"]
    lines = ["| arm | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    reference = by_arm.get(reference_arm)
    for arm, results in by_arm.items():
        cells = []
        tested = reference is not None and arm != reference_arm
        comparison = {c["metric"]: c for c in compare_cohorts(results, reference)} if tested else {}
        for metric in metrics:
            if not tested:
                fmt = format_median_iqr if metric in DETECTION_METRICS else format_mean_sd
                cells.append(fmt([float(r[metric]) for r in results]))
            else:
                c = comparison[metric]
                mark = "*" if np.isfinite(c["p"]) and c["p"] < 0.01 else ""
                cells.append(f"{c['results']}{mark} (p={c['p']:.2g})")
        lines.append(f"| {arm} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
