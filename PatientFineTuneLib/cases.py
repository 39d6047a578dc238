"""Finding cases on disk: a folder convention and a CSV manifest for any other layout.

Folder convention: a case is a folder holding one file per sequence named after the
sequence (``FLAIR.nii.gz``, ``T1.nii.gz``, ``DCE.nii.gz`` ...), optionally ``lesions.*``
and ``organ.*``. Any folder below the given root that has every sequence file is a case
(so ``patient01/baseline/`` and ``patient01/followup/`` are two cases).

Manifest: a CSV with a ``case`` column, one column per sequence name, and optional
``lesions`` and ``organ`` columns; relative paths are taken from the manifest's folder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class CaseFiles:
    name: str
    sequences: list[Path]
    lesions: Path | None = None
    organ: Path | None = None


def find_image(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` with any known image suffix, or None."""
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _from_manifest(path: Path, sequence_names: Sequence[str]) -> list[CaseFiles]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"manifest {path} has no rows")
    missing = [c for c in ["case", *sequence_names] if c not in rows[0]]
    if missing:
        raise ValueError(
            f"manifest {path} lacks column(s) {', '.join(missing)}; it needs case, {', '.join(sequence_names)}[, lesions, organ]"
        )
    base = path.parent

    def resolve(value):
        return (base / value).resolve() if value else None

    return [
        CaseFiles(
            name=row["case"],
            sequences=[resolve(row[s]) for s in sequence_names],
            lesions=resolve(row.get("lesions")),
            organ=resolve(row.get("organ")),
        )
        for row in rows
    ]


def find_cases(root: str | os.PathLike, sequence_names: Sequence[str]) -> list[CaseFiles]:
    """Cases under a folder (folder convention) or listed in a ``.csv`` manifest, sorted by name."""
    root = Path(root)
    if root.suffix.lower() == ".csv":
        return _from_manifest(root, sequence_names)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is neither a folder of cases nor a .csv manifest")
    cases = []
    for folder in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
        sequences = [find_image(folder, s) for s in sequence_names]
        if all(sequences):
            name = str(folder.relative_to(root)) if folder != root else folder.name
            cases.append(CaseFiles(name, sequences, find_image(folder, "lesions"), find_image(folder, "organ")))
    if not cases:
        raise FileNotFoundError(
            f"no case found under {root}: a case folder holds {', '.join(s + '.nii.gz' for s in sequence_names)} "
            "(any SimpleITK format), or pass a CSV manifest"
        )
    return cases
