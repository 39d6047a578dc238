"""Brain masks of skull-on real scans: the built-in heuristic against offline skull strippers.

    python Testing/benchmarks/eval_skull_stripping.py [--data ../shared/data] [--methods heuristic,deepbet,auto] [--json out.json]

Every skull-on scan of ``../shared/data`` is masked by each method and scored:

- Ljubljana longitudinal MS, patients 01 and 12, studies 1 and 2, FLAIR and T1W (native
  scanner space, skull on): Dice against the reference brain mask supplied in the common
  space. A mask on the FLAIR grid is taken to the common grid through the supplied
  ``studyN_FLAIR_to_common_space.txt``; a T1W mask first onto its study's FLAIR grid
  through ``studyN_T1W_intrastudy_to_FLAIR.txt`` (nearest neighbour both times).
- Brain-Tumor-Progression 01-03, Pre and Post (T1 post-contrast, skull on, no reference
  brain mask): the fraction of the enhancing-tumour mask inside the brain mask (it must
  be 1: the tumour is brain) and the mask's volume in voxels.

Methods: ``heuristic`` (:func:`PatientFineTuneLib.brainmask.foreground_brain_mask`, the
library's only mask before deepbet), ``deepbet``
(:func:`PatientFineTuneLib.brainmask.deepbet_brain_mask`: deepbet 1.0.2, weights inside
its wheel, on the CPU) and ``auto`` (:func:`PatientFineTuneLib.brainmask.brain_mask`, what
``load_case`` does without an organ mask: detect skull-stripped scans, deepbet for the
others). Time per scan is wall time on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PatientFineTuneLib.brainmask import brain_mask, deepbet_brain_mask, foreground_brain_mask

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def scans(data: Path) -> list[dict]:
    out = []
    for patient in ("patient01", "patient12"):
        folder = data / "ljubljana_ms_longitudinal" / patient
        for study in ("study1", "study2"):
            for sequence in ("FLAIR", "T1W"):
                out.append(
                    {
                        "name": f"Ljubljana {patient[-2:]} {study} {sequence}",
                        "image": folder / f"{study}_{sequence}.nii.gz",
                        "reference": folder / "brainmask_common.nii.gz",
                        "to_common": folder / f"{study}_FLAIR_to_common_space.txt",
                        "flair": folder / f"{study}_FLAIR.nii.gz",
                        "to_flair": folder / f"{study}_T1W_intrastudy_to_FLAIR.txt" if sequence == "T1W" else None,
                    }
                )
    for n in ("01", "02", "03"):
        for visit in ("Pre", "Post"):
            folder = data / "brain_tumor_progression" / n
            out.append(
                {
                    "name": f"BTP {n} {visit} T1c",
                    "image": folder / f"{visit}_Scan_T1.nii.gz",
                    "tumour": folder / f"{visit}_Mask.nii.gz",
                }
            )
    return out


def as_image(mask: np.ndarray, image: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(mask.astype(np.uint8))
    out.CopyInformation(image)
    return out


METHODS = {
    "heuristic": lambda image: as_image(
        foreground_brain_mask(sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]), image
    ),
    "deepbet": lambda image: as_image(deepbet_brain_mask(image), image),
    "auto": lambda image: as_image(brain_mask(image).mask, image),
}


def onto(mask: sitk.Image, grid: sitk.Image, transform_file: Path) -> sitk.Image:
    return sitk.Resample(
        mask, grid, sitk.ReadTransform(str(transform_file)), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def score(scan: dict, mask: sitk.Image) -> dict:
    if "reference" in scan:
        if scan["to_flair"] is not None:
            mask = onto(mask, sitk.ReadImage(str(scan["flair"])), scan["to_flair"])
        reference = sitk.ReadImage(str(scan["reference"]))
        common = onto(mask, reference, scan["to_common"])
        return {
            "dice_to_reference": round(
                dice(sitk.GetArrayFromImage(common) > 0, sitk.GetArrayFromImage(reference) > 0), 4
            )
        }
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(scan["tumour"]))) > 0
    inside = sitk.GetArrayFromImage(mask) > 0
    return {
        "tumour_inside": round(float((tumour & inside).sum()) / max(1, int(tumour.sum())), 4),
        "mask_voxels": int(inside.sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--methods", default="heuristic,deepbet,auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no real data at {args.data}; nothing to do")
        return 0
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(sorted(unknown))}: choose from {', '.join(METHODS)}")
    rows = []
    for scan in scans(args.data):
        image = sitk.ReadImage(str(scan["image"]), sitk.sitkFloat32)
        for name in args.methods.split(","):
            start = time.perf_counter()
            mask = METHODS[name](image)
            seconds = time.perf_counter() - start
            row = {"scan": scan["name"], "method": name, "seconds": round(seconds, 1), **score(scan, mask)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
