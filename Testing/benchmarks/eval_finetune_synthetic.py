"""Does patient-specific fine-tuning help? Base vs fine-tuned follow-up segmentation on
synthetic brain-wmh pairs (the paper's WMH experiment in miniature).

    python Testing/benchmarks/eval_finetune_synthetic.py --model brain-wmh [--pairs 10] [--seed 400]
        [--slices all-lesion] [--iterations 100] [--angles 8] [--pixel-fraction 0.125] [--out results.csv]

Pairs are generated in memory with seeds seed..seed+pairs-1 (keep them apart from the
seeds the base model was trained on: the shipped models used 100-107, 200 and 300-304). Prints per-pair Dice / AVD / lesion F1 for both
models and the paired comparison (mean ± SD, paired t-test for Dice and AVD).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-wmh", help="base model file (default: the shipped brain-wmh model)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=400)
    parser.add_argument("--slices", default="all-lesion")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument(
        "--angles", type=int, default=8, help="fixed angle set size; 0 = continuous angles as in the paper"
    )
    parser.add_argument(
        "--pixel-fraction",
        type=float,
        help="also fine-tune in the approximate mode with this pixel fraction and compare it with exact fine-tuning",
    )
    parser.add_argument("--out", help="per-pair CSV")
    args = parser.parse_args()

    from PatientFineTuneLib.finetune import FinetuneConfig, finetune_patient_model
    from PatientFineTuneLib.inference import segment_case
    from PatientFineTuneLib.metrics import compare_cohorts, evaluate_case
    from PatientFineTuneLib.modelcard import resolve_model_path
    from PatientFineTuneLib.modelfile import load_model
    from PatientFineTuneLib.postprocess import write_csv
    from PatientFineTuneLib.synth import generate_pair, visit_case

    base = load_model(resolve_model_path(args.model))
    rows = {"base": [], "finetuned": [], "approximate": []}
    for seed in range(args.seed, args.seed + args.pairs):
        t = time.perf_counter()
        pair = generate_pair("brain-wmh", seed)
        baseline, followup = visit_case(pair, "baseline"), visit_case(pair, "followup")
        models = [("base", base)]
        for name, fraction in (("finetuned", 1.0), ("approximate", args.pixel_fraction)):
            if fraction:
                config = FinetuneConfig(
                    iterations=args.iterations, n_angles=args.angles, seed=0, pixel_fraction=fraction
                )
                models.append(
                    (name, finetune_patient_model(base, baseline, args.slices, config, device="cpu", allow_empty=True))
                )
        spacing = followup.grid.GetSpacing()[::-1]
        line = [f"pair {seed}"]
        for name, bundle in models:
            mask = segment_case(bundle, followup, device="cpu").mask
            m = evaluate_case(followup.layout.from_slices(mask), followup.layout.from_slices(followup.lesions), spacing)
            rows[name].append({"case": seed, "model": name, **m})
            line.append(f"{name} Dice {m['dice']:.3f} AVD {m['avd_percent']:6.1f}% F1 {m['lesion_f1']:.3f}")
        print(", ".join(line) + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    print(
        f"\nfine-tuned ({args.slices}, {args.iterations} iterations) vs base on {args.pairs} synthetic brain-wmh pairs:"
    )
    for row in compare_cohorts(rows["finetuned"], rows["base"]):
        print(
            f"  {row['metric']}: {row['results']} vs {row['reference']} ({row['summary']}; {row['test']} p = {row['p']:.3g}, n = {row['n']})"
        )
    if args.pixel_fraction:
        print(f"\napproximate (pixel fraction {args.pixel_fraction}) vs exact fine-tuning:")
        for row in compare_cohorts(rows["approximate"], rows["finetuned"]):
            print(
                f"  {row['metric']}: {row['results']} vs {row['reference']} ({row['summary']}; {row['test']} p = {row['p']:.3g}, n = {row['n']})"
            )
    if args.out:
        write_csv(rows["base"] + rows["finetuned"] + rows["approximate"], args.out, overwrite=True)


if __name__ == "__main__":
    main()
