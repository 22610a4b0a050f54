"""A server's shard: the chunks of the flat vector it owns, and their optimizer state.

The server knows nothing about transformers. It owns a list of chunks, each a range
``[begin, end)`` of the job's flat parameter vector, and keeps them back to back in one
local vector (so the optimizer runs over one flat array, as in the single-process
trainer). A message addresses a chunk by its global range; ``locate`` turns that into
the local slice, and refuses a range the server does not own.

Gradients from the workers of one step land in per-worker slots, and are summed in
rank order: the sum, and therefore the parameters, do not depend on the order in
which pushes arrive (a run is reproducible bit for bit; the reliability tests rely on it).

A pushed chunk may arrive compressed (``common/wire/compress.py``): it is decoded into the
slot, so everything after the slot sees float values whatever the wire carried.

How an update is made depends on the consistency model (``modes.py``): plain BSP
holds each pushed chunk as received, sums the agreed workers' chunks once the step's set
is known (``average_chunk``; again, from the held chunks, if the set shrinks) and updates
chunk by chunk (``begin_update``, ``update_chunk``, ``end_update``: every element is
updated on its own, so chunks updated one after the other give exactly the step of the
whole shard; ``steps.py``); BSP with backup workers averages slots and takes an optimizer step (``average`` + ``apply``);
ASP/SSP take an optimizer step with one worker's gradient as it arrives (``set_update``
+ ``apply``); local SGD averages the workers' parameter changes and subtracts them
(``average`` + ``apply_delta``: an outer SGD step with learning rate 1).
"""
from __future__ import annotations

import numpy

from common.wire.compress import decode_chunk, all_finite
from common.wire.pull_compress import PullEncoder
from common.layout import intersect_ranges
from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer, sum_of_squares
from common.wire.protocol import ProtocolError


class Shard:
    def __init__(self, chunks, dtype, optim: OptimConfig, decay_ranges=(), scheme=None, pull_scheme=None,
                 params=None):
        """``chunks``: the global ranges this server owns; ``decay_ranges``: the job's
        global weight-decay ranges (the shard keeps the parts inside its chunks);
        ``scheme``: the job's gradient compression (``common.wire.compress``; None: plain);
        ``pull_scheme``: the compression of its answers (``--compress-pull``; None: plain);
        ``params``: zeroed memory to keep the parameters in (a shared-memory segment the
        workers of this host read, ``common/wire/shm.py``), or None: allocated here."""
        self.scheme = scheme
        self.chunks = [(int(b), int(e)) for b, e in chunks]
        self.dtype = numpy.dtype(dtype)
        self._local = {}                    # (begin, end) -> local offset
        self._index = {}                    # (begin, end) -> chunk index
        local_decay, offset = [], 0
        for i, (b, e) in enumerate(self.chunks):
            self._index[(b, e)] = i
            self._local[(b, e)] = offset
            local_decay += [(lb + offset, le + offset) for lb, le in intersect_ranges(decay_ranges, b, e)]
            offset += e - b
        self.size = offset
        self.params = numpy.zeros(self.size, dtype=self.dtype) if params is None else params
        self.avg = numpy.zeros(self.size, dtype=self.dtype)       # the averaged gradient of a step
        self.optim_cfg = optim
        self.optimizer = make_optimizer(optim, self.size, self.dtype, local_decay)
        self.version = 0                    # optimizer steps applied
        self.initialized = False
        self._slots = {}                    # worker rank -> gradient buffer, reused every step
        self._snapshot = None               # (version, [arrays]): a copy of the parameters to send
        self._step = None                   # (lr, grad scale) of the update in progress (begin_update)
        self.avg_scale = 1.0                # avg holds avg_scale^-1 times the mean (average_chunk: the sum)
        self.held = {}                      # (rank, chunk) -> its pushed gradient, as received (store_gradient)
        self._sources = {}                  # chunk -> its gradient for the update (average_chunk)
        # --compress-pull: the copy the workers hold and its versions, checkpointed with the shard
        self.pull = PullEncoder(pull_scheme, self.chunks, self.dtype) if pull_scheme is not None else None

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

    def chunk_index(self, begin: int, end: int) -> int:
        """The index of the owned chunk ``[begin, end)`` (a whole chunk, not part of one)."""
        i = self._index.get((begin, end))
        if i is None:
            raise ProtocolError(f"[{begin}, {end}) is not one of this server's chunks "
                                f"({self.describe_chunks()})")
        return i

    def chunk_slice(self, i: int) -> slice:
        return self.locate(*self.chunks[i])

    def describe_chunks(self, most: int = 4) -> str:
        text = ", ".join(f"[{b}, {e})" for b, e in self.chunks[:most])
        return text + (f" and {len(self.chunks) - most} more" if len(self.chunks) > most else "")

    def check_full_cover(self, ranges, what: str):
        """Refuse a message whose arrays are not exactly this server's chunks (each once)."""
        # (the parts of a compressed chunk all carry the chunk's range; a chunk sent twice
        # as plain arrays is refused by write_chunks)
        if sorted(set(r for r in ranges if r is not None)) != sorted(self.chunks) or None in ranges:
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

    def store_gradient(self, rank: int, msg, hold: bool = False) -> list[int]:
        """Worker ``rank``'s pushed chunks (a decoded push ``msg``) into its slot; returns
        the chunk indices. See ``write_chunks``. ``hold`` (plain BSP, chunk by chunk): a
        plain chunk is not copied but held as received (a view of the message's frame,
        kept until the chunk is averaged: ``average_chunk`` reads it there)."""
        return self.write_chunks(self.slot(rank), msg, hold=rank if hold else None)

    def set_update(self, msg) -> list[int]:
        """self.avg = one worker's gradient (asp/ssp: a push is applied alone)."""
        self.avg_scale = 1.0
        return self.write_chunks(self.avg, msg)

    def write_chunks(self, dest, msg, hold=None) -> list[int]:
        """Write the whole chunks a push carries into ``dest`` (a slot, or ``avg``) and
        return their indices. Plain arrays must have the job's dtype (an array the
        transport received straight into ``dest``, ``msg.placed``, is already there);
        compressed ones (``msg.encs``) are decoded with the job's scheme. Refuses
        (ProtocolError) a chunk twice in one message, and non-finite values: ``dest``
        may then hold part of the message, which is harmless as long as the caller
        does not count the chunks as received. ``hold``: a rank, whose plain chunks are
        kept as views of the message (``self.held``) instead of copied into ``dest``."""
        want, done, i = self.dtype.name, [], 0
        arrays, ranges, encs = msg.arrays, msg.ranges, msg.encs or [None] * len(msg.arrays)
        placed = msg.placed or [False] * len(arrays)
        while i < len(arrays):
            r = ranges[i]
            if r is None:
                raise ProtocolError("every pushed array needs its range in the flat vector")
            c = self.chunk_index(*r)
            if any(c == d for d, _ in done):
                raise ProtocolError(f"chunk [{r[0]}, {r[1]}) appears twice in one push")
            out = dest[self.chunk_slice(c)]
            if encs[i] is None:
                a = arrays[i]
                if msg.dtypes[i] != want or a.ndim != 1:
                    raise ProtocolError(f"push: expected {want} flat arrays, got {msg.dtypes[i]} {a.shape}")
                if hold is not None and not placed[i]:
                    out = a                      # no copy: averaged straight from the frame
                elif not placed[i]:
                    out[...] = a
                i += 1
            else:
                if self.scheme is None:
                    raise ProtocolError("a compressed chunk, but this job pushes plain gradients (--compress none)")
                j = i
                while j < len(arrays) and ranges[j] == r and encs[j] is not None:
                    j += 1
                decode_chunk(self.scheme, arrays[i:j], encs[i:j], out)
                i = j
            if not all_finite(out):
                raise ProtocolError(f"push: range [{r[0]}, {r[1]}) holds NaN or Inf; refused")
            done.append((c, out))
        if hold is not None:
            for c, out in done:
                self.held[(hold, c)] = out
        return [c for c, _ in done]

    def average(self, ranks) -> numpy.ndarray:
        """self.avg = mean of the slots of ``ranks``, summed in rank order."""
        ranks = sorted(ranks)
        self.avg_scale = 1.0
        numpy.copyto(self.avg, self._slots[ranks[0]])
        for r in ranks[1:]:
            self.avg += self._slots[r]
        if len(ranks) > 1:
            self.avg *= 1.0 / len(ranks)
        return self.avg

    def average_chunk(self, i: int, ranks):
        """The gradient of chunk ``i`` for the update: the SUM of the ``ranks``' pushes of it
        (held by ``store_gradient``), in rank order (the same sums as ``average``), in
        ``avg``; with one worker, its push itself, uncopied. The 1 / W goes into the
        optimizer's gradient scale (``avg_scale``), which multiplies the gradient anyway:
        one pass over memory saved."""
        ranks = sorted(ranks)
        parts = [self.held[(r, i)] for r in ranks]      # (kept: a smaller set may average again)
        if len(parts) == 1:
            self._sources[i] = parts[0]
        else:
            avg = self._sources[i] = self.avg[self.chunk_slice(i)]
            numpy.add(parts[0], parts[1], out=avg)
            for p in parts[2:]:
                avg += p
        self.avg_scale = 1.0 / len(ranks)

    def local_sumsq(self) -> float:
        """This shard's share of the squared norm of the averaged gradient."""
        if self._sources:                    # chunk by chunk: the chunks' own gradients
            return sum(sum_of_squares(self._sources[i]) for i in sorted(self._sources)) * self.avg_scale ** 2
        return sum_of_squares(self.avg) * self.avg_scale ** 2

    def apply(self, global_sumsq: float | None = None, lr_step: int | None = None, lr_scale: float = 1.0):
        """One optimizer step with the averaged gradient in ``self.avg``. With clipping
        on, ``global_sumsq`` is the squared norm of the averaged gradient over every
        shard of the job (each server adds the others' shares, see ``server.py``).
        ``lr_step``: where in the learning-rate schedule this update is (default: the
        version; asp/ssp pass version // W, so W pushes make one step of the schedule);
        ``lr_scale`` multiplies the scheduled rate (asp/ssp: 1 / W, see modes.py)."""
        self.begin_update(global_sumsq, lr_step, lr_scale)
        self.optimizer.update(self.params, self.avg, *self._step)
        self.end_update()

    def begin_update(self, global_sumsq: float | None = None, lr_step: int | None = None, lr_scale: float = 1.0):
        """Start this version's optimizer step (arguments as ``apply``); then
        ``update_chunk`` each chunk once, then ``end_update``."""
        cfg = self.optim_cfg
        scale = 1.0
        if cfg.grad_clip > 0:
            if global_sumsq is None:
                raise ValueError("clipping needs the global squared norm")
            scale = clip_scale(global_sumsq ** 0.5, cfg.grad_clip)
        step = self.version if lr_step is None else lr_step
        self.optimizer.begin()
        self._step = (lr_at(cfg, step) * lr_scale, scale * self.avg_scale)

    @property
    def updating(self) -> bool:
        return self._step is not None

    def update_chunk(self, i: int):
        """The current step's update of chunk ``i`` (with its gradient from ``average_chunk``)."""
        sl = self.chunk_slice(i)
        self.optimizer.update(self.params, self._sources.pop(i), *self._step, lo=sl.start, hi=sl.stop,
                              grads_at=sl.start)

    def end_update(self):
        self._step = None
        self.version += 1
        self.held.clear()

    def apply_delta(self):
        """Local SGD: params -= the averaged parameter change in ``self.avg`` (model
        averaging; the optimizer ran on the workers)."""
        self.params -= self.avg
        self.version += 1
