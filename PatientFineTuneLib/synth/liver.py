"""Synthetic abdominal MRI with liver metastases (``liver-metastases``): DCE with 16
phases (fat-suppressed T1, pre-contrast to delayed) and DWI with b = 10, 150, 1000 s/mm².

Anatomy: body wall with subcutaneous fat and muscle, lungs above the diaphragm, liver
with hepatic/portal vessels and gallbladder, spleen, kidneys, stomach/bowel with gas,
spine, aorta and IVC. Each tissue has a contrast-uptake curve and an (S0, ADC) pair.
Each patient draws a metastasis type (hypovascular with rim enhancement, like colorectal,
or hypervascular with washout, like neuroendocrine), lesion count and sizes, contrast
timing, noise, bias, and look-alikes (cysts, haemangiomas, vessels in cross-section).
Follow-up: treatment response (shrinkage, resolution), growth and new lesions.
"""

from __future__ import annotations

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
    overlay,
    render_blobs,
    render_channels,
    soft,
)

LIVER_GRID = Grid(shape=(100, 256, 256), spacing=(2.0, 1.543, 1.543))
#: DCE acquisition times (s after injection) of the 16 phases in 6 breath holds.
DCE_TIMES = np.array([-20, -10, 18, 24, 30, 36, 55, 65, 75, 95, 110, 125, 160, 180, 240, 300], dtype=np.float32)
B_VALUES = np.array([10.0, 150.0, 1000.0], dtype=np.float32)

# Pre-contrast signal, arterial and portal enhancement, washout (fraction/min), T2 S0, ADC (1e-3 mm²/s)
TISSUES = {
    "air": (0.0, 0.0, 0.0, 0.0, 0.0, 3.0),
    "fat": (0.08, 0.0, 0.05, 0.0, 0.05, 0.5),
    "muscle": (0.35, 0.1, 0.35, 0.0, 0.2, 1.4),
    "lung": (0.03, 0.05, 0.05, 0.0, 0.03, 2.0),
    "liver": (0.55, 0.15, 0.75, 0.0, 0.35, 1.1),
    "vessel": (0.25, 1.0, 3.5, 0.2, 0.25, 6.0),
    "aorta": (0.25, 3.0, 1.3, 0.4, 0.2, 8.0),
    "spleen": (0.4, 1.3, 0.8, 0.1, 0.6, 0.8),
    "kidney": (0.38, 2.0, 1.1, 0.2, 0.6, 1.9),
    "bone": (0.3, 0.2, 0.3, 0.0, 0.15, 0.6),
    "csf": (0.1, 0.0, 0.0, 0.0, 1.0, 3.0),
    "bowel": (0.3, 0.5, 0.5, 0.1, 0.8, 2.0),
    "fluid": (0.12, 0.0, 0.02, 0.0, 1.1, 2.9),
    "lesion": (0.35, 0.1, 0.25, 0.0, 0.65, 0.85),
    "rim": (0.38, 0.7, 0.5, 0.1, 0.6, 0.9),
    "cyst": (0.1, 0.0, 0.0, 0.0, 1.2, 2.8),
    "hemangioma": (0.3, 0.4, 1.4, -0.05, 1.0, 1.6),
}
HYPERVASCULAR_LESION = (0.38, 1.8, 0.35, 0.5, 0.6, 0.9)


def uptake(times: np.ndarray, arterial: float, portal: float, washout: float, arrival: float) -> np.ndarray:
    """Relative enhancement over time: an arterial first pass (gamma-variate-like bump)
    and a portal-venous rise to a plateau, with optional washout."""
    t = np.clip(times - arrival, 0, None)
    first_pass = (t / 10.0) ** 2 * np.exp(2 - t / 5.0) / 4.0
    plateau = 1 - np.exp(-t / 35.0)
    late = np.exp(-washout * np.clip(times - 60, 0, None) / 60.0)
    return arterial * first_pass + portal * plateau * late


def _metastasis(rng, liver_centre, liver_axes, ident=0) -> Blob:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    centre = liver_centre + direction * liver_axes * rng.uniform(0.0, 0.7)
    radius = float(np.exp(rng.uniform(np.log(3.0), np.log(20.0))))
    return Blob(centre, radius * rng.uniform(0.8, 1.2, 3), "lesion", ident, 0.2)


def make_patient(seed: int) -> dict:
    rng = np.random.default_rng([seed, 0x11FE])
    liver_axes = np.array([95.0, 85.0, 80.0]) * rng.uniform(0.88, 1.1, 3)
    liver_centre = np.array([-48.0, -5.0, 5.0])
    n = min(31, 1 + int(rng.poisson(5)))
    blobs = [_metastasis(rng, liver_centre, liver_axes, i + 1) for i in range(n)]
    for _ in range(int(rng.integers(0, 5))):
        b = _metastasis(rng, liver_centre, liver_axes)
        blobs.append(
            Blob(b.centre, b.radii * rng.uniform(0.4, 0.8), rng.choice(["cyst", "cyst", "hemangioma"]), 0, 0.05)
        )
    tissues = {k: np.array(v, dtype=np.float64) for k, v in TISSUES.items()}
    if rng.random() < 0.3:
        tissues["lesion"] = np.array(HYPERVASCULAR_LESION)
        tissues["rim"] = np.array(HYPERVASCULAR_LESION) * [1, 1.2, 1, 1, 1, 1]
    for v in tissues.values():  # patient-specific contrast
        v[:2] *= np.exp(0.12 * rng.standard_normal(2))
        v[4:] *= np.exp(0.1 * rng.standard_normal(2))
    return {
        "seed": seed,
        "body_axes": np.array([rng.uniform(145, 178), rng.uniform(100, 125)]),
        "fat": rng.uniform(8, 28),
        "liver_axes": liver_axes,
        "liver_centre": liver_centre,
        "tissues": tissues,
        "arrival": rng.uniform(8, 16),
        "noise": rng.uniform(0.015, 0.04),
        "dwi_noise": rng.uniform(0.02, 0.05),
        "bias": rng.uniform(0.1, 0.35),
        "rim": rng.uniform(0.15, 0.35),
        "fields": NoiseFields(
            rng,
            {
                "shape": 60.0,
                "vessels": 14.0,
                "vessels2": 9.0,
                "tex": 4.0,
                "bowel": 12.0,
                "rough": 6.0,
                "bias": 150.0,
                "bias2": 110.0,
            },
        ),
        "blobs": blobs,
    }


def _elliptic_cylinder(xyz, centre_xy, axes_xy):
    x, y = xyz[0] - centre_xy[0], xyz[1] - centre_xy[1]
    return (np.sqrt((x / axes_xy[0]) ** 2 + (y / axes_xy[1]) ** 2) - 1.0) * float(min(axes_xy))


def render_visit(p: dict, blobs, tissues: dict, pose: Pose, rng, bias_mix: float, grid: Grid):
    xyz = coordinates(grid, pose)
    f = p["fields"].sample(xyz)
    x, y, z = xyz
    w = float(min(grid.spacing))
    body = _elliptic_cylinder(xyz, (0, 10), p["body_axes"]) + 5 * f["shape"]
    inner = body + p["fat"]
    dome = 45 + 0.004 * ((x + 30) ** 2 + y**2)  # diaphragm
    liver_phi = ellipsoid_phi(xyz, p["liver_centre"], p["liver_axes"]) + 6 * f["shape"]
    # the left lobe tapers towards the patient's left and the liver stays below the dome
    liver_phi = np.maximum(liver_phi, x - (25 - 0.6 * (z - p["liver_centre"][2]) - 0.4 * y))
    liver_phi = np.maximum(liver_phi, z - dome + 4)
    layers = [
        ("fat", soft(body, w)),
        ("muscle", soft(inner, w)),
        ("fat", soft(inner + 9, w)),  # intra-abdominal fat
        ("lung", soft(inner + 6, w) * soft(dome - z, w)),
        ("bowel", soft(ellipsoid_phi(xyz, [55, -35, -15], [60, 45, 55]) + 8 * f["bowel"], w)),
        ("air", soft(ellipsoid_phi(xyz, [55, -35, -15], [60, 45, 55]) + 8 * f["bowel"] + 10, w) * (f["bowel"] > 0.5)),
        ("spleen", soft(ellipsoid_phi(xyz, [80, 35, 15], [22, 45, 48]) + 3 * f["shape"], w)),
        ("kidney", soft(ellipsoid_phi(xyz, [-65, 60, -55], [24, 30, 48]), w)),
        ("kidney", soft(ellipsoid_phi(xyz, [68, 58, -40], [24, 30, 48]), w)),
        ("fat", soft(ellipsoid_phi(xyz, [-65, 60, -55], [8, 10, 20]), w)),
        ("fat", soft(ellipsoid_phi(xyz, [68, 58, -40], [8, 10, 20]), w)),
        (
            "muscle",
            np.maximum(
                soft(_elliptic_cylinder(xyz, (-32, 90), (22, 28)), w),
                soft(_elliptic_cylinder(xyz, (32, 90), (22, 28)), w),
            ),
        ),
        ("bone", soft(_elliptic_cylinder(xyz, (0, 72), (20, 17)), w)),
        ("csf", soft(_elliptic_cylinder(xyz, (0, 98), (7, 7)), w)),
        ("aorta", soft(_elliptic_cylinder(xyz, (12, 48), (11, 11)), w)),
        ("liver", soft(liver_phi, w)),
        ("vessel", soft(_elliptic_cylinder(xyz, (-22, 40), (11, 10)), w)),  # IVC through the liver
        ("vessel", soft(liver_phi + 8, w) * soft((np.abs(f["vessels"]) - 0.05) * 40, w)),
        ("vessel", soft(liver_phi + 15, w) * soft((np.abs(f["vessels2"]) - 0.04) * 40, w)),
        ("fluid", soft(ellipsoid_phi(xyz, p["liver_centre"] + [10, -45, -45], [14, 18, 28]), w)),  # gallbladder
    ]
    weights = compose(layers, grid.shape)
    organ = (weights["liver"] + weights["vessel"] * (liver_phi < 0)) > 0.5
    inside = soft(liver_phi, w)
    lesions = render_blobs([b for b in blobs if b.kind == "lesion"], xyz, grid, pose, f["rough"], w) * inside
    core = (
        render_blobs([b.scaled(1 - p["rim"]) for b in blobs if b.kind == "lesion"], xyz, grid, pose, f["rough"], w)
        * inside
    )
    overlay(weights, "rim", lesions)
    overlay(weights, "lesion", core)
    for kind in ("cyst", "hemangioma"):
        overlay(
            weights, kind, render_blobs([b for b in blobs if b.kind == kind], xyz, grid, pose, f["rough"], w) * inside
        )
    lesion_mask = (lesions > 0.5) & organ

    # scanner gain: liver at ~1000 before contrast and at b ~ 0
    names = list(tissues)
    dce_gain, dwi_gain = 1000.0 / tissues["liver"][0], 1000.0 / tissues["liver"][4]
    dce = [
        {n: dce_gain * tissues[n][0] * (1 + uptake(np.array([t]), *tissues[n][1:4], p["arrival"])[0]) for n in names}
        for t in DCE_TIMES
    ]
    dwi = [{n: dwi_gain * tissues[n][4] * np.exp(-b * tissues[n][5] * 1e-3) for n in names} for b in B_VALUES]
    fine, strong = 0.05 * f["tex"], 0.2 * f["tex"]
    texture = {n: fine for n in ("liver", "spleen", "kidney", "muscle", "bowel")} | {"lesion": strong, "rim": strong}
    bias = bias_field({"b": (1 - bias_mix) * f["bias"] + bias_mix * f["bias2"]}, "b", p["bias"])
    signal = render_channels(weights, dce + dwi, texture)
    signal *= bias
    dce_img = add_rician_noise(signal[:16], p["noise"] * 1000.0, rng)
    dwi_img = add_rician_noise(signal[16:], p["dwi_noise"] * 1000.0, rng)
    return {"DCE": dce_img, "DWI": dwi_img}, organ, lesion_mask


def generate_pair(seed: int, grid: Grid = LIVER_GRID) -> dict:
    p = make_patient(seed)
    rng = np.random.default_rng([seed, 0x5EED])
    follow_blobs, evolution = evolve_blobs(
        p["blobs"], rng, lambda r: _metastasis(r, p["liver_centre"], p["liver_axes"]), growth=(0.7, 1.4)
    )
    visits = {}
    for name, blobs, drift in (("baseline", p["blobs"], 0.0), ("followup", follow_blobs, 0.03)):
        # breath-hold position differs between visits mostly along z
        pose = Pose.random(rng, max_deg=(1.0, 1.0, 2.0), max_mm=2.0)
        pose.translation[2] += rng.uniform(-6, 6)
        tissues = {k: v * (1 + drift * rng.standard_normal(v.shape)) for k, v in p["tissues"].items()}
        images, organ, lesions = render_visit(p, blobs, tissues, pose, rng, 0.25 if drift else 0.0, grid)
        visits[name] = {"images": images, "organ": organ, "lesions": lesions}
    return {
        "visits": visits,
        "grid": grid,
        "info": {
            "preset": "liver-metastases",
            "seed": seed,
            "sequences": ["DCE", "DWI"],
            "lesion_type": "hypervascular" if p["tissues"]["lesion"][1] > 1 else "hypovascular",
            "dce_times_s": DCE_TIMES.tolist(),
            "b_values": B_VALUES.tolist(),
            "evolution": evolution,
            "mimics": sum(b.kind != "lesion" for b in p["blobs"]),
        },
    }
