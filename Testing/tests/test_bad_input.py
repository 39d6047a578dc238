"""Bad input never gives a confident wrong answer or loses a file: each case here was a
defect found by a sweep of bad inputs through the real console script (exit 0 with a
wrong result, an input replaced, a traceback after the whole computation)."""

import locale
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PatientFineTuneLib.images import ImageError, load_case, normalise
from PatientFineTuneLib.modelfile import ModelBundle, ModelFileError, load_model, make_metadata, save_model

from conftest import tiny_model, write_volume


def cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _variant(src, dst, values):
    image = sitk.ReadImage(str(src))
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(dst))
    return dst


@pytest.mark.parametrize("what, sequence", [("zero", "FLAIR"), ("constant", "FLAIR"), ("zero", "T1")])
def test_a_blank_or_constant_sequence_is_refused_not_segmented(small_pair_dir, tmp_path, what, sequence):
    case = small_pair_dir / "baseline"
    shape = sitk.GetArrayFromImage(sitk.ReadImage(str(case / f"{sequence}.nii.gz"))).shape
    blank = _variant(
        case / f"{sequence}.nii.gz", tmp_path / f"{sequence}.nii.gz", np.full(shape, 0.0 if what == "zero" else 417.0)
    )
    images = [blank if s == sequence else case / f"{s}.nii.gz" for s in ("FLAIR", "T1")]
    out = tmp_path / "out"
    proc = cli("segment", "--model", "brain-wmh", "--images", *images, "--organ", case / "organ.nii.gz", "--out", out)
    assert proc.returncode == 2, proc.stdout
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and sequence in message and ("blank" in message or "constant" in message), (
        message
    )
    assert not out.exists()


def test_normalise_refuses_a_channel_without_spread_inside_the_organ():
    organ = np.zeros((4, 10, 10), bool)
    organ[:, 2:8, 2:8] = True
    images = np.random.default_rng(0).normal(100, 10, (2, 4, 10, 10)).astype(np.float32)
    images[1][organ] = 50.0  # constant inside the organ, varied outside
    with pytest.raises(ImageError, match="T1.*no intensity spread"):
        normalise(images, organ, names=["FLAIR", "T1"])


def test_nan_and_inf_in_nifti_are_refused_like_in_every_other_format(tmp_path):
    values = np.random.default_rng(0).normal(100, 10, (6, 12, 12)).astype(np.float32)
    values[2, 3, 4], values[1, 1, 1] = np.nan, np.inf
    for name in ("bad.nii.gz", "bad.nii", "bad.nrrd"):
        image = sitk.GetImageFromArray(values)
        sitk.WriteImage(image, str(tmp_path / name))
        with pytest.raises(ImageError, match="2 NaN or infinite"):
            load_case([tmp_path / name])


def test_an_input_is_never_replaced_by_the_commands_output(small_pair_dir, tmp_path):
    case = tmp_path / "case"
    shutil.copytree(small_pair_dir / "baseline", case)
    before = (case / "lesions.nii.gz").read_bytes()
    for out in (case / "lesions.nii.gz", case / "FLAIR.nii.gz"):
        proc = cli("finetune", "--model", "brain-wmh", "--case", case, "--iterations", 2, "--out", out, "--overwrite")
        assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr
    assert (case / "lesions.nii.gz").read_bytes() == before
    # a hard link to an input is the same file
    os.link(case / "lesions.nii.gz", tmp_path / "link.pt")
    proc = cli(
        "finetune",
        "--model",
        "brain-wmh",
        "--case",
        case,
        "--iterations",
        2,
        "--out",
        tmp_path / "link.pt",
        "--overwrite",
    )
    assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr
    assert (case / "lesions.nii.gz").read_bytes() == before
    # segment's output folder holding an input named like one of its outputs
    shutil.copy(case / "organ.nii.gz", case / "segmentation.nii.gz")
    organ_before = (case / "segmentation.nii.gz").read_bytes()
    proc = cli(
        "segment",
        "--model",
        "brain-wmh",
        "--images",
        case / "FLAIR.nii.gz",
        case / "T1.nii.gz",
        "--organ",
        case / "segmentation.nii.gz",
        "--out",
        case,
        "--overwrite",
    )
    assert proc.returncode == 2 and "input" in proc.stderr, proc.stderr
    assert (case / "segmentation.nii.gz").read_bytes() == organ_before


def test_output_problems_are_found_before_any_work(small_pair_dir, tmp_path):
    case = small_pair_dir / "baseline"
    (tmp_path / "a-file").write_text("x")
    checks = [
        (
            ("finetune", "--model", "brain-wmh", "--case", case, "--iterations", 5000, "--out", tmp_path / "model"),
            ".pt",
        ),
        (
            (
                "finetune",
                "--model",
                "brain-wmh",
                "--case",
                case,
                "--iterations",
                5000,
                "--out",
                tmp_path / "a-file" / "m.pt",
            ),
            "not a folder",
        ),
        (("segment", "--model", "brain-wmh", "--case", case, "--out", tmp_path / "a-file"), "not a folder"),
        (("train-base", "--preset", "brain-wmh", "--train", small_pair_dir, "--out", tmp_path / "base"), ".pt"),
        (("evaluate", "--pred", case / "lesions.nii.gz", "--gt", case / "lesions.nii.gz", "--out", tmp_path), "folder"),
    ]
    for args, words in checks:
        proc = cli(*args, timeout=60)  # 5,000 iterations would take minutes: the check comes first
        assert proc.returncode == 2, (args, proc.stderr)
        message = proc.stderr.strip()
        assert len(message.splitlines()) == 1 and words in message and "Traceback" not in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize(
    "args",
    [
        ("finetune", "--model", "brain-wmh", "--case", ".", "--out", "x.pt", "--iterations", "0"),
        ("finetune", "--model", "brain-wmh", "--case", ".", "--out", "x.pt", "--iterations", "-5"),
        ("finetune", "--model", "brain-wmh", "--case", ".", "--out", "x.pt", "--angles", "-1"),
        ("finetune", "--model", "brain-wmh", "--case", ".", "--out", "x.pt", "--pixel-fraction", "0"),
        ("finetune", "--model", "brain-wmh", "--case", ".", "--out", "x.pt", "--pixel-fraction", "1.5"),
        ("synth", "--preset", "brain-wmh", "--out", "x", "--patients", "-1"),
        ("experiment", "--model", "brain-wmh", "--cohort", ".", "--out", "x", "--workers", "0"),
        ("segment", "--model", "brain-wmh", "--case", ".", "--out", "x", "--mc-samples", "1"),
        ("segment", "--model", "brain-wmh", "--case", ".", "--out", "x", "--min-lesion-voxels", "0"),
    ],
)
def test_nonsense_counts_are_refused_by_the_parser(args, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2 and "invalid" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_model_is_neither_saved_nor_loaded(tmp_path):
    model = tiny_model()
    meta = make_metadata(model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], (1.0, 1.0))
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_model(ModelBundle(model, meta), tmp_path / "diverged.pt")
    assert not (tmp_path / "diverged.pt").exists()
    # a file written by an older version (or edited) with non-finite weights and a valid hash
    from PatientFineTuneLib import modelfile

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = dict(meta, architecture=model.architecture())
    meta["sha256"] = modelfile._content_hash(meta, state)
    import json

    torch.save(
        {
            "format": modelfile.FORMAT_NAME,
            "format_version": modelfile.FORMAT_VERSION,
            "metadata_json": json.dumps(meta, sort_keys=True),
            "state_dict": state,
        },
        tmp_path / "old.pt",
    )
    with pytest.raises(ModelFileError, match="non-finite"):
        load_model(tmp_path / "old.pt")


def test_the_training_progress_bar_moves(small_pair_dir, tmp_path):
    proc = cli(
        "finetune",
        "--model",
        "brain-wmh",
        "--case",
        small_pair_dir / "baseline",
        "--iterations",
        12,
        "--slices",
        "all-lesion",
        "--no-check",
        "--out",
        tmp_path / "p.pt",
    )
    assert proc.returncode == 0, proc.stderr
    counts = {
        int(part.split("/")[0].split()[-1]) for part in proc.stderr.replace("\r", "\n").splitlines() if "/12 " in part
    }
    assert len(counts) >= 3 and max(counts) == 12, proc.stderr[-2000:]


def test_segment_overwrite_removes_what_the_earlier_run_wrote_and_this_one_does_not(small_pair_dir, tmp_path):
    case = small_pair_dir / "baseline"
    out = tmp_path / "seg"
    assert (
        cli(
            "segment",
            "--model",
            "brain-wmh",
            "--images",
            case / "FLAIR.nii.gz",
            case / "T1.nii.gz",
            "--mc-samples",
            2,
            "--suggest",
            1,
            "--out",
            out,
        ).returncode
        == 0
    )
    assert {"organ_mask.nii.gz", "uncertainty_sd.nii.gz", "uncertainty.json", "suggestions.json"} <= {
        p.name for p in out.iterdir()
    }
    proc = cli(
        "segment",
        "--model",
        "brain-wmh",
        "--images",
        case / "FLAIR.nii.gz",
        case / "T1.nii.gz",
        "--organ",
        case / "organ.nii.gz",
        "--out",
        out,
        "--overwrite",
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "lesion_labels.nii.gz",
        "lesions.csv",
        "probability.nii.gz",
        "segmentation.nii.gz",
    ]


def test_evaluate_refuses_images_that_are_not_label_maps(small_pair_dir, tmp_path):
    case = small_pair_dir / "baseline"
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesions.nii.gz")))
    negative = _variant(case / "lesions.nii.gz", tmp_path / "negative.nii.gz", np.where(truth > 0, -1, 0))
    probability = _variant(case / "lesions.nii.gz", tmp_path / "probability.nii.gz", (truth > 0) * 0.8 + 0.05)
    for pred, words in ((case / "FLAIR.nii.gz", "not a label"), (probability, "not a label"), (negative, "negative")):
        proc = cli("evaluate", "--pred", pred, "--gt", case / "lesions.nii.gz", timeout=120)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_evaluate_writes_valid_json_and_names_missing_columns(small_pair_dir, tmp_path):
    import json

    case = small_pair_dir / "baseline"
    empty = _variant(
        case / "lesions.nii.gz",
        tmp_path / "empty.nii.gz",
        np.zeros_like(sitk.GetArrayFromImage(sitk.ReadImage(str(case / "lesions.nii.gz")))),
    )
    proc = cli("evaluate", "--pred", empty, "--gt", case / "lesions.nii.gz", timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[0], parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert record["hd95_mm"] is None  # empty prediction: HD95 undefined
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("name,prediction,truth\na,empty.nii.gz,x.nii.gz\n")
    proc = cli("evaluate", "--pairs", pairs, timeout=120)
    assert proc.returncode == 2 and "case,pred,gt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_model_file_with_a_malformed_body_is_refused_cleanly(tmp_path):
    from PatientFineTuneLib import modelfile

    for body in ({"metadata_json": "[1, 2]", "state_dict": {}}, {"metadata_json": "{}", "state_dict": [1, 2]}):
        torch.save(
            {"format": modelfile.FORMAT_NAME, "format_version": modelfile.FORMAT_VERSION, **body}, tmp_path / "m.pt"
        )
        with pytest.raises(ModelFileError, match="malformed"):
            load_model(tmp_path / "m.pt")


def _write_dicom_series(
    volume: np.ndarray,
    folder,
    spacing=(0.9, 0.9, 3.0),
    origin=(-100.0, -120.0, -40.0),
    series="1.2.826.0.1.3680043.2.1125.1.4242",
    prefix="slice",
    orientation="1\\0\\0\\0\\1\\0",
):
    """A real DICOM series (one file per slice, with position, orientation and spacing;
    each file gets its own new SOP instance UID)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # GDCM's DICOM writer sets the process's LC_CTYPE to "C", after which Python decodes
    # every later subprocess's output as ASCII: put the locale back
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(image, volume.shape[0], folder, writer, series, spacing, prefix, orientation)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return image


def _write_slices(image, n, folder, writer, series, spacing, prefix, orientation):
    for z in range(n):
        slice_ = image[:, :, z]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": series + ".1",
            "0020|000e": series,
            "0020|0013": str(z + 1),
            "0020|0037": orientation,
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
            "0020|0032": "\\".join(str(c) for c in image.TransformIndexToPhysicalPoint((0, 0, z))),
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folders_are_read_and_a_single_slice_or_an_empty_folder_refused(tmp_path):
    from PatientFineTuneLib.images import read_image

    volume = np.random.default_rng(0).integers(0, 1000, (6, 20, 24))
    written = _write_dicom_series(volume, tmp_path / "series")
    image = read_image(tmp_path / "series")
    assert image.GetSize() == (24, 20, 6) and np.array_equal(sitk.GetArrayFromImage(image), volume)
    assert image.GetSpacing() == pytest.approx((0.9, 0.9, 3.0))
    assert image.GetSpacing() == pytest.approx(written.GetSpacing()) and image.GetOrigin() == pytest.approx(
        written.GetOrigin()
    )
    with pytest.raises(ImageError, match="single 2D DICOM image"):
        read_image(tmp_path / "series" / "slice000.dcm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="folder without a DICOM series"):
        read_image(tmp_path / "empty")


def test_a_study_folder_with_several_series_needs_series_uids_in_image_order(tmp_path):
    """A study exported as one folder (FLAIR and T1 series side by side): without
    --series-uid the reader lists the series and names the option; with one UID per such
    folder, in the order of the images, each sequence reads its own series."""
    from PatientFineTuneLib.images import assign_series_uids, read_image

    rng = np.random.default_rng(1)
    flair, t1 = rng.integers(0, 1000, (6, 20, 24)), rng.integers(0, 1000, (6, 20, 24))
    uid_flair, uid_t1 = "1.2.826.0.1.3680043.2.1125.1.51", "1.2.826.0.1.3680043.2.1125.1.52"
    study = tmp_path / "study"
    _write_dicom_series(flair, study, series=uid_flair, prefix="flair")
    _write_dicom_series(t1, study, series=uid_t1, prefix="t1")
    with pytest.raises(ImageError, match="holds 2 DICOM series .*--series-uid"):
        read_image(study)
    with pytest.raises(ImageError, match="no DICOM series 1.2.3"):
        read_image(study, "1.2.3")
    assert np.array_equal(sitk.GetArrayFromImage(read_image(study, uid_t1)), t1)
    single = tmp_path / "single"
    _write_dicom_series(flair, single, series=uid_flair)
    # the same study folder twice (FLAIR, then T1) and a one-series folder between them
    assert assign_series_uids([study, single, study], [uid_flair, uid_t1]) == [uid_flair, None, uid_t1]
    with pytest.raises(ImageError, match="3 --series-uid given but only 2"):
        assign_series_uids([study, single, study], [uid_flair, uid_t1, uid_t1])
    organ = write_volume(
        tmp_path / "organ.nii.gz", np.ones(flair.shape, np.uint8), (0.9, 0.9, 3.0), (-100.0, -120.0, -40.0)
    )
    case = load_case([study, study], organ_path=organ, series_uids=[uid_flair, uid_t1])
    stored = case.layout.from_slices(case.images[1])
    assert np.array_equal(stored, t1.astype(np.float32))
    # the command line refuses the study folder without the option, before any work
    proc = cli("segment", "--model", "brain-wmh", "--images", study, study, "--organ", organ, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--series-uid" in proc.stderr and not (tmp_path / "o").exists()


def test_messages_name_options_not_python_and_case_with_images_is_refused(small_pair_dir, tmp_path):
    from PatientFineTuneLib.images import grid_mismatch

    a, b = sitk.Image(4, 4, 4, sitk.sitkUInt8), sitk.Image(4, 4, 4, sitk.sitkUInt8)
    b.SetSpacing((1.0, 1.5, 2.0))
    assert "np.float64" not in grid_mismatch(a, b)
    proc = cli(
        "segment",
        "--model",
        "brain-wmh",
        "--case",
        small_pair_dir / "baseline",
        "--images",
        small_pair_dir / "baseline" / "FLAIR.nii.gz",
        small_pair_dir / "baseline" / "T1.nii.gz",
        "--out",
        tmp_path / "o",
    )
    assert proc.returncode == 2 and "not both" in proc.stderr
    # a folder in the working directory named like a preset does not shadow the shipped model
    (tmp_path / "brain-wmh").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", "info", "brain-wmh"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0 and '"preset": "brain-wmh"' in proc.stdout, proc.stderr


def test_a_failing_registration_is_one_line_not_itks_exception(tmp_path):
    box = np.zeros((20, 40, 40), np.uint8)
    box[5:15, 10:30, 10:30] = 1
    paths = {}
    for name, values in (
        ("baseline", np.full(box.shape, 5.0)),
        ("followup", np.full(box.shape, 5.0)),
        ("lesions", box),
    ):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(
            sitk.GetImageFromArray(values.astype(np.float32 if name != "lesions" else np.uint8)), str(paths[name])
        )
    proc = cli(
        "compare",
        "--baseline-image",
        paths["baseline"],
        "--followup-image",
        paths["followup"],
        "--baseline-lesions",
        paths["lesions"],
        "--followup-lesions",
        paths["lesions"],
        "--out",
        tmp_path / "out",
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "registering" in proc.stderr, (
        proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_a_dicom_series_with_a_duplicate_missing_or_turned_slice_is_refused_naming_the_slices(tmp_path):
    """ITK would read each with the wrong geometry, saying so only in warnings: one slice
    sent twice gave 1.0 mm instead of 3.0 mm, a missing one 3.3 mm and shifted positions,
    slices of another orientation were stacked with the rest."""
    import shutil

    from PatientFineTuneLib.images import read_image

    volume = np.random.default_rng(2).integers(0, 1000, (6, 20, 24))
    good = tmp_path / "good"
    _write_dicom_series(volume, good)
    duplicate = tmp_path / "duplicate"
    shutil.copytree(good, duplicate)
    _write_dicom_series(volume[2:3], tmp_path / "again", origin=(-100.0, -120.0, -40.0 + 2 * 3.0), prefix="again")
    shutil.copy(
        tmp_path / "again" / "again000.dcm", duplicate / "resent.dcm"
    )  # slice 2 again, with its own SOP instance UID
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "slice003.dcm").unlink()
    turned = tmp_path / "turned"
    shutil.copytree(good, turned)
    _write_dicom_series(
        volume[:3], turned, origin=(-100.0, -120.0, 50.0), prefix="coronal", orientation="1\\0\\0\\0\\0\\-1"
    )
    with pytest.raises(ImageError, match=r"resent\.dcm.*slice002\.dcm|slice002\.dcm.*resent\.dcm") as found:
        read_image(duplicate)
    assert "same position" in str(found.value) and "\n" not in str(found.value)
    with pytest.raises(
        ImageError, match=r"slice002\.dcm and slice004\.dcm are 6(\.0+)? mm apart.*3(\.0+)? mm"
    ) as found:
        read_image(missing)
    with pytest.raises(ImageError, match=r"coronal000\.dcm.*another orientation"):
        read_image(turned)
    assert read_image(good).GetSpacing() == pytest.approx((0.9, 0.9, 3.0))
    # the command line: one line, exit 2, before any work
    proc = cli(
        "segment", "--model", "brain-wmh", "--images", duplicate, duplicate, "--out", tmp_path / "o", timeout=120
    )
    assert proc.returncode == 2 and "same position" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )


def _followup_variants(small_pair_dir, folder):
    """FLAIR and T1 of the small follow-up as a 2D image, as one slice, as a coarse volume
    (19.2 mm in-plane: the brain spans one slice once N4 shrinks it) and as float64 values
    beyond float32's range."""
    folder.mkdir()
    made = {}
    for name in ("FLAIR", "T1"):
        image = sitk.ReadImage(str(small_pair_dir / "followup" / f"{name}.nii.gz"))
        coarse = sitk.Resample(
            image,
            [10, 10, 12],
            sitk.Transform(),
            sitk.sitkLinear,
            image.GetOrigin(),
            (19.2, 19.2, 3.0),
            image.GetDirection(),
        )
        huge = sitk.GetImageFromArray(sitk.GetArrayFromImage(image).astype(np.float64) * 1e300)
        huge.CopyInformation(image)
        for kind, variant in (
            ("2d", image[:, :, 5]),
            ("one-slice", image[:, :, 5:6]),
            ("coarse", coarse),
            ("huge", huge),
        ):
            sitk.WriteImage(variant, str(folder / f"{kind}-{name}.nii.gz"))
            made.setdefault(kind, []).append(folder / f"{kind}-{name}.nii.gz")
    return made


def test_what_the_libraries_would_say_unclearly_is_said_in_our_words_up_front(small_pair_dir, tmp_path):
    """torch's "Input and output sizes should be greater than 0" (a 2D image, one slice),
    N4's "Zero-valued spacing ... Refusing to change spacing" (a coarse volume), "NaN or
    infinite voxels" for finite values beyond float32: each is checked first and said
    plainly, naming the file."""
    variants = _followup_variants(small_pair_dir, tmp_path / "variants")
    expected = {"2d": "single slice", "one-slice": "single slice", "coarse": "bias-field correction", "huge": "beyond"}
    for kind, words in expected.items():
        with pytest.raises(ValueError, match=words) as refused:  # ImageError, or brainmask's ValueError for N4
            load_case(variants[kind])
        message = str(refused.value)
        assert "\n" not in message and not any(
            w in message for w in ("Input and output sizes", "Zero-valued", "NaN")
        ), message
        assert kind in message or kind == "coarse", message  # the file is named (N4 sees the whole case)
    proc = cli(
        "segment", "--model", "brain-wmh", "--images", *variants["one-slice"], "--out", tmp_path / "o", timeout=120
    )
    assert proc.returncode == 2 and "single slice" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )


def test_a_folder_with_one_multi_frame_dicom_file_is_one_volume(tmp_path):
    """One file holding every slice (multi-frame) is a volume, not a single slice: read
    as 3D with its spacing (it was read as a 4D image before the series checks)."""
    pytest.importorskip(
        "pydicom", reason="pydicom comes with the web extra (trame-slicer), which the test extra installs"
    )
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from PatientFineTuneLib.images import read_image

    volume = np.random.default_rng(3).integers(0, 1000, (6, 20, 24)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = (
        "1.2.840.10008.5.1.4.1.1.7",
        generate_uid(),
        ExplicitVRLittleEndian,
    )
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 20, 24, 6
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [0.9, 0.9], 3.0, 3.0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [-100, -120, -40], [1, 0, 0, 0, 1, 0]
    ds.PixelData = volume.tobytes()
    (tmp_path / "mf").mkdir()
    ds.save_as(tmp_path / "mf" / "volume.dcm", enforce_file_format=True)
    image = read_image(tmp_path / "mf")
    assert image.GetSize() == (24, 20, 6) and np.array_equal(sitk.GetArrayFromImage(image), volume)
    assert image.GetSpacing() == pytest.approx((0.9, 0.9, 3.0))
