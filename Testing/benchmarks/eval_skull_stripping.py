"""Brain masks of skull-on real scans: the built-in heuristic against offline skull strippers.

    python Testing/benchmarks/eval_skull_stripping.py [--data ../shared/data] [--methods heuristic,deepbet] [--json out.json]

Every skull-on scan of ``../shared/data`` is masked by each method and scored:

- Ljubljana longitudinal MS, patients 01 and 12, studies 1 and 2, FLAIR and T1W (native
  scanner space, skull on): Dice against the reference brain mask supplied in the common
  space. A mask on the FLAIR grid is taken to the common grid through the supplied
  ``studyN_FLAIR_to_common_space.txt``; a T1W mask first onto its study's FLAIR grid
  through ``studyN_T1W_intrastudy_to_FLAIR.txt`` (nearest neighbour both times).
- Brain-Tumor-Progression 01-03, Pre and Post (T1 post-contrast, skull on, no reference
  brain mask): the fraction of the enhancing-tumour mask inside the brain mask (it must
  be 1: the tumour is brain) and the mask's volume in voxels.

Methods: ``heuristic`` (:func:`PatientFineTuneLib.images.auto_brain_mask`, what the
library does today without ``--organ``) and ``deepbet`` (``deepbet.BrainExtraction``,
version 1.0.2 from PyPI, weights inside the wheel; run on the CPU; not a dependency of
the project: install it beside to measure it). Time per scan is wall time on this machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PatientFineTuneLib.images import auto_brain_mask

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def scans(data: Path) -> list[dict]:
    out = []
    for patient in ("patient01", "patient12"):
        folder = data / "ljubljana_ms_longitudinal" / patient
        for study in ("study1", "study2"):
            for sequence in ("FLAIR", "T1W"):
                out.append({"name": f"Ljubljana {patient[-2:]} {study} {sequence}", "image": folder / f"{study}_{sequence}.nii.gz",
                            "reference": folder / "brainmask_common.nii.gz", "to_common": folder / f"{study}_FLAIR_to_common_space.txt",
                            "flair": folder / f"{study}_FLAIR.nii.gz",
                            "to_flair": folder / f"{study}_T1W_intrastudy_to_FLAIR.txt" if sequence == "T1W" else None})
    for n in ("01", "02", "03"):
        for visit in ("Pre", "Post"):
            folder = data / "brain_tumor_progression" / n
            out.append({"name": f"BTP {n} {visit} T1c", "image": folder / f"{visit}_Scan_T1.nii.gz", "tumour": folder / f"{visit}_Mask.nii.gz"})
    return out


def heuristic_mask(image: sitk.Image) -> sitk.Image:
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    mask = sitk.GetImageFromArray(auto_brain_mask(volume, image.GetSpacing()[::-1]).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def deepbet_masker():
    import nibabel as nib
    from deepbet import BrainExtraction

    extractor = BrainExtraction(no_gpu=True)

    def mask_of(path: Path) -> sitk.Image:
        _, mask, _ = extractor.run(nib.load(str(path)))
        # deepbet returns its mask as a NIfTI in the input's voxel order: read it back
        # through a file so that SimpleITK gives it the input's geometry
        with tempfile.TemporaryDirectory() as tmp:
            mask.to_filename(f"{tmp}/mask.nii.gz")
            return sitk.ReadImage(f"{tmp}/mask.nii.gz", sitk.sitkUInt8)

    return mask_of


def onto(mask: sitk.Image, grid: sitk.Image, transform_file: Path) -> sitk.Image:
    return sitk.Resample(mask, grid, sitk.ReadTransform(str(transform_file)), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


def score(scan: dict, mask: sitk.Image) -> dict:
    if "reference" in scan:
        if scan["to_flair"] is not None:
            mask = onto(mask, sitk.ReadImage(str(scan["flair"])), scan["to_flair"])
        reference = sitk.ReadImage(str(scan["reference"]))
        common = onto(mask, reference, scan["to_common"])
        return {"dice_to_reference": round(dice(sitk.GetArrayFromImage(common) > 0, sitk.GetArrayFromImage(reference) > 0), 4)}
    tumour = sitk.GetArrayFromImage(sitk.ReadImage(str(scan["tumour"]))) > 0
    inside = sitk.GetArrayFromImage(mask) > 0
    return {"tumour_inside": round(float((tumour & inside).sum()) / max(1, int(tumour.sum())), 4), "mask_voxels": int(inside.sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--methods", default="heuristic,deepbet")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no real data at {args.data}; nothing to do")
        return 0
    methods = {}
    for name in args.methods.split(","):
        if name == "heuristic":
            methods[name] = lambda path: heuristic_mask(sitk.ReadImage(str(path), sitk.sitkFloat32))
        elif name == "deepbet":
            methods[name] = deepbet_masker()
        else:
            raise SystemExit(f"unknown method {name!r}: heuristic or deepbet")
    rows = []
    for scan in scans(args.data):
        for name, mask_of in methods.items():
            start = time.perf_counter()
            mask = mask_of(scan["image"])
            seconds = time.perf_counter() - start
            row = {"scan": scan["name"], "method": name, "seconds": round(seconds, 1), **score(scan, mask)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
