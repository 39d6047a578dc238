"""Cohort manifests for ``patient-finetune experiment`` from data sets laid out their own way.

``patient-finetune experiment --cohort`` reads a CSV manifest, or a folder of
``<patient>/{baseline,followup}/`` case folders (:func:`PatientFineTuneLib.experiment.write_folder_cohort`).
A data set with its own file names gets its manifest here:

    python Testing/benchmarks/cohorts.py tumor-progression ../shared/data/brain_tumor_progression \
        --out /tmp/btp/cohort.csv [--sequence T1c]
    patient-finetune experiment --model brain-tumor --cohort /tmp/btp/cohort.csv --out /tmp/btp/experiment
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path


def write_tumor_progression_cohort(
    root: str | os.PathLike, manifest: str | os.PathLike, sequence_name: str = "T1c"
) -> Path:
    """A cohort manifest for TCIA Brain-Tumor-Progression as shipped in ``../shared/data``:
    ``NN/{Pre,Post}_Scan_T1.nii.gz`` (T1 post-contrast) with ``{Pre,Post}_Mask.nii.gz``
    (enhancing tumour); Pre is the baseline, Post the follow-up; no brain mask."""
    root, manifest = Path(root), Path(manifest)
    rows = []
    for patient in sorted(
        p for p in root.iterdir() if (p / "Pre_Scan_T1.nii.gz").is_file() and (p / "Post_Scan_T1.nii.gz").is_file()
    ):
        for visit, prefix in (("baseline", "Pre"), ("followup", "Post")):
            rows.append(
                {
                    "patient": patient.name,
                    "visit": visit,
                    sequence_name: os.path.relpath(patient / f"{prefix}_Scan_T1.nii.gz", manifest.parent),
                    "lesions": os.path.relpath(patient / f"{prefix}_Mask.nii.gz", manifest.parent),
                    "organ": "",
                }
            )
    if not rows:
        raise FileNotFoundError(f"no NN/Pre_Scan_T1.nii.gz + Post_Scan_T1.nii.gz under {root}")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["patient", "visit", sequence_name, "lesions", "organ"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


COHORTS = {"tumor-progression": write_tumor_progression_cohort}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dataset",
        choices=sorted(COHORTS),
        help="tumor-progression: TCIA Brain-Tumor-Progression (NN/{Pre,Post}_Scan_T1.nii.gz)",
    )
    parser.add_argument("root", type=Path, help="the data set's folder")
    parser.add_argument(
        "--out", type=Path, required=True, help="the manifest to write (CSV; paths in it are relative to its folder)"
    )
    parser.add_argument(
        "--sequence",
        default="T1c",
        help="the model's sequence name the scans are read as (default T1c, the brain-tumor preset's)",
    )
    args = parser.parse_args(argv)
    print(COHORTS[args.dataset](args.root, args.out, args.sequence))


if __name__ == "__main__":
    main()
