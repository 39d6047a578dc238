"""The files a segmentation is written as (``segment``'s output folder): written in one
place for the command line, the demo and the web app, and read back in one place for the
report and the Slicer module."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from .files import atomic_write, json_ready, output_set
from .postprocess import write_csv

if TYPE_CHECKING:  # the Slicer module reads outputs in Slicer's process, which never imports PyTorch
    from .images import Case

#: Output files of a segmentation, by role.
SEGMENT_FILES = {
    "segmentation": "segmentation.nii.gz",
    "labels": "lesion_labels.nii.gz",
    "probability": "probability.nii.gz",
    "table": "lesions.csv",
    "organ": "organ_mask.nii.gz",
    "uncertainty": "uncertainty_sd.nii.gz",
    "summary": "uncertainty.json",
    "suggestions": "suggestions.json",
}


def write_segment_outputs(
    case: Case,
    result,
    folder: str | Path,
    overwrite: bool = False,
    organ: bool = False,
    suggestions: list[dict] | None = None,
    **summary_extra,
) -> dict[str, Path]:
    """Write a :class:`~PatientFineTuneLib.inference.Segmentation` of ``case`` into
    ``folder`` on the case's input grid: the 0/1 segmentation, the lesion labels, the
    probability, the lesion table, with ``organ`` the organ mask used, with an
    uncertainty the SD map and its summary (plus ``summary_extra``, e.g. the MC sample
    count), and the ``suggestions`` (slices worth annotating) when given.

    The files appear together or not at all (:func:`~PatientFineTuneLib.files.output_set`):
    a full disk or a cancel leaves no part of them. With ``overwrite``, an earlier run's
    files that this one does not write are removed (they would read as this run's).
    Returns the files written, by role.
    """
    from .images import write_image  # needs PyTorch: only where outputs are written

    folder = Path(folder)
    written = {}
    with output_set(folder, overwrite, replaces=SEGMENT_FILES.values()) as stage:

        def image(role, array, pixel_type=None):
            write_image(case.to_image(array, pixel_type), stage / SEGMENT_FILES[role])
            written[role] = folder / SEGMENT_FILES[role]

        def text(role, value):
            atomic_write(
                stage / SEGMENT_FILES[role], lambda tmp: Path(tmp).write_text(json.dumps(json_ready(value), indent=2))
            )
            written[role] = folder / SEGMENT_FILES[role]

        image("segmentation", result.mask.astype(np.uint8), sitk.sitkUInt8)
        image("labels", result.labels.astype(np.uint16), sitk.sitkUInt16)
        image("probability", result.probability)
        write_csv(result.lesions, stage / SEGMENT_FILES["table"])
        written["table"] = folder / SEGMENT_FILES["table"]
        if organ:
            image("organ", case.organ.astype(np.uint8), sitk.sitkUInt8)
        if result.uncertainty is not None:
            image("uncertainty", result.uncertainty.sd)
            text("summary", result.summary | summary_extra)
        if suggestions is not None:
            text("suggestions", suggestions)
    return written


#: What every segmentation writes, whatever its options (the rest is optional).
REQUIRED_ROLES = ("segmentation", "labels", "probability", "table")


class IncompleteResult(ValueError):
    """A segment output folder lacks a file every segmentation writes, or its files
    disagree (a run that did not finish, or files removed or edited by hand)."""


def _table_value(column: str, text: str | None, folder: Path, line: int) -> int | float:
    """One cell of the lesion table: ids and voxel counts as integers, the rest as floats
    (NaN where empty); a hand-edited or cut table is refused naming the file, the line and
    the column."""
    try:
        if column in ("id", "voxels"):
            return int(text)
        return float(text) if text not in ("", None) else float("nan")
    except (TypeError, ValueError):
        kind = "a whole number" if column in ("id", "voxels") else "a number"
        raise IncompleteResult(
            f"{folder / SEGMENT_FILES['table']}, line {line}: {column} is {text!r}, not {kind}; "
            "it is not a lesion table as segment writes it: segment the case again"
        ) from None


def read_segment_outputs(folder: str | Path) -> dict:
    """What :func:`write_segment_outputs` wrote: ``segmentation``, ``probability`` and
    ``uncertainty`` as SimpleITK images (the last None when absent), ``lesions`` (the
    lesion table's rows: ids and voxel counts as integers, the rest as floats, NaN where
    empty) and ``summary`` (the uncertainty summary, or None).

    Raises IncompleteResult for a folder that is not a whole result (a file every
    segmentation writes is missing, the lesion table is empty or does not list the lesions
    of the label image): read as it is, it would say "0 lesions" beside outlines that
    show lesions.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give a segment output folder")
    missing = [SEGMENT_FILES[r] for r in REQUIRED_ROLES if not (folder / SEGMENT_FILES[r]).is_file()]
    if missing:
        raise IncompleteResult(
            f"{folder} is not a complete segment result: {', '.join(missing)} missing; segment the case again into it"
        )

    def image(role):
        path = folder / SEGMENT_FILES[role]
        return sitk.ReadImage(str(path)) if path.is_file() else None

    with open(folder / SEGMENT_FILES["table"], newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "id" not in reader.fieldnames:
            raise IncompleteResult(
                f"{folder} is not a complete segment result: an empty {SEGMENT_FILES['table']} (no header); segment the case again into it"
            )
        lesions = [{k: _table_value(k, v, folder, reader.line_num) for k, v in row.items()} for row in reader]
    labels = np.unique(sitk.GetArrayFromImage(image("labels")))
    labelled = int((labels > 0).sum())
    if labelled != len(lesions):
        raise IncompleteResult(
            f"{folder} is not a complete segment result: {SEGMENT_FILES['table']} lists {len(lesions)} lesion(s) but "
            f"the lesion labels ({SEGMENT_FILES['labels']}) hold {labelled}; segment the case again into it"
        )
    summary_path = folder / SEGMENT_FILES["summary"]
    return {
        "segmentation": image("segmentation"),
        "probability": image("probability"),
        "uncertainty": image("uncertainty"),
        "lesions": lesions,
        "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None,
    }
