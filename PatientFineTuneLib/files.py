"""Safe file writing: outputs appear whole or not at all, and nothing is overwritten by
accident."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable


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
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffixes at the end: writers such as SimpleITK pick the format from them.
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); give it the permissions a plain open()
        # would have (0666 minus the umask), as users and installers expect.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
