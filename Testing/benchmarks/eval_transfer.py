"""Cohort transfer learning with the 3D U-Net (Kaur et al. 2019): fine-tuning strategies against
de-novo training on the same N target studies.

Two settings, one input sequence each (the source and target must share the network's
input):
  synthetic  source = brain-wmh FLAIR (white-matter lesions), target = brain-tumor T1c
             (enhancing tumours), generated here; N in --ns, tested on --test held-out
             target studies;
  real       source = Ljubljana MS cross-sectional FLAIR (3 patients), target = BraTS
             FLAIR with the whole tumour as lesion (6 cases: 2 held out, N in {2, 4}).

Arms for each N: ``de-novo`` (a fresh U-Net), ``all`` / ``decoder`` / ``last-layers``
(the last three layers replaced with new ones first, as in Kaur et al. 2019), ``head`` (only the
output layer, kept, as in patient-specific fine-tuning), and ``source`` (the source model
as is). Every trained arm gets the same iterations. Reports Dice and lesion-wise
sensitivity / PPV (26-connected, any overlap) per arm and N; writes results.csv and a
Markdown table into --work.

    python Testing/benchmarks/eval_transfer.py --work /tmp/pft-transfer

The defaults are a reduced CPU configuration (2 mm voxels, width 8, a few hundred
iterations; Wahlig et al. 2023 train at 1 mm for 30 epochs): compare arms with each other, not
with the papers' absolute numbers.
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
ARMS = ("source", "de-novo", "all", "decoder", "last-layers", "head")


def one_sequence(case, index: int):
    """The case with only sequence ``index`` (a one-pathway model's input)."""
    return replace(case, images=case.images[index : index + 1])


def synthetic_cases(preset: str, seeds, sequence: int):
    from PatientFineTuneLib.synth import generate_pair, visit_case

    cases = []
    for seed in seeds:
        case = one_sequence(visit_case(generate_pair(preset, seed), "baseline"), sequence)
        cases.append(replace(case, name=f"{preset}-{seed}"))
    return cases


def real_cases(folder: Path, pattern: tuple[str, str, str | None]):
    from PatientFineTuneLib.images import load_case, prepare_case

    image, lesions, organ = pattern
    return [
        prepare_case(
            load_case([p / image], organ_path=p / organ if organ else None, lesion_path=p / lesions, name=p.name)
        )
        for p in sorted(folder.iterdir())
        if (p / image).is_file()
    ]


def evaluate(bundle, cases) -> dict:
    from PatientFineTuneLib.inference import predict_probability
    from PatientFineTuneLib.metrics import dice, lesion_detection
    from PatientFineTuneLib.postprocess import postprocess

    scores = []
    for case in cases:
        mask = postprocess(predict_probability(bundle, case, device="cpu"), case.organ)
        detection = lesion_detection(mask, case.lesions)
        scores.append((dice(mask, case.lesions), detection["lesion_recall"], detection["lesion_precision"]))
    return dict(zip(("dice", "sensitivity", "ppv"), np.mean(scores, axis=0)))


def run_setting(name: str, source_cases, target_pool, test_cases, ns, args, writer) -> list[dict]:
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata
    from PatientFineTuneLib.volume_training import (
        VolumeTrainingConfig,
        finetune_volume_model,
        new_volume_model,
        train_volume_model,
        volume_model_metadata,
    )

    config = VolumeTrainingConfig(
        iterations=args.source_iterations,
        learning_rate=args.learning_rate,
        spacing_mm=args.spacing_mm,
        batch_size=args.batch_size,
        class_weights=(1.0, args.lesion_weight),
        seed=args.seed,
    )
    sequences = [{"name": "input", "channels": 1}]

    def bundle_of(model):
        return ModelBundle(
            model, make_metadata(model, sequences, (config.spacing_mm,) * 3, **volume_model_metadata(config, model))
        )

    t = time.perf_counter()
    source = new_volume_model((1,), width=args.width, seed=args.seed)
    train_volume_model(source, source_cases, config, device="cpu")
    source = bundle_of(source)
    print(
        f"[{name}] source model: {len(source_cases)} studies, {config.iterations} iterations, {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    rows = []
    target_config = replace(config, iterations=args.iterations)
    for n in ns:
        train = target_pool[:n]
        for arm in ARMS:
            t = time.perf_counter()
            if arm == "source":
                model = source
            elif arm == "de-novo":
                fresh = new_volume_model((1,), width=args.width, seed=args.seed + 1)
                train_volume_model(fresh, train, target_config, device="cpu")
                model = bundle_of(fresh)
            else:
                strategy_config = replace(target_config, strategy=arm, reset_last_layers=arm != "head")
                model = finetune_volume_model(source, train, strategy_config, device="cpu")
            row = {
                "setting": name,
                "n": n,
                "arm": arm,
                **evaluate(model, test_cases),
                "seconds": round(time.perf_counter() - t, 1),
            }
            print(
                f"[{name}] N={n} {arm:12s} Dice {row['dice']:.3f} sensitivity {row['sensitivity']:.3f} PPV {row['ppv']:.3f} ({row['seconds']} s)",
                flush=True,
            )
            writer.writerow(row)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        ns = sorted({r["n"] for r in rows if r["setting"] == setting})
        lines += [
            f"**{setting}** (Dice / lesion sensitivity / lesion PPV on the held-out target studies)",
            "",
            "| arm | " + " | ".join(f"N = {n}" for n in ns) + " |",
            "|---|" + "---|" * len(ns),
        ]
        for arm in ARMS:
            cells = []
            for n in ns:
                r = next(r for r in rows if r["setting"] == setting and r["n"] == n and r["arm"] == arm)
                cells.append(f"{r['dice']:.2f} / {r['sensitivity']:.2f} / {r['ppv']:.2f}")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--settings", nargs="+", default=["synthetic", "real"], choices=["synthetic", "real"])
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 5, 10], help="target studies (synthetic)")
    parser.add_argument("--test", type=int, default=5, help="held-out synthetic target studies")
    parser.add_argument("--source-studies", type=int, default=10, help="synthetic source studies")
    parser.add_argument("--source-iterations", type=int, default=600)
    parser.add_argument(
        "--iterations", type=int, default=200, help="iterations of every trained arm on the target studies"
    )
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--spacing-mm", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--lesion-weight",
        type=float,
        default=5.0,
        help="cross-entropy weight of the lesion class (Kaur et al. 2019: weighted)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.work / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["setting", "n", "arm", "dice", "sensitivity", "ppv", "seconds"])
        writer.writeheader()
        if "synthetic" in args.settings:
            source = synthetic_cases("brain-wmh", range(600, 600 + args.source_studies), sequence=0)  # FLAIR
            pool = synthetic_cases("brain-tumor", range(700, 700 + max(args.ns)), sequence=0)  # T1c
            test = synthetic_cases("brain-tumor", range(800, 800 + args.test), sequence=0)
            rows += run_setting(
                "synthetic brain-wmh FLAIR -> brain-tumor T1c", source, pool, test, args.ns, args, writer
            )
        if "real" in args.settings:
            if not (DATA / "brats2015_subset").is_dir():
                print(f"real setting skipped: {DATA} has no brats2015_subset")
            else:
                source = real_cases(DATA / "ljubljana_ms_cross", ("FLAIR.nii.gz", "lesions.nii.gz", None))
                brats = real_cases(
                    DATA / "brats2015_subset",
                    ("Flair_subtrMeanDivStd.nii.gz", "OTMultiClass.nii.gz", "brainmask.nii.gz"),
                )
                test, pool = brats[:2], brats[2:]
                rows += run_setting(
                    "real Ljubljana MS FLAIR -> BraTS FLAIR whole tumour", source, pool, test, [2, 4], args, writer
                )
    table = markdown(rows)
    (args.work / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
