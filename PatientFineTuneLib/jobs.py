"""Long work as ``patient-finetune`` commands in a subprocess: progress read from the
command's JSON lines (``--progress json``, see :mod:`.progress`), a one-line error when it
fails, and Cancel that terminates it.

Why a subprocess: in 3D Slicer, Python threads only advance while the main thread runs
Python (PythonQt keeps the GIL while Qt idles), so training in a thread crawls. A process
runs at full speed, cannot freeze the application, and is cancelled by terminating it.
The caller (the Slicer module's QTimer, a test, a console) calls :meth:`CliJob.poll`
regularly; nothing here blocks or imports Qt. The pipe is read without a thread where
the platform can read pipes without blocking (POSIX); elsewhere (Windows before Python
3.12) a small thread only moves the bytes into a queue that :meth:`poll` drains.

Files in, files out: a job reads inputs the caller wrote and writes into an output folder
the caller owns; the commands write atomically, and a cancelled job's partial files go
with the ``.partial-*`` temporaries the commands remove when terminated.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

#: Folder that holds the PatientFineTuneLib package: put on the subprocess's PYTHONPATH,
#: so the job runs this very library (a source checkout, or an installed extension's
#: qt-scripted-modules folder) whatever the interpreter's own path.
LIBRARY_PARENT = Path(__file__).resolve().parent.parent


class CliJob:
    """One or more ``patient-finetune`` commands, run one after another in a subprocess.

    Parameters
    ----------
    steps : each a list of command-line arguments after ``patient-finetune`` (the verb
        first), e.g. ``[["finetune", "--model", "brain-wmh", ...]]``.
    python : interpreter to run them with (in Slicer: ``PythonSlicer``); default: this one.
    env : extra environment variables.

    Attributes
    ----------
    progress : the last ``progress`` event (dict) or None.
    results : every ``result`` event, in order.
    log : the last 200 plain output lines (not JSON events).
    error : the failing command's one-line message, or None.
    device : what the commands run the network on, as they report it, or None.
    notes : what the commands did to the inputs that the user should know (``note``
        events: e.g. which brain mask was made and whether the scan was bias-corrected),
        without repeats.
    step : index of the command running now.
    """

    #: Read the pipe in a thread (where non-blocking pipe reads are not available).
    threaded_reads = os.name != "posix"

    def __init__(self, steps: Sequence[Sequence[str]], python: str | None = None, env: dict | None = None):
        if not steps:
            raise ValueError("a job needs at least one command")
        self.steps = [list(map(str, s)) for s in steps]
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.step = -1
        self.progress: dict | None = None
        self.results: list[dict] = []
        self.log: deque[str] = deque(maxlen=200)
        self.error: str | None = None
        self.device: str | None = None
        self.notes: list[str] = []
        self.cancelled = False
        self._process: subprocess.Popen | None = None
        self._buffer = b""
        self._chunks: queue.Queue[bytes] | None = None
        self._done = False

    # -- running ---------------------------------------------------------------------------

    def command(self, step: int) -> list[str]:
        return [self.python, "-m", "PatientFineTuneLib.cli", "--progress", "json", *self.steps[step]]

    def start(self) -> CliJob:
        if self.step >= 0:
            raise RuntimeError("this job was already started")
        self._start_step(0)
        return self

    def _start_step(self, step: int) -> None:
        self.step = step
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(LIBRARY_PARENT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        self._process = subprocess.Popen(
            self.command(step),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            **_process_options(),
        )
        if self.threaded_reads:
            self._chunks = queue.Queue()
            stream, chunks = self._process.stdout, self._chunks
            self._reader = threading.Thread(
                target=lambda: [chunks.put(c) for c in iter(lambda: stream.read1(65536), b"")], daemon=True
            )
            self._reader.start()
        else:  # read whatever is there on each poll, never wait for a line
            os.set_blocking(self._process.stdout.fileno(), False)

    @property
    def finished(self) -> bool:
        """True once every command ended (or one failed, or the job was cancelled)."""
        return self._done

    @property
    def succeeded(self) -> bool:
        return self._done and self.error is None and not self.cancelled

    def poll(self) -> list[dict]:
        """Read what the command printed since the last call; returns the new JSON events.
        Starts the next command when one ends successfully."""
        if self._process is None or self._done:
            return []
        events = self._read()
        code = self._process.poll()
        if code is None:
            return events
        events += self._read(final=True)
        if self.cancelled:
            self._done = True
        elif code != 0:
            self.error = self.error or self._last_log_line() or f"the command exited with status {code}"
            self._done = True
        elif self.step + 1 < len(self.steps):
            self._start_step(self.step + 1)
        else:
            self._done = True
        return events

    def wait(
        self, timeout: float | None = None, interval: float = 0.05, idle: Callable[[], object] | None = None
    ) -> bool:
        """Poll until finished (console and tests); False if ``timeout`` passed first.
        ``idle`` is called between polls (in Slicer: ``slicer.app.processEvents``, so the
        application stays responsive while a script waits)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.poll()
            if end is not None and time.monotonic() > end:
                return False
            if idle is not None:
                idle()
            time.sleep(interval)
        return True

    def cancel(self, grace_s: float = 1.5) -> None:
        """Terminate the running command and every process it started (they remove their
        partial files and exit); whatever is left of them after ``grace_s`` is killed.
        Later commands never start."""
        if self._process is None or self._done:
            return
        self.cancelled = True
        if self._process.poll() is None or self._group_alive():
            self._signal_tree(kill=False)
            # Slicer's PythonSlicer launcher ends at once on SIGTERM while the interpreter
            # it started may be stuck in a long native or GPU call: wait for the whole
            # group, not only the launcher, then kill what is left of it
            end = time.monotonic() + grace_s
            while (self._process.poll() is None or self._group_alive()) and time.monotonic() < end:
                time.sleep(0.02)
            if self._process.poll() is None or self._group_alive():
                self._signal_tree(kill=True)
                self._process.wait()
        self.poll()

    def _group_alive(self) -> bool:
        """True while a process of the job's group runs (POSIX; the launcher reaped first,
        so that it does not count as one)."""
        if os.name != "posix":
            return False
        try:
            os.killpg(self._process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member that changed its user: still there
            return True
        return True

    def _signal_tree(self, kill: bool) -> None:
        """Terminate (SIGTERM: the command removes its partial files) or kill the command
        and every process it started."""
        pid = self._process.pid
        if os.name == "posix":
            try:
                os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
            except ProcessLookupError:
                pass
        else:  # Windows has no SIGTERM: end the whole tree; the job folder goes with the job
            subprocess.run(
                ["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True, **_process_options(new_group=False)
            )

    # -- output ----------------------------------------------------------------------------

    def _read(self, final: bool = False) -> list[dict]:
        if self._chunks is not None:
            if final:  # the process ended: the thread reaches the end of the pipe
                self._reader.join(timeout=2.0)
            while not self._chunks.empty():
                self._buffer += self._chunks.get_nowait()
        else:
            stream = self._process.stdout
            while True:
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if final and self._buffer:
            lines, self._buffer = lines + [self._buffer], b""
        events = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace").rstrip("\r")
            event = _parse_event(line)
            if event is None:
                if line.strip():
                    self.log.append(line)
                continue
            events.append(event)
            kind = event["event"]
            if kind == "progress":
                self.progress = {**event, "command": self.step}
            elif kind == "result":
                self.results.append(event)
            elif kind == "error":
                self.error = event.get("message") or "failed"
            elif kind == "device":
                self.device = event.get("description")
            elif kind == "note" and event.get("text") and event["text"] not in self.notes:
                self.notes.append(event["text"])
        return events

    def _last_log_line(self) -> str | None:
        return self.log[-1] if self.log else None

    def fraction(self) -> float:
        """Overall fraction done over all commands (each counts the same)."""
        if self._done and self.succeeded:
            return 1.0
        within = (self.progress or {}).get("fraction") if (self.progress or {}).get("command") == self.step else 0.0
        return (max(self.step, 0) + (within or 0.0)) / len(self.steps)


#: Windows' SW_HIDE: the value of STARTUPINFO.wShowWindow that hides the window.
SW_HIDE = 0


def _process_options(new_group: bool = True) -> dict:
    """Popen options of a job's process. POSIX: its own session (process group), so that
    Cancel reaches the launcher (PythonSlicer) and the interpreter it starts. Windows: a
    new process group, and the console window of the console program PythonSlicer.exe
    hidden, as Slicer's own ``slicer.util.launchConsoleProcess`` does: a visible console
    would open for every step, and closing it would kill the job (its children inherit
    the hidden console, so they open none either)."""
    if os.name == "posix":
        return {"start_new_session": True}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP if new_group else 0}


def _parse_event(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
