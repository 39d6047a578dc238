"""The end-to-end demo on a generated patient (README's first command).

1. Generate one synthetic ``brain-wmh`` patient (baseline + follow-up; seed 0, which no
   shipped model was trained on) and load the shipped ``brain-wmh`` base model.
2. Suggest 2 baseline slices (mean lesion softmax closest to 0.5) and take the
   generator's ground truth on them as the radiologist's annotation.
3. Fine-tune the last two layers (100 iterations, with the never-worse check of the
   command line) and segment the follow-up with the base and with the patient model, each
   with 25-sample MC-dropout uncertainty.
4. Print base vs fine-tuned Dice, AVD and lesion F1 with the time of every step; write
   NIfTI results, the change table (baseline annotation vs fine-tuned follow-up), the
   figures and the patient's HTML report (``report.html``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path



def run_demo(out: Path, overwrite: bool = False, model: str | Path | None = None, device: str = "auto",
             finetune_iterations: int = 100, mc_samples: int = 25, seed: int = 0) -> dict:
    """Run the demo into ``out``; ``model`` is a base-model file (default: the shipped
    ``brain-wmh`` model). Returns the summary also written to ``demo-summary.json``."""
    from .cases import find_cases
    from .finetune import finetune_patient_model, shipped_config
    from .images import load_case, prepare_case
    from .inference import segment_case
    from .runtime import resolve_device
    from .metrics import evaluate_case
    from .modelcard import describe_patient_model, resolve_model_path
    from .modelfile import load_model, save_model
    from .outputs import write_segment_outputs
    from .presets import get_preset
    from .suggest import suggest_slices
    from .synth import generate_pair, write_pair

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    preset = get_preset("brain-wmh")
    names = [n for n, _ in preset.sequences]
    device = resolve_device(device)
    timings: dict[str, float] = {}

    def step(name):
        timings[name] = time.perf_counter()

    def done(name, message):
        timings[name] = time.perf_counter() - timings[name]
        print(f"[{timings[name]:6.1f} s] {message}")

    step("load_base")
    model = resolve_model_path(model or preset.name)
    base = load_model(model, device=device)
    if [s["name"] for s in base.sequences] != names:
        raise ValueError(f"the demo needs a brain-wmh model (FLAIR + T1); {model} reads {', '.join(s['name'] for s in base.sequences)}")
    done("load_base", f"loaded base model {model} (sha256 {base.sha256[:12]}...)")

    step("synth")
    write_pair(generate_pair(preset.name, seed), out / "patients" / "patient000", overwrite=True)
    done("synth", f"generated a synthetic brain-wmh patient (seed {seed}) -> {out / 'patients' / 'patient000'}")

    def load(files):
        return prepare_case(load_case(files.sequences, files.organ, files.lesions, sequence_names=names, name=files.name))

    patient_dir = out / "patients" / "patient000"
    baseline = load(find_cases(patient_dir / "baseline", names)[0])
    followup = load(find_cases(patient_dir / "followup", names)[0])

    step("suggest")
    suggestions = suggest_slices(base, baseline, k=2, device=device)
    chosen = [s.index for s in suggestions]
    done("suggest", f"suggested baseline slices {chosen} (mean lesion softmax {', '.join(f'{s.mean_probability:.2f}' for s in suggestions)})")

    step("finetune")
    # the generator's truth on the suggested slices plays the radiologist's annotation; it is
    # a real annotation even where a slice has no lesion, hence allow_empty
    # the command line's defaults: the preset's weighting and the never-worse check
    config = shipped_config(base, iterations=finetune_iterations, seed=seed)
    patient = finetune_patient_model(base, baseline, chosen, config, device=device, allow_empty=True)
    save_model(patient, out / "patient000-model.pt", overwrite=True)
    done("finetune", describe_patient_model(patient.metadata["finetune"]))

    results, metrics = {}, {}
    spacing = followup.grid.GetSpacing()[::-1]
    for name, bundle in (("base", base), ("finetuned", patient)):
        step(f"segment_{name}")
        result = segment_case(bundle, followup, mc_samples=mc_samples, device=device)
        results[name] = result
        metrics[name] = evaluate_case(followup.layout.from_slices(result.mask), followup.layout.from_slices(followup.lesions), spacing)
        folder = out / f"patient000-followup-{name}"
        write_segment_outputs(followup, result, folder, overwrite=True, mc_samples=mc_samples, seed=seed)
        done(f"segment_{name}", f"segmented the follow-up with the {name} model and {mc_samples} MC-dropout samples -> {folder}")

    report = _write_report(out, patient_dir, baseline, followup, results, suggestions)
    print("\nfollow-up of patient000, against the known lesions:")
    print(f"{'':12s}{'Dice':>8s}{'AVD %':>9s}{'lesion F1':>11s}{'recall':>8s}{'FP':>6s}{'max SD':>8s}")
    for name in ("base", "finetuned"):
        m, s = metrics[name], results[name].summary
        print(f"{name:12s}{m['dice']:8.3f}{m['avd_percent']:9.1f}{m['lesion_f1']:11.3f}{m['lesion_recall']:8.2f}{m['fp_count']:6d}{s['max_sd']:8.3f}")
    summary = {
        "device": str(device),
        "base_model": {"file": str(model), "sha256": base.sha256},
        "suggested_slices": [s.as_dict() for s in suggestions],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "followup_metrics": {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()} for name, m in metrics.items()},
        "uncertainty": {name: {k: round(v, 4) for k, v in r.summary.items()} for name, r in results.items()},
    }
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nresults, figures, demo-summary.json and the patient's report {report} in {out}")
    return summary


def _write_report(out: Path, patient_dir: Path, baseline, followup, results: dict, suggestions) -> Path:
    """What changed (the baseline annotation against the fine-tuned follow-up: the
    generator draws both visits in one space, so no registration is needed), the figures
    as PNG and the HTML report."""
    from .change import lesion_changes, write_change_files
    from .report import ReportInputs, save_report_figures, write_report

    (out / "suggestions.json").write_text(json.dumps([s.as_dict() for s in suggestions], indent=2))
    rows, summary = lesion_changes(baseline.layout.from_slices(baseline.lesions), followup.layout.from_slices(results["finetuned"].mask),
                                   followup.grid.GetSpacing()[::-1], grid=followup.grid)
    write_change_files(rows, summary, out / "changes", overwrite=True)
    inputs = ReportInputs(
        patient_dir / "followup" / "FLAIR.nii.gz",
        {"base": out / "patient000-followup-base", "fine-tuned": out / "patient000-followup-finetuned"},
        title="Synthetic patient 000 (demo)",
        truth=patient_dir / "followup" / "lesions.nii.gz",
        patient_model=out / "patient000-model.pt",
        changes=out / "changes",
        suggestions=out / "suggestions.json",
        notes=["A generated patient: the reference outline is the generator's truth. The baseline annotation is the truth on the "
               "suggested slices only; the change table compares the whole baseline truth with the fine-tuned follow-up."],
    )
    save_report_figures(inputs, out)
    return write_report(inputs, out / "report.html", overwrite=True)
