"""The interactive aims (docs/aims.md), measured in one run at the shipped width.

    python Testing/benchmarks/bench_interactive.py [--threads N] [--device auto] [--no-reuse-memory]

On the shipped ``brain-wmh`` model (width 16) and the demo's synthetic patient (seed 0:
240x240x48 FLAIR + T1 at both visits) it prints, with the aim of each:

- CLI start-up: ``patient-finetune --help``, and a process that imports everything a
  segment or fine-tune run imports (torch included);
- slice suggestion (2 slices of the baseline);
- one deterministic pass of the follow-up, and 25 MC-dropout samples as a ratio to it;
- fine-tuning on the 2 suggested slices for 100 iterations (exact, the cached-feature
  path), the shipped fine-tuning every front end runs (the preset's weighting, the
  never-worse check, the head on a quarter of each patch's pixels), the same on every
  pixel, and the naive loop as a ratio;
- equality checks: fast vs naive fine-tuning (largest weight difference), MC fast vs
  naive on 4 follow-up slices, and the folded inference network vs the stored one.

With ``--real`` (needs ../shared/data) it also times the all-lesion route as ``finetune``
runs it by default (every lesion slice of the baseline annotated, so every layer trains) on
two real scans: Ljubljana MS 26 (FLAIR + T1, 182x218x182, 1 mm, the whole lesion mask;
aim < 60 s) and Brain-Tumor-Progression 01 Pre (T1c; aim < 30 s), each with one
segmentation of the same scan as a ratio, and the same route in float32 as a ratio (the
shipped route trains in bfloat16 on a CPU with AMX: ``training_loop.resolved_precision``);
``--previous-route`` adds the route shipped until 2026-12-06 (two folds, every pixel, the
paper's learning rate, 1/2/4x, float32) as a ratio. ``--real-only``: these rows alone.

The command line turns on :func:`~PatientFineTuneLib.heap.keep_freed_memory_for_reuse`
and so does this script, unless ``--no-reuse-memory`` (to measure what it is worth).
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

AIMS = {
    "startup": 2.0,
    "suggest": 5.0,
    "pass": 3.0,
    "mc_ratio": 3.0,
    "finetune": 10.0,
    "all_lesion_ms": 60.0,
    "all_lesion_tumour": 30.0,
}


def wall(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def startup_times() -> tuple[float, float]:
    help_s, _ = wall(
        lambda: subprocess.run(
            [sys.executable, "-m", "PatientFineTuneLib.cli", "--help"], check=True, capture_output=True
        )
    )
    imports = (
        "import PatientFineTuneLib.cli, PatientFineTuneLib.inference, PatientFineTuneLib.finetune, "
        "PatientFineTuneLib.images, PatientFineTuneLib.modelfile, PatientFineTuneLib.outputs, PatientFineTuneLib.suggest"
    )
    import_s, _ = wall(lambda: subprocess.run([sys.executable, "-c", imports], check=True, capture_output=True))
    return help_s, import_s


def line(what: str, seconds: float, aim: str, ok: bool, extra: str = "") -> None:
    print(f"{what:58s} {seconds:7.2f} s   aim {aim:10s} {'met' if ok else 'NOT met'}{'   ' + extra if extra else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-reuse-memory", action="store_true")
    parser.add_argument(
        "--real", action="store_true", help="also time the all-lesion route on two real scans (../shared/data)"
    )
    parser.add_argument(
        "--previous-route", action="store_true", help="with --real: also the route shipped until 2026-12-06"
    )
    parser.add_argument("--real-only", action="store_true", help="only the real scans' rows (implies --real)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from PatientFineTuneLib.caseload import load_for_model
    from PatientFineTuneLib.cases import find_cases
    from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model, shipped_config
    from PatientFineTuneLib.heap import keep_freed_memory_for_reuse
    from PatientFineTuneLib.inference import predict_probability, predict_with_uncertainty
    from PatientFineTuneLib.modelcard import resolve_model_path
    from PatientFineTuneLib.modelfile import load_model
    from PatientFineTuneLib.runtime import describe_device, resolve_device
    from PatientFineTuneLib.suggest import suggest_slices
    from PatientFineTuneLib.synth import generate_pair, write_pair

    if args.threads:
        torch.set_num_threads(args.threads)
    reuse = False if args.no_reuse_memory else keep_freed_memory_for_reuse()
    device = resolve_device(args.device)
    base = load_model(resolve_model_path("brain-wmh"), device=device)
    print(
        f"torch {torch.__version__}; {describe_device(device)}; shipped brain-wmh model, width {base.model.width}; "
        f"freed memory kept for reuse: {reuse}"
    )

    if args.real_only:
        real_all_lesion_rows(device, args.previous_route)
        return
    help_s, import_s = startup_times()
    line("CLI start-up: patient-finetune --help", help_s, "< 2 s", help_s < AIMS["startup"])
    line("CLI start-up: every module a segment/fine-tune run imports", import_s, "< 2 s", import_s < AIMS["startup"])

    with tempfile.TemporaryDirectory() as tmp:
        write_pair(generate_pair("brain-wmh", 0), Path(tmp), overwrite=True)
        names = ["FLAIR", "T1"]
        visits = {}
        for visit in ("baseline", "followup"):
            files = find_cases(Path(tmp) / visit, names)[0]
            visits[visit] = load_for_model(
                base.sequences, files.sequences, files.organ, files.lesions, auto_organ=base.auto_organ_mask
            ).case
    baseline, followup = visits["baseline"], visits["followup"]
    print(
        f"patient: synthetic brain-wmh seed 0, {baseline.images.shape[2]}x{baseline.images.shape[3]}x{baseline.images.shape[1]}, "
        f"{len(np.flatnonzero(followup.organ.any(axis=(1, 2))))} follow-up slices with brain"
    )

    predict_probability(base, followup, device=device)  # warm-up: allocator, kernels
    suggest_s, suggestions = wall(lambda: suggest_slices(base, baseline, k=2, device=device))
    chosen = [s.index for s in suggestions]
    line(f"slice suggestion (2 of the baseline: {chosen})", suggest_s, "< 5 s", suggest_s < AIMS["suggest"])
    pass_s, probability = wall(lambda: predict_probability(base, followup, device=device))
    line("one deterministic pass of the follow-up", pass_s, "< 3 s", pass_s < AIMS["pass"])
    mc_s, (mc_probability, _) = wall(lambda: predict_with_uncertainty(base, followup, n_samples=25, device=device))
    line(
        "25 MC-dropout samples (with the deterministic result)",
        mc_s,
        "<= 3x pass",
        mc_s <= AIMS["mc_ratio"] * pass_s,
        f"{mc_s / pass_s:.2f}x the pass",
    )

    config = FinetuneConfig(iterations=100, seed=0)
    fast_s, fast = wall(lambda: finetune_patient_model(base, baseline, chosen, config, device=device, allow_empty=True))
    line(
        f"fine-tuning, 2 slices, 100 iterations, exact ({fast.metadata['finetune']['method']} path)",
        fast_s,
        "< 10 s",
        fast_s < AIMS["finetune"],
    )
    # what every front end runs: the preset's weighting (a pass near the chosen slices), the
    # check (two folds, then the final model) and the head on a quarter of the pixels
    check_s, checked = wall(
        lambda: finetune_patient_model(
            base, baseline, chosen, shipped_config(base, iterations=100, seed=0), device=device, allow_empty=True
        )
    )
    kept = "fine-tuned kept" if checked.metadata["finetune"]["holdout_check"]["kept"] else "base model kept"
    line(
        "the shipped fine-tuning (weighting, check, 1/4 of the pixels)",
        check_s,
        "< 10 s",
        check_s < AIMS["finetune"],
        kept,
    )
    every_s, every = wall(
        lambda: finetune_patient_model(
            base,
            baseline,
            chosen,
            shipped_config(base, iterations=100, seed=0, pixel_fraction=1.0),
            device=device,
            allow_empty=True,
        )
    )
    kept = "fine-tuned kept" if every.metadata["finetune"]["holdout_check"]["kept"] else "base model kept"
    line("the same on every pixel", every_s, "-", True, f"{kept}; {every_s / check_s:.2f}x the shipped")
    naive_s, naive = wall(
        lambda: finetune_patient_model(
            base,
            baseline,
            chosen,
            FinetuneConfig(iterations=100, seed=0, method="naive"),
            device=device,
            allow_empty=True,
        )
    )
    line(
        "the naive loop (whole network every iteration)",
        naive_s,
        "-",
        True,
        f"fast path {naive_s / fast_s:.2f}x faster",
    )

    if args.real:
        real_all_lesion_rows(device, args.previous_route)

    print("\nequality checks")
    a, b = fast.model.state_dict(), naive.model.state_dict()
    weight_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"  fast vs naive fine-tuning: largest weight difference {weight_diff:.2e}")
    subset = copy.copy(followup)
    keep = np.zeros(followup.organ.shape[0], dtype=bool)
    keep[np.flatnonzero(followup.organ.any(axis=(1, 2)))[::10][:4]] = True
    subset.organ = followup.organ & keep[:, None, None]
    with torch.no_grad():
        _, fast_mc = predict_with_uncertainty(base, subset, n_samples=25, method="fast", device=device)
        _, naive_mc = predict_with_uncertainty(base, subset, n_samples=25, method="naive", device=device)
    print(
        f"  MC-25 fast vs naive on {int(keep.sum())} slices: largest difference of the mean {np.abs(fast_mc.mean - naive_mc.mean).max():.2e}, "
        f"of the SD {np.abs(fast_mc.sd - naive_mc.sd).max():.2e}"
    )
    print(
        f"  deterministic result of the MC run vs the pass: largest difference {np.abs(mc_probability - probability).max():.2e}"
    )
    stored = base.model.eval()
    with torch.no_grad():
        s = int(np.flatnonzero(followup.organ.any(axis=(1, 2)))[len(chosen) * 10])
        x = followup.slice_tensor(s)[None].to(device)
        unfolded = torch.softmax(stored(x), 1)[0, 1].cpu().numpy()
    organ = followup.organ[s]
    print(
        f"  folded inference network vs the stored network, slice {s}: largest probability difference inside the brain "
        f"{np.abs(probability[s] - unfolded)[organ].max():.2e}"
    )


def real_all_lesion_rows(device, previous_route: bool) -> None:
    """The all-lesion route (every layer trains) on Ljubljana 26 and BTP 01 Pre."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from PatientFineTuneLib.finetune import finetune_patient_model, shipped_config
    from PatientFineTuneLib.inference import predict_mask
    from PatientFineTuneLib.modelcard import resolve_model_path
    from PatientFineTuneLib.modelfile import load_model

    from eval_real_base_models import DATA, real_cases
    from eval_real_finetune import load

    if not DATA.is_dir():
        print(f"\nno real data at {DATA}: the all-lesion rows are skipped")
        return
    specs = {c["case"]: c for c in real_cases(DATA)}
    print("\nthe all-lesion route on real scans (the whole baseline mask annotated)")
    for name, aim in (("patient26", "all_lesion_ms"), ("01_Pre", "all_lesion_tumour")):
        spec = specs[name]
        base = load_model(resolve_model_path(spec["preset"]), device=device)
        case = load(spec, base)
        size = "x".join(map(str, (*case.images.shape[2:], case.images.shape[1])))
        segment_s, _ = wall(partial(predict_mask, base, case, device=device))
        tuned_s, tuned = wall(
            partial(finetune_patient_model, base, case, "all-lesion", shipped_config(base), device=device)
        )
        check = tuned.metadata["finetune"]["holdout_check"]
        precision = tuned.metadata["finetune"]["config"]["precision"]
        outcome = (
            f"{'fine-tuned kept' if check['kept'] else 'base model kept'}, {check['layers']} layers, "
            f"{check['iterations']} iterations, {precision}"
        )
        line(
            f"all-lesion fine-tuning, {spec['set']} {name} ({size})",
            tuned_s,
            f"< {AIMS[aim]:.0f} s",
            tuned_s < AIMS[aim],
            f"{outcome}; {tuned_s / segment_s:.1f}x one segmentation ({segment_s:.1f} s)",
        )
        fp32_s, fp32 = wall(
            partial(
                finetune_patient_model, base, case, "all-lesion", shipped_config(base, precision="fp32"), device=device
            )
        )
        check = fp32.metadata["finetune"]["holdout_check"]
        line(
            "  the same in float32",
            fp32_s,
            "-",
            True,
            f"{'fine-tuned kept' if check['kept'] else 'base model kept'}, {check['iterations']} iterations; "
            f"{fp32_s / tuned_s:.2f}x the shipped",
        )
        if previous_route:
            before = shipped_config(
                base, large_annotation={"layers": "all", "pixel_fraction": 1.0, "precision": "fp32"}
            )
            before_s, _ = wall(partial(finetune_patient_model, base, case, "all-lesion", before, device=device))
            line(
                "  the route shipped until 2026-12-06 (2 folds, every pixel, 1/2/4x)",
                before_s,
                "-",
                True,
                f"{before_s / tuned_s:.2f}x the shipped",
            )


if __name__ == "__main__":
    main()
