"""Progress of long work, for a person (a tqdm bar on stderr) or for a program (one JSON
line per step on stdout, read by :mod:`.jobs`).

JSON lines have an ``"event"`` key: ``progress`` (``step``, ``done``, ``total``,
``fraction`` and, for training, ``loss``; ``phase`` where a step has phases), ``device``, ``note``, ``result`` (what a verb
wrote or found), ``error`` (the one-line message a failing verb also prints on stderr)
and ``cancelled``. In JSON mode every line on stdout is an event; what the verbs print
for people goes to stderr (see the README's table of events).
"""

from __future__ import annotations

import json
import sys
from typing import Callable, TextIO

from .files import json_ready


class Cancelled(Exception):
    """Raised when a cancel callback asked long work to stop; nothing was written."""


#: Modes of ``patient-finetune --progress``.
MODES = ("bar", "json", "none")


#: Where events go when not stdout: the command line keeps the real stdout for them in
#: JSON mode and points sys.stdout (what verbs print for people) at stderr.
_events_stream: TextIO | None = None


def send_events_to(stream: TextIO | None) -> None:
    """Send later events to ``stream`` (None: back to sys.stdout)."""
    global _events_stream
    _events_stream = stream


def emit(event: str, stream: TextIO | None = None, **fields) -> None:
    """Write one JSON event line and flush it (a reader polls the pipe)."""
    print(json.dumps(json_ready({"event": event, **fields})), file=stream or _events_stream or sys.stdout, flush=True)


class StepProgress:
    """Progress of one step (``with`` closes its bar). ``update(done, total=None,
    loss=None)`` is the ``progress`` callback the library's long functions take."""

    def __init__(self, mode: str, step: str, total: int | None, unit: str):
        if mode not in MODES:
            raise ValueError(f"unknown progress mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.step, self.total = mode, step, total
        self.current_phase: str | None = None
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=step, unit=unit, mininterval=0.5)

    def update(self, done: int, total: int | None = None, loss: float | None = None) -> None:
        if total is not None:
            self.total = total
        if self._bar is not None:
            if self._bar.total != self.total:
                self._bar.total = self.total
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            # update() (not setting .n) is what makes tqdm redraw, at most every mininterval
            self._bar.update(int(done) - self._bar.n)
        elif self.mode == "json":
            fraction = done / self.total if self.total else None
            emit(
                "progress",
                step=self.step,
                done=int(done),
                total=self.total,
                fraction=fraction,
                **({"loss": float(loss)} if loss is not None else {}),
                **({"phase": self.current_phase} if self.current_phase else {}),
            )

    def phase(self, name: str, done: int, total: int) -> None:
        """A phase of the step starts (e.g. "checking fold 1 of 2"): the bar is resized to
        ``total`` and named after it; JSON progress events carry it as ``phase``."""
        self.current_phase, self.total = name, total
        if self._bar is not None:
            self._bar.set_description(f"{self.step}: {name}", refresh=False)
        self.update(done)

    def training_callback(self) -> Callable[[int, float], None]:
        """``progress(iteration, loss)``, the form training loops call."""
        return lambda iteration, loss: self.update(iteration, loss=loss)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
