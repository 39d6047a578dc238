"""Synthetic longitudinal patients (baseline + follow-up) for tests, demos and
experiments. One module per anatomy; :func:`generate_pair` dispatches on the preset."""

from __future__ import annotations

PRESET_GENERATORS = ("brain-wmh", "brain-tumor", "liver-metastases")


def generate_pair(preset: str, seed: int, small: bool = False) -> dict:
    """Generate one patient pair in memory.

    Returns a dict with ``visits`` ({"baseline"|"followup": {"images": {seq: array},
    "organ": bool array, "lesions": bool array}}), ``grid`` and ``info`` (parameters and
    the lesion evolution record). ``small`` gives a reduced field of view for fast tests.
    """
    if preset in ("brain-wmh", "brain-tumor"):
        from .brain import BRAIN_GRID
        from .brain import generate_pair as brain_pair
        from .common import Grid

        grid = Grid((12, 96, 96), (3.0, 2.0, 2.0)) if small else BRAIN_GRID
        return brain_pair(preset, seed, grid)
    if preset == "liver-metastases":
        from .common import Grid
        from .liver import LIVER_GRID
        from .liver import generate_pair as liver_pair

        grid = Grid((24, 96, 96), (5.0, 4.0, 4.0)) if small else LIVER_GRID
        return liver_pair(seed, grid)
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_GENERATORS)}")


def write_pair(pair: dict, folder, overwrite: bool = False, preview: bool = True) -> None:
    """Write a generated pair as ``folder/{baseline,followup}/{<SEQ>,organ,lesions}.nii.gz``
    plus ``patient.json`` (parameters, lesion evolution) and ``preview.png``.

    The patient folder is assembled under a temporary name and renamed at the end, so an
    interrupted run never leaves a half-written patient.
    """
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import numpy as np
    import SimpleITK as sitk

    from ..montage import montage, radiological, save_png, volume_montage
    from .common import STORAGE_DIRECTION, to_image

    folder = Path(folder)
    if folder.exists():
        if not overwrite:
            raise FileExistsError(f"{folder} already exists; choose another folder or pass --overwrite")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        grid = pair["grid"]
        tiles, outlines = [], []
        for visit, data in pair["visits"].items():
            (tmp / visit).mkdir()
            for seq, array in data["images"].items():
                sitk.WriteImage(to_image(array, grid), str(tmp / visit / f"{seq}.nii.gz"), True)
            sitk.WriteImage(to_image(data["organ"], grid, sitk.sitkUInt8), str(tmp / visit / "organ.nii.gz"), True)
            sitk.WriteImage(to_image(data["lesions"], grid, sitk.sitkUInt8), str(tmp / visit / "lesions.nii.gz"), True)
            first = next(iter(data["images"].values()))
            first = first if first.ndim == 3 else first[len(first) // 2]
            direction = np.diag(STORAGE_DIRECTION)
            t, o = volume_montage(radiological(first, direction), radiological(data["lesions"], direction), 4)
            tiles += t
            outlines += o
        (tmp / "patient.json").write_text(json.dumps(pair["info"], indent=2, default=lambda v: np.asarray(v).tolist()))
        if preview:
            save_png(montage(tiles, outlines, 4), tmp / "preview.png")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def visit_case(pair: dict, visit: str):
    """One visit of a generated pair as a normalised :class:`~PatientFineTuneLib.images.Case`,
    without writing files (benchmarks and experiments)."""
    import numpy as np

    from ..images import Case, normalise, slice_layout
    from .common import to_image

    data = pair["visits"][visit]
    grid = to_image(data["organ"].astype(np.float32), pair["grid"])
    layout = slice_layout(grid)
    images = np.concatenate([a if a.ndim == 4 else a[None] for a in data["images"].values()])
    organ = layout.to_slices(data["organ"])
    return Case(
        normalise(layout.to_slices(images), organ),
        organ,
        layout.to_slices(data["lesions"]),
        grid,
        layout,
        name=f"{pair['info']['seed']}/{visit}",
    )
