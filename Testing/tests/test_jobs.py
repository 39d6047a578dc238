"""Long work in a subprocess (the Slicer module's way): real ``patient-finetune`` processes
run by :class:`PatientFineTuneLib.jobs.CliJob`, progress read from their JSON lines,
Cancel that terminates them and leaves no file, and one-line errors."""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from PatientFineTuneLib.jobs import CliJob
from PatientFineTuneLib.modelfile import load_model
from PatientFineTuneLib.training_loop import resolved_precision


def _finetune_args(case_dir, out, iterations):
    return [
        "finetune",
        "--model",
        "brain-wmh",
        "--case",
        str(case_dir / "baseline"),
        "--slices",
        "all-lesion",
        "--iterations",
        str(iterations),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("threaded", [False, True], ids=["non-blocking reads", "reader thread"])
def test_a_finetuning_job_reports_progress_and_its_patient_model_loads(small_pair_dir, tmp_path, threaded, monkeypatch):
    monkeypatch.setattr(CliJob, "threaded_reads", threaded)  # the thread is what Windows uses
    out = tmp_path / "patient.pt"
    asked = 4
    job = CliJob([_finetune_args(small_pair_dir, out, asked)]).start()
    seen, fractions = [], []
    while not job.finished:
        for event in job.poll():
            if event["event"] == "progress":
                seen.append(event)
                fractions.append(job.fraction())
                assert not job.finished or job.succeeded
        time.sleep(0.02)
    assert job.succeeded, (job.error, list(job.log))
    # progress lines arrived one per iteration, with the loss, while it ran: the check's
    # iterations on each of its folds, then the final model's. All lesion slices are
    # annotated, so the large annotation's route runs (one fold, every layer, comparing 2,
    # 4 and 8 iterations): the bar, first sized for the most any route may take, is resized
    # to this route's own total when the check has split the annotation, and each phase is
    # named
    bundle = load_model(out)
    check = bundle.metadata["finetune"]["holdout_check"]
    compared = [c["iterations"] for c in check["compared"]]
    final = bundle.metadata["finetune"]["config"]["iterations"]
    assert check["folds"] == 1 and check["layers"] == "all" and compared == [asked // 2, asked, 2 * asked]
    # no --precision: the route's own, decided for this machine (the command line's default
    # used to override it with fp32)
    assert bundle.metadata["finetune"]["config"]["precision"] == resolved_precision("auto", "cpu")
    # the patient model continues the check's model at the chosen count for half as many
    assert check["iterations"] in compared and final == check["iterations"] // 2
    training = [e for e in seen if e["step"] == "finetune" and "loss" in e]
    assert len(training) == max(compared) + final
    finetune = [e for e in seen if e["step"] == "finetune"]
    done = [e["done"] for e in finetune]
    total = max(compared) + max(compared) // 2
    assert done == sorted(done) and done[-1] == total
    assert all(e["total"] == total for e in finetune) and all(e["loss"] > 0 for e in training)
    assert list(dict.fromkeys(e["phase"] for e in finetune)) == ["checking fold 1 of 1", "final model"]
    assert fractions == sorted(fractions) and job.fraction() == 1.0
    assert job.results and job.results[-1]["outputs"]["model"] == str(out)
    assert job.device.startswith("CPU (")  # what ran the network, as the command reported it


def test_cancel_terminates_the_job_quickly_and_leaves_no_file(small_pair_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    job = CliJob([_finetune_args(small_pair_dir, out_dir / "patient.pt", 5000)]).start()
    deadline = time.monotonic() + 120
    while not (job.progress and job.progress["step"] == "finetune" and job.progress["done"] >= 2):
        job.poll()
        assert not job.finished, (job.error, list(job.log))
        assert time.monotonic() < deadline, "no training progress within 2 minutes"
        time.sleep(0.02)
    start = time.monotonic()
    job.cancel()
    elapsed = time.monotonic() - start
    assert job.finished and job.cancelled and not job.succeeded
    assert elapsed < 2.0, f"cancel took {elapsed:.2f} s"
    assert list(out_dir.iterdir()) == []


def test_a_failing_job_surfaces_its_one_line_error_and_stops_the_chain(small_pair_dir, tmp_path):
    second = tmp_path / "never.pt"
    job = CliJob(
        [
            [
                "segment",
                "--model",
                "brain-wmh",
                "--images",
                str(tmp_path / "missing.nii.gz"),
                str(tmp_path / "missing2.nii.gz"),
                "--out",
                str(tmp_path / "seg"),
            ],
            _finetune_args(small_pair_dir, second, 2),
        ]
    ).start()
    assert job.wait(timeout=120)
    assert not job.succeeded and job.step == 0
    assert "missing.nii.gz" in job.error and "\n" not in job.error
    assert not second.exists()


def test_commands_run_one_after_another(small_pair_dir, tmp_path):
    job = CliJob(
        [
            [
                "segment",
                "--model",
                "brain-wmh",
                "--case",
                str(small_pair_dir / "baseline"),
                "--out",
                str(tmp_path / "a"),
                "--suggest",
                "2",
            ],
            [
                "segment",
                "--model",
                "brain-wmh",
                "--case",
                str(small_pair_dir / "followup"),
                "--out",
                str(tmp_path / "b"),
            ],
        ]
    ).start()
    assert job.wait(timeout=300), "the job did not finish"
    assert job.succeeded, (job.error, list(job.log))
    assert [r["verb"] for r in job.results] == ["segment", "segment"]
    suggestions = json.loads((tmp_path / "a" / "suggestions.json").read_text())
    assert len(suggestions) == 2 and {"slice", "mean_probability", "centre_lps_mm"} <= set(suggestions[0])
    assert (tmp_path / "b" / "segmentation.nii.gz").is_file() and not (tmp_path / "b" / "suggestions.json").exists()


def test_progress_json_lines_are_the_only_lines_starting_with_a_brace(small_pair_dir, tmp_path):
    proc = subprocess.run(
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
            str(small_pair_dir / "baseline"),
            "--out",
            str(tmp_path / "seg"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["fraction"] == pytest.approx(1.0)
    assert events[-1]["event"] == "result" and events[-1]["outputs"]["segmentation"].endswith("segmentation.nii.gz")
    assert "\r" not in proc.stderr  # no tqdm bar in JSON mode


def test_cancel_kills_what_the_launcher_leaves_behind(tmp_path):
    # Slicer's PythonSlicer is a launcher that starts the interpreter as its child and ends
    # at once on SIGTERM; an interpreter stuck in a long native or GPU call does not. A
    # real launcher of that kind: a shell that starts a Python process ignoring SIGTERM
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(
        "#!/bin/sh\n"
        + shlex.join(
            [
                sys.executable,
                "-c",
                (
                    "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('pid', os.getpid(), flush=True); time.sleep(600)"
                ),
            ]
        )
        + " &\nwait\n"
    )
    launcher.chmod(0o755)
    job = CliJob([["segment"]], python=str(launcher)).start()
    deadline = time.monotonic() + 30
    while not job.log:
        job.poll()
        assert time.monotonic() < deadline, "the stuck interpreter never started"
        time.sleep(0.02)
    stuck = int(job.log[-1].split()[1])
    start = time.monotonic()
    job.cancel(grace_s=0.5)
    assert job.finished and job.cancelled and time.monotonic() - start < 2.0
    for _ in range(100):  # killed: gone once its new parent (init) reaps it
        if not Path(f"/proc/{stuck}").exists() or Path(f"/proc/{stuck}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.02)
    else:
        os.kill(stuck, signal.SIGKILL)
        raise AssertionError("the interpreter the launcher started still runs after Cancel")


def test_on_windows_the_console_window_is_hidden(monkeypatch):
    # PythonSlicer.exe is a console program: without a hidden console Windows opens a
    # window for every step, and closing it kills the job. The Windows-only names of the
    # subprocess module are stood in for here (this runs on Linux), with Popen and os.name
    started = {}

    class StartupInfo:  # as subprocess.STARTUPINFO: flags and show-window state
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    class Started(Exception):
        pass

    def popen(args, **options):
        started.update(options)
        raise Started

    for name, value in (("STARTUPINFO", StartupInfo), ("STARTF_USESHOWWINDOW", 1), ("CREATE_NEW_PROCESS_GROUP", 0x200)):
        monkeypatch.setattr(subprocess, name, value, raising=False)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(os, "name", "nt")
    try:
        CliJob([["segment"]]).start()
    except Started:
        pass
    finally:
        monkeypatch.undo()  # before any report: pytest itself reads os.name
    info = started.get("startupinfo")
    assert info is not None, f"no STARTUPINFO among the options {sorted(started)}"
    assert (
        info.dwFlags & 1 and info.wShowWindow == 0
    )  # STARTF_USESHOWWINDOW, SW_HIDE: as slicer.util.launchConsoleProcess
    assert started["creationflags"] & 0x200  # CREATE_NEW_PROCESS_GROUP: Cancel still ends the whole tree
    assert "start_new_session" not in started


def test_a_job_does_not_outlive_the_application_that_started_it(small_pair_dir, tmp_path):
    # Slicer crashes while a step runs: the job's next progress line finds no reader (a
    # broken pipe) and the job ends, removing its partial files
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    application = tmp_path / "application.py"
    application.write_text(
        textwrap.dedent(f"""
        import os, time
        from PatientFineTuneLib.jobs import CliJob
        job = CliJob([{_finetune_args(small_pair_dir, out_dir / "patient.pt", 5000)!r}]).start()
        while not (job.progress and job.progress["step"] == "finetune" and job.progress["done"] >= 2):
            job.poll()
            time.sleep(0.02)
        print(job._process.pid, flush=True)
        os._exit(1)  # no cleanup of any kind, as in a crash
    """)
    )
    crashed = subprocess.run([sys.executable, str(application)], capture_output=True, text=True, timeout=300)
    group = int(crashed.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
            raise AssertionError("the job still runs a minute after the application that started it ended")
        time.sleep(0.1)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
def test_a_job_run_by_the_workflow_never_outlives_its_caller(tmp_path, stop):
    # run_job (the demo's and the web app's way) waits in the caller's thread: when the
    # caller cancels, or is itself interrupted (Ctrl-C, a terminated demo), the job it
    # started must end with it instead of running on in its own session
    from PatientFineTuneLib.progress import Cancelled
    from PatientFineTuneLib.workflow import run_job

    python = tmp_path / "python"
    python.write_text(
        "#!/bin/sh\n"
        + shlex.join([sys.executable, "-c", "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)"])
    )
    python.chmod(0o755)
    job = CliJob([["segment"]], python=str(python))
    started = []

    def progress(fraction, phase):
        started.extend(job.log)
        if started and stop == "interrupt":
            raise KeyboardInterrupt

    with pytest.raises(Cancelled if stop == "cancel" else KeyboardInterrupt):
        run_job(job, progress, cancel=lambda: bool(started) and stop == "cancel", interval=0.02)
    assert job.finished and job.cancelled
    pid = int(started[0].split()[1])
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the job's process still runs after the caller's {stop}")
