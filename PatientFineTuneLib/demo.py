"""The end-to-end demo on a generated patient (README's first command): the workflow's
three steps (:mod:`.workflow`), run as the same jobs the Slicer module and the web app run.

1. Generate one synthetic ``brain-wmh`` patient (baseline + follow-up; seed 0, which no
   shipped model was trained on).
2. Analyse the baseline: the base model's segmentation and the 2 slices to check first
   (mean lesion softmax closest to 0.5); the generator's ground truth on them plays the
   radiologist's annotation.
3. Fine-tune (100 iterations, the shipped rule and the never-worse check) and segment the
   follow-up with the patient and with the base model, each with 25-sample MC-dropout
   uncertainty.
4. Print base vs fine-tuned Dice, AVD and lesion F1 with the time of every step; write the
   change table (baseline annotation vs fine-tuned follow-up), the figures and the
   patient's HTML report (``report.html``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

#: The demo's result folders, by the workflow's model label.
RESULT_FOLDERS = {"base": "patient000-followup-base", "fine-tuned": "patient000-followup-finetuned"}


def run_demo(
    out: Path,
    overwrite: bool = False,
    model: str | Path | None = None,
    device: str = "auto",
    finetune_iterations: int = 100,
    mc_samples: int = 25,
    seed: int = 0,
) -> dict:
    """Run the demo into ``out``; ``model`` is a base-model file (default: the shipped
    ``brain-wmh`` model). Returns the summary also written to ``demo-summary.json``."""
    import SimpleITK as sitk
    from tqdm.auto import tqdm

    from .metrics import evaluate_case
    from .modelcard import file_sha256, read_model_metadata, resolve_model_path
    from .outputs import read_segment_outputs
    from .presets import get_preset
    from .synth import generate_pair, write_pair
    from .workflow import (
        analyse_job,
        finetune_job,
        followup_job,
        input_arguments,
        job_description,
        read_suggestions,
        run_job,
    )

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    preset = get_preset("brain-wmh")
    names = [n for n, _ in preset.sequences]
    model = resolve_model_path(model or preset.name)
    metadata = read_model_metadata(model)
    if [s["name"] for s in metadata["sequences"]] != names:
        raise ValueError(
            f"the demo needs a brain-wmh model (FLAIR + T1); {model} reads {', '.join(s['name'] for s in metadata['sequences'])}"
        )
    timings: dict[str, float] = {}

    def timed(name: str, what: str, job):
        """Run one step's job with a progress bar; its time goes into the summary."""
        start = time.perf_counter()
        with tqdm(total=100, desc=what, unit="%", leave=False) as bar:

            def progress(fraction, phase):
                if phase != bar.postfix:
                    bar.set_postfix_str(phase, refresh=False)
                if round(100 * fraction) > bar.n:
                    bar.update(round(100 * fraction) - bar.n)

            run_job(job, progress)
        timings[name] = time.perf_counter() - start
        return job

    start = time.perf_counter()
    patient_dir = out / "patients" / "patient000"
    write_pair(generate_pair(preset.name, seed), patient_dir, overwrite=True)
    timings["synth"] = time.perf_counter() - start
    print(f"[{timings['synth']:6.1f} s] generated a synthetic brain-wmh patient (seed {seed}) -> {patient_dir}")
    baseline, followup = patient_dir / "baseline", patient_dir / "followup"
    scans = {
        visit: [folder / f"{n}.nii.gz" for n in names]
        for visit, folder in (("baseline", baseline), ("followup", followup))
    }

    analysis = out / "baseline-analysis"
    shutil.rmtree(analysis, ignore_errors=True)
    timed(
        "analyse",
        "analysing the baseline",
        analyse_job(str(model), input_arguments(scans["baseline"], baseline / "organ.nii.gz"), analysis, device=device),
    )
    suggestions = read_suggestions(analysis)
    chosen = ",".join(str(s.index) for s in suggestions)
    print(
        f"[{timings['analyse']:6.1f} s] segmented the baseline with the base model and suggested slices {chosen} "
        f"(mean lesion softmax {', '.join(f'{s.mean_probability:.2f}' for s in suggestions)})"
    )

    # the generator's truth on the suggested slices plays the radiologist's annotation
    patient_model = out / "patient000-model.pt"
    patient_model.unlink(missing_ok=True)  # an earlier run's (the folder is the demo's: empty, or --overwrite)
    job = timed(
        "finetune",
        "fine-tuning",
        finetune_job(
            str(model),
            input_arguments(scans["baseline"], baseline / "organ.nii.gz", baseline / "lesions.nii.gz"),
            patient_model,
            chosen,
            finetune_iterations,
            seed=seed,
            device=device,
        ),
    )
    print(f"[{timings['finetune']:6.1f} s] {job_description(job)}")

    results = out / "followup-results"
    shutil.rmtree(results, ignore_errors=True)
    timed(
        "segment_followup",
        "segmenting the follow-up with both models",
        followup_job(
            [("base", str(model)), ("fine-tuned", str(patient_model))],
            input_arguments(scans["followup"], followup / "organ.nii.gz"),
            results,
            mc_samples,
            seed=seed,
            device=device,
        ),
    )
    for label, folder in RESULT_FOLDERS.items():
        shutil.rmtree(out / folder, ignore_errors=True)
        (results / label).rename(out / folder)
    results.rmdir()
    print(
        f"[{timings['segment_followup']:6.1f} s] segmented the follow-up with the base and the fine-tuned model and "
        f"{mc_samples} MC-dropout samples -> {', '.join(str(out / f) for f in RESULT_FOLDERS.values())}"
    )

    truth = sitk.ReadImage(str(followup / "lesions.nii.gz"))
    spacing = truth.GetSpacing()[::-1]
    metrics, uncertainty = {}, {}
    for label, folder in RESULT_FOLDERS.items():
        name = label.replace("-", "")
        result = read_segment_outputs(out / folder)
        metrics[name] = evaluate_case(
            sitk.GetArrayFromImage(result["segmentation"]) > 0, sitk.GetArrayFromImage(truth) > 0, spacing
        )
        uncertainty[name] = result["summary"] or {}
    report = _write_report(out, patient_dir, analysis)
    print("\nfollow-up of patient000, against the known lesions:")
    print(f"{'':12s}{'Dice':>8s}{'AVD %':>9s}{'lesion F1':>11s}{'recall':>8s}{'FP':>6s}{'max SD':>8s}")
    for name in ("base", "finetuned"):
        m, s = metrics[name], uncertainty[name]
        print(
            f"{name:12s}{m['dice']:8.3f}{m['avd_percent']:9.1f}{m['lesion_f1']:11.3f}{m['lesion_recall']:8.2f}{m['fp_count']:6d}"
            f"{s.get('max_sd', float('nan')):8.3f}"
        )
    summary = {
        "device": job.device,
        "base_model": {"file": str(model), "file_sha256": file_sha256(model)},
        "suggested_slices": [s.as_dict() for s in suggestions],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "followup_metrics": {
            name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()} for name, m in metrics.items()
        },
        "uncertainty": {
            name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
            for name, s in uncertainty.items()
        },
    }
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nresults, figures, demo-summary.json and the patient's report {report} in {out}")
    return summary


def _write_report(out: Path, patient_dir: Path, analysis: Path) -> Path:
    """What changed (the baseline truth against the fine-tuned follow-up: the generator
    draws both visits in one space, so no registration is needed), the figures as PNG and
    the HTML report."""
    import SimpleITK as sitk

    from .change import lesion_changes, write_change_files
    from .report import ReportInputs, save_report_figures, write_report

    shutil.copyfile(analysis / "suggestions.json", out / "suggestions.json")
    before = sitk.ReadImage(str(patient_dir / "baseline" / "lesions.nii.gz"))
    after = sitk.ReadImage(str(out / RESULT_FOLDERS["fine-tuned"] / "segmentation.nii.gz"))
    rows, summary = lesion_changes(
        sitk.GetArrayFromImage(before) > 0, sitk.GetArrayFromImage(after) > 0, after.GetSpacing()[::-1], grid=after
    )
    write_change_files(rows, summary, out / "changes", overwrite=True)
    inputs = ReportInputs(
        patient_dir / "followup" / "FLAIR.nii.gz",
        {label: out / folder for label, folder in RESULT_FOLDERS.items()},
        title="Synthetic patient 000 (demo)",
        truth=patient_dir / "followup" / "lesions.nii.gz",
        patient_model=out / "patient000-model.pt",
        changes=out / "changes",
        suggestions=out / "suggestions.json",
        notes=[
            "A generated patient: the reference outline is the generator's truth. The baseline annotation is the truth on the "
            "suggested slices only; the change table compares the whole baseline truth with the fine-tuned follow-up."
        ],
    )
    save_report_figures(inputs, out)
    return write_report(inputs, out / "report.html", overwrite=True)
