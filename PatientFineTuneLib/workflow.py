"""The patient workflow, one for every front end: its three steps as ``patient-finetune``
jobs on files.

1. **Analyse the baseline** (:func:`analyse_job`): the base model's segmentation of the
   baseline and the ``k`` slices worth checking and correcting first
   (``segment --suggest K``; :func:`read_analysis` reads its results).
2. **Fine-tune** (:func:`finetune_job`): the patient model from the corrected baseline
   annotation (``finetune``).
3. **Segment the follow-up** (:func:`followup_job`): with the patient model and, for
   comparison, the base model, each with its MC-dropout uncertainty (``segment``), into one
   folder per model.

The Slicer module and the web app run these jobs through
:class:`~.slicerworkflow.PatientSession`, which writes the scene's volumes into the job's
input files and loads the results back into the scene; the demo runs them on the files it
generated (:mod:`.demo`). Each front end shows the job's progress (:meth:`CliJob.poll`,
:meth:`CliJob.fraction`) and cancels it by terminating it (:meth:`CliJob.cancel`), which
leaves no partial file; :func:`run_job` does both for a caller that can block.

Nothing here imports PyTorch: the jobs do, in their own process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from .jobs import CliJob
from .progress import Cancelled
from .suggest import SliceSuggestion

#: How many baseline slices the workflow suggests checking first (Jansen et al. annotate two).
SUGGESTED_SLICES = 2


def input_arguments(images: Sequence, organ=None, lesions=None, resample: bool = True) -> list[str]:
    """The command-line arguments that name a step's input files: the sequences in the
    model's order, the organ mask and the lesion annotation if given; ``resample`` puts every
    other sequence and the masks onto the first sequence's grid (``--resample-to``)."""
    arguments = ["--images", *map(str, images)]
    for option, path in (("--organ", organ), ("--lesions", lesions)):
        if path is not None:
            arguments += [option, str(path)]
    return arguments + (["--resample-to"] if resample else [])


def analyse_job(
    model: str,
    arguments: Sequence[str],
    out: str | Path,
    k: int = SUGGESTED_SLICES,
    device: str = "auto",
    python: str | None = None,
) -> CliJob:
    """Step 1: segment the baseline and suggest ``k`` slices (``out``: its folder)."""
    return CliJob(
        [["segment", "--model", model, *arguments, "--out", str(out), "--suggest", str(k), "--device", device]], python
    )


def finetune_job(
    model: str,
    arguments: Sequence[str],
    out: str | Path,
    slices: str,
    iterations: int = 100,
    weighting: str = "preset",
    seed: int = 0,
    device: str = "auto",
    python: str | None = None,
) -> CliJob:
    """Step 2: the patient model file ``out`` (``arguments`` with ``--lesions``);
    ``slices`` as ``finetune --slices``; ``weighting`` as ``finetune --weighting``
    ("preset": the task's default)."""
    return CliJob(
        [
            [
                "finetune",
                "--model",
                model,
                *arguments,
                "--slices",
                slices,
                "--iterations",
                str(iterations),
                "--weighting",
                weighting,
                "--seed",
                str(seed),
                "--device",
                device,
                "--out",
                str(out),
            ]
        ],
        python,
    )


def followup_job(
    models: Sequence[tuple[str, str]],
    arguments: Sequence[str],
    out: str | Path,
    mc_samples: int = 25,
    seed: int = 0,
    device: str = "auto",
    python: str | None = None,
) -> CliJob:
    """Step 3: the follow-up segmented with each (label, model), one after the other, into
    ``out/<label>``; ``mc_samples`` 0 for no uncertainty map."""
    return CliJob(
        [
            [
                "segment",
                "--model",
                model,
                *arguments,
                "--out",
                str(Path(out) / label),
                "--mc-samples",
                str(mc_samples),
                "--seed",
                str(seed),
                "--device",
                device,
            ]
            for label, model in models
        ],
        python,
    )


def read_suggestions(out: str | Path) -> list[SliceSuggestion]:
    """The suggested slices of an :func:`analyse_job` folder."""
    return [SliceSuggestion.from_dict(r) for r in json.loads((Path(out) / "suggestions.json").read_text())]


def job_description(job: CliJob) -> str:
    """What a finished :func:`finetune_job` made, in words (its ``result`` event)."""
    return job.results[-1]["description"]


def run_job(
    job: CliJob,
    progress: Callable[[float, str], object] | None = None,
    cancel: Callable[[], bool] | None = None,
    interval: float = 0.1,
) -> CliJob:
    """Start ``job`` if it is not running and wait for it in this thread, calling
    ``progress(fraction done, phase)`` as it moves; ``cancel()`` returning True terminates
    it. Returns the job once it succeeded.

    Raises
    ------
    Cancelled
        ``cancel()`` asked to stop (the job is terminated; it leaves no partial file). An
        exception raised meanwhile in this thread (Ctrl-C, ``progress`` failing) also
        terminates the job before it goes on.
    RuntimeError
        The job failed: its one-line error message.
    """
    if job.step < 0:
        job.start()
    try:
        while not job.finished:
            job.poll()
            if cancel is not None and cancel():
                raise Cancelled("stopped on request; no partial output was left behind")
            if progress is not None:
                progress(job.fraction(), (job.progress or {}).get("phase") or "")
            time.sleep(interval)
    except BaseException:  # cancelled, or the caller itself interrupted (Ctrl-C): the job ends with it
        job.cancel()
        raise
    if not job.succeeded:
        raise RuntimeError(job.error or "the job ended without a result")
    if progress is not None:
        progress(1.0, "")
    return job
