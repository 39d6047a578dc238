"""Training slices synthesised from real anatomy: whole-head label maps under random
contrast, deformation, resolution and artefacts, with lesions inserted into the tissue
where they occur (the domain-randomisation idea of SynthSeg, Billot et al. 2023, and of
WMH-SynthSeg, Laso et al. 2024).

Per synthetic volume: one label map, one random 3D affine + smooth elastic deformation
sampled onto a thin slab of axial slices at the network's in-plane spacing, lesions drawn
into the slab's tissue, one intensity per label and sequence from tissue priors (FLAIR-,
T1- and T1c-like) with texture, then a slice profile of a random thickness (1-8 mm), an
in-plane resolution, a bias field, noise and a gamma curve. Only the few output slices and
the slices within their slice profile are ever rendered, so a volume costs a fraction of a
second: generation stays cheap next to the network's training step.

The label maps are FreeSurfer ``aseg`` label volumes with extra-cerebral labels (skull,
scalp, eyes, ...). Everything random comes from a ``numpy.random.Generator`` the caller
seeds: the same map, preset and seed give the same slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

#: Changes whenever the same map, settings and seed would give other slices; recorded with
#: every model and learning curve made from the synthesis, so a resumed run says which
#: volumes its iterations saw.
SYNTHESIS_VERSION = 3

#: FreeSurfer labels by tissue. Labels not listed here (the extra-cerebral ones, >= 100)
#: each get their own random intensity.
TISSUES = {
    "wm": (2, 41),
    "cortex": (3, 42),
    "lateral_ventricle": (4, 43, 5, 44),
    "ventricle": (14, 15, 72),
    "cerebellum_wm": (7, 46),
    "cerebellum_cortex": (8, 47),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "brainstem": (16,),
    "hippocampus": (17, 53),
    "amygdala": (18, 54),
    "csf": (24,),
    # white-matter lesions already present in the anatomy (FreeSurfer's hypointensities)
    "lesion": (25, 57, 77),
    "accumbens": (26, 58),
    "ventral_dc": (28, 60),
    "vessel": (30, 62),
    "choroid_plexus": (31, 63),
    "optic_chiasm": (85,),
}

#: Tissue where white-matter lesions grow; juxtacortical lesions may reach into cortex.
LESION_TISSUE = ("wm", "cerebellum_wm", "brainstem", "ventral_dc", "lesion")

#: Intensity priors per sequence, as (low, high) relative to white matter, drawn
#: uniformly per volume. FLAIR: CSF suppressed, grey matter brighter than white matter
#: (cortex, deep nuclei, hippocampus), lesions brighter still. T1: white matter brightest
#: in the brain, lesions iso- to hypointense. T1c: T1 with enhancing vessels and choroid
#: plexus (the bright structures a tumour model must learn to reject).
#:
#: FLAIR lesions: real MS lesions are dimmer than a textbook's. On the three Ljubljana
#: scans their cores lie at 1.46-1.65 x white matter and their whole masks at 1.39-1.42,
#: overlapping grey matter (1.17-1.23); with the per-lesion gain of 0.75-1.2 this prior puts
#: synthetic lesions at 0.98-2.3 (median near 1.56). Version 2 drew 1.45-2.6 (median near
#: 1.96), a lesion/grey-matter boundary that real lesions straddle (docs/base-training.md).
PRIORS = {
    "FLAIR": {
        "wm": (1.0, 1.0),
        "cortex": (1.12, 1.5),
        "lateral_ventricle": (0.08, 0.45),
        "ventricle": (0.08, 0.45),
        "cerebellum_wm": (0.9, 1.1),
        "cerebellum_cortex": (1.05, 1.45),
        "thalamus": (1.0, 1.3),
        "caudate": (1.1, 1.45),
        "putamen": (1.05, 1.4),
        "pallidum": (0.8, 1.15),
        "brainstem": (1.0, 1.35),
        "hippocampus": (1.15, 1.6),
        "amygdala": (1.15, 1.55),
        "csf": (0.08, 0.5),
        "lesion": (1.3, 1.9),
        "accumbens": (1.05, 1.4),
        "ventral_dc": (1.0, 1.3),
        "vessel": (0.2, 1.2),
        "choroid_plexus": (0.6, 1.5),
        "optic_chiasm": (0.9, 1.3),
        "oedema": (1.3, 2.0),
        "enhancing": (1.1, 1.7),
        "necrosis": (0.5, 1.6),
        "dura": (0.6, 1.3),
        "grey_focus": (1.3, 2.0),
        "csf_flow": (0.5, 1.4),
    },
    "T1": {
        "wm": (1.0, 1.0),
        "cortex": (0.55, 0.8),
        "lateral_ventricle": (0.1, 0.35),
        "ventricle": (0.1, 0.35),
        "cerebellum_wm": (0.9, 1.05),
        "cerebellum_cortex": (0.6, 0.8),
        "thalamus": (0.75, 0.95),
        "caudate": (0.65, 0.85),
        "putamen": (0.7, 0.9),
        "pallidum": (0.8, 1.0),
        "brainstem": (0.8, 1.0),
        "hippocampus": (0.55, 0.8),
        "amygdala": (0.55, 0.8),
        "csf": (0.1, 0.35),
        "lesion": (0.4, 0.95),
        "accumbens": (0.65, 0.85),
        "ventral_dc": (0.8, 1.0),
        "vessel": (0.2, 1.0),
        "choroid_plexus": (0.4, 0.9),
        "optic_chiasm": (0.8, 1.0),
        "oedema": (0.55, 0.85),
        "enhancing": (0.55, 0.9),
        "necrosis": (0.15, 0.5),
        "dura": (0.4, 0.9),
        "grey_focus": (0.5, 0.85),
        "csf_flow": (0.1, 0.4),
    },
    "T1c": {
        "wm": (1.0, 1.0),
        "cortex": (0.55, 0.8),
        "lateral_ventricle": (0.1, 0.35),
        "ventricle": (0.1, 0.35),
        "cerebellum_wm": (0.9, 1.05),
        "cerebellum_cortex": (0.6, 0.85),
        "thalamus": (0.75, 0.95),
        "caudate": (0.65, 0.85),
        "putamen": (0.7, 0.9),
        "pallidum": (0.8, 1.0),
        "brainstem": (0.8, 1.0),
        "hippocampus": (0.55, 0.8),
        "amygdala": (0.55, 0.8),
        "csf": (0.1, 0.35),
        "lesion": (0.5, 0.95),
        "accumbens": (0.65, 0.85),
        "ventral_dc": (0.8, 1.0),
        "vessel": (1.1, 1.8),
        "choroid_plexus": (1.1, 1.8),
        "optic_chiasm": (0.8, 1.0),
        "oedema": (0.55, 0.85),
        "enhancing": (1.15, 2.0),
        "necrosis": (0.15, 0.5),
        "dura": (1.05, 1.8),
        "grey_focus": (0.5, 0.9),
        "csf_flow": (0.1, 0.4),
    },
}

#: Extra-cerebral labels (scalp, fat, muscle, bone, eyes) vary most between sequences
#: and scanners: any intensity in this range relative to white matter.
EXTRA_CEREBRAL_RANGE = (0.0, 1.8)


@dataclass(frozen=True)
class AnatomyMap:
    """One label map, as compact tissue codes on its own grid.

    ``codes`` is a (k, j, i) uint8 array; ``names[code]`` is the tissue (or
    ``"extra:<label>"``) of each code, code 0 being background. ``inverse @ (p - origin)``
    is the continuous (i, j, k) index of LPS point ``p`` (mm).
    """

    codes: np.ndarray
    names: tuple[str, ...]
    origin: np.ndarray
    inverse: np.ndarray  # (3, 3): LPS offset -> continuous index
    brain_cells: np.ndarray  # (N, 3) (k, j, i) of the 4-voxel cells whose corner is brain
    name: str = ""

    def codes_of(self, *tissues: str) -> np.ndarray:
        return np.array([c for c, n in enumerate(self.names) if n in tissues], dtype=np.uint8)

    @property
    def brain_codes(self) -> np.ndarray:
        """Codes inside a brain mask: every named tissue (extra-cerebral labels are not)."""
        return _brain_codes(self.names)


def _brain_codes(names: Sequence[str]) -> np.ndarray:
    return np.array([c for c, n in enumerate(names) if c and not n.startswith("extra:")], dtype=np.uint8)


def load_anatomy_map(path: str | Path) -> AnatomyMap:
    """Read a FreeSurfer-labelled whole-head map (any orientation) as an :class:`AnatomyMap`."""
    import SimpleITK as sitk  # here: a packed map (gpu_training.py) is synthesised from without SimpleITK

    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image)
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
        raise ValueError(f"{path} is not a label map (non-integer values)")
    labels = labels.astype(np.int32)
    by_label = {label: tissue for tissue, values in TISSUES.items() for label in values}
    present = [int(v) for v in np.unique(labels) if v != 0]
    names = ["background"] + [by_label.get(v, f"extra:{v}") for v in present]
    if len(names) > 255:
        raise ValueError(f"{path} has {len(present)} labels; at most 254 are supported")
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint8)
    codes = lookup[np.clip(labels, 0, None)]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    inverse = np.diag(1.0 / np.array(image.GetSpacing())) @ direction.T
    cells = np.argwhere(np.isin(codes[::4, ::4, ::4], _brain_codes(names)))
    return AnatomyMap(codes, tuple(names), np.array(image.GetOrigin()), inverse, cells, name=Path(path).name)


@dataclass(frozen=True)
class SynthesisSettings:
    """What one preset's synthetic slices look like."""

    sequences: tuple[str, ...]
    lesion_kind: str  # "ms" (white-matter lesions) or "tumour" (glioma; the target is the tumour core)
    spacing_mm: tuple[float, float]  # in-plane (row, col) spacing of the output slices
    size: int = 240  # output slices are size x size
    slices: int = 4  # output slices per volume
    slice_gap_mm: float = 4.0  # distance between output slices
    max_thickness_mm: float = 8.0


def _coarse_field(rng: np.random.Generator, coarse: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """A smooth random field of ``shape``: normal values on a ``coarse`` grid, linearly
    interpolated (torch's interpolation: scipy's zoom took half of a volume's time)."""
    import torch
    import torch.nn.functional as F

    values = torch.from_numpy(rng.standard_normal(tuple(coarse)).astype(np.float32))[None, None]
    mode = {2: "bilinear", 3: "trilinear"}[len(shape)]
    return F.interpolate(values, size=tuple(int(n) for n in shape), mode=mode, align_corners=False)[0, 0].numpy()


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    c, s = np.cos(angles), np.sin(angles)
    rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    return rz @ ry @ rx


def sample_slab(anatomy: AnatomyMap, settings: SynthesisSettings, depth: int, rng: np.random.Generator) -> np.ndarray:
    """Tissue codes of a randomly placed, rotated, scaled and elastically deformed slab of
    ``depth`` axial 1-mm slices of ``size`` x ``size`` pixels at the output spacing.

    Slab axes are (slice: superior, row: posterior, col: left), the radiological order in
    which the library presents axial slices. Nearest-neighbour lookup: codes stay codes.
    """
    size = settings.size
    # a centre inside the brain: a random 4-voxel cell of the map's brain, jittered within it
    cell = anatomy.brain_cells[rng.integers(len(anatomy.brain_cells))]
    centre_index = cell[::-1] * 4.0 + rng.uniform(0, 4, 3)  # (i, j, k)
    axes = _rotation(rng, 12.0) * rng.uniform(0.9, 1.1, 3)[None, :]  # columns: col, row, slice directions (LPS)
    if rng.random() < 0.5:
        axes[:, 0] *= -1  # left-right mirror
    # index = inverse @ (point - origin), with point = centre + axes @ (col, row, slice) mm:
    # separable in the three slab axes, so it is built by broadcasting, not a full grid
    steps = anatomy.inverse @ axes  # index change per mm along col, row, slice
    col = ((np.arange(size) - (size - 1) / 2) * settings.spacing_mm[1]).astype(np.float32)
    row = ((np.arange(size) - (size - 1) / 2) * settings.spacing_mm[0]).astype(np.float32)
    sl = (np.arange(depth) - (depth - 1) / 2).astype(np.float32)
    index = (
        centre_index.astype(np.float32)[:, None, None, None]
        + steps[:, 2, None, None, None].astype(np.float32) * sl[None, :, None, None]
        + steps[:, 1, None, None, None].astype(np.float32) * row[None, None, :, None]
        + steps[:, 0, None, None, None].astype(np.float32) * col[None, None, None, :]
    )
    amplitude = rng.uniform(0.0, 3.0)
    if amplitude > 0:
        displacement = amplitude * np.stack([_coarse_field(rng, (2, 5, 5), (depth, size, size)) for _ in range(3)])
        index = index + np.tensordot(anatomy.inverse.astype(np.float32), displacement, axes=1)
    index = np.rint(index).astype(np.int32)
    shape = anatomy.codes.shape  # (k, j, i)
    inside = np.all((index >= 0) & (index < np.array(shape[::-1], dtype=np.int32)[:, None, None, None]), axis=0)
    codes = np.zeros((depth, size, size), dtype=np.uint8)
    codes[inside] = anatomy.codes[index[2][inside], index[1][inside], index[0][inside]]
    return codes


# ---------------------------------------------------------------------------------------
# Lesions


def _ellipsoid(shape, centre, radii, rotation, rng, spacing) -> tuple[tuple[slice, ...], np.ndarray]:
    """A rough ellipsoid (mm radii, rotated) as a bounding box and its boolean mask."""
    reach = float(max(radii)) * 1.3
    box, local = [], []
    for axis in range(3):
        lo = max(0, int(np.floor(centre[axis] - reach / spacing[axis])))
        hi = min(shape[axis], int(np.ceil(centre[axis] + reach / spacing[axis])) + 1)
        if hi <= lo:
            return tuple(slice(0, 0) for _ in range(3)), np.zeros((0, 0, 0), bool)
        box.append(slice(lo, hi))
        local.append((np.arange(lo, hi) - centre[axis]) * spacing[axis])
    grid = np.stack(np.meshgrid(*local, indexing="ij"))
    q = np.tensordot(rotation.T, grid, axes=1) / np.asarray(radii, dtype=np.float64)[:, None, None, None]
    rough = 0.25 * _coarse_field(rng, (3, 3, 3), grid.shape[1:])
    return tuple(box), (q**2).sum(0) + rough < 1.0


def _tissue(codes: np.ndarray, names: Sequence[str], *wanted: str) -> np.ndarray:
    """Where ``codes`` hold any of the ``wanted`` tissues (``names`` names each code)."""
    return np.isin(codes, np.array([c for c, name in enumerate(names) if name in wanted], dtype=np.uint8))


class _Voxels:
    """The voxels of a mask within slices ``rows``, to draw random ones from (found once,
    drawn from many times)."""

    def __init__(self, mask: np.ndarray, rows: slice):
        self.flat = np.flatnonzero(mask[rows])
        self.shape = mask[rows].shape
        self.offset = rows.start or 0

    def draw(self, rng: np.random.Generator) -> np.ndarray | None:
        """A random voxel index (float), or None when there is none."""
        if self.flat.size == 0:
            return None
        index = np.array(np.unravel_index(self.flat[rng.integers(self.flat.size)], self.shape), dtype=np.float64)
        index[0] += self.offset
        return index


def grey_matter_foci(
    codes: np.ndarray, names: Sequence[str], spacing: Sequence[float], centre_slices: slice, rng: np.random.Generator
) -> list[tuple[np.ndarray, str]]:
    """Bright spots that are not lesions, as real FLAIR has them: foci in the cortex and
    deep grey matter (gyral crowns, partial volume, vessels) and, in some volumes, CSF
    whose signal the inversion did not null (flow). Overlays (mask, tissue), never target:
    a white-matter lesion is told by where it is and its shape, not by brightness alone."""
    grey = _tissue(
        codes, names, "cortex", "cerebellum_cortex", "thalamus", "caudate", "putamen", "hippocampus", "amygdala"
    )
    spacing = np.asarray(spacing, dtype=np.float64)
    foci = np.zeros(codes.shape, bool)
    candidates = _Voxels(grey, centre_slices)
    for _ in range(int(rng.integers(0, 60))):
        centre = candidates.draw(rng)
        if centre is None:
            break
        box, blob = _ellipsoid(codes.shape, centre, rng.uniform(0.8, 3.0, 3), _rotation(rng, 180.0), rng, spacing)
        foci[box] |= blob & grey[box]
    overlays = [(foci, "grey_focus")]
    if rng.random() < 0.3:
        csf = _tissue(codes, names, "csf", "lateral_ventricle", "ventricle")
        flow = csf & (_coarse_field(rng, (3, 12, 12), codes.shape) > 1.0)
        overlays.append((flow, "csf_flow"))
    return overlays


def insert_ms_lesions(
    codes: np.ndarray, names: Sequence[str], spacing: Sequence[float], centre_slices: slice, rng: np.random.Generator
) -> np.ndarray:
    """A mask of MS lesions drawn into ``codes``' white matter: ovoid periventricular lesions
    with their long axis perpendicular to the ventricle wall (Dawson's fingers), confluent
    periventricular caps, deep white-matter, juxtacortical and infratentorial lesions,
    3 mm to 2 cm across. Centres lie in ``centre_slices`` so the output slices see them."""

    def tissue(*wanted):
        return _tissue(codes, names, *wanted)

    allowed = tissue(*LESION_TISSUE)
    cortex = tissue("cortex")
    ventricle = tissue("lateral_ventricle")
    cerebral_wm = tissue("wm")
    infratentorial = tissue("brainstem", "cerebellum_wm")
    lesions = tissue("lesion")
    walls = _Voxels(ventricle & ndimage.binary_dilation(cerebral_wm), centre_slices)
    sites = {
        "juxtacortical": _Voxels(cerebral_wm & ndimage.binary_dilation(cortex, iterations=2), centre_slices),
        "infratentorial": _Voxels(infratentorial, centre_slices),
        "deep": _Voxels(cerebral_wm, centre_slices),
    }
    spacing = np.asarray(spacing, dtype=np.float64)
    # lesion loads from a few specks to confluent disease; a few volumes have none
    count = 0 if rng.random() < 0.05 else int(np.exp(rng.uniform(np.log(2), np.log(45))))
    for _ in range(count):
        kind = rng.choice(
            ["periventricular", "cap", "deep", "juxtacortical", "infratentorial"], p=[0.38, 0.1, 0.27, 0.15, 0.1]
        )
        reach_cortex = kind == "juxtacortical"
        if kind in ("periventricular", "cap"):
            wall = walls.draw(rng)
            if wall is None:
                continue
            # outward normal: away from the ventricle voxels around the wall point
            lo = np.maximum(wall.astype(int) - 5, 0)
            window = ventricle[
                lo[0] : wall[0].astype(int) + 6, lo[1] : wall[1].astype(int) + 6, lo[2] : wall[2].astype(int) + 6
            ]
            inner = np.array(np.nonzero(window), dtype=np.float64).mean(axis=1) + lo
            normal = (wall - inner) * spacing
            normal /= np.linalg.norm(normal) + 1e-6
            if kind == "cap":
                radii = np.array([rng.uniform(5, 10), rng.uniform(3, 7), rng.uniform(3, 7)])
            else:
                radii = np.array([rng.uniform(3, 12), rng.uniform(1.5, 5), rng.uniform(1.5, 5)])
            centre = wall + normal * radii[0] * rng.uniform(0.4, 0.9) / spacing
            helper = np.array([1.0, 0, 0]) if abs(normal[0]) < 0.9 else np.array([0, 1.0, 0])
            second = np.cross(normal, helper)
            second /= np.linalg.norm(second)
            rotation = np.stack([normal, second, np.cross(normal, second)], axis=1)
        else:
            centre = sites[kind].draw(rng)
            if centre is None:
                continue
            radius = rng.uniform(1.5, 5.0) if kind != "deep" or rng.random() < 0.8 else rng.uniform(5.0, 9.0)
            radii = radius * rng.uniform(0.7, 1.3, 3)
            rotation = _rotation(rng, 180.0)
        box, shape = _ellipsoid(codes.shape, centre, radii, rotation, rng, spacing)
        grow = allowed[box] | (cortex[box] & reach_cortex & (rng.random() < 0.7))
        lesions[box] |= shape & grow
    return lesions


def _tubes(
    region: np.ndarray, count: int, spacing: np.ndarray, rng: np.random.Generator, centre_slices: slice
) -> np.ndarray:
    """``count`` thin straight tubes (vessels: 0.5-1.2 mm radius, 8-40 mm long) starting in
    ``region``."""
    out = np.zeros(region.shape, bool)
    starts = _Voxels(region, centre_slices)
    for _ in range(count):
        start = starts.draw(rng)
        if start is None:
            break
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        length, radius = rng.uniform(8, 40), rng.uniform(0.5, 1.2)
        for t in np.arange(0, length, radius):
            point = start + direction * t / spacing
            lo = np.maximum(np.floor(point - radius / spacing).astype(int), 0)
            hi = np.minimum(np.ceil(point + radius / spacing).astype(int) + 1, region.shape)
            if np.any(hi <= lo):
                break
            grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"))
            near = (((grid - point[:, None, None, None]) * spacing[:, None, None, None]) ** 2).sum(0) <= radius**2
            out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= near
    return out


def insert_tumour(
    codes: np.ndarray, names: Sequence[str], spacing: Sequence[float], centre_slices: slice, rng: np.random.Generator
) -> tuple[list[tuple[np.ndarray, str]], np.ndarray]:
    """A glioma drawn into ``codes``: a necrotic core inside an irregular enhancing rim (or a
    solid enhancing tumour), surrounded by oedema that spreads along white matter; and the
    enhancing structures that are not tumour, in every volume: dura and venous sinuses
    around the brain, vessels in the sulci, choroid plexus in the ventricles.

    Returns the overlays to paint, in order, as (mask, tissue), and the target mask: the
    tumour core (enhancing tumour and necrosis, BraTS labels 1 + 4), as a T1c model
    segments it. A few volumes have no tumour, only the structures that mimic it.
    """

    def tissue(*wanted):
        return _tissue(codes, names, *wanted)

    spacing = np.asarray(spacing, dtype=np.float64)
    brain = np.isin(codes, _brain_codes(names))
    overlays = []
    if rng.random() < 0.85:
        dura = ndimage.binary_dilation(brain, iterations=int(rng.integers(1, 4))) & ~brain
        overlays.append((dura, "dura"))
    overlays.append((_tubes(tissue("csf", "cortex"), int(rng.integers(3, 16)), spacing, rng, centre_slices), "vessel"))
    ventricle = tissue("lateral_ventricle")
    plexus = np.zeros(codes.shape, bool)
    sites = _Voxels(ventricle, centre_slices)
    for _ in range(int(rng.integers(0, 3))):
        centre = sites.draw(rng)
        if centre is not None:
            box, blob = _ellipsoid(codes.shape, centre, rng.uniform(2, 5, 3), _rotation(rng, 180.0), rng, spacing)
            plexus[box] |= blob & ventricle[box]
    overlays.append((plexus, "choroid_plexus"))
    target = np.zeros(codes.shape, bool)
    if rng.random() < 0.1:
        return overlays, target
    centre = _Voxels(tissue("wm", "cortex", "thalamus", "putamen", "caudate"), centre_slices).draw(rng)
    if centre is None:
        return overlays, target
    radius = rng.uniform(6, 30)
    rotation = _rotation(rng, 180.0)
    radii = radius * rng.uniform(0.75, 1.25, 3)
    box, tumour = _ellipsoid(codes.shape, centre, radii, rotation, rng, spacing)
    tumour &= brain[box]
    spread = rng.uniform(5, 25)
    obox, oedema = _ellipsoid(codes.shape, centre, radii + spread, rotation, rng, spacing)
    oedema &= tissue("wm")[obox]
    overlays.append((_placed(codes.shape, obox, oedema), "oedema"))
    core = _placed(codes.shape, box, tumour)
    if rng.random() < 0.75 and radius > 8:
        necrosis = (
            _placed(
                codes.shape, *_ellipsoid(codes.shape, centre, radii * rng.uniform(0.4, 0.8), rotation, rng, spacing)
            )
            & core
        )
        overlays.append((core & ~necrosis, "enhancing"))
        overlays.append((necrosis, "necrosis"))
    else:
        overlays.append((core, "enhancing"))
    return overlays, core


def _placed(shape, box, mask) -> np.ndarray:
    """``mask`` of bounding box ``box`` as a whole-slab mask."""
    out = np.zeros(shape, bool)
    out[box] = mask
    return out


# ---------------------------------------------------------------------------------------
# Appearance


def _intensities(names: Sequence[str], sequence: str, rng: np.random.Generator) -> np.ndarray:
    """One mean intensity per code for ``sequence`` (white matter = 1); the codes of one
    tissue (left and right) share it."""
    prior = PRIORS[sequence]
    by_name = {}
    for name in dict.fromkeys(names[1:]):
        by_name[name] = rng.uniform(*prior[name]) if name in prior else rng.uniform(*EXTRA_CEREBRAL_RANGE)
    return np.array([0.0] + [by_name[n] for n in names[1:]], dtype=np.float32)


def _slice_profile(thickness_mm: float) -> np.ndarray:
    """Weights of the 1-mm slab slices that make one slice of ``thickness_mm`` (a Gaussian
    whose full width at half maximum is the thickness)."""
    sigma = max(thickness_mm, 1.0) / 2.355
    reach = int(np.ceil(3 * sigma))
    offsets = np.arange(-reach, reach + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def synthesize_slices(anatomy: AnatomyMap, settings: SynthesisSettings, rng: np.random.Generator) -> dict:
    """One synthetic volume's output slices.

    Returns
    -------
    dict with ``images`` (C, S, H, W) float32 raw intensities (normalise them like any
    case), ``lesions`` (S, H, W) bool, ``organ`` (S, H, W) bool (the brain, its border
    perturbed as automatic masks are), ``tissue`` (S, H, W) the anatomy's codes at the
    slice centres (``anatomy.names`` names them), ``thickness_mm`` and ``resolution_mm``.
    """
    thickness = rng.uniform(1.0, 2.0) if rng.random() < 0.5 else rng.uniform(2.0, settings.max_thickness_mm)
    profile = _slice_profile(thickness)
    reach = len(profile) // 2
    gap = int(round(settings.slice_gap_mm))
    span = gap * (settings.slices - 1)
    depth = span + 2 * reach + 1
    codes = sample_slab(anatomy, settings, depth, rng)
    slab_spacing = (1.0, *settings.spacing_mm)
    middle = slice(reach, reach + span + 1)
    overlays = []
    if settings.lesion_kind == "ms":
        lesions = insert_ms_lesions(codes, anatomy.names, slab_spacing, middle, rng)
        overlays = grey_matter_foci(codes, anatomy.names, slab_spacing, middle, rng)
    elif settings.lesion_kind == "tumour":
        overlays, lesions = insert_tumour(codes, anatomy.names, slab_spacing, middle, rng)
    else:
        raise ValueError(f"unknown lesion kind {settings.lesion_kind!r}")
    centres = reach + gap * np.arange(settings.slices)
    window = np.stack([np.arange(c - reach, c + reach + 1) for c in centres])  # (S, taps)

    # texture: smooth multiplicative variation within each tissue, and per-lesion contrast
    texture = 1.0 + rng.uniform(0.02, 0.08) * _coarse_field(rng, (max(2, depth // 4), 24, 24), codes.shape)
    # fine-grained texture (1-2 voxels): real tissue is never a flat plateau
    texture = texture * (
        1.0
        + rng.uniform(0.02, 0.1)
        * ndimage.gaussian_filter(rng.standard_normal(codes.shape).astype(np.float32), 0.8)
        * 2.0
    )
    if settings.lesion_kind == "ms":
        lesion_ids, n_lesions = ndimage.label(lesions)
        lesion_gain = rng.uniform(0.75, 1.2, n_lesions + 1).astype(np.float32)
    in_plane = rng.uniform(0.6, 1.6, 2)
    sigma_px = [max(0.0, (r**2 - s**2)) ** 0.5 / 2.355 / s for r, s in zip(in_plane, settings.spacing_mm)]
    images = []
    for sequence in settings.sequences:
        values = _intensities(anatomy.names, sequence, rng)
        volume = values[codes] * texture
        for mask, name in overlays:
            volume = np.where(mask, rng.uniform(*PRIORS[sequence][name]) * texture, volume)
        if settings.lesion_kind == "ms":
            lesion_value = (
                values[anatomy.names.index("lesion")]
                if "lesion" in anatomy.names
                else rng.uniform(*PRIORS[sequence]["lesion"])
            )
            per_lesion = lesion_value * lesion_gain
            if sequence != "FLAIR":
                per_lesion = np.minimum(per_lesion, 1.0)  # iso- to hypointense to white matter on T1
            volume = np.where(lesions, per_lesion[lesion_ids] * texture, volume)
        slices = np.einsum("t,sthw->shw", profile, volume[window])
        slices = np.stack([ndimage.gaussian_filter(s, sigma_px, mode="constant") for s in slices])
        bias = np.exp(rng.uniform(0.0, 0.35) * _coarse_field(rng, (settings.slices, 4, 4), slices.shape))
        slices = slices * bias
        noise = rng.uniform(0.005, 0.05)
        slices = np.sqrt(
            (slices + noise * rng.standard_normal(slices.shape)) ** 2 + (noise * rng.standard_normal(slices.shape)) ** 2
        )
        slices = (slices / max(float(slices.max()), 1e-6)) ** np.exp(rng.normal(0.0, 0.2))
        images.append(slices.astype(np.float32))
    lesion_fraction = np.einsum("t,sthw->shw", profile, lesions[window].astype(np.float32))
    brain = np.isin(codes[centres], anatomy.brain_codes)
    organ = np.stack([_perturb_mask(b, rng) for b in brain])
    return {
        "images": np.stack(images),
        "lesions": (lesion_fraction >= 0.5) & organ,
        "organ": organ,
        "tissue": codes[centres],
        "thickness_mm": float(thickness),
        "resolution_mm": tuple(float(r) for r in in_plane),
    }


def _perturb_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A brain mask as an automatic method might give it: a few pixels too large (taking in
    dura and sinuses) or too small, or exact; always without holes, as brain masks are."""
    mask = ndimage.binary_fill_holes(mask)
    change = int(rng.integers(-2, 4))
    if change > 0:
        return ndimage.binary_dilation(mask, iterations=change)
    if change < 0:
        return ndimage.binary_erosion(mask, iterations=-change)
    return mask
