"""Outputs are complete or absent (docs/aims.md): a run that cannot write everything,
because the disk is full (a real ``ulimit -f`` in a real shell) or because it is cancelled
(a real SIGTERM), exits non-zero and leaves no file under a final name."""

import json
import shlex
import signal
import subprocess
import sys
import time

import pytest

from PatientFineTuneLib.outputs import SEGMENT_FILES

from conftest import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


def limited(kilobytes: int, *args, cwd=None):
    """``patient-finetune ARGS`` in a shell whose file-size limit is ``kilobytes`` (a
    full disk as the process sees it: writes beyond it fail with EFBIG)."""
    command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-m", "PatientFineTuneLib.cli", *args))
    return subprocess.run(
        ["bash", "-c", f"ulimit -f {kilobytes}; exec {command}"], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def files_under(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def segment_args(case, model, out, *extra):
    return (
        "segment",
        "--model",
        model,
        "--images",
        case / "FLAIR.nii.gz",
        case / "T1.nii.gz",
        "--organ",
        case / "organ.nii.gz",
        "--out",
        out,
        *extra,
    )


@pytest.mark.parametrize("kilobytes", [1, 100])
def test_segment_on_a_full_disk_fails_and_leaves_no_output(small_pair_dir, tiny_model_file, tmp_path, kilobytes):
    """1 kB: every image is cut short; 100 kB: only the probability map (about 200 kB)."""
    out = tmp_path / "seg"
    proc = limited(kilobytes, "--progress", "json", *segment_args(small_pair_dir / "followup", tiny_model_file, out))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = events(proc.stdout)
    assert lines[-1]["event"] == "error" and "result" not in {e["event"] for e in lines}, proc.stdout
    assert "disk is full" in lines[-1]["message"] and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()  # not even the folder made for the outputs


def test_finetune_and_report_on_a_full_disk_say_so_in_one_line(small_pair_dir, tiny_model_file, tmp_path):
    case = small_pair_dir / "baseline"
    out = tmp_path / "models" / "patient.pt"  # a folder made for it goes again, too
    proc = limited(
        1,
        "--progress",
        "none",
        "finetune",
        "--model",
        tiny_model_file,
        "--case",
        case,
        "--iterations",
        2,
        "--no-check",
        "--out",
        out,
    )
    assert proc.returncode == 2 and "disk is full" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr[-2000:]
    )
    assert files_under(tmp_path) == []
    seg = tmp_path / "seg"
    assert limited(10_000, *segment_args(small_pair_dir / "followup", tiny_model_file, seg)).returncode == 0
    report = tmp_path / "report.html"
    proc = limited(
        1,
        "--progress",
        "none",
        "report",
        "--followup-image",
        small_pair_dir / "followup" / "FLAIR.nii.gz",
        "--results",
        f"base={seg}",
        "--out",
        report,
    )
    assert proc.returncode == 2 and "disk is full" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr[-2000:]
    )
    assert not report.exists() and not [f for f in files_under(tmp_path) if "report" in f]


def test_base_training_on_a_full_disk_says_so_in_one_line(small_pair_dir, tmp_path):
    """The checkpoint, written every iteration here, meets the full disk first: the run
    ends with one line saying so (after training's own progress bar), exit 2, no
    checkpoint or model left (torch.save to a file said only "enforce fail at
    inline_container.cc")."""
    out = tmp_path / "base.pt"
    proc = limited(
        1,
        "--progress",
        "none",
        "train-base",
        "--preset",
        "brain-wmh",
        "--train",
        small_pair_dir / "baseline",
        "--out",
        out,
        "--iterations",
        2,
        "--width",
        4,
        "--patches-per-slice",
        2,
        "--checkpoint-every",
        1,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "disk is full" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert files_under(tmp_path) == []


def _cancel_when(args, changed):
    """Start ``patient-finetune ARGS`` and send it SIGTERM as soon as ``changed()``; returns
    the process once it has ended, or None when it finished first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "PatientFineTuneLib.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while proc.poll() is None and not changed():
        time.sleep(0.001)
    if proc.poll() is not None:
        proc.communicate()
        return None
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    return proc


def _written_since(out, stamps: dict):
    """Whether an output file under ``out`` (under its final name, in ``out`` or in a
    folder inside it) is new or newer than in ``stamps`` (name -> mtime)."""

    def changed():
        try:
            return any(
                p.name in SEGMENT_FILES.values() and stamps.get(p.name) != p.stat().st_mtime_ns for p in out.rglob("*")
            )
        except FileNotFoundError:  # a file renamed while listed: written
            return True

    return changed


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_cancel_while_outputs_are_written_leaves_none_of_this_run(
    small_pair_dir, tiny_model_file, tmp_path, overwrite
):
    """SIGTERM (the Slicer job's Cancel) as the first output file gets its name: no new file is left,
    and with --overwrite the earlier run's files are all still there, unchanged."""
    case = small_pair_dir / "followup"
    out = tmp_path / "seg"
    before, model = {}, tiny_model_file
    if overwrite:  # the second run's model differs, so its files differ from the first's
        model = save_tiny_model(tmp_path / "other.pt", seed=1)
        assert limited(10_000, *segment_args(case, tiny_model_file, out, "--mc-samples", 2)).returncode == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()} if overwrite else {}
    for _ in range(5):  # the run may finish before the kill lands; then try again
        proc = _cancel_when(segment_args(case, model, out, "--overwrite"), _written_since(out, stamps))
        if proc is not None:
            break
    else:
        pytest.skip("the run always finished before SIGTERM arrived")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert files_under(out) == sorted(before)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before if out.exists() else not before
