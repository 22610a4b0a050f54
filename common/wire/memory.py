"""Keep freed memory mapped: no page-fault storm on the receive path.

libzmq receives every frame into a fresh ``malloc`` of its size. glibc serves a request
above its mmap threshold (128 KiB at first, raised as big blocks are freed, at most
32 MiB) with a fresh ``mmap`` and returns it to the kernel when it is freed; below it,
from its heaps, which it trims back to the kernel once more than ``M_TRIM_THRESHOLD``
(128 KiB at first) is free at the top. Either way the next receive of a few MB lands
in memory the kernel must map again, one page fault per 4 KiB page written: a server
of config B took about 8,000 of them per BSP sync (docs/wire.md, ``bench_sync.py``).

``keep_freed_memory`` tells glibc (``mallopt``) to serve every request under 32 MiB
(the largest threshold glibc accepts) from its heaps and to keep up to 1 GiB of freed
heap memory mapped: a chunk's receive buffer of one step is the memory the same chunk
of the next step reuses. This is what the environment variables
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` do, set from
inside the process so that every way of starting a server or a worker gets it. It
costs no memory beyond the process's peak: what is kept is what was in use before.

Not here: what is received where (``transport.py``). Elsewhere than glibc (musl, macOS)
this does nothing and says so (returns False).
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1            # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20        # the largest glibc accepts (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30

_done = None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory mapped (once per process); True where it took."""
    global _done
    if _done is None:
        _done = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _done


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):     # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(param, value) == 1
