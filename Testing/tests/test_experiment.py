"""The experiment runner in a small configuration: 2 synthetic pairs, 5 iterations."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import skimage.io

from PatientFineTuneLib.experiment import RESULT_COLUMNS, read_cohort, summary_table, write_folder_cohort
from PatientFineTuneLib.metrics import dice
from PatientFineTuneLib.modelfile import ModelBundle, make_metadata, save_model
from PatientFineTuneLib.synth import generate_pair, write_pair

from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cohorts import main as cohorts_main  # noqa: E402


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    for seed in (0, 1):
        write_pair(generate_pair("brain-wmh", seed, small=True), root / f"patient{seed:03d}", preview=False)
    return root


def test_folder_cohort_manifest(cohort_dir, tmp_path):
    manifest = write_folder_cohort(cohort_dir, ["FLAIR", "T1"], tmp_path / "cohort.csv")
    pairs = read_cohort(manifest, ["FLAIR", "T1"])
    assert [p.patient for p in pairs] == ["patient000", "patient001"]
    assert all(p.visits["followup"]["lesions"].is_file() and p.visits["baseline"]["organ"].is_file() for p in pairs)
    rows = list(csv.DictReader(open(manifest)))
    rows = [r for r in rows if not (r["patient"] == "patient001" and r["visit"] == "followup")]
    broken = tmp_path / "broken.csv"
    with open(broken, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="needs a baseline and a followup"):
        read_cohort(broken, ["FLAIR", "T1"])


def test_a_data_set_laid_out_its_own_way_gets_its_manifest_from_the_benchmarks_script(tmp_path, capsys):
    """Brain-Tumor-Progression's NN/{Pre,Post}_Scan_T1.nii.gz: Pre the baseline, Post the
    follow-up, read as the model's sequence; the experiment then takes the manifest."""
    root = tmp_path / "btp"
    for patient in ("02", "01"):
        for name in ("Pre_Scan_T1", "Pre_Mask", "Post_Scan_T1", "Post_Mask"):
            (root / patient).mkdir(parents=True, exist_ok=True)
            (root / patient / f"{name}.nii.gz").write_bytes(b"")
    (root / "03").mkdir()  # no scans: not a patient
    cohorts_main(["tumor-progression", str(root), "--out", str(tmp_path / "manifests" / "cohort.csv")])
    manifest = Path(capsys.readouterr().out.strip())
    pairs = read_cohort(manifest, ["T1c"])
    assert [p.patient for p in pairs] == ["01", "02"]
    assert pairs[0].visits["baseline"]["sequences"] == [(root / "01" / "Pre_Scan_T1.nii.gz").resolve()]
    assert pairs[1].visits["followup"]["lesions"] == (root / "02" / "Post_Mask.nii.gz").resolve()
    assert pairs[0].visits["followup"]["organ"] is None
    with pytest.raises(FileNotFoundError, match="Pre_Scan_T1"):
        cohorts_main(["tumor-progression", str(root / "03"), "--out", str(tmp_path / "none.csv")])


@pytest.mark.slow
def test_small_experiment_runs_resumes_and_summarises(cohort_dir, tmp_path):
    model = tiny_model()
    path = tmp_path / "base.pt"
    save_model(
        ModelBundle(
            model,
            make_metadata(
                model, [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}], (2.0, 2.0), preset="brain-wmh"
            ),
        ),
        path,
    )
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "PatientFineTuneLib.cli",
        "experiment",
        "--model",
        str(path),
        "--cohort",
        str(cohort_dir),
        "--out",
        str(out),
        "--iterations-axis",
        "5",
        "--default-iterations",
        "5",
        "--arms",
        "base,copy-forward,ft-iter5,ft-suggested1,ft-segmentation,ft-naive,ft-all,ft-shipped",
        "--mc-samples",
        "2",
        "--mc-arms",
        "base,ft-iter5,ft-all",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert list(rows[0]) == RESULT_COLUMNS
    arms = ["base", "copy-forward", "ft-iter5", "ft-suggested1", "ft-segmentation", "ft-naive", "ft-all", "ft-shipped"]
    assert len(rows) == 2 * 8 and {r["arm"] for r in rows} == set(arms)
    # the product's fine-tuning: the check chose 5, 10 or 20 iterations, or kept the base model (0)
    assert all((r["iterations"] in {"0", "5", "10", "20"}) == (r["arm"] == "ft-shipped") for r in rows)
    for r in rows:
        for metric in ("dice", "avd_percent", "lesion_recall", "lesion_precision", "lesion_f1", "seconds"):
            assert math.isfinite(float(r[metric])), (r["arm"], metric, r[metric])
        # MC dropout only where asked
        assert math.isfinite(float(r["max_sd"])) if r["arm"] in ("base", "ft-iter5", "ft-all") else r["max_sd"] == ""
    assert {r["finetune_method"] for r in rows if r["arm"] in ("ft-naive", "ft-all")} == {"naive"}
    # each arm's mask is kept and scores as the CSV says
    for r in rows:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "masks" / r["patient"] / f"{r['arm']}.nii.gz"))) > 0
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(cohort_dir / r["patient"] / "followup" / "lesions.nii.gz"))) > 0
        assert abs(dice(pred, gt) - float(r["dice"])) < 1e-3, r["arm"]
    for png in [out / "boxplots.png", *(out / "overlays" / f"patient{k:03d}.png" for k in (0, 1))]:
        image = skimage.io.imread(png)
        assert image.ndim == 3 and image.shape[1] > 400 and image[..., :3].std() > 10, png
    assert all(float(r["registration_correlation"]) > 0.5 for r in rows if r["arm"] == "copy-forward")
    summary = (out / "summary.md").read_text()
    assert "| base | 2 |" in summary and "| ft-naive | 2 |" in summary
    # resuming: nothing is recomputed, nothing duplicated
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and len(list(csv.DictReader(open(out / "results.csv")))) == 2 * 8


def test_summary_without_the_reference_arm_has_no_tests():
    rows = [
        {
            "patient": f"p{k}",
            "arm": arm,
            "dice": 0.5 + 0.1 * k,
            "avd_percent": 10,
            "hd95_mm": 3,
            "lesion_recall": 1,
            "fp_count": k,
            "lesion_precision": 1,
            "lesion_f1": 1,
        }
        for k in range(3)
        for arm in ("ft-all", "ft-naive")
    ]
    table = summary_table(rows)
    assert "| ft-all | 3 | 0.60 ± 0.10 |" in table and "p=" not in table
    with_base = summary_table(rows + [dict(r, arm="base", dice=0.4) for r in rows if r["arm"] == "ft-all"])
    assert "| ft-all | 3 | 0.60 ± 0.10" in with_base and "(p=" in with_base
