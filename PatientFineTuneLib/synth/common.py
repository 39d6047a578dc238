"""Building blocks of the synthetic patient generator.

Anatomy is described by implicit functions of physical coordinates (millimetres in a
canonical, patient-centred LPS frame): negative inside a structure, roughly the signed
distance in mm. A timepoint is rendered by evaluating them at the voxel centres of its
grid after a small rigid pose change, which gives partial-volume edges, patient
repositioning between visits and lesion evolution without ever resampling an image.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage


@dataclass
class Grid:
    """Voxel grid of a synthetic volume: numpy-order shape and spacing (z, y, x)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]


@dataclass
class Pose:
    """Rigid placement of the patient in the scanner: canonical = R @ scanner + t."""

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @staticmethod
    def random(rng: np.random.Generator, max_deg=(2.0, 2.0, 3.0), max_mm=3.0) -> Pose:
        ax, ay, az = np.deg2rad(rng.uniform(-1, 1, 3) * np.array(max_deg))
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return Pose(rz @ ry @ rx, rng.uniform(-max_mm, max_mm, 3))


#: How synthetic volumes are stored: like a typical NIfTI from a scanner, RAS-flipped
#: (diag(-1, -1, 1) in ITK's LPS convention). Index axis i runs towards the patient's
#: right, j towards anterior, k towards superior.
STORAGE_DIRECTION = np.array([-1.0, -1.0, 1.0])


def coordinates(grid: Grid, pose: Pose) -> np.ndarray:
    """Canonical (x, y, z) mm coordinates of every voxel centre, shape (3, z, y, x).

    With the identity pose these are the voxel's physical LPS coordinates in the written
    file (origin at the volume centre), so left, posterior and superior in the anatomy
    code are left, posterior and superior in any viewer.
    """
    axes = [
        (np.arange(n, dtype=np.float32) - (n - 1) / 2) * s * np.float32(sign)
        for n, s, sign in zip(grid.shape, grid.spacing, STORAGE_DIRECTION[::-1])
    ]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    scanner = np.stack([x, y, z]).reshape(3, -1)
    canonical = pose.rotation.astype(np.float32) @ scanner + pose.translation.astype(np.float32)[:, None]
    return canonical.reshape(3, *grid.shape)


class NoiseFields:
    """Smooth random fields in canonical space, sampled at arbitrary coordinates.

    Each field is white noise on a coarse lattice (cell size = its wavelength scale),
    smoothed and trilinearly interpolated, then scaled to unit standard deviation. Fixed
    by the seed, so every timepoint of a patient sees the same fields.
    """

    def __init__(self, rng: np.random.Generator, cells_mm: dict[str, float], box_mm: float = 420.0):
        self.names = list(cells_mm)
        self.box = box_mm
        counts = [max(4, int(round(box_mm / cells_mm[name]))) for name in self.names]
        size = min(max(counts) * 2, 128)  # common lattice, fine enough for the finest field
        lattices = []
        for n in counts:
            lattice = ndimage.gaussian_filter(rng.standard_normal((n, n, n)).astype(np.float32), 1.0, mode="wrap")
            lattice = torch.from_numpy(lattice)[None, None]
            lattice = F.interpolate(lattice, size=(size,) * 3, mode="trilinear", align_corners=True)[0, 0]
            lattices.append(lattice / (lattice.std() + 1e-6))
        self.lattice = torch.stack(lattices)[None]  # (1, F, n, n, n)

    def sample(self, xyz: np.ndarray) -> dict[str, np.ndarray]:
        shape = xyz.shape[1:]
        pts = torch.from_numpy(np.ascontiguousarray(xyz.reshape(3, -1).T / (self.box / 2))).float()
        out = F.grid_sample(self.lattice, pts[None, None, None], mode="bilinear", align_corners=True)
        values = out[0, :, 0, 0].numpy()
        return {name: values[i].reshape(shape) for i, name in enumerate(self.names)}


def ellipsoid_phi(xyz: np.ndarray, centre, radii) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid."""
    total = None
    for axis in range(3):
        d = (xyz[axis] - np.float32(centre[axis])) * np.float32(1.0 / radii[axis])
        d *= d
        total = d if total is None else np.add(total, d, out=total)
    np.sqrt(total, out=total)
    total -= 1.0
    total *= np.float32(np.min(radii))
    return total


def soft(phi: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Partial-volume occupancy in [0, 1] of the region phi < 0 for voxels ~``width`` mm."""
    return np.clip(0.5 - phi / width, 0.0, 1.0).astype(np.float32)


@dataclass
class Blob:
    """A lesion or lesion mimic: rough ellipsoid in canonical space."""

    centre: np.ndarray
    radii: np.ndarray
    kind: str = "lesion"
    ident: int = 0
    roughness: float = 0.25

    def scaled(self, factor: float) -> Blob:
        return replace(self, radii=self.radii * factor)


def render_blobs(blobs, xyz: np.ndarray, grid: Grid, pose: Pose, rough: np.ndarray, width: float) -> np.ndarray:
    """Union (max) of the blobs' soft occupancies, each evaluated only in its bounding box."""
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    inverse = pose.rotation.T
    spacing = np.array(grid.spacing[::-1])  # x, y, z
    centre_index = (np.array(grid.shape[::-1]) - 1) / 2
    for b in blobs:
        if np.min(b.radii) <= 0:
            continue
        # canonical centre -> scanner mm -> voxel index (x, y, z)
        scanner = inverse @ (b.centre - pose.translation)
        idx = scanner * STORAGE_DIRECTION / spacing + centre_index
        half = (b.radii.max() * (1 + b.roughness) + 2.0) / spacing
        lo = np.maximum(np.floor(idx - half).astype(int), 0)
        hi = np.minimum(np.ceil(idx + half).astype(int) + 1, np.array(grid.shape[::-1]))
        if np.any(hi <= lo):
            continue
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        sub = xyz[(slice(None),) + sl]
        phi = ellipsoid_phi(sub, b.centre, b.radii) + b.roughness * float(np.min(b.radii)) * rough[sl]
        np.maximum(occupancy[sl], soft(phi, width), out=occupancy[sl])
    return occupancy


def compose(layers: list[tuple[str, np.ndarray]], shape) -> dict[str, np.ndarray]:
    """Painter's algorithm on soft occupancies: later layers cover earlier ones.

    Returns the fraction of every voxel owned by each tissue (they sum to 1).
    """
    weights: dict[str, np.ndarray] = {}
    remaining = np.ones(shape, dtype=np.float32)
    for name, occupancy in reversed(layers):
        w = remaining * occupancy
        weights[name] = weights.get(name, 0) + w
        remaining = remaining - w
    weights["background"] = weights.get("background", 0) + remaining
    return weights


def overlay(weights: dict[str, np.ndarray], name: str, occupancy: np.ndarray) -> None:
    """Paint one more tissue on top of an existing composition (in place)."""
    keep = 1.0 - occupancy
    for key in weights:
        weights[key] = weights[key] * keep
    weights[name] = weights.get(name, 0) + occupancy


def render_channels(
    weights: dict[str, np.ndarray], values: list[dict[str, float]], texture: dict[str, np.ndarray]
) -> np.ndarray:
    """Noise-free signal of every channel, (C, z, y, x): for each channel the sum over
    tissues of fraction x intensity x (1 + texture). One matrix product for all channels
    (16 DCE phases cost little more than one); large buffers are filled in place, since
    first-touching fresh memory costs more than the arithmetic here."""
    names = [n for n, w in weights.items() if isinstance(w, np.ndarray)]
    shape = weights[names[0]].shape
    stack = torch.empty((len(names), int(np.prod(shape))), dtype=torch.float32)
    for i, name in enumerate(names):
        row = stack[i]
        row.copy_(torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32)).reshape(-1))
        if name in texture:
            row.addcmul_(row, torch.from_numpy(np.ascontiguousarray(texture[name], dtype=np.float32)).reshape(-1))
    matrix = torch.tensor([[float(v.get(n, 0.0)) for n in names] for v in values], dtype=torch.float32)
    return (matrix @ stack).numpy().reshape(len(values), *shape)


def bias_field(fields: dict[str, np.ndarray], name: str, amplitude: float) -> np.ndarray:
    """Smooth multiplicative intensity non-uniformity, mean ~1."""
    return np.exp(amplitude * fields[name]).astype(np.float32)


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Replace ``signal`` (float32, C-contiguous) in place by the magnitude of signal plus
    complex Gaussian noise, as in MRI magnitude images; returns it.

    The normals come from a torch generator seeded by ``rng`` (several times faster than
    numpy for the ~10^8 draws of a DCE series); channels are processed one at a time with
    one reusable buffer.
    """
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    volume = torch.from_numpy(signal)
    rows = volume.reshape(-1, int(np.prod(signal.shape[-3:])))
    buffer = torch.empty(rows.shape[1], dtype=torch.float32)
    for row in rows:
        row.add_(buffer.normal_(0.0, float(sigma), generator=generator)).square_()
        row.add_(buffer.normal_(0.0, float(sigma), generator=generator).square_())
        # numpy's square root, which IEEE rounds exactly: torch 2.13's multi-threaded one
        # on this project's machine is off by 1 ulp, and in about one process in five by
        # 3e-4 (relative) on one thread's half, so the same seed gave different patients
        magnitude = row.numpy()
        np.sqrt(magnitude, out=magnitude)
    return signal


def to_image(array_zyx: np.ndarray, grid: Grid, pixel=sitk.sitkInt16) -> sitk.Image:
    """A volume (or (C, z, y, x) multi-channel volume, stored 4D) on the synthetic grid.

    Stored with ``STORAGE_DIRECTION`` and the volume centre at physical (0, 0, 0), which
    makes :func:`coordinates` physical coordinates.
    """
    direction = np.diag(STORAGE_DIRECTION)
    spacing = np.array(grid.spacing[::-1])
    origin = -direction @ ((np.array(grid.shape[::-1]) - 1) / 2 * spacing)
    if array_zyx.ndim == 4:
        vols = [to_image(a, grid, pixel) for a in array_zyx]
        return sitk.JoinSeries(vols)
    if pixel == sitk.sitkInt16:
        array_zyx = np.clip(np.round(array_zyx), -32768, 32767).astype(np.int16)
    elif pixel == sitk.sitkUInt8:
        array_zyx = array_zyx.astype(np.uint8)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(direction.ravel()))
    return image


def evolve_blobs(
    blobs: list[Blob], rng: np.random.Generator, new_blob, growth=(1.0, 1.3)
) -> tuple[list[Blob], list[dict]]:
    """Follow-up lesions: most grow, a few grow a lot (confluence), some shrink, some
    resolve, and new ones appear. Guarantees at least one new and one resolved lesion
    when there are three or more, so every pair shows change. Returns the follow-up blobs
    and the per-lesion evolution record."""
    lesions = [b for b in blobs if b.kind == "lesion"]
    n = len(lesions)
    fates = rng.choice(["grow", "confluent", "shrink", "resolve"], size=n, p=[0.68, 0.14, 0.08, 0.10])
    if n >= 3 and "resolve" not in fates:
        fates[int(rng.integers(n))] = "resolve"
    follow, record = [], []
    for b, fate in zip(lesions, fates):
        factor = {
            "grow": rng.uniform(*growth),
            "confluent": rng.uniform(1.35, 1.8),
            "shrink": rng.uniform(0.55, 0.85),
            "resolve": 0.0,
        }[fate]
        record.append({"id": b.ident, "fate": str(fate), "radius_factor": round(float(factor), 3)})
        if factor > 0:
            follow.append(b.scaled(factor))
    n_new = max(1 if n >= 3 else 0, int(rng.poisson(0.25 * n)))
    next_id = max([b.ident for b in blobs], default=0) + 1
    for k in range(n_new):
        b = new_blob(rng)
        b.ident = next_id + k
        follow.append(b)
        record.append({"id": b.ident, "fate": "new", "radius_factor": None})
    follow.extend(b for b in blobs if b.kind != "lesion")
    return follow, record


def jitter(values: dict[str, float], rng: np.random.Generator, relative: float) -> dict[str, float]:
    """The same patient at another visit: every tissue intensity drifts a little."""
    return {k: float(v * (1 + relative * rng.standard_normal())) for k, v in values.items()}
