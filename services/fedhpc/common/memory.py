"""Process memory settings for services that stream large blobs.

glibc raises its mmap threshold each time a large block is freed, after which
multi-MiB transfer buffers (S3 parts, gRPC messages) come from the heap arenas
of whichever threads touched them and are not returned to the OS: a registry
moving 300 MB blobs then keeps 100+ MB it no longer uses. A fixed threshold
keeps every buffer of 1 MiB or more in its own mapping, released on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def tune_malloc_for_streaming(mmap_threshold: int = 1 << 20, arena_max: int = 2) -> bool:
    """Apply the settings above; True when glibc accepted them (False elsewhere, harmlessly)."""
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_ARENA_MAX, arena_max))
