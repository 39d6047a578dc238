"""The command line end to end on a tiny generated case, through the real console script."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def run(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "PatientFineTuneLib.cli", *map(str, args)], capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize(
    "verb", ["synth", "train-base", "segment", "suggest", "finetune", "transfer", "compare", "evaluate", "info", "demo"]
)
def test_every_verb_has_help(verb):
    out = run(verb, "--help").stdout
    assert "usage: patient-finetune " + verb in out


@pytest.mark.slow
def test_synth_train_segment_evaluate(tmp_path):
    data = tmp_path / "data"
    run("synth", "--preset", "brain-wmh", "--patients", "2", "--small", "--out", data)
    assert (data / "patient000" / "baseline" / "FLAIR.nii.gz").is_file()
    # refuses to overwrite
    again = run("synth", "--preset", "brain-wmh", "--patients", "1", "--small", "--out", data, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr

    model = tmp_path / "base.pt"
    run(
        "train-base",
        "--preset",
        "brain-wmh",
        "--train",
        data / "patient001",
        "--val",
        data / "patient000" / "baseline",
        "--out",
        model,
        "--iterations",
        "3",
        "--width",
        "4",
        "--patches-per-slice",
        "2",
        "--validate-every",
        "3",
    )
    assert model.is_file() and not (tmp_path / "base.pt.checkpoint").exists()
    info = json.loads(run("info", model).stdout)
    assert info["preset"] == "brain-wmh" and info["receptive_field_px"] == 123
    assert info["training"]["config"]["iterations"] == 3 and "train-base" in info["training"]["command"]

    baseline = data / "patient000" / "baseline"
    suggested = json.loads(
        run("suggest", "--model", model, "--case", baseline, "-k", "2", "--candidates", "lesion").stdout
    )
    assert len(suggested) == 2 and {"slice", "score", "centre_ras_mm"} <= set(suggested[0])
    same = run("finetune", "--model", model, "--case", baseline, "--out", model, check=False)
    assert same.returncode == 2 and "never overwritten" in same.stderr
    patient = tmp_path / "patient.pt"
    run(
        "finetune",
        "--model",
        model,
        "--case",
        baseline,
        "--slices",
        "suggested-lesion:2",
        "--iterations",
        "3",
        "--angles",
        "2",
        "--out",
        patient,
    )
    tuned = json.loads(run("info", patient).stdout)["finetune"]
    assert tuned["slices"] == [s["slice"] for s in suggested] and tuned["base_model_sha256"] == info["sha256"]

    out = tmp_path / "seg"
    followup = data / "patient000" / "followup"
    run("segment", "--model", patient, "--case", followup, "--out", tmp_path / "seg-mc", "--mc-samples", "3")
    summary = json.loads((tmp_path / "seg-mc" / "uncertainty.json").read_text())
    assert summary["mc_samples"] == 3 and summary["max_sd"] >= 0
    assert (
        sitk.ReadImage(str(tmp_path / "seg-mc" / "uncertainty_sd.nii.gz")).GetSize()
        == sitk.ReadImage(str(followup / "FLAIR.nii.gz")).GetSize()
    )
    run("segment", "--model", model, "--case", followup, "--out", out)
    flair = sitk.ReadImage(str(followup / "FLAIR.nii.gz"))
    for name in ("segmentation.nii.gz", "lesion_labels.nii.gz", "probability.nii.gz"):
        result = sitk.ReadImage(str(out / name))
        assert result.GetSize() == flair.GetSize()
        assert result.GetOrigin() == pytest.approx(flair.GetOrigin())
        assert result.GetDirection() == pytest.approx(flair.GetDirection())
    with open(out / "lesions.csv") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["id", "voxels", "volume_mm3", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]
    twice = run("segment", "--model", model, "--case", followup, "--out", out, check=False)
    assert twice.returncode == 2 and "--overwrite" in twice.stderr

    ev = run(
        "evaluate",
        "--pred",
        out / "segmentation.nii.gz",
        "--gt",
        followup / "lesions.nii.gz",
        "--out",
        tmp_path / "m.csv",
    )
    metrics = json.loads(ev.stdout.splitlines()[0])
    assert 0.0 <= metrics["dice"] <= 1.0
    with open(tmp_path / "m.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["case"] == "segmentation.nii.gz" and "hd95_mm" in rows[0]

    # a cohort through a manifest, then a paired comparison against another method's CSV
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        f"case,pred,gt\nA,{out / 'segmentation.nii.gz'},{followup / 'lesions.nii.gz'}\n"
        f"B,{followup / 'lesions.nii.gz'},{followup / 'lesions.nii.gz'}\n"
    )
    run("evaluate", "--pairs", pairs, "--out", tmp_path / "cohort.csv")
    compared = run("evaluate", "--pairs", pairs, "--compare-to", tmp_path / "cohort.csv").stdout
    assert "dice: mean ± SD" in compared and "paired comparison with" in compared and "wilcoxon" in compared


@pytest.mark.slow
def test_unet3d_train_transfer_finetune_segment(tmp_path):
    data = tmp_path / "data"
    run("synth", "--preset", "brain-wmh", "--patients", "2", "--small", "--out", data)
    source = tmp_path / "unet.pt"
    run(
        "train-base",
        "--preset",
        "brain-wmh",
        "--architecture",
        "unet3d",
        "--train",
        data / "patient001" / "baseline",
        "--out",
        source,
        "--iterations",
        "2",
        "--width",
        "2",
        "--patch-mm",
        "64",
        "--batch-size",
        "1",
    )
    info = json.loads(run("info", source).stdout)
    assert (
        info["architecture"]["type"] == "unet3d"
        and info["patch_voxels"] == 32
        and info["training_spacing_mm"] == [2.0, 2.0, 2.0]
    )
    card = run("info", source, "--card").stdout
    assert "3D U-Net (Wahlig et al. 2023): 4 down- and 4 up-sampling blocks" in card and "2.000 mm isotropic" in card

    target = tmp_path / "target.pt"
    run(
        "transfer",
        "--model",
        source,
        "--train",
        data / "patient000" / "baseline",
        "--strategy",
        "decoder",
        "--reset-last-layers",
        "--iterations",
        "2",
        "--batch-size",
        "1",
        "--out",
        target,
    )
    tuned = json.loads(run("info", target).stdout)["finetune"]
    assert (
        tuned["strategy"] == "decoder"
        and tuned["config"]["reset_last_layers"]
        and tuned["base_model_sha256"] == info["sha256"]
    )

    baseline, followup = data / "patient000" / "baseline", data / "patient000" / "followup"
    patient = tmp_path / "patient.pt"
    run(
        "finetune",
        "--model",
        target,
        "--case",
        baseline,
        "--layers",
        "last-layers",
        "--iterations",
        "2",
        "--out",
        patient,
    )
    refused = run(
        "finetune",
        "--model",
        target,
        "--case",
        baseline,
        "--slices",
        "suggested:2",
        "--out",
        tmp_path / "x.pt",
        check=False,
    )
    assert refused.returncode == 2 and "whole annotated baseline volume" in refused.stderr
    run("segment", "--model", patient, "--case", followup, "--out", tmp_path / "seg", "--mc-samples", "2")
    flair = sitk.ReadImage(str(followup / "FLAIR.nii.gz"))
    assert sitk.ReadImage(str(tmp_path / "seg" / "uncertainty_sd.nii.gz")).GetSize() == flair.GetSize()

    two_d = tmp_path / "base2d.pt"
    run(
        "train-base",
        "--preset",
        "brain-wmh",
        "--train",
        data / "patient001",
        "--out",
        two_d,
        "--iterations",
        "1",
        "--width",
        "2",
        "--patches-per-slice",
        "1",
    )
    wrong = run("transfer", "--model", two_d, "--train", baseline, "--out", tmp_path / "y.pt", check=False)
    assert wrong.returncode == 2 and "2D network" in wrong.stderr


def test_bad_inputs_give_one_clear_line(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a model")
    proc = run("info", bogus, check=False)
    assert proc.returncode == 2 and "could not be read as a PatientFineTune model file" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("segment", "--model", tmp_path / "missing.pt", "--case", tmp_path, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_a_segment_or_fine_tune_run_imports_no_statistics_or_spatial_scipy():
    """Start-up is held to 2 s (docs/aims.md): scipy.stats alone takes 0.4-0.6 s to
    import and only the evaluation's paired tests need it, scipy.spatial only HD95."""
    modules = "cli inference finetune images modelfile outputs suggest metrics".split()
    script = (
        "import sys\n"
        + "".join(f"import PatientFineTuneLib.{m}\n" for m in modules)
        + "print(sorted(m for m in ('scipy.stats', 'scipy.spatial') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_verbs_on_masks_import_no_torch(tmp_path):
    """evaluate and compare read and write label maps only: importing torch (about 2 s of
    every run) buys them nothing, nor the refusals of their bad input."""
    gt = np.zeros((6, 16, 16), np.uint8)
    gt[2:4, 4:8, 4:8] = 1
    for name in ("gt", "pred"):
        sitk.WriteImage(sitk.GetImageFromArray(gt), str(tmp_path / f"{name}.nii.gz"))
    verbs = {
        "evaluate": ["--pred", tmp_path / "pred.nii.gz", "--gt", tmp_path / "gt.nii.gz"],
        "compare": [
            "--baseline-lesions",
            tmp_path / "gt.nii.gz",
            "--followup-lesions",
            tmp_path / "pred.nii.gz",
            "--out",
            tmp_path / "changes",
        ],
        "evaluate (refused)": ["--pred", tmp_path / "absent.nii.gz", "--gt", tmp_path / "gt.nii.gz"],
    }
    for verb, arguments in verbs.items():
        script = (
            "import sys\nfrom PatientFineTuneLib.cli import main\n"
            f"code = main({[verb.split()[0], *map(str, arguments)]!r})\n"
            "print('torch' in sys.modules, code)"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().splitlines()[-1] == f"False {2 if 'refused' in verb else 0}", (verb, done.stderr)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """A small synthetic patient and its follow-up segmented by a tiny real model."""
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("segmented")
    run("synth", "--preset", "brain-wmh", "--small", "--out", root / "data")
    case = root / "data" / "patient000" / "followup"
    model = save_tiny_model(root / "tiny.pt")
    run("segment", "--model", model, "--case", case, "--out", root / "seg")
    return case, model, root / "seg"


def failure(*args):
    """Run a verb that must fail in JSON mode; returns (stderr, the error event)."""
    proc = run("--progress", "json", *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr[-3000:]
    )
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events and events[-1]["event"] == "error" and events[-1]["message"] == proc.stderr.strip(), proc.stdout
    return proc.stderr


def test_errors_from_the_system_are_one_line_exit_2_and_an_error_event(segmented, tmp_path):
    """A folder given as a file, a suggestions file without its fields, a place where
    nothing can be written: the same one-line message, exit 2 and JSON error event as any
    other bad input, not a traceback."""
    case, _, seg = segmented
    report = ("report", "--followup-image", case / "FLAIR.nii.gz", "--results", f"base={seg}")
    assert "Is a directory" in failure(*report, "--suggestions", tmp_path, "--out", tmp_path / "r.html")
    odd = tmp_path / "suggestions.json"
    odd.write_text(json.dumps([{"mean_probability": 0.5}]))
    assert (
        "suggestions.json" in failure(*report, "--suggestions", odd, "--out", tmp_path / "r.html")
        and not (tmp_path / "r.html").exists()
    )
    assert "/sys/x.html" in failure(*report, "--out", "/sys/x.html")


def test_a_reader_that_stops_early_gives_one_line_not_a_broken_pipe_traceback(segmented, tmp_path):
    """``--progress json segment ... | head -1``: the reader closes the pipe after the
    first event; the verb stops with one line on stderr and exit 2, and leaves no output."""
    case, model, _ = segmented
    command = (
        f"{sys.executable} -m PatientFineTuneLib.cli --progress json segment --model {model} --case {case} --out {tmp_path / 'o'}"
        " | head -1; exit ${PIPESTATUS[0]}"
    )
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr[-3000:]
    )
    assert json.loads(proc.stdout)["event"] and not (tmp_path / "o").exists()


def test_a_damaged_lesion_table_is_named_not_an_invalid_literal(segmented, tmp_path):
    import shutil

    case, _, seg = segmented
    damaged = tmp_path / "seg"
    shutil.copytree(seg, damaged)
    table = damaged / "lesions.csv"
    header, first, *rest = table.read_text().splitlines()
    table.write_text("\n".join([header, "x" + first[first.index(",") :], *rest]) + "\n")
    message = failure(
        "report",
        "--followup-image",
        case / "FLAIR.nii.gz",
        "--results",
        f"base={damaged}",
        "--out",
        tmp_path / "r.html",
    )
    assert str(table) in message and "invalid literal" not in message, message
    assert (
        "--lesion-labels"
        in run(
            "train-base",
            "--preset",
            "brain-wmh",
            "--train",
            tmp_path,
            "--out",
            tmp_path / "m.pt",
            "--lesion-labels",
            "1,x",
            check=False,
        ).stderr
    )


def test_options_of_the_2d_network_are_refused_for_a_3d_unet(segmented, tmp_path):
    """They were silently ignored (only --pixel-fraction was refused, after the case was
    read); now they are refused before any work, each named."""
    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata, save_model
    from PatientFineTuneLib.unet3d import UNet3D

    case = segmented[0].parent / "baseline"
    net = UNet3D((1, 1), width=2)
    unet = tmp_path / "unet.pt"
    save_model(
        ModelBundle(
            net,
            make_metadata(
                net,
                [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1}],
                (2.0, 2.0, 2.0),
                preset="brain-wmh",
                patch_voxels=32,
            ),
        ),
        unet,
    )
    options = [
        ("--method", "fast"),
        ("--angles", "0"),
        ("--hard-negatives", "2"),
        ("--check",),
        ("--pixel-fraction", "0.5"),
    ]
    proc = run(
        "--progress",
        "none",
        "finetune",
        "--model",
        unet,
        "--case",
        case,
        "--iterations",
        1,
        *[a for o in options for a in o],
        "--out",
        tmp_path / "p.pt",
        check=False,
    )
    assert proc.returncode == 2 and "3D U-Net" in proc.stderr and all(o[0] in proc.stderr for o in options), (
        proc.stderr[-2000:]
    )
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.pt").exists()


def json_events(proc) -> list[dict]:
    """Every stdout line of a --progress json run, each checked to be an event."""
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events and all(isinstance(e, dict) and "event" in e for e in events), proc.stdout[-3000:]
    return events


@pytest.mark.slow
def test_in_json_mode_every_stdout_line_is_an_event_and_each_verb_ends_with_result(segmented, tmp_path):
    """Plain text goes to stderr; synth, info, suggest, evaluate and compare end with a
    ``result`` event holding what they found; a usage error is an ``error`` event."""
    case, model, seg = segmented
    lesions = case / "lesions.nii.gz"
    runs = {
        "synth": ("synth", "--preset", "brain-wmh", "--small", "--out", tmp_path / "synth"),
        "info": ("info", model),
        "suggest": ("suggest", "--model", model, "--case", case, "-k", 2),
        "evaluate": ("evaluate", "--pred", seg / "segmentation.nii.gz", "--gt", lesions),
        "compare": (
            "compare",
            "--baseline-lesions",
            lesions,
            "--followup-lesions",
            seg / "segmentation.nii.gz",
            "--out",
            tmp_path / "changes",
        ),
    }
    found = {verb: json_events(run("--progress", "json", *args))[-1] for verb, args in runs.items()}
    assert all(last["event"] == "result" and last["verb"] == verb for verb, last in found.items()), found
    assert found["info"]["metadata"]["preset"] == "brain-wmh"
    assert [s["slice"] for s in found["suggest"]["suggestions"]] and found["evaluate"]["cases"][0]["dice"] >= 0
    # fine-tuning's progress names its phases (the check's folds, then the final model)
    tuned = json_events(
        run(
            "--progress",
            "json",
            "finetune",
            "--model",
            model,
            "--case",
            case,
            "--iterations",
            2,
            "--out",
            tmp_path / "ft.pt",
        )
    )
    phases = list(dict.fromkeys(e.get("phase") for e in tuned if e["event"] == "progress"))
    folds = int(phases[0].rsplit(" ", 1)[-1])  # 1 where the annotation is large (every layer trains), else 2
    assert phases == [f"checking fold {k} of {folds}" for k in range(1, folds + 1)] + (
        [] if tuned[-1]["base_model_kept"] else ["final model"]
    )
    proc = run("--progress", "json", "segment", "--model", model, check=False)  # --out missing: argparse's error
    assert (
        proc.returncode == 2
        and json_events(proc)[-1]["event"] == "error"
        and "--out" in json_events(proc)[-1]["message"]
    )


def test_a_cancelled_json_run_ends_with_a_cancelled_event(segmented, tmp_path):
    import signal

    case, _, _ = segmented
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "PatientFineTuneLib.cli",
            "--progress",
            "json",
            "segment",
            "--model",
            "brain-wmh",
            "--case",
            case,
            "--out",
            tmp_path / "o",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()  # the device event: the run has started
    status = Path(f"/proc/{proc.pid}/status")
    blocked = (
        [line for line in status.read_text().splitlines() if line.startswith(("SigBlk", "SigIgn"))]
        if status.exists()
        else []
    )
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    events = [json.loads(line) for line in (first + rest).splitlines()]
    assert (
        proc.returncode == 130 and events[-1]["event"] == "cancelled" and "no partial output" in events[-1]["message"]
    ), (
        events[-3:],
        err,
        blocked,
    )


def test_report_refuses_an_mr_image_as_truth_and_a_repeated_label_and_uses_ras_throughout(segmented, tmp_path):
    case, _, seg = segmented
    report = ("report", "--followup-image", case / "FLAIR.nii.gz", "--out", tmp_path / "r.html")
    assert "not a label image" in failure(*report, "--results", f"base={seg}", "--truth", case / "FLAIR.nii.gz")
    assert "base" in failure(*report, "--results", f"base={seg}", f"base={seg}") and not (tmp_path / "r.html").exists()
    run(
        "compare",
        "--baseline-lesions",
        case / "lesions.nii.gz",
        "--followup-lesions",
        seg / "segmentation.nii.gz",
        "--out",
        tmp_path / "changes",
    )
    run(*report, "--results", f"base={seg}", "--changes", tmp_path / "changes")
    page = (tmp_path / "r.html").read_text()
    assert "LPS" not in page and page.count("(RAS mm)") >= 1 and "coordinates are RAS" in page.replace("\n", " ")


def test_a_failed_compare_leaves_neither_files_nor_an_empty_folder(segmented, tmp_path):
    """A full disk (a real ulimit -f) while compare writes its three files."""
    from test_outputs_complete import limited

    case, _, seg = segmented
    out = tmp_path / "changes"
    proc = limited(
        1,
        "--progress",
        "none",
        "compare",
        "--baseline-lesions",
        case / "lesions.nii.gz",
        "--followup-lesions",
        seg / "segmentation.nii.gz",
        "--out",
        out,
    )
    assert proc.returncode == 2 and "disk is full" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_the_web_reports_name_no_server_path_of_the_session(segmented, tmp_path):
    """The web app builds its report from a session folder it deletes right after: the
    page names the files, not the folder."""
    from PatientFineTuneLib.report import ReportInputs, build_report

    case, _, seg = segmented
    page = build_report(ReportInputs(case / "FLAIR.nii.gz", {"base": seg}, paths_shown=False))
    assert str(seg) not in page and str(case) not in page and "FLAIR.nii.gz" in page


def test_a_model_trained_without_t1_segments_a_flair_only_scan_and_others_say_what_is_missing(segmented, tmp_path):
    """The commonest MS follow-up is a FLAIR alone. A model whose T1 is optional (trained
    with sequence dropout) segments it with no extra flag, as a --case folder without
    T1 or as one --images file, on the FLAIR's grid, and says T1 was absent; a model that
    needs T1 refuses with what is missing."""
    import shutil

    from PatientFineTuneLib.modelfile import ModelBundle, make_metadata, save_model

    from conftest import tiny_model

    case, needs_t1, _ = segmented
    net = tiny_model()
    optional = tmp_path / "flair-or-both.pt"
    save_model(
        ModelBundle(
            net,
            make_metadata(
                net,
                [{"name": "FLAIR", "channels": 1}, {"name": "T1", "channels": 1, "optional": True}],
                (2.0, 2.0),
                preset="brain-wmh",
            ),
        ),
        optional,
    )
    flair_only = tmp_path / "flair-only"
    flair_only.mkdir()
    for name in ("FLAIR.nii.gz", "organ.nii.gz"):
        shutil.copy(case / name, flair_only / name)
    flair = sitk.ReadImage(str(case / "FLAIR.nii.gz"))
    for given in (("--case", flair_only), ("--images", case / "FLAIR.nii.gz", "--organ", case / "organ.nii.gz")):
        out = tmp_path / f"seg{given[0]}"
        proc = run("segment", "--model", optional, *given, "--out", out)
        assert "no T1" in proc.stderr
        seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
        assert seg.GetSize() == flair.GetSize() and seg.GetOrigin() == pytest.approx(flair.GetOrigin())
    refused = run("segment", "--model", needs_t1, "--case", flair_only, "--out", tmp_path / "no", check=False)
    assert refused.returncode == 2 and "no image for sequence(s) T1" in refused.stderr
    refused = run(
        "segment", "--model", needs_t1, "--images", case / "FLAIR.nii.gz", "--out", tmp_path / "no", check=False
    )
    assert refused.returncode == 2 and "needs 2 file(s) in the order FLAIR, T1; got 1" in refused.stderr
    assert not (tmp_path / "no").exists()
