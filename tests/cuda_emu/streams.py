"""Streams and events of the CuPy stand-in (``fake_cupy.py``): deferred copies.

The emulated kernels and cuBLAS calls run at once, on the current stream (the null
stream, unless a ``with stream:`` block made another one current): that stream is
*eager*. A non-blocking ``Stream`` is *deferred*: its copies wait in a queue and land,
in order, only when
- the stream is synchronised (``stream.synchronize()``, ``Device().synchronize()``);
- an event recorded on it is synchronised, or the eager stream waits on such an event
  (everything the eager stream runs afterwards must see the copy);
- another deferred stream that waits on such an event runs its own queue.
So a copy whose wait was forgotten lands late, and the code that read its destination
in between saw stale numbers, as on a GPU.

The other direction, a copy that must not start before kernels end, is counted: each
kernel or cuBLAS call on the eager stream is a launch; a device-to-host copy put on a
deferred stream that has not waited for every launch so far (an event recorded on the
eager stream, then ``stream.wait_event``), while the host has not synchronised either,
raises ``StreamOrderError``: on a GPU it could copy memory the kernels are still writing.

Blocking streams (``non_blocking=False``) synchronise with the null stream on a GPU;
here they run at once, like it. Not modelled: timing, several devices.
"""
from __future__ import annotations


class StreamOrderError(RuntimeError):
    """A copy on a stream that is not ordered after the kernels whose results it reads."""


class DeviceState:
    """One emulated device: the copy log, the eager stream, the launch counts."""

    def __init__(self):
        self.copies = []          # (kind "d2h"/"h2d", stream as given, blocking), in order
        self.launches = 0         # kernels and cuBLAS calls run on the eager stream
        self.synced = 0           # launches the host has waited for
        self.deferred = []        # the deferred streams made so far
        self.null = Stream(null=True)
        self.null.state = self
        self.current = self.null

    def launched(self, name):
        self.launches += 1

    def copy(self, kind, stream, blocking, do):
        s = stream if stream is not None else self.current
        self.copies.append((kind, stream, blocking))
        if not s.deferred:
            do()
            return
        if kind == "d2h" and max(s.waited, self.synced) < self.launches:
            raise StreamOrderError(
                f"a device-to-host copy on stream {s.ptr:#x} after {self.launches} kernel "
                f"launches, of which the stream waited for {max(s.waited, self.synced)}: it may "
                "read memory the kernels are still writing. Record an event on the compute "
                "stream and stream.wait_event(it) first, or synchronise.")
        s._enqueue(do)
        if blocking:
            s.synchronize()

    def synchronize_device(self):
        for s in self.deferred:
            s.synchronize()
        self.synced = self.launches


class Stream:
    """``cupy.cuda.Stream``: deferred when non-blocking (see the module's docstring)."""

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.state = globals().get("STATE")      # None only for the first state's null stream
        self.ptr = 0 if null else id(self)
        self.non_blocking = non_blocking
        self.deferred = non_blocking and not null
        self.queue = []           # pending operations, oldest first
        self.enqueued = 0         # operations ever put on the stream
        self.executed = 0         # operations run so far
        self.waited = 0           # eager-stream launches this stream is ordered after
        self._outer = None
        if self.deferred:
            self.state.deferred.append(self)

    def _enqueue(self, op):
        self.queue.append(op)
        self.enqueued += 1

    def _run(self, upto=None):
        """Runs the queued operations, up to the ``upto``-th ever enqueued."""
        while self.queue and (upto is None or self.executed < upto):
            op = self.queue.pop(0)
            self.executed += 1
            op()

    @property
    def is_non_blocking(self):
        return self.non_blocking

    def synchronize(self):
        self._run()
        if not self.deferred:
            self.state.synced = self.state.launches

    def record(self, event=None):
        event = event or Event()
        event._mark(self)
        return event

    def wait_event(self, event):
        if not self.deferred:
            event._complete()        # what the eager stream runs next must see the event's work
            return
        self._enqueue(event._complete)
        if event.stream is not None and not event.stream.deferred:
            self.waited = max(self.waited, event.launches)

    def __enter__(self):
        self._outer, self.state.current = self.state.current, self
        return self

    def __exit__(self, *exc):
        self.state.current = self._outer
        return False


class Event:
    """``cupy.cuda.Event``: a position in one stream's queue."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.stream = None
        self.ticket = 0           # the stream's operations before the event
        self.launches = 0         # eager launches before the event

    def _mark(self, stream):
        self.stream, self.ticket = stream, stream.enqueued
        self.launches = stream.state.launches

    def record(self, stream=None):
        (stream or STATE.current).record(self)

    def _complete(self):
        if self.stream is not None and self.stream.deferred:
            self.stream._run(self.ticket)

    def synchronize(self):
        self._complete()
        if self.stream is not None and not self.stream.deferred:
            self.stream.state.synced = max(self.stream.state.synced, self.launches)

    @property
    def done(self):
        return self.stream is None or not self.stream.deferred or self.stream.executed >= self.ticket


STATE = DeviceState()             # replaced by each fake_cupy()
