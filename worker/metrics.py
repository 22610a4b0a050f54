"""What a training run writes as it goes: metrics.jsonl, one JSON object a line.

The single-process trainer (``worker/train.py``) and the distributed worker 0
(``worker/distributed.py``) write the same file the same way: ``MetricsWriter`` appends
a line and flushes it (a crash loses nothing written), and on a resume first keeps only
the lines up to the step it resumes from; ``ThroughputWindow`` gives the tokens per
second since the last line; ``crossed`` says when the run's step passed a multiple of
an interval (a mode may jump over one: backup workers, asp).

Not here: what a line holds (the loops), plots of it (``common/plot.py``).
"""
from __future__ import annotations

import json
from pathlib import Path

from common.files import atomic_write

METRICS = "metrics.jsonl"


class MetricsWriter:
    """Appends one JSON object per line to ``path`` and flushes it, so a crash loses
    nothing written. ``keep_until=s`` first drops lines past step ``s``: the lines a
    crashed run wrote after the checkpoint it resumes from."""

    def __init__(self, path, keep_until: int | None = None):
        self.path = Path(path)
        self.last: dict = {}                  # the last line kept (a resumed run's clock goes on from it)
        if keep_until is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= keep_until]
            self.last = json.loads(kept[-1]) if kept else {}
            # a new file in place of the old (a reader following it, like ps-local, sees a new inode)
            atomic_write(self.path, "".join(ln + "\n" for ln in kept).encode())
        self._f = open(self.path, "a")

    def write(self, record: dict):
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()


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
