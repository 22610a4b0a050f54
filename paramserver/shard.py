"""A server's shard: the chunks of the flat vector it owns, and their optimizer state.

The server knows nothing about transformers. It owns a list of chunks, each a range
``[begin, end)`` of the job's flat parameter vector, and keeps them back to back in one
local vector (so the optimizer runs over one flat array, as in the single-process
trainer). A message addresses a chunk by its global range; ``locate`` turns that into
the local slice, and refuses a range the server does not own.

Gradients from the workers of one step land in per-worker slots, and are summed in
rank order: the sum, and therefore the parameters, do not depend on the order in
which pushes arrive (a run is reproducible bit for bit; the reliability tests rely on it).

How an update is made depends on the consistency model (``consistency.py``): BSP and
backup workers average slots and take an optimizer step (``average`` + ``apply``);
ASP/SSP take an optimizer step with one worker's gradient as it arrives (``set_update``
+ ``apply``); local SGD averages the workers' parameter changes and subtracts them
(``average`` + ``apply_delta``: an outer SGD step with learning rate 1).
"""
from __future__ import annotations

import numpy

from common.layout import intersect_ranges
from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer, sum_of_squares
from common.protocol import ProtocolError


class Shard:
    def __init__(self, chunks, dtype, optim: OptimConfig, decay_ranges=()):
        """``chunks``: the global ranges this server owns; ``decay_ranges``: the job's
        global weight-decay ranges (the shard keeps the parts inside its chunks)."""
        self.chunks = [(int(b), int(e)) for b, e in chunks]
        self.dtype = numpy.dtype(dtype)
        self._local = {}                    # (begin, end) -> local offset
        local_decay, offset = [], 0
        for b, e in self.chunks:
            self._local[(b, e)] = offset
            local_decay += [(lb + offset, le + offset) for lb, le in intersect_ranges(decay_ranges, b, e)]
            offset += e - b
        self.size = offset
        self.params = numpy.zeros(self.size, dtype=self.dtype)
        self.avg = numpy.zeros(self.size, dtype=self.dtype)       # the averaged gradient of a step
        self.optim_cfg = optim
        self.optimizer = make_optimizer(optim, self.size, self.dtype, local_decay)
        self.version = 0                    # optimizer steps applied
        self.initialized = False
        self._slots = {}                    # worker rank -> gradient buffer, reused every step
        self._snapshot = None               # (version, [arrays]): a copy of the parameters to send

    # --- addressing ---------------------------------------------------------------
    def locate(self, begin: int, end: int) -> slice:
        """The local slice of an owned chunk or of a range inside one chunk."""
        off = self._local.get((begin, end))
        if off is not None:
            return slice(off, off + end - begin)
        for (b, e), off in self._local.items():
            if b <= begin and end <= e:
                return slice(off + begin - b, off + end - b)
        raise ProtocolError(f"range [{begin}, {end}) is not owned by this server "
                            f"(it owns {self.describe_chunks()})")

    def describe_chunks(self, most: int = 4) -> str:
        text = ", ".join(f"[{b}, {e})" for b, e in self.chunks[:most])
        return text + (f" and {len(self.chunks) - most} more" if len(self.chunks) > most else "")

    def check_full_cover(self, ranges, what: str):
        """Refuse a message whose arrays are not exactly this server's chunks (each once)."""
        if sorted(r for r in ranges if r is not None) != sorted(self.chunks) or None in ranges:
            got = ", ".join(f"[{r[0]}, {r[1]})" if r else "no range" for r in ranges[:4])
            raise ProtocolError(f"{what} must carry exactly this server's chunks "
                                f"({self.describe_chunks()}); got {got}")

    def check_arrays(self, arrays, ranges, dtypes, what: str):
        """Every array: the job's dtype, one dimension, finite values; ranges owned."""
        want = self.dtype.name
        for a, r, d in zip(arrays, ranges, dtypes):
            if d != want:
                raise ProtocolError(f"{what}: expected {want} arrays, got {d}")
            if a.ndim != 1:
                raise ProtocolError(f"{what}: expected flat arrays, got shape {a.shape}")
            if r is None:
                raise ProtocolError(f"{what}: every array needs its range in the flat vector")
            self.locate(*r)
            if not numpy.isfinite(a).all():
                raise ProtocolError(f"{what}: range [{r[0]}, {r[1]}) holds NaN or Inf; refused")

    # --- parameters ---------------------------------------------------------------
    def set_params(self, arrays, ranges):
        for a, (b, e) in zip(arrays, ranges):
            self.params[self.locate(b, e)] = a
        self.initialized = True

    def param_views(self):
        """(arrays, ranges) of every chunk, views of the live parameters (no copy)."""
        return [self.params[self.locate(b, e)] for b, e in self.chunks], list(self.chunks)

    def param_snapshot(self):
        """(arrays, ranges) like ``param_views``, but of a copy taken at this version. A
        reply is sent without a copy and may sit in libzmq's queue for a while; where an
        update can come before it leaves (asp, ssp, late pushes of backup workers), it
        must be sent from memory that no update touches. One copy per version, shared
        by every reply at that version, and never written again (a new version gets a
        new array, so a reply still queued keeps the old one alive)."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, self.params.copy())
        snap = self._snapshot[1]
        return [snap[self.locate(b, e)] for b, e in self.chunks], list(self.chunks)

    # --- gradients ----------------------------------------------------------------
    def slot(self, rank: int):
        """The gradient buffer of worker ``rank`` (allocated at its first push, then reused)."""
        buf = self._slots.get(rank)
        if buf is None:
            buf = self._slots[rank] = numpy.empty(self.size, dtype=self.dtype)
        return buf

    def store_gradient(self, rank: int, arrays, ranges):
        buf = self.slot(rank)
        for a, (b, e) in zip(arrays, ranges):
            buf[self.locate(b, e)] = a

    def set_update(self, arrays, ranges):
        """self.avg = one worker's gradient (asp/ssp: a push is applied alone)."""
        for a, (b, e) in zip(arrays, ranges):
            self.avg[self.locate(b, e)] = a

    def average(self, ranks) -> numpy.ndarray:
        """self.avg = mean of the slots of ``ranks``, summed in rank order."""
        ranks = sorted(ranks)
        numpy.copyto(self.avg, self._slots[ranks[0]])
        for r in ranks[1:]:
            self.avg += self._slots[r]
        if len(ranks) > 1:
            self.avg *= 1.0 / len(ranks)
        return self.avg

    def local_sumsq(self) -> float:
        """This shard's share of the squared norm of the averaged gradient."""
        return sum_of_squares(self.avg)

    def apply(self, global_sumsq: float | None = None, lr_step: int | None = None, lr_scale: float = 1.0):
        """One optimizer step with the averaged gradient in ``self.avg``. With clipping
        on, ``global_sumsq`` is the squared norm of the averaged gradient over every
        shard of the job (each server adds the others' shares, see ``server.py``).
        ``lr_step``: where in the learning-rate schedule this update is (default: the
        version; asp/ssp pass version // W, so W pushes make one step of the schedule);
        ``lr_scale`` multiplies the scheduled rate (asp/ssp: 1 / W, see consistency.py)."""
        cfg = self.optim_cfg
        scale = 1.0
        if cfg.grad_clip > 0:
            if global_sumsq is None:
                raise ValueError("clipping needs the global squared norm")
            scale = clip_scale(global_sumsq ** 0.5, cfg.grad_clip)
        step = self.version if lr_step is None else lr_step
        self.optimizer.step(self.params, self.avg, lr_at(cfg, step) * lr_scale, grad_scale=scale)
        self.version += 1

    def apply_delta(self):
        """Local SGD: params -= the averaged parameter change in ``self.avg`` (model
        averaging; the optimizer ran on the workers)."""
        self.params -= self.avg
        self.version += 1
