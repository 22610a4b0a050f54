"""What a training run writes as it goes: metrics.jsonl, one JSON object a line.

The single-process trainer (``worker/train.py``) and the distributed worker 0
(``worker/distributed.py``) write the same file the same way: ``MetricsWriter`` appends
a line and flushes it (a crash loses nothing written), and on a resume first keeps only
the lines up to the step it resumes from; a line that cannot be written (a full disk) is
left out whole, with a warning, and the run goes on; ``ThroughputWindow`` gives the tokens per
second since the last line; ``crossed`` says when the run's step passed a multiple of
an interval (a mode may jump over one: backup workers, asp).

Not here: what a line holds (the loops), plots of it (``common/plot.py``).
"""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

from common.files import atomic_write

METRICS = "metrics.jsonl"
log = logging.getLogger("metrics")


class MetricsWriter:
    """Appends one JSON object per line to ``path``, each line in one write, so a crash
    loses nothing written. ``keep_until=s`` first drops lines past step ``s``: the lines a
    crashed run wrote after the checkpoint it resumes from. Metrics are not worth a run: a
    line the disk cannot take is cut back off (no torn line is left) and counted in
    ``lost``, with a warning when the writes start failing and when they work again."""

    def __init__(self, path, keep_until: int | None = None):
        self.path = Path(path)
        self.last: dict = {}                  # the last line kept (a resumed run's clock goes on from it)
        self.lost = 0                         # lines that could not be written
        self._failing = False
        if keep_until is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
            self.last = json.loads(kept[-1]) if kept else {}
            try:       # a new file in place of the old (a reader following it, like ps-local, sees a new inode)
                atomic_write(self.path, "".join(ln + "\n" for ln in kept).encode())
            except OSError as e:
                log.warning("could not rewrite %s up to step %s (%s); appending to it as it is", self.path,
                            keep_until, e)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> bool:
        """Append ``record`` as one line; False (and the file as it was) if it could not be written."""
        line = (json.dumps(record) + "\n").encode()
        size = os.fstat(self._fd).st_size
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))          # a short write: the disk is full
        except OSError as e:
            try:
                os.ftruncate(self._fd, size)                # no half line for the readers
            except OSError:
                pass
            self.lost += 1
            if not self._failing:
                log.warning("could not write to %s (%s); the run goes on and leaves its metrics out until the "
                            "file can be written again", self.path, e)
            self._failing = True
            return False
        if self._failing:
            log.warning("%s is written again (%d line(s) were left out)", self.path, self.lost)
        self._failing = False
        return True

    def close(self):
        os.close(self._fd)


def read_metrics(path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


class ThroughputWindow:
    """Tokens per second since ``mark``, on whatever clock the caller counts in (wall
    time in the distributed worker, compute time in the single-process trainer)."""

    def __init__(self):
        self.t, self.tokens = 0.0, 0

    def mark(self, t: float, tokens: int):
        self.t, self.tokens = t, tokens

    def rate(self, t: float, tokens: int) -> float:
        return (tokens - self.tokens) / max(t - self.t, 1e-9)


def crossed(interval: int, last: int, now: int) -> bool:
    """Has the step passed a multiple of ``interval`` since ``last``?"""
    return now // interval > last // interval
