"""glibc allocator settings for a server that holds request bodies for many slow streams.

gRPC's threads each get a malloc arena; receive buffers freed there stay mapped, so a burst of
large bodies leaves the process well above what it holds. Fewer arenas, a fixed mmap threshold
(large buffers are mapped and unmapped whole, never stranded in a heap) and a trim after large
releases keep RSS close to the bytes actually held. No-ops where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc


def tune_allocator(arenas: int = 2, mmap_threshold: int = 128 * 1024) -> bool:
    """Call before threads start. True when applied."""
    lib = _glibc()
    if not lib:
        return False
    ok = lib.mallopt(M_ARENA_MAX, arenas) == 1
    ok &= lib.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1  # fixed: glibc would raise it after each large free
    return bool(ok)


def trim() -> bool:
    """Give free heap pages back to the OS (all arenas)."""
    lib = _glibc()
    return bool(lib) and bool(lib.malloc_trim(0))
