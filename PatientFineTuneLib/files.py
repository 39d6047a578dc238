"""Safe file writing: outputs appear whole or not at all, and nothing is overwritten by
accident."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

#: errno values of a write that ran out of room: a full disk, a file-size limit, a quota.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class OutputError(OSError):
    """An output could not be written whole; nothing was left under its name."""


def incomplete_output(path: str | os.PathLike) -> OutputError:
    """The error of an output that could not be written whole (the one message for it)."""
    return OutputError(
        f"could not write {path} whole: the disk is full (or a file-size limit was reached); "
        "free some space and run again (no output was left under its name)"
    )


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; read once, at import (os.umask is process-wide)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Write ``path`` through ``write(tmp_path)`` and a rename in the same folder, so a
    reader, a crash or a cancel never leaves half a file under the final name.

    Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite (--overwrite)")
    tmp = None
    made = _missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the real suffixes at the end: writers such as SimpleITK pick the format from them.
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix="-" + path.name, dir=path.parent)
        os.close(fd)
        write(tmp)
        # mkstemp creates the file private (0600); give it the permissions a plain open()
        # would have (0666 minus the umask), as users and installers expect.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        _remove_empty(made)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            # the system names the temporary file; the user knows the output's name
            raise (
                incomplete_output(path)
                if exc.errno in _NO_ROOM
                else OutputError(f"could not write {path}: {exc.strerror or exc}")
            ) from None
        raise


@contextmanager
def output_set(folder: str | os.PathLike, overwrite: bool = False, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """The outputs of one run, moved into ``folder`` together: yields a hidden temporary
    folder inside it to write them into (under their final names); when the block ends
    without error they are moved into place at once, otherwise (an error, a full disk, a
    cancel) they are removed with it, so a reader never sees part of a run.

    Refuses to replace an existing file unless ``overwrite``; then the files named in
    ``replaces`` that this run did not write (an earlier run's, which would read as this
    one's) are removed too. A folder made for the outputs is removed again when the run
    fails.
    """
    folder = Path(folder)
    made = _missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        clash = [folder / n for n in names if (folder / n).exists()]
        if clash and not overwrite:
            raise FileExistsError(f"{clash[0]} already exists; choose another name or pass overwrite (--overwrite)")
        for name in names:
            os.chmod(stage / name, 0o666 & ~_UMASK)
        stale = [n for n in replaces if n not in names] if overwrite else []
        with _signals_held():
            _move_into_place(stage, folder, names, stale)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(made)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders a failed write made (innermost first), where nothing else was
    put meanwhile: a failed run leaves no empty output folder."""
    for folder in made:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _move_into_place(stage: Path, folder: Path, names: list[str], stale: list[str]) -> None:
    """Rename the staged ``names`` into ``folder``, the files they replace and the
    ``stale`` ones first into the stage; on any failure undo every rename (renames within
    one file system need no room on the disk)."""
    replaced = stage / ".replaced"
    replaced.mkdir()
    put_aside, moved = [], []
    try:
        for name in [*names, *stale]:
            if (folder / name).exists():
                os.replace(folder / name, replaced / name)
                put_aside.append(name)
        for name in names:
            os.replace(stage / name, folder / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            os.replace(folder / name, stage / name)
        for name in put_aside:
            os.replace(replaced / name, folder / name)
        raise


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (Ctrl-C, a job's Cancel) for the few renames that put a
    run's outputs in place, and deliver them after: a cancel then finds the outputs all
    old or all new. Python runs signal handlers in the main thread only, so elsewhere
    there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in caught:
            signal.raise_signal(s)


def json_ready(value):
    """``value`` with NaN and infinities as None: JSON has no NaN (a bare NaN makes the
    file unreadable for strict parsers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return json_ready(value.item())
    return value


# -- output guards: refuse, before any work, what could not be written or would be lost


def check_output_file(path: str | Path, option: str = "--out", suffix: str | None = None) -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, a path
    under a file, the wrong suffix, a folder without write permission."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name{f' ending in {suffix}' if suffix else ''}")
    if suffix and not path.name.endswith(suffix):
        raise ValueError(f"{option} {path} must end in {suffix}")
    _check_writable_folder(path.parent, option, path)
    return path


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file, lies under a file or
    cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; give a folder for the outputs")
    _check_writable_folder(path, option, path)
    return path


def _check_writable_folder(folder: Path, option: str, target: Path) -> None:
    existing = folder
    while not existing.exists():  # the nearest existing ancestor is where the folders get made
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {target}: {existing} is a file, not a folder")
    try:  # a real file, not os.access: root passes that check in /proc and /sys, where nothing can be written
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(
            f"{option} {target}: cannot write in {existing} ({exc.strerror}); choose another place"
        ) from None


def refuse_inputs_as_outputs(inputs, outputs) -> None:
    """No output may be one of the command's inputs (same path, symbolic or hard link),
    with or without --overwrite."""
    existing = [Path(p) for p in inputs if p is not None and Path(p).exists()]
    for out in map(Path, outputs):
        for source in existing:
            same = out.exists() and os.path.samefile(out, source)
            if same or out.resolve() == source.resolve():
                raise ValueError(
                    f"{out} is one of this command's inputs ({source}); an output never replaces an input: choose another --out"
                )


def refuse_existing(paths: Iterable, overwrite: bool) -> None:
    """Refuse, before any work, outputs that exist already (naming the first) unless
    ``overwrite``."""
    clash = [Path(p) for p in paths if Path(p).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} already exists; choose another --out or pass --overwrite")
