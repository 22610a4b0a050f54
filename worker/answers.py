"""Where a worker's chunks live, and how the servers' answers come back into ``params``.

``ChunkMap`` is the job's placement as a worker reads it (``common/placement.py``: the
coordinator's JOB answer says which server owns which chunk): the chunks in the order of
the flat vector, each with its server, and the chunks of each server.

``AnswerReader`` takes the answers of pulls and pushes: the transport receives their
arrays straight into ``params`` where the answer brings exactly the chunks its request
asked for (``destinations``: the one copy on the way in), anything else is copied there
(``take``); it marks the chunks whose new values are in (``fresh``), keeps each server's
version and the meta of its answers. In bsp and local-sgd every server answers at the
same version, and anything else is an error; with backup workers a late push may come
back from one server after it moved on and from another before (``behind`` names the
servers to catch up with); in asp and ssp each server has its own version.

Not here: sending and waiting (``worker/requests.py``), the key-value API (``worker/client.py``).
"""
from __future__ import annotations

from common.wire.protocol import OK, PULL, PUSH, ProtocolError
from worker.requests import RemoteError


class ChunkMap:
    def __init__(self, placement, num_servers: int):
        """``placement``: the JOB answer's ``[[begin, end, server], ...]``."""
        self.list = sorted((b, e, s) for b, e, s in placement)       # every chunk, by offset
        self.index = {(b, e): i for i, (b, e, _) in enumerate(self.list)}
        self.of_server = [[(b, e) for b, e, s in placement if s == k] for k in range(num_servers)]

    def __len__(self) -> int:
        return len(self.list)

    def server(self, i: int) -> int:
        return self.list[i][2]

    def ids_of(self, s: int) -> list[int]:
        """The chunk indices of server ``s``."""
        return [self.index[c] for c in self.of_server[s]]

    def overlapping(self, begin: int, end: int) -> list[int]:
        return [i for i, (b, e, _) in enumerate(self.list) if b < end and begin < e]

    def within(self, ids, ranges) -> list[int]:
        """The chunks of ``ids`` that lie wholly inside one of ``ranges``."""
        return [i for i in ids if any(b <= self.list[i][0] and self.list[i][1] <= e for b, e in ranges)]


class AnswerReader:
    def __init__(self, chunks: ChunkMap, num_servers: int, one_version: bool, pull=None):
        """``one_version``: every server must answer at the same version (bsp, local-sgd);
        ``pull``: --compress-pull's ``PullDecoder`` (answers are changes against its copy)."""
        self.chunks, self.one_version, self.pull = chunks, one_version, pull
        self.params = None                     # where answers are written (set by each pull or push)
        self.fresh: set = set()                # chunks whose answer is in, since ``expect``
        self.metas: dict = {}                  # server -> its answers' meta, merged, since ``expect``
        self.versions = [0] * num_servers      # per server: the version of its last answer
        self.version = 0                       # the (lowest) version of the parameters held, as of ``settle``
        self.bytes_pulled = 0                  # the arrays' bytes of every answer with parameters

    def expect(self, params):
        """Answers from now on go into ``params``; nothing is fresh yet."""
        self.params, self.fresh, self.metas = params, set(), {}

    def destinations(self, req, header):
        """Views of ``params`` for the array frames of an answer that brings exactly the
        chunks ``req`` asked for (None for an array to be copied, or for the whole answer)."""
        params = self.params
        if header["cmd"] != OK or params is None:
            return None
        want = {self.chunks.list[i][:2] for i in req.answers}
        dests = []
        for d in header["arrays"]:
            if "at" in d:                      # in the server's shared memory: no frame
                continue
            r = tuple(d.get("range") or ())
            ok = r in want and "enc" not in d and d["dtype"] == params.dtype.name and d["shape"] == [r[1] - r[0]]
            dests.append(memoryview(params[r[0]:r[1]]).cast("B") if ok else None)
        return dests

    def take(self, req, msg, nbytes: int):
        """An OK answer: its parameters into ``params`` (unless already placed there), its
        chunks marked fresh, the server's version and meta recorded."""
        s = req.server
        if req.cmd not in (PUSH, PULL):
            return
        want = {self.chunks.list[i][:2]: i for i in req.answers}
        for a, r in zip(msg.arrays, msg.ranges):
            if r not in want or a.ndim != 1:
                raise ProtocolError(f"server {s} sent parameters for a range {r} it was not asked for")
        if self.pull is not None:
            self.fresh.update(self.pull.take(msg, self.params, msg.placed))
        else:
            for a, r, placed in zip(msg.arrays, msg.ranges, msg.placed):
                if not placed:
                    self.params[r[0]:r[1]] = a
                self.fresh.add(want[r])
        self.versions[s] = msg.meta.get("version", self.versions[s])
        self.metas[s] = dict(self.metas.get(s, {}), **msg.meta)
        self.bytes_pulled += nbytes

    def held(self, ids) -> dict:
        """A request's ``held`` (--compress-pull: the version of the chunks ``ids`` held)."""
        return {"held": self.pull.held(ids)} if self.pull is not None else {}

    def settle(self) -> int:
        """Every answer of a pull or a step is in: the version of the parameters held (the
        lowest); refuses servers at different versions where every server must be at one."""
        if len(set(self.versions)) != 1 and self.one_version:
            raise RemoteError(f"servers are at different versions {sorted(set(self.versions))}")
        self.version = min(self.versions)
        return self.version

    def behind(self) -> tuple[list[int], int]:
        """(the servers behind the newest one, its version): whom to catch up with."""
        target = max(self.versions)
        return [s for s, v in enumerate(self.versions) if v < target], target
