import numpy as np
import torch

from PatientFineTuneLib.patches import corner_and_centre_patch_centres, extract_patches, random_patch_centres


def test_unrotated_patch_is_an_exact_crop():
    image = torch.arange(200 * 180, dtype=torch.float32).reshape(1, 200, 180)
    patch = extract_patches(image, np.array([[100.0, 90.0]]), [0.0], size=64)
    assert torch.allclose(patch[0, 0], image[0, 68:132, 58:122], rtol=0, atol=1e-2)


def test_ninety_degrees_is_an_exact_rotation():
    image = torch.rand(2, 100, 100)
    patch0 = extract_patches(image, np.array([[50.0, 50.0]]), [0.0], size=32)
    patch90 = extract_patches(image, np.array([[50.0, 50.0]]), [90.0], size=32)
    assert torch.allclose(patch90[0], torch.rot90(patch0[0], k=1, dims=(1, 2)), atol=1e-5) or torch.allclose(
        patch90[0], torch.rot90(patch0[0], k=-1, dims=(1, 2)), atol=1e-5
    )


def test_labels_stay_aligned_with_the_image_at_any_angle():
    rng = np.random.default_rng(0)
    labels = np.zeros((120, 120), np.float32)
    yy, xx = np.mgrid[:120, :120]
    labels[(yy - 50) ** 2 + (xx - 70) ** 2 < 15**2] = 1
    image = torch.from_numpy(labels * 100.0)[None]
    label_t = torch.from_numpy(labels)[None]
    centres = np.array([[60.5, 60.5]] * 6)
    angles = rng.uniform(-45, 45, 6)
    img_p = extract_patches(image, centres, angles, size=64)
    lab_p = extract_patches(label_t, centres, angles, size=64, label=True)
    assert set(lab_p.unique().tolist()) <= {0.0, 1.0}
    # the bilinear image is ~100 inside the label and ~0 outside, except at the edge
    inside = img_p[lab_p == 1]
    outside = img_p[lab_p == 0]
    assert inside.mean() > 90 and outside.mean() < 3
    agree = ((img_p > 50) == (lab_p == 1)).float().mean()
    assert agree > 0.99


def test_random_centres_lie_in_the_organ_and_are_reproducible():
    organ = np.zeros((50, 60), bool)
    organ[10:20, 30:55] = True
    a = random_patch_centres(organ, 25, np.random.default_rng(3))
    b = random_patch_centres(organ, 25, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == (25, 2)
    rows, cols = np.floor(a).astype(int).T
    assert organ[rows, cols].all()


def test_corner_and_centre_patches_cover_the_bounding_box():
    organ = np.zeros((300, 300), bool)
    organ[20:280, 40:240] = True
    c = corner_and_centre_patch_centres(organ, size=128)
    assert c.tolist() == [[84, 104], [84, 176], [216, 104], [216, 176], [150, 140]]
