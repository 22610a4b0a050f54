"""The worker's key-value API to the servers: register, init, pull, push (ps-lite's KVWorker).

The client sees the model only as two flat vectors cut into chunks (``common/placement.py``:
the coordinator's JOB answer says which server owns which chunk). It sends
``grads[b:e]`` of each chunk to its server and writes the parameters that come back into
``params[b:e]``: the transport receives them straight into ``params`` (``recv_into``),
the one copy on the way in; on the way out the arrays leave without a copy. Every
request carries an id; a late answer to an old request is dropped. Every wait has a
deadline; when it passes, the error names the servers that did not answer and their
addresses.

Usage (the "hello PS" script in scripts/ is a complete example):

    client = PSClient(cluster, job)
    job = client.register(layout, "float32")     # blocks until the whole job has registered
    if client.rank == 0:
        client.init(params)                      # worker 0 gives the servers the initial values
    client.pull(params)                          # params[:] = the servers' values
    for step in range(steps):
        ...compute grads...
        reply = client.push_pull(grads, params, step, loss=loss)   # BSP: returns after the update
    client.done()

``push_pull`` is three calls, which a worker that overlaps communication with compute
makes itself (plain BSP; ``worker/mode_loops.py``):

    client.begin_push(grads, params, step, loss=loss)
    ...backward: client.push_final(b, e) each time grads[b:e] is final -> its chunks leave
    client.push_rest()                           # what is left
    ...next forward: client.wait_params(b, e) before params[b:e] is used
    reply = client.end_step()                    # every answer in; server 0's meta

With ``--compress`` each chunk of a push is compressed (``common/wire/compress.py``), the
residual kept here for error feedback. ``bytes_pushed`` and ``bytes_pulled`` count the
arrays' bytes on the wire (compressed, when they are), not the headers (a hundred or two
bytes a message), so that a push can carry the count including itself; ``bytes_sent`` and
``bytes_received`` count every frame to and from the servers and the coordinator, headers
and resends included (``Requests``; the heartbeats' own socket is not counted), and a push
carries them as they were before it, plus its own arrays.

How the answers are read depends on the consistency model (``--mode``, see
``paramserver/modes.py``): in bsp and local-sgd every server answers at the same
version, and anything else is an error; with backup workers a push may come back
``dropped`` (its step went on without it), and the client then catches up with any
server that is behind, so that the worker's parameters are again one version; in asp
and ssp each server has its own version, the client remembers each one and tells
each server, with the next push, which version the gradient was computed on
(``base_version``: the server measures staleness with it).

The client counts the time it spends waiting for answers (``wait_s``: the network and
the other workers, as the worker sees them), its pushes and its dropped pushes.

The client is the API; its parts: ``Requests`` (``worker/requests.py``: every request's
deadline, refusal and resend, every wait), ``ChunkMap`` and ``AnswerReader``
(``worker/answers.py``: where the chunks live, answers written into ``params``, each
server's version and the catch-up of backup workers), ``PushEncoder`` (compression
with error feedback), ``Heartbeat``; a step's push in progress is a ``StepPush``.

Failures (docs/failures.md): once registered, a thread sends the coordinator
heartbeats (``worker/heartbeat.py``). Every push carries this process's session and a
request id; when the connection to a server breaks and comes back (the server was
restarted, a link flapped), the client sends the unanswered requests again, unchanged,
and the server applies a push at most once. A worker the coordinator dropped (it was
silent too long) registers again and goes on from the current parameters; when the
coordinator says the job is stopping, or is gone, the next wait raises with the reason.

Not here: sockets (``common/wire/transport.py``), bytes (``common/wire/codec.py``), the model.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy

from common.cluster import ClusterConfig, JobConfig, host_name
from common.config import to_dict
from common.layout import Layout, merge_ranges
from common.wire.compress import PushEncoder, make_scheme
from common.wire.pull_compress import PullDecoder, pull_scheme
from common.wire.memory import keep_freed_memory
from common.wire.protocol import DONE, INIT, JOB, PULL, PUSH, REGISTER
from common.wire.shm import PeerSegments, Segment
from worker.answers import AnswerReader, ChunkMap
from worker.heartbeat import Heartbeat
from worker.requests import DeadlineError, RemoteError, Requests

log = logging.getLogger("client")

__all__ = ["PSClient", "RemoteError", "DeadlineError"]


@dataclass
class Member:
    """Who this client is in the job."""
    role: str
    rank: int
    identity: bytes            # one name per process, kept across reconnects
    session: int = 0           # this process's incarnation, from the coordinator
    joined_at: int = 0         # the version the job was at when this worker joined it
    model: tuple | None = None  # (layout, dtype, tokenizer): to register again


@dataclass
class StepPush:
    """A step's push in progress (``begin_push`` .. ``end_step``)."""
    step: int
    grads: object
    meta: dict
    unsent: set                # chunks of the step not pushed yet
    overlapped: bool = False   # chunks left one by one during the backward (push_final)
    final: list = field(default_factory=list)   # ranges whose gradients are final (push_final)


@dataclass
class ClientStats:
    """What the client counts for the worker's metrics."""
    bytes_pushed: int = 0      # the arrays' bytes of every push (compressed, when they are)
    pushes: int = 0
    push_messages: int = 0     # PUSH messages sent (overlap: several per server and step)
    shm_pushes: int = 0        # of which their arrays lay in shared memory (--shm)
    dropped: int = 0           # pushes a server did not apply (backup workers)
    wait_s: float = 0.0        # seconds spent waiting for answers to push/pull
    rejoins: int = 0           # registrations after being dropped


class PSClient:
    def __init__(self, cluster: ClusterConfig, job: JobConfig | None = None, role: str = "worker"):
        keep_freed_memory()                     # before any socket: receive buffers stay mapped
        self.cluster = cluster
        self.job_cfg = job or JobConfig()
        self.me = Member(role, cluster.rank, f"{role}:{cluster.rank}/{os.getpid()}/{id(self):x}".encode())
        # where a server may hold an answer back (ssp) or wait for a version, its own deadline
        # names the workers it waits for: give it time to say so before ours passes
        grace = 0.0 if self.chunkwise else max(2.0, 0.1 * cluster.timeout)
        self.requests = Requests(cluster, self.me.identity, lambda: self.name, self._check_job, grace)
        self.chunk_map: ChunkMap | None = None  # the job's placement, from registration
        self.answers: AnswerReader | None = None
        self.encoder: PushEncoder | None = None  # --compress: the scheme and the error-feedback residual
        self.heartbeat: Heartbeat | None = None
        self.stats = ClientStats()
        self.step: StepPush | None = None
        self.segment: Segment | None = None      # --shm auto: where pushes to the servers of this host lie

    # --- who and what ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"{self.me.role}:{self.me.rank}"

    @property
    def rank(self) -> int:
        return self.me.rank

    @property
    def session(self) -> int:
        return self.me.session

    @property
    def identity(self) -> bytes:
        return self.me.identity

    @property
    def joined_at(self) -> int:
        return self.me.joined_at

    @property
    def curve(self):
        return self.requests.curve

    @property
    def asynchronous(self) -> bool:
        return self.job_cfg.mode in ("asp", "ssp")

    @property
    def catch_up(self) -> bool:
        return self.job_cfg.backup_workers > 0

    @property
    def chunkwise(self) -> bool:
        """Plain BSP: a step's chunks may leave one by one."""
        return self.job_cfg.mode == "bsp" and not self.catch_up

    @property
    def version(self) -> int:
        """The (lowest) version of the parameters held."""
        return self.answers.version if self.answers else 0

    @property
    def versions(self) -> list[int]:
        return self.answers.versions if self.answers else []

    @property
    def chunks(self) -> list[list[tuple[int, int]]]:
        """Per server: the ranges of the chunks it owns."""
        return self.chunk_map.of_server if self.chunk_map else []

    @property
    def links(self) -> list:
        """One link per server, in server rank order."""
        return self.requests.links

    @property
    def in_step(self) -> bool:
        return self.step is not None

    @property
    def tracer(self):
        return self.requests.tracer

    @tracer.setter
    def tracer(self, tracer):
        self.requests.tracer = tracer

    # the counters the worker's metrics read
    bytes_pushed = property(lambda self: self.stats.bytes_pushed)
    bytes_pulled = property(lambda self: self.answers.bytes_pulled if self.answers else 0)
    pushes = property(lambda self: self.stats.pushes)
    push_messages = property(lambda self: self.stats.push_messages)
    shm_pushes = property(lambda self: self.stats.shm_pushes)
    dropped = property(lambda self: self.stats.dropped)
    wait_s = property(lambda self: self.stats.wait_s)
    rejoins = property(lambda self: self.stats.rejoins)
    resends = property(lambda self: self.requests.resends)
    bytes_sent = property(lambda self: self.requests.bytes_sent)
    bytes_received = property(lambda self: self.requests.bytes_received)

    # --- the job ------------------------------------------------------------------------
    def register(self, layout: Layout, dtype: str, tokenizer: str = "") -> dict:
        """Join the job; returns the coordinator's JOB answer once every process has
        registered. Sets ``self.rank`` (assigned by the coordinator when it was -1).
        ``tokenizer``: the sha256 of this worker's tokenizer, checked like the layout."""
        me = self.me
        me.model = (layout, dtype, tokenizer)
        meta = dict(role=me.role, rank=me.rank, host=host_name(), pid=os.getpid(),
                    layout=layout.table(), layout_hash=layout.hash(), dtype=dtype,
                    job=to_dict(self.job_cfg), **({"tokenizer": tokenizer} if tokenizer else {}))
        # wait a little longer than the coordinator does: when registration times out there,
        # the coordinator's answer names who is missing, which this side cannot know
        grace = max(5.0, 0.25 * self.cluster.timeout)
        msg = self.requests.ask_coordinator(
            REGISTER, "registration (are all the servers and workers of the job started?)",
            sender=self.name if me.rank >= 0 else f"{me.role}:?", timeout=self.cluster.timeout + grace,
            periodic=False, **meta)                 # sent again only after a lost connection
        if msg.cmd != JOB:
            raise RemoteError(f"the coordinator answered {msg.cmd} to registration")
        job = msg.meta
        if job["layout_hash"] != layout.hash():
            raise RemoteError(f"the job's layout hash {job['layout_hash']} differs from ours {layout.hash()}")
        if job.get("tokenizer", "") != tokenizer:
            raise RemoteError(f"the job's tokenizer {job.get('tokenizer', '')[:12]} differs from ours {tokenizer[:12]}")
        me.rank, me.session, me.joined_at = job["rank"], job.get("session", 0), job.get("version", 0)
        if self.chunk_map is None:              # (a worker registering again keeps its links)
            self._connect(job, layout, dtype)
        c = self.cluster
        if c.heartbeat > 0 and me.role == "worker":
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.heartbeat = Heartbeat(self, c.heartbeat, c.silence_s, c.timeout)
            self.heartbeat.start()
        log.info("%s as %s (session %d)%s; servers %s", "joined the running job" if job.get("rejoin") else "registered",
                 self.name, me.session, f" at version {me.joined_at}" if me.joined_at else "",
                 ", ".join(self.requests.addrs))
        return job

    def _connect(self, job: dict, layout: Layout, dtype: str):
        """The job's chunks, the compression scheme, and one link per server."""
        servers = list(job["servers"])
        self.chunk_map = ChunkMap(job["placement"], len(servers))
        jc = self.job_cfg
        pull = pull_scheme(jc.compress_pull, jc.compress_pull_ratio)
        decoder = PullDecoder(pull, [c[:2] for c in self.chunk_map.list], layout.size, dtype) if pull else None
        self.answers = AnswerReader(self.chunk_map, len(servers), one_version=not (self.asynchronous or self.catch_up),
                                    pull=decoder)
        scheme = make_scheme(jc.compress, jc.compress_ratio, jc.error_feedback == "on")
        if scheme is not None:                  # the residual lives here: one per worker, whole vector
            self.encoder = PushEncoder(scheme, layout.size, dtype, jc.error_feedback == "on",
                                       seed=[1, self.rank], momentum=jc.compress_momentum)
        # not the coordinator link's name: server 0 is both, and a name is one connection
        link_id = self.name.encode() + b"/" + self.me.identity.split(b"/", 1)[1] + b"/data"
        # a server of this host is reached through its Unix socket (cluster.ipc): no TCP stack
        self.requests.connect(servers, job.get("ipc") or [""] * len(servers), link_id, self.cluster.ipc)
        if self.cluster.use_shm and any(self.requests.local):
            self._share_memory(layout, dtype)

    def _share_memory(self, layout: Layout, dtype: str):
        """--shm auto, servers on this host: this worker's segment (its pushes, laid out as the
        flat vector) and the servers' segments (their parameters), mapped as they name them."""
        itemsize = numpy.dtype(dtype).itemsize
        try:
            self.segment = Segment.create(self.cluster.coordinator, "worker", self.rank, layout.size * itemsize)
        except OSError as e:
            log.warning("no shared memory (%s): pushes go as frames", e)
            return
        at: dict = {}                          # (server, begin, end) -> byte offset in its segment
        for s, chunks in enumerate(self.chunk_map.of_server):
            offset = 0
            for b, e in chunks:
                at[(s, b, e)] = offset * itemsize
                offset += e - b
        sizes = [sum(e - b for b, e in chunks) * itemsize for chunks in self.chunk_map.of_server]
        self.requests.segments = PeerSegments(self.cluster.coordinator,
                                              lambda role, s: sizes[s] if role == "server" and s < len(sizes) else 0,
                                              lambda role, s, b, e: at.get((s, b, e), -1))

    def _shm_meta(self, s: int) -> dict:
        """The name of this worker's segment, for a server of this host (it maps it then)."""
        return {"shm": self.segment.name} if self.segment is not None and self.requests.local[s] else {}

    def rejoin_if_dropped(self) -> bool:
        """If the coordinator dropped this worker (it was silent too long: a stall, a cut
        link), register again under the same rank; True when it did (the caller pulls)."""
        hb = self.heartbeat
        if hb is None or hb.member or hb.error:
            return False
        log.warning("%s was dropped from the job (view %d); registering again", self.name, hb.view)
        if self.in_step:                        # overlap: the answers of the step out (dropped ones)
            self.end_step(one_version=False)
        self.register(*self.me.model)
        self.stats.rejoins += 1
        return True

    def done(self):
        """Tell the coordinator this worker has finished (it stops the servers after the last)."""
        servers = len(self.requests.links)
        if self.asynchronous and servers > 1:   # ssp: so it stops counting as a live worker
            for s in range(1, servers):
                self.requests.send(s, DONE, self.version)
            self._wait(DONE, self.version)
        self.requests.ask_coordinator(DONE, "done")
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def close(self):
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.requests.close()
        if self.segment is not None:
            self.segment.close()

    # --- parameters and gradients ---------------------------------------------------------
    def init(self, params):
        """Worker 0: give every server its chunks of the initial parameters."""
        for s, chunks in enumerate(self.chunk_map.of_server):
            self.requests.send(s, INIT, 0, arrays=[params[b:e] for b, e in chunks], ranges=list(chunks))
        self._wait(INIT, 0)

    def pull(self, params, servers=None, min_version: int = 0) -> int:
        """params[b:e] = the servers' values for every chunk (of ``servers``: default all),
        once each is at ``min_version`` or later; returns the version."""
        t0 = time.monotonic()
        servers = list(range(len(self.requests.links))) if servers is None else list(servers)
        self.answers.params = params
        for s in servers:
            self._send_pull(s, min_version)
        self._wait(PULL, self.version)
        if not self.asynchronous and len(set(self.versions)) > 1:
            # a server may be one step ahead of another (it finished the step first): wait
            # for the others to reach it, so that the parameters are of one version
            behind, target = self.answers.behind()
            for s in behind:
                self._send_pull(s, target)
            self._wait(PULL, self.version)
        self.answers.settle()
        self.stats.wait_s += time.monotonic() - t0
        return self.version

    def _send_pull(self, s: int, min_version: int):
        meta = dict({"min_version": min_version} if min_version else {}, **self._shm_meta(s))
        ids = self.chunk_map.ids_of(s)
        self.requests.send(s, PULL, self.version, answers=ids, **meta, **self.answers.held(ids))

    def push_pull(self, grads, params, step: int, **meta) -> dict:
        """Push ``grads`` for ``step``; each server answers after its update with fresh
        parameters, written into ``params``. Returns server 0's answer meta (it holds the
        step's mean loss over the workers and summed counters under ``stats``; with backup
        workers ``dropped`` is True when this push came too late to count)."""
        t0, waited = time.monotonic(), self.stats.wait_s
        self.begin_push(grads, params, step, **meta)
        self.push_rest()
        reply = self.end_step()
        self.stats.wait_s = waited + time.monotonic() - t0
        return reply

    # --- a step's push, chunk by chunk ------------------------------------------------------
    def begin_push(self, grads, params, step: int, **meta):
        """Start the push of ``step``: ``meta`` travels with it (loss, tokens...). The
        answers of the previous step must be in (``end_step``)."""
        if self.step is not None:
            raise RuntimeError(f"{self.name}: the answers of step {self.step.step} are not in; "
                               "call end_step() first")
        if self.me.session:
            meta = dict(meta, session=self.me.session)
        self.step = StepPush(step, grads, meta, set(range(len(self.chunk_map))))
        self.answers.expect(params)

    def push_final(self, begin: int, end: int):
        """The gradients in ``[begin, end)`` are final: push every chunk that is now wholly
        final (plain BSP; elsewhere a push carries a server's chunks together, at the end).
        Answers that came in meanwhile are read on the way (their parameters are written)."""
        if self.step is None or not self.chunkwise:
            return
        sp = self.step
        sp.final, sp.overlapped = merge_ranges(sp.final + [(begin, end)]), True
        self._push(self.chunk_map.within(sp.unsent, sp.final))
        self.requests.receive_ready(0, self.answers)

    def push_rest(self):
        """Push every chunk not pushed yet: one message per server unless the step is
        overlapped (then a chunk a message, for the servers' pipeline)."""
        if self.step is not None:
            self._push(sorted(self.step.unsent))

    def wait_params(self, begin: int, end: int):
        """Return once ``params[begin:end]`` holds this step's answers (at once when no
        step is in progress): the next forward calls this before each layer."""
        if self.step is None or self.step.unsent:
            return
        need, fresh = self.chunk_map.overlapping(begin, end), self.answers.fresh
        if any(i not in fresh for i in need):
            t0 = time.monotonic()
            self._wait(PUSH, self.step.step, lambda: all(i in fresh for i in need))
            self.stats.wait_s += time.monotonic() - t0

    def end_step(self, one_version: bool = True) -> dict:
        """Wait for every answer of the step; returns server 0's answer meta (see
        ``push_pull``). A no-op ({}) when no step is in progress. ``one_version=False``: the
        answers need not bring one version (a step this worker was dropped from: the servers
        answer as each moves on, and the pull after its rejoin brings one version)."""
        if self.step is None:
            return {}
        step, t0 = self.step.step, time.monotonic()
        self.push_rest()
        self._wait(PUSH, step)
        self.stats.wait_s += time.monotonic() - t0
        self.step = None
        self.stats.pushes += 1
        metas = self.answers.metas
        dropped = any(a.get("dropped") for a in metas.values())
        self.stats.dropped += dropped
        if not one_version or (dropped and not self.catch_up):
            # plain BSP answers ``dropped`` only to a worker dropped from the view: the servers answered
            # as each moved on, so the versions may differ; the pull after its rejoin brings one version
            return dict(metas.get(0, {}), dropped=dropped)
        self.answers.settle()
        if self.catch_up and len(set(self.versions)) > 1:
            # a late push can come back from one server after it moved on and from another
            # before: wait for the servers that are behind, so the parameters are one version
            behind, target = self.answers.behind()
            self.pull(self.answers.params, behind, min_version=target)
        return dict(metas.get(0, {}), dropped=dropped)

    def _push(self, chunk_ids):
        """PUSH the given chunks (compressed if the job says so): in an overlapped plain-BSP
        step one message per chunk, so that a server averages, updates and answers one chunk
        while the next is still on the wire (a pipeline); otherwise one message per server,
        all its chunks (a message costs 0.1-0.25 ms of Python on each side: docs/wire.md)."""
        sp, chunks = self.step, self.chunk_map
        per_chunk = self.chunkwise and sp.overlapped
        groups: dict = {}
        for i in chunk_ids:
            groups.setdefault(i if per_chunk else chunks.server(i), []).append(i)
            sp.unsent.discard(i)
        for key, ids in sorted(groups.items()):
            s = chunks.server(ids[0])
            arrays, ranges, encs = [], [], []
            for i in ids:
                b, e, _ = chunks.list[i]
                parts = [(None, sp.grads[b:e])] if self.encoder is None else self.encoder.encode(b, e, sp.grads)
                for enc, a in parts:
                    arrays.append(a)
                    ranges.append((b, e))
                    encs.append(enc)
            at = self._to_shared(s, arrays, ranges, encs)
            meta = dict(sp.meta, bytes_pushed=self.stats.bytes_pushed + sum(a.nbytes for a in arrays),
                        bytes_pulled=self.bytes_pulled, bytes_received=self.bytes_received,
                        bytes_sent=self.bytes_sent + (0 if at else sum(a.nbytes for a in arrays)),   # all but its own header
                        **self._shm_meta(s))
            if self.asynchronous:
                meta["base_version"] = self.versions[s]
            meta.update(self.answers.held(ids))
            wire = dict(self.encoder.scheme.parts) if self.encoder else {}
            dtypes = [wire.get(enc) for enc in encs]       # bfloat16 words travel as "bfloat16"
            self.requests.send(s, PUSH, sp.step, answers=ids, arrays=arrays, ranges=ranges, encs=encs,
                                        dtypes=dtypes, at=at, **meta)
            self.stats.bytes_pushed += sum(a.nbytes for a in arrays)       # the arrays, framed or shared
            self.stats.push_messages += 1
            self.stats.shm_pushes += at is not None

    def _to_shared(self, s: int, arrays, ranges, encs):
        """Plain arrays for a server that answers through shared memory: copied into this
        worker's segment where their range lies; their byte offsets (None: a frame)."""
        if self.segment is None or s not in self.requests.shared_with or any(encs):
            return None
        at = []
        for a, (b, e) in zip(arrays, ranges):
            self.segment.array(a.dtype, e - b, b * a.itemsize)[...] = a
            at.append(b * a.itemsize)
        return at

    # --- waits ------------------------------------------------------------------------------
    def _wait(self, cmd: str, step: int, done=None):
        """Read answers into ``params`` until ``done()`` (default: every request answered)."""
        self.requests.wait(cmd, step, self.answers, done)

    def _check_job(self):
        """Raise when the heartbeat thread learned that the job is stopping or the coordinator is
        gone; follow a server that the coordinator says came back at another address."""
        if self.heartbeat is not None and self.heartbeat.error:
            raise RemoteError(f"{self.name}: {self.heartbeat.error}")
        if self.heartbeat is not None and self.heartbeat.servers:
            self.requests.follow(self.heartbeat.servers)
