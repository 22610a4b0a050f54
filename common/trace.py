"""A timeline of one process: where its time goes, as a Chrome trace.

    tracer = Tracer("worker 0", pid=100)          # or NULL_TRACER: every call does nothing
    with tracer.span("forward"):
        ...
    t0 = tracer.now()                             # a span whose start and end are known apart
    ...
    tracer.add("wait for pushes", t0, tracer.now(), step=12)
    tracer.save("runs/x/trace-worker-0.json")

The file is the Chrome trace event format (JSON object form: ``{"traceEvents": [...]}``)
that https://ui.perfetto.dev and chrome://tracing open: one "complete" event (``ph: X``)
per span, with ``ts`` and ``dur`` in microseconds. Every process stamps its events on the
same clock, microseconds since the Unix epoch (``time.time``, read once when the tracer
starts; durations from ``time.perf_counter``), so the traces of the processes of one job,
loaded together, line up on one time axis (to the precision the machines' clocks agree:
exactly on one machine, NTP's few milliseconds across machines).

Each process is one ``pid`` in the viewer (named by ``process_name``), each thread that
records a span one ``tid``. ``NULL_TRACER`` is the tracer of a run without ``--trace``:
its ``span`` returns one shared do-nothing context manager, so a traced line costs a
method call and nothing else.

Not here: what is traced (the worker loop, the client, the server decide), drawing
(``common/plot.py`` draws a trace as a picture). Format: "Trace Event Format",
Google, https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from common.files import atomic_write


class Tracer:
    """Records spans of one process in memory; ``save`` writes them as a Chrome trace."""

    enabled = True

    def __init__(self, process_name: str, pid: int | None = None, max_events: int = 1_000_000):
        self.process_name = process_name
        self.pid = os.getpid() if pid is None else int(pid)
        self.max_events = max_events        # a bound on memory: past it, spans are counted, not kept
        self.dropped = 0
        self.events: list[dict] = []
        self._threads: dict[int, str] = {}
        # one reading of the wall clock, then a monotonic clock: spans never run backwards
        self._wall0_us = time.time() * 1e6
        self._perf0 = time.perf_counter()

    def now(self) -> float:
        """Microseconds since the Unix epoch, on this tracer's clock."""
        return self._wall0_us + (time.perf_counter() - self._perf0) * 1e6

    def add(self, name: str, start_us: float, end_us: float, **args):
        """Record a span from ``start_us`` to ``end_us`` (values of ``now()``)."""
        if len(self.events) >= self.max_events:
            self.dropped += 1
            return
        tid = threading.get_ident()
        if tid not in self._threads:
            self._threads[tid] = threading.current_thread().name
        event = {"name": name, "ph": "X", "ts": round(start_us, 3), "dur": round(max(end_us - start_us, 0.0), 3),
                 "pid": self.pid, "tid": tid}
        if args:
            event["args"] = args
        self.events.append(event)

    @contextlib.contextmanager
    def span(self, name: str, **args):
        """``with tracer.span("push", step=3):`` records the time the block takes."""
        start = self.now()
        try:
            yield
        finally:
            self.add(name, start, self.now(), **args)

    def trace(self) -> dict:
        """The Chrome trace as a dict: metadata events naming the process and threads, then the spans."""
        meta = [{"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
                 "args": {"name": self.process_name}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": self.pid, "tid": tid, "args": {"name": name}}
                 for tid, name in self._threads.items()]
        other = {"clock": "microseconds since the Unix epoch", "process": self.process_name}
        if self.dropped:
            other["dropped_spans"] = self.dropped
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ms", "otherData": other}

    def save(self, path) -> Path:
        """Write the trace to ``path`` atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(self.trace(), separators=(",", ":")).encode())
        return path


class _NullTracer:
    """The tracer of an untraced run: every method does nothing, as cheaply as Python allows."""

    enabled = False
    _null = contextlib.nullcontext()

    def now(self) -> float:
        return 0.0

    def add(self, name, start_us, end_us, **args):
        pass

    def span(self, name, **args):
        return self._null

    def save(self, path):
        return None


NULL_TRACER = _NullTracer()


def trace_file(directory, role: str, rank: int) -> Path:
    """Where a process of a run folder writes its trace: ``trace-worker-0.json``, ``trace-server-1.json``."""
    return Path(directory) / f"trace-{role}-{rank}.json"


def merge_traces(directory, out_name: str = "trace.json") -> Path | None:
    """Write ``directory/trace.json``: every ``trace-*.json`` of a run folder in one file
    (the viewers open one file at a time), servers first, then workers, each process
    renumbered 1, 2, ... so that PIDs of different machines cannot collide. Returns its
    path, or None when the folder holds no trace."""
    directory = Path(directory)

    def order(path):
        role, _, rank = path.stem[len("trace-"):].rpartition("-")
        return (role != "server", role, int(rank) if rank.isdigit() else 0)
    files = sorted(directory.glob("trace-*.json"), key=order)
    if not files:
        return None
    events = []
    for new_pid, path in enumerate(files, start=1):
        for e in json.loads(path.read_text())["traceEvents"]:
            events.append(dict(e, pid=new_pid))
        events.append({"name": "process_sort_index", "ph": "M", "pid": new_pid, "tid": 0,
                       "args": {"sort_index": new_pid}})
    out = directory / out_name
    atomic_write(out, json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                  "otherData": {"clock": "microseconds since the Unix epoch",
                                                "files": [f.name for f in files]}},
                                 separators=(",", ":")).encode())
    return out


def read_trace(path) -> list[dict]:
    """The complete events (``ph: X``) of a trace file, with the process name as ``process``."""
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [dict(e, process=names.get(e["pid"], str(e["pid"]))) for e in events if e.get("ph") == "X"]
