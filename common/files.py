"""Files that survive a crash: written whole or not at all.

Checkpoints (the worker's model, the servers' shards) are written to a temporary file
in the same folder, flushed and fsynced, then renamed over the old one: a reader sees
the old file or the new one, never a torn mix, even if the machine loses power.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path, data):
    """Write ``data`` (bytes, or a list of bytes-like pieces written one after the other,
    e.g. ``common.stfile.safetensors_parts``) to ``path`` so that readers see the old file
    or the new, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)      # mkstemp makes 0600; a checkpoint is for sharing
            for piece in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass                              # some filesystems cannot fsync a folder
