"""The ``patient-finetune`` command line: thin verbs over the library.

Every verb refuses to overwrite existing outputs unless ``--overwrite``, exits non-zero
with a one-line explanation on bad input, and writes files atomically. ``--progress json``
(before the verb) replaces the progress bars by one JSON line per step on stdout, plus a
``result`` line naming what was written and an ``error`` line on failure, for programs
that run the verbs as jobs (:mod:`..jobs`, the Slicer module, the web app).

The verbs live by group, each module registering its own subparsers beside its commands:
:mod:`.training` (synth, train-base, transfer), :mod:`.patient` (segment, suggest,
finetune), :mod:`.analysis` (compare, evaluate, experiment, report) and :mod:`.apps` (info,
demo, web); :mod:`.common` holds the option groups and helpers they share.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .. import __version__
from ..progress import MODES as PROGRESS_MODES
from ..progress import emit, send_events_to
from . import analysis, apps, patient, training

VERB_GROUPS = (training, patient, analysis, apps)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error also sent as an ``error`` event when the command line
    asks for ``--progress json`` (argparse's own text goes to stderr as always)."""

    json_errors = False  # set by main() before parsing; the verbs' subparsers share it

    def error(self, message):
        if _Parser.json_errors:
            emit("error", message=f"{self.prog}: error: {message}")
        super().error(message)


def _json_requested(argv: list[str]) -> bool:
    """Whether ``argv`` asks for ``--progress json`` (looked at before parsing, so that
    a usage error can be an event too)."""
    return "--progress=json" in argv or any(a == "--progress" and b == "json" for a, b in zip(argv, argv[1:]))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="patient-finetune",
        description="Patient-specific fine-tuning of a lesion-segmentation CNN (Jansen et al.).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="bar",
        help="bar: progress bars on stderr (default); json: one JSON line per step on stdout, for programs; none",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")
    for group in VERB_GROUPS:
        group.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    _Parser.json_errors = _json_requested(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    from ..heap import keep_freed_memory_for_reuse
    from ..progress import Cancelled

    keep_freed_memory_for_reuse()

    # In JSON mode stdout carries events only: what the verbs print for people goes to stderr.
    events = sys.stdout
    if args.progress == "json":
        sys.stdout = sys.stderr
        send_events_to(events)
    # A terminated job (Cancel in the Slicer module) unwinds like Ctrl-C, so the atomic
    # writers remove their partial files before the process ends.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "pthread_sigmask"):
        # a launcher that blocks these signals passes its mask on to us: Cancel must still reach us
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        args.func(args)
    except KeyboardInterrupt:
        return _cancelled(args, "cancelled; no partial output was left behind")
    except Cancelled as exc:
        return _cancelled(args, f"cancelled: {exc}")
    except BrokenPipeError:
        # The program reading stdout stopped reading (``| head -1``): no event can reach it,
        # and Python's own flush at exit would fail again without the redirection.
        os.dup2(os.open(os.devnull, os.O_WRONLY), events.fileno())
        return _fail(
            args,
            "the program reading this command's output closed it before the end; the run was stopped",
            events=False,
        )
    except (OSError, ValueError, RuntimeError) as exc:  # ImageError and ModelFileError are ValueErrors
        return _fail(args, _one_line(exc))
    except (
        Exception
    ) as exc:  # a defect of ours: a program reading events still gets its error event; people get the traceback
        if args.progress == "json":
            emit(
                "error",
                message=f"patient-finetune {args.command}: internal error: {type(exc).__name__}: {exc} (please report it)",
            )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.stdout = events
        send_events_to(None)
    return 0


def _cancelled(args, message: str) -> int:
    """Say that the verb was cancelled (stderr; a final ``cancelled`` event in JSON mode);
    returns the exit status, 130."""
    if args.progress == "json":
        emit("cancelled", message=message)
    print(message, file=sys.stderr)
    return 130


def _fail(args, text: str, events: bool = True) -> int:
    """Say why the verb failed, in one line on stderr and (``--progress json``) as an
    ``error`` event; returns the exit status, 2."""
    message = f"patient-finetune {args.command}: error: {text}"
    if events and args.progress == "json":
        emit("error", message=message)
    print(message, file=sys.stderr)
    return 2


def _one_line(exc: Exception) -> str:
    """The message of a failure: ours as it is; the operating system's (a folder given as
    a file, no permission) with the path it is about."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
