"""Host staging of a GPU model's flat vectors for push and pull: pinned memory, async copies.

The wire code (``worker/client.py``, ``common/wire/codec.py``) sends and receives host
memory: it sees ``HostStaging.params`` and ``.grads``, two NumPy vectors in pinned
(page-locked) host memory, the layout and dtype of the model's, and never a CuPy
array. The loop moves data between them and the GPU at two points of a step:

    model.backward()                  # on the compute stream
    staging.grads_to_host()           # copy stream waits for the backward (an event),
                                      # copies grads device -> pinned host, returns when done
    client.push_pull(staging.grads, staging.params, ...)     # the wire, host memory only
    staging.params_to_device()        # copy stream: pinned host -> device, returns at once;
                                      # the compute stream waits (on the GPU) for the copy

So the host goes on at once after ``params_to_device`` (to the next batch, the next
forward's launches) while the copy runs, and the compute stream starts the forward
when the copy is done, with no host-side wait. Pinned memory is what makes the copies
asynchronous (and about twice as fast as from pageable memory); the copies run on a
stream of their own (``non_blocking``: no implicit synchronisation with the default
stream), ordered against the compute stream by events, never by a device-wide sync.
Safety of the host buffers: ``params`` is rewritten only by the next ``push_pull``,
which comes after the next ``grads_to_host``, which waits for the copy stream and so
for the previous upload too.

On a CPU model the staging is the model itself: ``params`` and ``grads`` ARE the
model's vectors and the copies do nothing, so the loop reads the same either way.

Not here: overlapping the gradient copy with the backward layer by layer, or the push
with the copy chunk by chunk (the copy of a GPT-2 124M gradient, 0.5 GB, takes ~20 ms
over PCIe 5 x16: a small share of a step, measured first on a GPU before it is cut up).
"""
from __future__ import annotations

import numpy


class HostStaging:
    """``params`` / ``grads``: host vectors for the wire, mirrored to and from ``model``."""

    def __init__(self, model):
        self.model = model
        self.layout, self.dtype = model.layout, model.dtype
        xp = model.xp
        self.on_device = xp is not numpy
        if not self.on_device:
            self.params, self.grads = model.params, model.grads
            return
        n, nbytes = model.layout.size, model.layout.size * model.dtype.itemsize
        # keep the pinned blocks alive as long as the arrays that view them
        self._pinned = [xp.cuda.alloc_pinned_memory(nbytes) for _ in range(2)]
        self.params = numpy.frombuffer(self._pinned[0], dtype=model.dtype, count=n)
        self.grads = numpy.frombuffer(self._pinned[1], dtype=model.dtype, count=n)
        self.stream = xp.cuda.Stream(non_blocking=True)
        self._xp = xp
        self.copies = 0                  # device <-> host copies made (for tests and traces)

    def num_params(self) -> int:
        return self.layout.size

    def grads_to_host(self):
        """``grads`` (host) <- the model's gradients, once the work queued so far on the
        compute stream (the backward) is done. Returns when the copy is complete."""
        if not self.on_device:
            return
        done = self._xp.cuda.get_current_stream().record()        # the backward's end
        self.stream.wait_event(done)
        self.model.grads.get(stream=self.stream, out=self.grads, blocking=False)
        self.stream.synchronize()
        self.copies += 1

    def params_to_device(self):
        """The model's parameters <- ``params`` (host), asynchronously: returns at once;
        the compute stream waits on the GPU for the copy before its next kernel."""
        if not self.on_device:
            return
        self.model.params.set(self.params, stream=self.stream)
        self._xp.cuda.get_current_stream().wait_event(self.stream.record())
        self.copies += 1

    def params_to_host(self):
        """``params`` (host) <- the model's parameters, synchronously (before an init)."""
        if not self.on_device:
            return
        self._xp.cuda.get_current_stream().synchronize()
        self.model.params.get(stream=self.stream, out=self.params, blocking=False)
        self.stream.synchronize()
        self.copies += 1
