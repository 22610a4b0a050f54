"""Compressed pulls (``--compress-pull``): a server answers with the compressed CHANGE of
its parameters against the copy the workers hold, and keeps what it did not send.

The push side (``compress.py``) keeps an error-feedback residual on each worker; the pull
side turns it around. The server keeps, per chunk, θ̂: exactly the values every worker
holds. When it answers at a version it has not answered at yet, it refreshes the chunk
once for everyone:

    Δ = C(θ - θ̂)          the chosen scheme (bf16, int8, topk) on the difference
    θ̂ <- θ̂ + D(Δ)         D: the decoding the workers do, bit for bit

and every worker that holds the θ̂ of the refresh before gets Δ and adds D(Δ) to its
copy, so it holds the new θ̂ exactly. What C dropped stays in θ - θ̂ and goes out with
a later answer: error feedback on the server (as in DoubleSqueeze, Tang et al. 2019, and
the two-way compression of SparseLoCo). A worker that missed refreshes (asp/ssp, where
the versions move on between a worker's reads) gets the changes since the θ̂ it holds,
in order, when the server still has them (at most the last ``DEPTH``, and fewer bytes
than θ̂ in full, are kept); otherwise, and when it holds nothing (it joins or rejoins), it gets θ̂ in full,
as float values. So every worker's parameters are always one θ̂ of the server. The
first answer of a chunk sets θ̂ = θ (in full).

Every request carries ``held``: the version of the θ̂ it holds of the chunks it asks for
(-1: none, or not one version); ``PullEncoder.note`` records it per connection, and
``answer`` picks, per chunk, the change or the full θ̂. The random numbers of int8's
stochastic rounding come from (chunk, version) alone: a refresh after a restart is the
refresh before it. ``state``/``load`` are what a checkpoint keeps (θ̂ and the versions).

``PullDecoder`` is the worker's side: its copy of θ̂ (its own vector: a local-sgd or
diloco worker moves its parameters between pulls), the version of each chunk, and the
answer's chunks written into ``params``.

Not here: when answers are sent (``paramserver/replier.py``), reading answers
(``worker/answers.py``), the schemes (``compress.py``).
"""
from __future__ import annotations

import numpy

from common.wire.compress import decode_chunk, make_scheme
from common.wire.protocol import ProtocolError

PULL_SCHEMES = ("none", "bf16", "int8", "topk")
SEED = 0x5EED                  # int8's rounding: numpy's generator seeded with (SEED, chunk begin, version)
DEPTH = 8                      # refreshes of each chunk kept, for a worker that missed some


def pull_scheme(name: str, ratio: float):
    """The scheme of ``--compress-pull`` (None for none); top-k keeps ``ratio`` of each chunk."""
    if name not in PULL_SCHEMES:
        raise ValueError(f"compress_pull must be one of {', '.join(PULL_SCHEMES)}, got {name!r}")
    return make_scheme(name, ratio) if name != "none" else None


def held_version(versions) -> int:
    """What a request says it holds: the one version of ``versions`` (-1 if none or several)."""
    versions = set(versions)
    return versions.pop() if len(versions) == 1 else -1


class PullEncoder:
    def __init__(self, scheme, chunks, dtype, peers: int = 1024):
        """``chunks``: this server's (begin, end) ranges in the order of its shard;
        ``peers``: how many connections' ``held`` are remembered (the oldest are forgotten)."""
        self.scheme, self.chunks = scheme, [(int(b), int(e)) for b, e in chunks]
        self.offsets = numpy.cumsum([0] + [e - b for b, e in self.chunks])
        self.hat = numpy.zeros(int(self.offsets[-1]), dtype=dtype)
        n = len(self.chunks)
        self.version = [-1] * n        # the version θ̂ of each chunk stands for (-1: never answered)
        # per chunk, its last refreshes, oldest first: (version before, [(part name, array)])
        self.history: list[list] = [[] for _ in range(n)]
        self.held: dict[bytes, int] = {}
        self.peers = peers

    def view(self, c: int):
        return self.hat[self.offsets[c]:self.offsets[c + 1]]

    def note(self, identity: bytes, meta: dict):
        """A request from ``identity``: remember the version of θ̂ it says it holds."""
        held = meta.get("held", -1)
        if not isinstance(held, int) or isinstance(held, bool) or held < -1:
            raise ProtocolError(f"held must be a version >= -1, got {held!r}")
        self.held.pop(identity, None)
        self.held[identity] = held
        while len(self.held) > self.peers:
            del self.held[next(iter(self.held))]

    def refresh(self, c: int, theta, version: int):
        """θ̂ of chunk ``c`` brought to ``theta`` (the chunk at ``version``), once per version."""
        if self.version[c] == version:
            return
        hat = self.view(c)
        if self.version[c] < 0:
            hat[...] = theta
        else:
            diff = numpy.subtract(theta, hat)
            rng = numpy.random.default_rng([SEED, self.chunks[c][0], version])
            parts = [(name, a.copy()) for name, a in
                     self.scheme.encode(diff, self.scheme.buffers(diff.size), rng)]
            decode_chunk(self.scheme, [a for _, a in parts], [n for n, _ in parts], diff)
            hat += diff
            kept = self.history[c] = self.history[c][1 - DEPTH:] + [(self.version[c], parts)]
            while len(kept) > 1 and sum(a.nbytes for _, change in kept for _, a in change) >= hat.nbytes:
                kept.pop(0)              # a chain as large as θ̂ is never sent: at most θ̂'s bytes kept
        self.version[c] = version

    def changes_since(self, c: int, held: int) -> list | None:
        """The parts of chunk ``c``'s refreshes after version ``held``, in order, when they
        are all kept and take fewer bytes than θ̂ in full; else None."""
        if held < 0 or held >= self.version[c]:
            return None
        for i in range(len(self.history[c]) - 1, -1, -1):
            if self.history[c][i][0] == held:
                parts = [p for _, change in self.history[c][i:] for p in change]
                small = sum(a.nbytes for _, a in parts) < self.view(c).nbytes
                return parts if small else None
        return None

    def answer(self, identity: bytes, ids, arrays, version: int):
        """The answer's arrays for the chunk indices ``ids`` whose values are ``arrays`` at
        ``version``: (arrays, ranges, encs, dtypes) for ``codec.encode``."""
        held = self.held.get(identity, -1)
        out, ranges, encs, dtypes = [], [], [], []
        wire = dict(self.scheme.parts)
        for c, theta in zip(ids, arrays):
            self.refresh(c, theta, version)
            parts = self.changes_since(c, held)
            if parts is None:            # in full: a copy (θ̂ changes with the next refresh)
                parts = [(None, self.view(c).copy())]
            for name, a in parts:
                out.append(a)
                ranges.append(self.chunks[c])
                encs.append(name)
                dtypes.append(wire.get(name))
        return out, ranges, encs, dtypes

    def state(self) -> dict:
        return {"hat": self.hat, "version": list(self.version)}

    def load(self, state: dict):
        """From a checkpoint: θ̂ and its versions (the changes are not kept: a worker that
        misses one gets θ̂ in full)."""
        self.hat[...] = state["hat"]
        self.version = [int(v) for v in state["version"]]
        self.history = [[] for _ in self.chunks]


class PullDecoder:
    def __init__(self, scheme, chunks, size: int, dtype):
        """``chunks``: every chunk (begin, end) of the job, in the order of the flat vector."""
        self.scheme = scheme
        self.index = {(b, e): i for i, (b, e) in enumerate(chunks)}
        self.hat = numpy.zeros(size, dtype=dtype)
        self.version = [-1] * len(chunks)      # per chunk: the version of θ̂ held (-1: none)

    def held(self, ids) -> int:
        return held_version(self.version[i] for i in ids)

    def take(self, msg, params, placed=None) -> list[int]:
        """The chunks of an answer ``msg`` into θ̂ and ``params``; returns their indices.
        A plain array is θ̂ in full (already in ``params`` where ``placed``); compressed
        parts are the change, added to θ̂."""
        version, done, i = msg.meta.get("version", -1), [], 0
        arrays, ranges, encs = msg.arrays, msg.ranges, msg.encs or [None] * len(msg.arrays)
        placed = placed or [False] * len(arrays)
        while i < len(arrays):
            r = ranges[i]
            c = self.index.get(r)
            if c is None or c in done:
                raise ProtocolError(f"an answer with a range {r} that is not a chunk, or twice")
            b, e = r
            if encs[i] is None:
                a = params[b:e] if placed[i] else arrays[i]
                if a.shape != (e - b,):
                    raise ProtocolError(f"chunk [{b}, {e}) answered with shape {a.shape}")
                self.hat[b:e] = a
                i += 1
            else:
                if self.scheme is None or self.version[c] < 0:
                    raise ProtocolError(f"a compressed change of [{b}, {e}) for a worker that holds none of it")
                change, per = numpy.empty(e - b, dtype=self.hat.dtype), len(self.scheme.parts)
                while i < len(arrays) and ranges[i] == r and encs[i] is not None:     # one change after another
                    decode_chunk(self.scheme, arrays[i:i + per], encs[i:i + per], change)
                    self.hat[b:e] += change
                    i += per
            params[b:e] = self.hat[b:e]
            self.version[c] = version
            done.append(c)
        return done
