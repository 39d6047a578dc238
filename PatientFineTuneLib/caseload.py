"""One way to read "these files, for this model": a normalised case in the model's
sequence order, with the notes the user should see about what was done to the inputs.

Every front end reads its cases here: the command line (``--case``/``--images`` and the
training folders), the Slicer module's in-process steps (volume nodes as SimpleITK images),
the experiment runner and the benchmarks. :func:`~.images.load_case` reads and checks one
case onto one grid; this module adds what depends on the model (its sequences, channels,
optional trailing sequences, automatic organ mask) and the normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cases import CaseFiles, find_cases, find_image
from .images import Case, load_case, prepare_case, with_absent_sequences
from .modelcard import describe_sequences, required_sequences


@dataclass(frozen=True)
class ScanOptions:
    """How scans are read (the command line's ``--skull-stripped``, ``--bias-correction``,
    ``--resample-to`` and ``--lesion-labels``); see :func:`~.images.load_case`."""

    skull_stripped: str = "auto"
    bias_correction: str = "auto"
    resample_to_first: bool = False
    lesion_labels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class LoadedCase:
    """A normalised case ready for the model, and what was done to its inputs that the user
    should know (the automatic brain mask, bias correction, a sequence read as absent)."""

    case: Case
    notes: tuple[str, ...] = ()


def load_for_model(
    sequences: Sequence[dict],
    images: Sequence,
    organ=None,
    lesions=None,
    *,
    auto_organ: bool,
    options: ScanOptions = ScanOptions(),
    series_uids: Sequence[str | None] | None = None,
    name: str = "",
    image_names: Sequence[str] | None = None,
) -> LoadedCase:
    """Read one case for a model.

    Parameters
    ----------
    sequences : the model's sequences (``ModelBundle.sequences`` or a preset's
        ``sequence_dicts()``): name, channels and whether it is optional.
    images : one file, DICOM folder or SimpleITK image per sequence, in the model's order;
        the trailing optional sequences may be left out.
    organ, lesions : the organ mask (None: automatic brain mask where ``auto_organ``) and
        the lesion mask (None: no annotation).
    auto_organ : whether a missing organ mask is computed (brain presets).
    options : how the scan is read.
    series_uids : per image, the DICOM series to read from a folder holding several.
    image_names : how to name each image in messages (default: the sequence names).

    Returns
    -------
    LoadedCase
        The normalised case, with zero channels for the absent optional sequences.
    """
    needed = required_sequences(sequences)
    if not needed <= len(images) <= len(sequences):
        raise ValueError(
            f"the model needs {len(sequences)} file(s) in the order {describe_sequences(sequences)}; got {len(images)}"
        )
    given = list(sequences[: len(images)])
    case = load_case(
        images,
        organ_path=organ,
        lesion_path=lesions,
        expected_channels=[s["channels"] for s in given],
        sequence_names=list(image_names or [s["name"] for s in given]),
        resample_to_first=options.resample_to_first,
        lesion_labels=options.lesion_labels,
        auto_organ=auto_organ,
        name=name,
        skull_stripped=options.skull_stripped,
        bias_correction=options.bias_correction,
        series_uids=series_uids,
    )
    notes = []
    if organ is None and auto_organ:
        notes.append(case.sources["organ"])
    if case.sources["bias_corrected"]:
        notes.append("bias field corrected (N4) inside the brain mask")
    prepared = prepare_case(case)
    if len(given) < len(sequences):
        absent = ", ".join(s["name"] for s in sequences[len(given) :])
        notes.append(f"no {absent}: this model was trained to read {', '.join(s['name'] for s in given)} without it")
        prepared = with_absent_sequences(prepared, sum(s["channels"] for s in sequences))
    return LoadedCase(prepared, tuple(notes))


def case_folder_files(folder: str | os.PathLike, sequences: Sequence[dict], lesions: bool = False) -> CaseFiles:
    """The files of a case folder for a model: one ``<sequence>.*`` per sequence (the
    trailing optional ones may be missing), ``organ.*`` and, if asked, ``lesions.*``."""
    folder = Path(folder)
    paths = [find_image(folder, s["name"]) for s in sequences]
    found = next((i for i, p in enumerate(paths) if p is None), len(paths))  # sequences found, in order
    if found < required_sequences(sequences) or any(p is not None for p in paths[found:]):
        missing = [s["name"] for s, p in zip(sequences, paths) if p is None]
        raise FileNotFoundError(
            f"{folder} has no image for sequence(s) {', '.join(missing)} (expected {', '.join(s['name'] + '.nii.gz' for s in sequences)})"
        )
    return CaseFiles(
        folder.name, paths[:found], find_image(folder, "lesions") if lesions else None, find_image(folder, "organ")
    )


def load_training_cases(
    root: str | os.PathLike,
    sequences: Sequence[dict],
    *,
    auto_organ: bool,
    options: ScanOptions = ScanOptions(),
    shard: tuple[int, int] = (0, 1),
    progress: Callable | None = None,
) -> list[Case]:
    """Every annotated case under ``root`` (a folder of case folders or a CSV manifest; see
    :func:`~.cases.find_cases`), normalised. ``shard=(rank, world)`` keeps every world-th
    case starting at rank (each distributed training process loads only its own);
    ``progress`` wraps the iteration over the case files (e.g. ``tqdm``)."""
    files = find_cases(root, [s["name"] for s in sequences])
    rank, world = shard
    if len(files) < world:
        raise ValueError(
            f"{len(files)} training case(s) cannot be shared among {world} processes; use at most {len(files)}"
        )
    cases = []
    for f in (progress or iter)(files[rank::world]):
        if f.lesions is None:
            raise FileNotFoundError(f"case {f.name} has no lesion mask (lesions.nii.gz or a 'lesions' manifest column)")
        cases.append(
            load_for_model(
                sequences, f.sequences, f.organ, f.lesions, auto_organ=auto_organ, options=options, name=f.name
            ).case
        )
    return cases
