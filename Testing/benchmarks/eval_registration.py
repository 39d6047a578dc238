"""Follow-up registration of raw real pairs: which mask and pre-processing close the gap
to the reference transforms supplied with the data.

    python Testing/benchmarks/eval_registration.py [--data ../shared/data] [--json out.json]

Ljubljana longitudinal MS, patients 01 and 12: study 2's FLAIR is registered onto study
1's FLAIR (native scanner space, skull on) with :func:`registration.register_followup`
(rigid then affine) under each variant, and every result is judged the same way: the
FLAIR correlation inside the reference brain mask (``brainmask_common`` taken to study 1
through the supplied transform), against the same correlation under the supplied
transforms (study 1 -> common -> study 2).

Variants (the metric mask restricts where the registration looks):

- ``reference mask``: the supplied brain mask (what the real-data test uses)
- ``no mask``: the whole field of view, skull and neck included
- ``deepbet mask``: :func:`brainmask.deepbet_brain_mask` of study 1 (what a user without
  a reference mask gets)
- ``deepbet mask + N4``: both studies bias-corrected inside their deepbet masks first
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PatientFineTuneLib.brainmask import deepbet_brain_mask, head_pair_for_registration
from PatientFineTuneLib.registration import masked_correlation, register_followup

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def as_mask(array: np.ndarray, image: sitk.Image) -> sitk.Image:
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for patient in ("patient01", "patient12"):
        folder = args.data / "ljubljana_ms_longitudinal" / patient
        if not folder.is_dir():
            print(f"no real data at {folder}; skipped")
            continue
        study1 = sitk.ReadImage(str(folder / "study1_FLAIR.nii.gz"), sitk.sitkFloat32)
        study2 = sitk.ReadImage(str(folder / "study2_FLAIR.nii.gz"), sitk.sitkFloat32)
        to_common1 = sitk.ReadTransform(str(folder / "study1_FLAIR_to_common_space.txt"))
        to_common2 = sitk.ReadTransform(str(folder / "study2_FLAIR_to_common_space.txt"))
        judge = sitk.Resample(
            sitk.ReadImage(str(folder / "brainmask_common.nii.gz")),
            study1,
            to_common1.GetInverse(),
            sitk.sitkNearestNeighbor,
            0,
        )
        supplied = sitk.CompositeTransform([to_common2, to_common1.GetInverse()])
        reference = masked_correlation(study1, sitk.Resample(study2, study1, supplied, sitk.sitkLinear, 0.0), judge)
        brain1 = deepbet_brain_mask(study1)
        variants = {
            "reference mask": (study1, study2, judge),
            "no mask": (study1, study2, None),
            "deepbet mask": (study1, study2, as_mask(brain1, study1)),
            "deepbet mask + N4": head_pair_for_registration(
                study1, study2, skull_stripped="no"
            ),  # what compare --baseline-organ brain does
        }
        for name, (fixed, moving, mask) in variants.items():
            start = time.perf_counter()
            result = register_followup(fixed, moving, mask)
            seconds = time.perf_counter() - start
            # judged on the raw FLAIRs, inside the reference brain, whatever the variant saw
            after = masked_correlation(
                study1, sitk.Resample(study2, study1, result.transform, sitk.sitkLinear, 0.0), judge
            )
            rows.append(
                {
                    "patient": patient[-2:],
                    "variant": name,
                    "correlation": round(after, 4),
                    "supplied": round(reference, 4),
                    "gap": round(reference - after, 4),
                    "seconds": round(seconds, 1),
                }
            )
            print(
                f"{patient}  {name:<18} correlation {after:.4f}  supplied transforms {reference:.4f}  gap {reference - after:+.4f}  {seconds:5.1f} s",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
