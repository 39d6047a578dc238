"""The process heap: freed memory kept for reuse (glibc), turned on by the command line
before any long work; torch-free, so a command that needs no network pays no torch import."""

from __future__ import annotations

import ctypes
import platform


def keep_freed_memory_for_reuse(limit_bytes: int = 1 << 30) -> bool:
    """On glibc, serve blocks up to ``limit_bytes`` from the process heap and keep freed
    ones for reuse instead of mapping and unmapping them each time.

    Every fine-tuning iteration allocates and frees tensors of tens of MB; glibc maps each
    block over 32 MB afresh, and its page faults cost more than the arithmetic (measured in
    docs/benchmarks.md, "Freed memory kept for reuse"). Freed memory stays with
    the process until it ends, so the command line, whose processes are short, turns
    this on. Returns whether it applied (False off glibc: nothing changes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(
        libc.mallopt(m_mmap_threshold, ctypes.c_int(limit_bytes))
        and libc.mallopt(m_trim_threshold, ctypes.c_int(limit_bytes))
    )
