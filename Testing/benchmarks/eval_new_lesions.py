"""New-lesion segmentation from the FLAIR subtraction (Wahlig et al. 2023), end to end.

Generates synthetic brain-wmh pairs (train seeds 100.., validation 200, test 300..),
turns each into a ``brain-new-lesions`` case (follow-up FLAIR + subtraction of the
registered baseline, target = the follow-up lesions that touch no baseline lesion),
trains a model with ``patient-finetune train-base``, and reports Dice and lesion-wise
sensitivity / PPV on the held-out synthetic pairs and on the two Ljubljana longitudinal
patients (whose reference is their change mask: new, enlarged and shrunk lesion voxels).

    python Testing/benchmarks/eval_new_lesions.py --work /tmp/pft-new --iterations 1500 --width 16
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from PatientFineTuneLib.synth import generate_pair, write_pair  # noqa: E402

from newlesions import ljubljana_case, synthetic_pair_case  # noqa: E402

LJUBLJANA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ljubljana_ms_longitudinal"


def build_cases(work: Path, n_train: int, n_test: int) -> dict[str, list[Path]]:
    seeds = {"train": range(100, 100 + n_train), "val": [200], "test": range(300, 300 + n_test)}
    cases = {}
    for split, split_seeds in seeds.items():
        cases[split] = []
        for seed in split_seeds:
            pair, case = work / "pairs" / f"patient{seed}", work / "cases" / split / f"patient{seed}"
            if not (case / "lesions.nii.gz").is_file():
                if not (pair / "followup" / "lesions.nii.gz").is_file():
                    write_pair(generate_pair("brain-wmh", seed), pair, overwrite=True, preview=False)
                quality = synthetic_pair_case(pair, case)
                print(
                    f"{split} patient{seed}: registration correlation {quality['correlation_before']:.2f} -> "
                    f"{quality['correlation_after']:.2f}, {quality['new_lesions']} new lesions",
                    flush=True,
                )
            cases[split].append(case)
    cases["ljubljana"] = []
    for patient in ("patient01", "patient12"):
        if (LJUBLJANA / patient).is_dir():
            case = work / "cases" / "ljubljana" / patient
            if not (case / "lesions.nii.gz").is_file():
                ljubljana_case(LJUBLJANA / patient, case)
            cases["ljubljana"].append(case)
    return cases


def evaluate(model_path: Path, cases: list[Path]) -> list[dict]:
    from PatientFineTuneLib.images import load_case, prepare_case
    from PatientFineTuneLib.inference import segment_case
    from PatientFineTuneLib.metrics import dice, lesion_detection
    from PatientFineTuneLib.modelfile import load_model

    bundle = load_model(model_path)
    rows = []
    for folder in cases:
        case = prepare_case(
            load_case(
                [folder / "FLAIR.nii.gz", folder / "FLAIR_subtraction.nii.gz"],
                folder / "organ.nii.gz",
                folder / "lesions.nii.gz",
            )
        )
        result = segment_case(bundle, case, device="cpu")
        pred, gt = case.layout.from_slices(result.mask), case.layout.from_slices(case.lesions)
        detection = lesion_detection(pred, gt)
        rows.append({"case": folder.name, "dice": dice(pred, gt), **detection})
    return rows


def table(name: str, rows: list[dict]) -> str:
    lines = [
        f"| {name} | Dice | reference lesions | found | sensitivity | predicted | PPV |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['dice']:.2f} | {r['gt_lesions']} | {r['detected_gt_lesions']} | {r['lesion_recall']:.2f} | "
            f"{r['pred_lesions']} | {r['lesion_precision']:.2f} |"
        )
    if len(rows) > 1:
        found, total = sum(r["detected_gt_lesions"] for r in rows), sum(r["gt_lesions"] for r in rows)
        predicted, false = sum(r["pred_lesions"] for r in rows), sum(r["fp_count"] for r in rows)
        lines.append(
            f"| all (pooled) | {np.mean([r['dice'] for r in rows]):.2f} (mean) | {total} | {found} | {found / max(total, 1):.2f} | "
            f"{predicted} | {(predicted - false) / max(predicted, 1):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train-pairs", type=int, default=8)
    parser.add_argument("--test-pairs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--precision", default="amp")
    args = parser.parse_args()

    start = time.perf_counter()
    cases = build_cases(args.work, args.train_pairs, args.test_pairs)
    print(f"cases ready in {time.perf_counter() - start:.0f} s", flush=True)
    model = args.work / "brain-new-lesions.pt"
    if not model.is_file():
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "PatientFineTuneLib.cli",
                "train-base",
                "--preset",
                "brain-new-lesions",
                "--train",
                str(args.work / "cases" / "train"),
                "--val",
                str(args.work / "cases" / "val"),
                "--out",
                str(model),
                "--iterations",
                str(args.iterations),
                "--width",
                str(args.width),
                "--precision",
                args.precision,
            ],
            check=True,
        )
        print(f"trained in {time.perf_counter() - t:.0f} s", flush=True)
    print(table("synthetic test pair (target: new lesions)", evaluate(model, cases["test"])))
    if cases["ljubljana"]:
        print()
        print(table("Ljubljana (reference: change mask)", evaluate(model, cases["ljubljana"])))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
