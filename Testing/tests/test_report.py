"""The patient's HTML report and its figures: built by the real console script from real
segment / finetune / compare outputs, opened in the headless system Chromium (screenshot
kept in ``$PFT_ARTIFACTS``, default ``Testing/artifacts/report``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ARTIFACTS = Path(os.environ.get("PFT_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")) / "report"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Every test here reads the session the fixture runs through the console script, fine-tuning included.
pytestmark = pytest.mark.slow


def cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def patient_outputs(small_pair_dir, tmp_path_factory):
    """What a radiologist's session leaves: suggestions, a patient model, the follow-up
    segmented by both models with uncertainty, and the change table."""
    out = tmp_path_factory.mktemp("session")
    baseline, followup = small_pair_dir / "baseline", small_pair_dir / "followup"
    cli("segment", "--model", "brain-wmh", "--case", baseline, "--out", out / "analysis", "--suggest", 2)
    cli("finetune", "--model", "brain-wmh", "--case", baseline, "--iterations", 2, "--out", out / "patient.pt")
    cli("segment", "--model", "brain-wmh", "--case", followup, "--mc-samples", 3, "--out", out / "base")
    cli("segment", "--model", out / "patient.pt", "--case", followup, "--mc-samples", 3, "--out", out / "fine-tuned")
    cli(
        "compare",
        "--baseline-lesions",
        baseline / "lesions.nii.gz",
        "--followup-lesions",
        out / "fine-tuned" / "segmentation.nii.gz",
        "--out",
        out / "changes",
    )
    return out


def _inputs(small_pair_dir, out):
    from PatientFineTuneLib.report import ReportInputs

    return ReportInputs(
        small_pair_dir / "followup" / "FLAIR.nii.gz",
        {"base": out / "base", "fine-tuned": out / "fine-tuned"},
        truth=small_pair_dir / "followup" / "lesions.nii.gz",
        patient_model=out / "patient.pt",
        changes=out / "changes",
        suggestions=out / "analysis" / "suggestions.json",
    )


def test_the_figures_have_legends_titles_sides_and_a_colour_bar(small_pair_dir, patient_outputs):
    from PatientFineTuneLib.outputs import read_segment_outputs
    from PatientFineTuneLib.report import report_figures

    inputs = _inputs(small_pair_dir, patient_outputs)
    results = {label: read_segment_outputs(folder) for label, folder in inputs.results.items()}
    figures = {name: figure for name, _caption, figure in report_figures(inputs, results)}
    outlines = figures["outlines"]
    assert [t.get_text() for t in outlines.legends[0].get_texts()] == ["reference", "base", "fine-tuned"]
    panels = [ax for ax in outlines.axes if ax.get_title()]
    assert panels and all(ax.get_title().startswith("slice ") for ax in panels)
    assert all({"R", "L"} <= {t.get_text() for t in ax.texts} for ax in panels)
    # the slices shown are those with the most lesion, in slice order
    shown = [int(ax.get_title().split()[1]) for ax in panels]
    assert shown == sorted(shown)
    uncertainty = figures["uncertainty"]
    bars = [ax for ax in uncertainty.axes if "uncertainty" in ax.get_ylabel()]
    assert len(bars) == 1 and "SD" in bars[0].get_ylabel()
    assert {ax.get_ylabel() for ax in uncertainty.axes} >= {"base", "fine-tuned"}


def test_the_report_opens_in_chromium_and_shows_what_a_radiologist_needs(small_pair_dir, patient_outputs, tmp_path):
    out = patient_outputs
    report = tmp_path / "report.html"
    cli(
        "report",
        "--followup-image",
        small_pair_dir / "followup" / "FLAIR.nii.gz",
        "--results",
        f"base={out / 'base'}",
        f"fine-tuned={out / 'fine-tuned'}",
        "--truth",
        small_pair_dir / "followup" / "lesions.nii.gz",
        "--model",
        out / "patient.pt",
        "--changes",
        out / "changes",
        "--suggestions",
        out / "analysis" / "suggestions.json",
        "--title",
        "Patient 000",
        "--out",
        report,
    )
    text = report.read_text()
    assert "src='http" not in text and 'src="http' not in text  # self-contained
    if not Path(CHROMIUM).is_file():
        if os.environ.get("PFT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no Chromium at {CHROMIUM}: install the Debian package chromium")
        pytest.skip("no system Chromium (apt-get install chromium); CI runs this test")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    changes = json.loads((out / "changes" / "changes.json").read_text())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.as_uri())
        body = page.inner_text("body")
        for heading in (
            "Inputs and models",
            "Suggested baseline slices",
            "Lesions at each visit",
            "What changed",
            "Uncertainty",
            "Figures",
        ):
            assert heading in body, heading
        assert "Never-worse check" in body and "Base model sha256" in body
        # which brain mask the patient model was fine-tuned inside, and whether N4 ran
        assert "Baseline organ mask" in body and "organ.nii.gz" in body and "Bias-field correction (N4)" in body
        # the change table: one row per lesion group, with its category
        rows = page.locator("section:has(h2:text('What changed')) table").nth(1).locator("tbody tr")
        assert rows.count() == len(changes["lesions"]) > 0
        assert {rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())} <= {
            "new",
            "enlarged",
            "stable",
            "shrinking",
            "resolved",
        }
        # every figure is decoded and drawn
        images = page.locator("img")
        assert images.count() == 3  # lesion load, outlines, uncertainty
        assert all(images.nth(i).evaluate("i => i.complete && i.naturalWidth > 300") for i in range(images.count()))
        assert all(u.startswith(("file:", "data:")) for u in requests)
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
    np.testing.assert_equal(
        sitk.ReadImage(str(out / "base" / "segmentation.nii.gz")).GetSize(),
        sitk.ReadImage(str(small_pair_dir / "followup" / "FLAIR.nii.gz")).GetSize(),
    )


def test_an_incomplete_result_folder_is_refused_not_reported_as_no_lesions(small_pair_dir, patient_outputs, tmp_path):
    """A segment folder without its lesion table, with an empty one, with a table that
    disagrees with the lesion labels, or without an image, is not a result: a report of
    it would say "0 lesions" while the outlines show lesions."""
    followup = small_pair_dir / "followup" / "FLAIR.nii.gz"
    damage = {
        "lesions.csv": lambda f: f.unlink(),
        "an empty lesions.csv": lambda f: f.write_text(""),
        "the lesion labels": lambda f: f.write_text(
            f.read_text().splitlines()[0] + "\n"
        ),  # header only, labels show lesions
        "probability.nii.gz": lambda f: f.unlink(),
    }
    for words, spoil in damage.items():
        folder = tmp_path / words.replace(" ", "-")
        shutil.copytree(patient_outputs / "base", folder)
        spoil(folder / ("probability.nii.gz" if words.startswith("probability") else "lesions.csv"))
        report = tmp_path / "report.html"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "PatientFineTuneLib.cli",
                "--progress",
                "none",
                "report",
                "--followup-image",
                followup,
                "--results",
                f"base={folder}",
                "--out",
                report,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and str(folder) in proc.stderr and words.split()[-1] in proc.stderr, (
            words,
            proc.stderr,
        )
        assert len(proc.stderr.strip().splitlines()) == 1 and not report.exists(), proc.stderr


@pytest.mark.parametrize("n_slices", [1, 3])
def test_an_outline_figures_legend_stays_inside_the_figure(n_slices):
    """A follow-up with lesions on one slice gets a one-panel figure; its legend of three
    outlines must not run off the figure's edges (it did: one row of three entries is
    wider than one panel)."""
    import matplotlib

    matplotlib.use("Agg")
    from PatientFineTuneLib.plots import outline_figure

    image = np.zeros((64, 64), np.float32)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    names = ["base model, lesions", "fine-tuned model, lesions", "reference lesions"]
    figure = outline_figure([image] * n_slices, {n: [mask] * n_slices for n in names}, ["slice"] * n_slices)
    figure.canvas.draw()
    box = figure.legends[0].get_window_extent()
    width, height = figure.canvas.get_width_height()
    assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, (box, width, height)
