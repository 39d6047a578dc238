"""Synthetic brain MRI: head, skull, cortex with sulci, ventricles, deep grey matter,
eyes and cerebellum, with white-matter hyperintensities (``brain-wmh``: FLAIR + T1) or a
glioma with enhancing rim, necrotic core and oedema (``brain-tumor``: T1 post-contrast).

Each patient draws its own appearance (tissue contrasts, lesion contrast and texture,
noise, bias field, atrophy, lesion mimics); both visits share it with mild drift, a new
noise realisation and a small change of head position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import (
    Blob,
    Grid,
    NoiseFields,
    Pose,
    add_rician_noise,
    bias_field,
    compose,
    coordinates,
    ellipsoid_phi,
    evolve_blobs,
    jitter,
    overlay,
    render_blobs,
    render_channels,
    soft,
)

BRAIN_GRID = Grid(shape=(48, 240, 240), spacing=(3.0, 0.958, 0.958))

# Tissue intensities (relative, before per-patient variation) per sequence. FLAIR: CSF
# suppressed, GM brighter than WM, lesions bright. T1: WM brightest, lesions hypointense.
# T1c: T1 with enhancing vessels/dura/choroid plexus and enhancing tumour rim.
BASE_INTENSITY = {
    "FLAIR": dict(
        scalp=0.75,
        marrow=0.45,
        skull=0.04,
        csf=0.12,
        gm=0.73,
        wm=0.62,
        deep_gm=0.68,
        eye=0.15,
        orbit_fat=0.7,
        lesion=1.25,
        mimic=1.15,
        core=0.9,
        oedema=0.95,
        rim=1.0,
    ),
    "T1": dict(
        scalp=1.0,
        marrow=0.8,
        skull=0.04,
        csf=0.15,
        gm=0.55,
        wm=0.82,
        deep_gm=0.62,
        eye=0.12,
        orbit_fat=1.0,
        lesion=0.55,
        mimic=0.2,
        core=0.3,
        oedema=0.62,
        rim=0.6,
    ),
    "T1c": dict(
        scalp=1.0,
        marrow=0.8,
        skull=0.04,
        csf=0.15,
        gm=0.55,
        wm=0.8,
        deep_gm=0.62,
        eye=0.12,
        orbit_fat=1.0,
        lesion=1.0,
        mimic=1.05,
        core=0.25,
        oedema=0.6,
        rim=1.15,
    ),
}


@dataclass
class BrainPatient:
    """Everything that makes one synthetic patient (shared by both visits)."""

    seed: int
    scale: np.ndarray
    atrophy: float
    intensities: dict
    texture_amp: dict
    noise: float
    bias: float
    fields: NoiseFields
    blobs: list
    sequences: tuple


def _structures(p: BrainPatient) -> list[tuple[str, Blob]]:
    """Small ellipsoidal structures, rendered in their bounding boxes only."""
    a, sx, sy = p.atrophy, p.scale[0], p.scale[1]
    out = []
    for side in (-1, 1):
        eye = np.array([32 * side * sx, -78 * sy, -46])
        out += [
            ("orbit_fat", Blob(eye, np.array([17.0, 17, 14]), roughness=0)),
            ("eye", Blob(eye, np.array([12.0, 12, 11]), roughness=0)),
        ]
        out += [
            ("deep_gm", Blob(np.array([10.0 * side, 8, 2]), np.array([9.0, 15, 9]), roughness=0.1)),
            ("deep_gm", Blob(np.array([22.0 * side, -6, 4]), np.array([7.0, 16, 9]), roughness=0.1)),
            # lateral ventricle: body, frontal horn and occipital horn; larger with atrophy
            (
                "csf",
                Blob(
                    np.array([(6 + 3 * a) * side, 2, 14]), np.array([3 + 4 * a, 24 + 4 * a, 7 + 3 * a]), roughness=0.15
                ),
            ),
            ("csf", Blob(np.array([(8 + 3 * a) * side, -22, 8]), np.array([3 + 3 * a, 10, 7 + 2 * a]), roughness=0.15)),
            ("csf", Blob(np.array([(14 + 4 * a) * side, 30, 6]), np.array([3 + 3 * a, 12, 6 + 2 * a]), roughness=0.2)),
        ]
    out.append(("csf", Blob(np.array([0.0, 6, 0]), np.array([1.5 + a, 12, 8]), roughness=0)))
    return out


def _anatomy(p: BrainPatient, xyz: np.ndarray, f: dict, grid: Grid, pose: Pose) -> tuple[list, np.ndarray]:
    """Soft occupancies of the normal tissues in painter's order, and the brain mask."""
    x, y, z = xyz
    brain_axes = np.array([68.0, 86.0, 64.0]) * p.scale
    centre = np.array([0.0, 0.0, -6.0])
    brain_phi = ellipsoid_phi(xyz, centre, brain_axes) + 3.0 * f["shape"]
    head_phi = ellipsoid_phi(xyz, centre + [0, -4, -8], brain_axes + [13, 14, 18]) + 2.0 * f["shape"]
    depth = -brain_phi
    cereb_phi = ellipsoid_phi(xyz, [0, 45 * p.scale[1], -52], [52 * p.scale[0], 32, 20])

    layers = [("scalp", soft(head_phi)), ("marrow", soft(head_phi + 5.0)), ("skull", soft(head_phi + 6.5))]
    layers.append(("skull", soft(brain_phi - 3.5) * (1 - soft(brain_phi - 1.5))))  # inner table
    layers.append(("csf", soft(brain_phi - 2.5)))
    # cortex: a GM ribbon folded along sulci (the zero set of a band-pass field)
    sulcus = np.minimum(np.abs(f["sulci"]), np.abs(f["sulci2"]) + 0.08)
    folded_depth = depth - 16.0 * np.clip(0.4 - sulcus, 0, None) / 0.4
    layers.append(("gm", soft(brain_phi)))
    layers.append(("wm", soft(-(folded_depth - 2.5 - 1.2 * (f["gyri"] + 1)))))
    # cerebellum: posterior fossa, finely foliated
    cereb = soft(cereb_phi)
    layers.append(("gm", cereb * (f["folia"] > -0.3)))
    layers.append(("wm", cereb * soft(cereb_phi + 6) * (f["folia"] > 0.6)))
    # interhemispheric fissure (falx + CSF), inside the brain only
    fissure = (np.abs(x - 1.5 * f["shape"]) - 0.8) + np.clip(depth - 38, 0, None) + np.clip(-z - 30, 0, None)
    inside = soft(brain_phi)
    layers.append(("gm", soft(fissure - 2.0) * inside))
    layers.append(("csf", soft(fissure) * inside))
    layers.append(("csf", soft(brain_phi + 1.0) * (sulcus < 0.05) * (depth < 16)))
    width = float(min(grid.spacing))
    for name, blob in _structures(p):
        layers.append((name, render_blobs([blob], xyz, grid, pose, f["rough"], width)))
    brain_mask = (brain_phi < 0) | (cereb_phi < 0)
    return layers, brain_mask


def _wmh_blob(p_scale, rng, ident=0) -> Blob:
    """A white-matter lesion: periventricular (often, larger) or deep (punctate)."""
    if rng.random() < 0.45:
        side = rng.choice([-1, 1])
        y = rng.choice([-30.0, 30.0]) + rng.normal(0, 5)
        centre = np.array([(10 + rng.uniform(0, 8)) * side, y, 14 + rng.normal(0, 6)])
        radii = rng.uniform(2.5, 7.0) * np.array([1.0, rng.uniform(1.0, 1.8), rng.uniform(0.8, 1.3)])
    else:
        r = rng.uniform(0.25, 0.75, 3) * np.array([55, 65, 30]) * p_scale
        centre = r * rng.choice([-1, 1], 3) + [0, 0, 15]
        radii = rng.uniform(1.2, 4.0) * rng.uniform(0.75, 1.3, 3)
    return Blob(centre=centre, radii=radii, kind="lesion", ident=ident, roughness=0.3)


def _tumour_blobs(p_scale, rng) -> list[Blob]:
    """A glioma (oedema, enhancing rim, necrotic core as nested blobs) and satellites."""
    side = rng.choice([-1, 1])
    centre = np.array([rng.uniform(18, 38) * side, rng.uniform(-45, 40), rng.uniform(-5, 35)])
    r = rng.uniform(8, 22)
    radii = r * rng.uniform(0.8, 1.2, 3)
    necrosis = rng.uniform(0.3, 0.7)
    blobs = [
        Blob(centre, radii * rng.uniform(1.4, 1.9), "oedema", 0, 0.35),
        Blob(centre, radii, "lesion", 1, 0.25),
        Blob(centre + rng.normal(0, 1.5, 3), radii * necrosis, "core", 1, 0.3),
    ]
    for k in range(int(rng.integers(0, 3))):
        blobs.append(Blob(centre + rng.normal(0, 1.8 * r, 3), rng.uniform(2, 5) * np.ones(3), "lesion", 2 + k, 0.3))
    return blobs


def _mimics(rng, kind: str, n: int) -> list[Blob]:
    """Patient-specific look-alikes: FLAIR-bright cortical / flow artefacts (WMH) or
    enhancing vessels and choroid plexus (tumour)."""
    out = []
    for _ in range(n):
        if kind == "brain-wmh":
            r = 62 + rng.normal(0, 3)
            theta, phi = rng.uniform(0, 2 * np.pi), rng.uniform(-0.4, 0.9)
            centre = np.array(
                [r * np.cos(theta) * np.cos(phi) * 0.95, r * np.sin(theta) * np.cos(phi) * 1.2, r * np.sin(phi) * 0.8]
            )
            out.append(Blob(centre, rng.uniform(1.5, 3.5) * rng.uniform(0.7, 1.3, 3), "mimic", 0, 0.3))
        else:
            side = rng.choice([-1, 1])
            centre = np.array([rng.uniform(3, 12) * side, rng.uniform(-5, 30), rng.uniform(5, 20)])
            out.append(Blob(centre, rng.uniform(2, 4.5) * rng.uniform(0.6, 1.4, 3), "mimic", 0, 0.35))
    return out


def make_patient(preset: str, seed: int) -> BrainPatient:
    rng = np.random.default_rng([seed, 0xB4A1])
    sequences = ("FLAIR", "T1") if preset == "brain-wmh" else ("T1c",)
    scale = rng.uniform(0.92, 1.06, 3)
    # population-wide variation of contrast: each patient its own look
    intensities = {}
    for seq in sequences:
        base = BASE_INTENSITY[seq]
        values = {k: v * np.exp(0.12 * rng.standard_normal()) for k, v in base.items()}
        lesion_gain = rng.uniform(0.8, 1.35) if seq != "T1" else rng.uniform(0.85, 1.2)
        for k in ("lesion", "mimic", "rim"):
            values[k] = values["wm"] * (base[k] / base["wm"]) ** lesion_gain
        intensities[seq] = values
    texture_amp = {
        "wm": rng.uniform(0.02, 0.06),
        "gm": rng.uniform(0.03, 0.08),
        "lesion": rng.uniform(0.05, 0.25),
        "rim": rng.uniform(0.1, 0.25),
        "deep_gm": 0.04,
    }
    fields = NoiseFields(
        rng,
        {
            "shape": 40.0,
            "sulci": 7.0,
            "sulci2": 5.0,
            "gyri": 14.0,
            "folia": 3.5,
            "tex_fine": 3.0,
            "tex_coarse": 12.0,
            "rough": 5.0,
            "bias": 120.0,
            "bias2": 90.0,
        },
    )
    if preset == "brain-wmh":
        n = int(rng.integers(12, 70))
        blobs = [_wmh_blob(scale, rng, ident=i + 1) for i in range(n)]
        blobs += _mimics(rng, preset, int(rng.integers(0, 9)))
    else:
        blobs = _tumour_blobs(scale, rng) + _mimics(rng, preset, int(rng.integers(1, 6)))
    return BrainPatient(
        seed=seed,
        scale=scale,
        atrophy=float(rng.uniform(0, 1)),
        intensities=intensities,
        texture_amp=texture_amp,
        noise=float(rng.uniform(0.015, 0.05)),
        bias=float(rng.uniform(0.05, 0.3)),
        fields=fields,
        blobs=blobs,
        sequences=sequences,
    )


def render_visit(
    p: BrainPatient, blobs: list[Blob], intensities: dict, pose: Pose, rng, bias_mix: float, grid: Grid = BRAIN_GRID
):
    """Images (C, z, y, x) float32, brain mask and lesion mask of one visit."""
    xyz = coordinates(grid, pose)
    f = p.fields.sample(xyz)
    layers, brain_mask = _anatomy(p, xyz, f, grid, pose)
    weights = compose(layers, grid.shape)
    width = float(min(grid.spacing))
    occ = {
        k: render_blobs([b for b in blobs if b.kind == k], xyz, grid, pose, f["rough"], width)
        for k in ("lesion", "mimic", "oedema", "core")
    }
    if p.sequences == ("T1c",):
        lesion = occ["lesion"] * brain_mask
        overlay(weights, "oedema", occ["oedema"] * brain_mask)
        overlay(weights, "rim", lesion)
        overlay(weights, "core", occ["core"] * lesion)
    else:
        # WMH live in white matter (and deep grey matter), never in CSF or cortex
        lesion = occ["lesion"] * np.clip(weights["wm"] + weights["deep_gm"] + 0.3 * weights["gm"], 0, 1)
        overlay(weights, "lesion", lesion)
    overlay(weights, "mimic", occ["mimic"] * brain_mask)
    lesion_mask = lesion > 0.5
    texture = {
        "wm": p.texture_amp["wm"] * f["tex_coarse"],
        "gm": p.texture_amp["gm"] * f["tex_fine"],
        "deep_gm": p.texture_amp["deep_gm"] * f["tex_coarse"],
        "lesion": p.texture_amp["lesion"] * f["tex_fine"],
        "rim": p.texture_amp["rim"] * f["tex_fine"],
        "core": 0.1 * f["tex_fine"],
        "scalp": 0.08 * f["tex_fine"],
        "marrow": 0.15 * f["tex_fine"],
    }
    bias = bias_field({"b": (1 - bias_mix) * f["bias"] + bias_mix * f["bias2"]}, "b", p.bias)
    # scanner gain: white matter at ~1000 in every sequence
    values = [{k: v * 1000.0 / intensities[seq]["wm"] for k, v in intensities[seq].items()} for seq in p.sequences]
    signal = render_channels(weights, values, texture)
    signal *= bias
    return add_rician_noise(signal, p.noise * 1000.0, rng), brain_mask, lesion_mask


def generate_pair(preset: str, seed: int, grid: Grid = BRAIN_GRID) -> dict:
    """A baseline/follow-up pair of one synthetic brain patient."""
    p = make_patient(preset, seed)
    rng = np.random.default_rng([seed, 0x5EED])
    if preset == "brain-wmh":
        follow_blobs, evolution = evolve_blobs(p.blobs, rng, lambda r: _wmh_blob(p.scale, r))
    else:
        follow_blobs, evolution = evolve_blobs(
            p.blobs,
            rng,
            lambda r: Blob(p.blobs[1].centre + r.normal(0, 20, 3), r.uniform(2, 5) * np.ones(3), "lesion", 0, 0.3),
            growth=(0.8, 1.3),
        )
        factor = {e["id"]: e["radius_factor"] for e in evolution}
        # necrosis and oedema follow their tumour
        follow_blobs = [b.scaled(factor.get(1) or 0.0) if b.kind in ("core", "oedema") else b for b in follow_blobs]
    visits = {}
    for name, blobs, drift, bias_mix in (("baseline", p.blobs, 0.0, 0.0), ("followup", follow_blobs, 0.02, 0.25)):
        pose = Pose.random(rng)
        intensities = {s: jitter(v, rng, drift) for s, v in p.intensities.items()}
        images, organ, lesions = render_visit(p, blobs, intensities, pose, rng, bias_mix, grid)
        visits[name] = {"images": {s: images[i] for i, s in enumerate(p.sequences)}, "organ": organ, "lesions": lesions}
    return {
        "visits": visits,
        "grid": grid,
        "info": {
            "preset": preset,
            "seed": seed,
            "sequences": list(p.sequences),
            "noise": p.noise,
            "bias": p.bias,
            "atrophy": p.atrophy,
            "evolution": evolution,
            "mimics": sum(b.kind == "mimic" for b in p.blobs),
        },
    }
