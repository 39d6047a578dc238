"""Where fine-tuning on part of a real scan's lesion slices helps or harms, per iteration count.

For one within-scan run of ``eval_real_finetune.py`` (a single-visit real scan, a subset of
its lesion slices annotated), fine-tune with the shipped settings but without the
never-worse check, for each iteration count, and score base and fine-tuned models on the
slices not annotated: Dice, AVD, lesion F1, and where the false positives lie, on the
unannotated lesion slices (which the check's held-out slices resemble) or on the
lesion-free slices (which the check never sees when only lesion slices are annotated).

    python Testing/benchmarks/real_finetune_by_count.py --case brats_2013_pat0005_1 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from PatientFineTuneLib import inference, modelcard, modelfile  # noqa: E402
from PatientFineTuneLib.finetune import finetune_patient_model, shipped_config  # noqa: E402

from eval_real_base_models import DATA, ground_truth, real_cases  # noqa: E402
from eval_real_finetune import WITHIN_SCAN, annotated_slices, load, mask_scores  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--case", default="brats_2013_pat0005_1", choices=[n for names in WITHIN_SCAN.values() for n in names]
    )
    parser.add_argument("--route", default="every-other", choices=["every-other", "suggested-2"])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no real data at {args.data}; nothing to do")
        return 0
    torch.set_num_threads(args.threads)
    model = next(m for m, names in WITHIN_SCAN.items() if args.case in names)
    base = modelfile.load_model(modelcard.resolve_model_path(model))
    spec = next(s for s in real_cases(args.data) if s["case"] == args.case)
    case = load(spec, base)
    gt_stored, spacing = ground_truth(spec)
    chosen = annotated_slices(args.route, case, base)
    keep = np.ones(case.organ.shape[0], bool)
    keep[chosen] = False
    truth = case.layout.to_slices(gt_stored).astype(bool) & keep[:, None, None]
    on_lesion_slice = truth.any(axis=(1, 2))
    print(
        f"{args.case}, {args.route}: {len(chosen)} slices annotated, scored on the other {int(keep.sum())} "
        f"({int(on_lesion_slice.sum())} with lesion), {int(truth.sum())} lesion voxels there"
    )

    def report(name: str, bundle) -> None:
        predicted = inference.predict_mask(bundle, case, device="cpu") & keep[:, None, None]
        s = mask_scores(predicted, case, gt_stored, spacing, keep)
        false = predicted & ~truth
        print(
            f"{name:<8} Dice {s['dice']:.3f}  AVD {s['avd_percent']:4.0f} %  lesion F1 {s['lesion_f1']:.3f}  "
            f"predicted {int(predicted.sum()):6d} voxels, false positives on lesion slices {int(false[on_lesion_slice].sum()):6d}, "
            f"on lesion-free slices {int(false[~on_lesion_slice].sum()):6d}",
            flush=True,
        )

    report("base", base)
    for count in args.counts:
        config = shipped_config(base, holdout_check=False, iterations=count)
        report(f"{count} it", finetune_patient_model(base, case, chosen, config, device="cpu", allow_empty=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
