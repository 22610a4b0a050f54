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
bytes a message), so that a push can carry the count including itself.

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

import itertools
import logging
import os
import time
from dataclasses import dataclass

from common.wire import codec
from common.cluster import ClusterConfig, JobConfig, host_name
from common.wire.compress import PushEncoder, make_scheme
from common.config import to_dict
from common.layout import Layout, merge_ranges
from common.wire.protocol import DONE, ERROR, INIT, JOB, OK, PULL, PUSH, REGISTER, ProtocolError
from common.trace import NULL_TRACER
from common.wire.transport import Dealer, Poller, reachable_locally
from worker.heartbeat import Heartbeat

log = logging.getLogger("client")


@dataclass
class _Request:
    """A request waiting for its answer."""
    server: int
    cmd: str
    step: int
    answers: list          # indices of the chunks whose parameters the answer brings
    frames: list           # the message as sent: sent again, unchanged, after a lost connection
    lost: int              # the link's lost connections when it was last sent
    sent: float            # when it was last sent (monotonic)


class RemoteError(RuntimeError):
    """A server refused a request; the text says which server and why."""


class DeadlineError(TimeoutError):
    """A wait passed its deadline; the text names who did not answer."""


class PSClient:
    def __init__(self, cluster: ClusterConfig, job: JobConfig | None = None, role: str = "worker"):
        self.cluster = cluster
        self.job_cfg = job or JobConfig()
        self.role = role
        self.rank = cluster.rank
        self.timeout = cluster.timeout
        self._rid = itertools.count(1)
        self.curve = cluster.curve_keys()       # None without --curve
        # one name per process, kept across reconnects (a server answers the reconnected socket)
        self.identity = f"{role}:{self.rank}/{os.getpid()}/{id(self):x}".encode()
        self.coord = Dealer(cluster.coordinator, identity=self.identity, curve=self.curve)
        self.session = 0                        # this process's incarnation, from the coordinator
        self.joined_at = 0                      # the version the job was at when this worker joined it
        self.heartbeat: Heartbeat | None = None
        self.resends = 0                        # requests sent again after a lost connection
        self.rejoins = 0                        # registrations after being dropped
        self._model = None                      # (layout, dtype, tokenizer): to register again
        self.links: list[Dealer] = []           # one per server, in server rank order
        self.servers: list[str] = []
        self.chunks: list[list[tuple[int, int]]] = []   # per server: the ranges it owns
        self.poller = Poller()
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.version = 0                        # the (lowest) version of the parameters held
        self.versions: list[int] = []           # per server: the version of its last answer
        self.resend_s = max(5.0, self.timeout / 3)   # also resend what waited this long (a safety net)
        self.pushes = 0
        self.push_messages = 0                  # PUSH messages sent (overlap: several per server and step)
        self.dropped = 0                        # pushes a server did not apply (backup workers)
        self.wait_s = 0.0                       # seconds spent waiting for answers to push/pull
        self.tracer = NULL_TRACER               # spans: push (send), wait (for every answer), pull (copy in)
        mode = self.job_cfg.mode
        self.asynchronous = mode in ("asp", "ssp")
        self.catch_up = self.job_cfg.backup_workers > 0
        self.chunkwise = mode == "bsp" and not self.catch_up    # a step's chunks may leave one by one
        self.encoder: PushEncoder | None = None  # --compress: the scheme and the error-feedback residual
        self._chunk_list: list[tuple[int, int, int]] = []     # (begin, end, server) of every chunk, by offset
        self._index: dict[tuple[int, int], int] = {}          # (begin, end) -> index in _chunk_list
        self._out: dict[int, _Request] = {}     # rid -> request waiting for its answer
        self._step = None                       # the step whose push is in progress (begin_push .. end_step)
        self._grads = self._params = None
        self._meta: dict = {}
        self._unsent: set = set()               # chunks of the step not pushed yet
        self._final: list = []                  # ranges whose gradients are final (push_final)
        self._fresh: set = set()                # chunks whose answer (new parameters) is in
        self._answers: dict = {}                # server -> its answers' meta, merged
        self._parsed = (None, None)             # (frame 0, its header) of the answer being received
        # where a server may hold an answer back (ssp) or wait for a version, its own deadline
        # names the workers it waits for: give it time to say so before ours passes
        self.grace = 0.0 if mode == "bsp" and not self.catch_up else max(2.0, 0.1 * self.timeout)

    @property
    def name(self) -> str:
        return f"{self.role}:{self.rank}"

    # --- the job ------------------------------------------------------------------------
    def register(self, layout: Layout, dtype: str, tokenizer: str = "") -> dict:
        """Join the job; returns the coordinator's JOB answer once every process has
        registered. Sets ``self.rank`` (assigned by the coordinator when it was -1).
        ``tokenizer``: the sha256 of this worker's tokenizer, checked like the layout."""
        self._model = (layout, dtype, tokenizer)
        meta = dict(role=self.role, rank=self.rank, host=host_name(), pid=os.getpid(),
                    layout=layout.table(), layout_hash=layout.hash(), dtype=dtype,
                    job=to_dict(self.job_cfg), **({"tokenizer": tokenizer} if tokenizer else {}))
        rid = next(self._rid)
        frames = codec.encode(REGISTER, self.name if self.rank >= 0 else f"{self.role}:?", rid=rid, **meta)
        self.coord.send(frames)
        # wait a little longer than the coordinator does: when registration times out there,
        # the coordinator's answer names who is missing, which this side cannot know
        grace = max(5.0, 0.25 * self.timeout)
        msg = self._wait_one(self.coord, rid, f"the coordinator at {self.coord.endpoint}",
                             "registration (are all the servers and workers of the job started?)",
                             timeout=self.timeout + grace, resend=frames)
        if msg.cmd != JOB:
            raise RemoteError(f"the coordinator answered {msg.cmd} to registration")
        job = msg.meta
        if job["layout_hash"] != layout.hash():
            raise RemoteError(f"the job's layout hash {job['layout_hash']} differs from ours {layout.hash()}")
        if job.get("tokenizer", "") != tokenizer:
            raise RemoteError(f"the job's tokenizer {job.get('tokenizer', '')[:12]} differs from ours {tokenizer[:12]}")
        self.rank = job["rank"]
        self.session = job.get("session", 0)
        self.joined_at = job.get("version", 0)
        if not self.links:                      # (a worker registering again keeps its links)
            self._connect(job, layout, dtype)
        c = self.cluster
        if c.heartbeat > 0 and self.role == "worker":
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.heartbeat = Heartbeat(self, c.heartbeat, c.silence_s, c.timeout)
            self.heartbeat.start()
        log.info("%s as %s (session %d)%s; servers %s", "joined the running job" if job.get("rejoin") else "registered",
                 self.name, self.session, f" at version {self.joined_at}" if self.joined_at else "",
                 ", ".join(self.servers))
        return job

    def _connect(self, job: dict, layout: Layout, dtype: str):
        """The job's chunks, the compression scheme, and one link per server."""
        self.servers = list(job["servers"])
        self.chunks = [[] for _ in self.servers]
        for b, e, s in job["placement"]:
            self.chunks[s].append((b, e))
        self._chunk_list = sorted((b, e, s) for b, e, s in job["placement"])
        self._index = {(b, e): i for i, (b, e, _) in enumerate(self._chunk_list)}
        jc = self.job_cfg
        scheme = make_scheme(jc.compress, jc.compress_ratio, jc.error_feedback == "on")
        if scheme is not None:                  # the residual lives here: one per worker, whole vector
            self.encoder = PushEncoder(scheme, layout.size, dtype, jc.error_feedback == "on",
                                       seed=[1, self.rank], momentum=jc.compress_momentum)
        # not the coordinator link's name: server 0 is both, and a name is one connection
        link_id = self.name.encode() + b"/" + self.identity.split(b"/", 1)[1] + b"/data"
        ipc = job.get("ipc") or [""] * len(self.servers)
        for addr, near in zip(self.servers, ipc):
            # a server of this host is reached through its Unix socket (cluster.ipc): no TCP stack
            link = Dealer(near if self.cluster.ipc and reachable_locally(near) else addr,
                          identity=link_id, curve=self.curve)
            self.links.append(link)
            self.poller.add(link)
        self.versions = [0] * len(self.servers)

    def rejoin_if_dropped(self) -> bool:
        """If the coordinator dropped this worker (it was silent too long: a stall, a cut
        link), register again under the same rank; True when it did (the caller pulls)."""
        hb = self.heartbeat
        if hb is None or hb.member or hb.error:
            return False
        log.warning("%s was dropped from the job (view %d); registering again", self.name, hb.view)
        if self.in_step:                        # overlap: the answers of the step out (dropped ones)
            self.end_step(one_version=False)
        self.register(*self._model)
        self.rejoins += 1
        return True

    def done(self):
        """Tell the coordinator this worker has finished (it stops the servers after the last)."""
        if self.asynchronous and len(self.links) > 1:    # ssp: so it stops counting as a live worker
            for s in range(1, len(self.links)):
                self._send(s, DONE, self.version)
            self._wait(DONE, self.version)
        rid = next(self._rid)
        frames = codec.encode(DONE, self.name, rid=rid)
        self.coord.send(frames)
        self._wait_one(self.coord, rid, f"the coordinator at {self.coord.endpoint}", "done", resend=frames)
        if self.heartbeat is not None:
            self.heartbeat.stop()

    def close(self):
        if self.heartbeat is not None:
            self.heartbeat.stop()
        for s in [self.coord, *self.links]:
            s.close()

    # --- parameters and gradients ---------------------------------------------------------
    def init(self, params):
        """Worker 0: give every server its chunks of the initial parameters."""
        for s in range(len(self.links)):
            self._send(s, INIT, 0, [params[b:e] for b, e in self.chunks[s]], list(self.chunks[s]))
        self._wait(INIT, 0)

    def pull(self, params, servers=None, min_version: int = 0) -> int:
        """params[b:e] = the servers' values for every chunk (of ``servers``: default all),
        once each is at ``min_version`` or later; returns the version."""
        t0 = time.monotonic()
        servers = list(range(len(self.links))) if servers is None else list(servers)
        meta = {"min_version": min_version} if min_version else {}
        self._params = params
        for s in servers:
            self._send(s, PULL, self.version, answers=[self._index[c] for c in self.chunks[s]], **meta)
        self._wait(PULL, self.version)
        if not self.asynchronous and len(set(self.versions)) > 1:
            # a server may be one step ahead of another (it finished the step first): wait
            # for the others to reach it, so that the parameters are of one version
            target = max(self.versions)
            for s in [s for s, v in enumerate(self.versions) if v < target]:
                self._send(s, PULL, self.version, answers=[self._index[c] for c in self.chunks[s]],
                           min_version=target)
            self._wait(PULL, self.version)
        self._check_versions()
        self.wait_s += time.monotonic() - t0
        return self.version

    def push_pull(self, grads, params, step: int, **meta) -> dict:
        """Push ``grads`` for ``step``; each server answers after its update with fresh
        parameters, written into ``params``. Returns server 0's answer meta (it holds the
        step's mean loss over the workers and summed counters under ``stats``; with backup
        workers ``dropped`` is True when this push came too late to count)."""
        t0, waited = time.monotonic(), self.wait_s
        self.begin_push(grads, params, step, **meta)
        self.push_rest()
        reply = self.end_step()
        self.wait_s = waited + time.monotonic() - t0
        return reply

    # --- a step's push, chunk by chunk ------------------------------------------------------
    def begin_push(self, grads, params, step: int, **meta):
        """Start the push of ``step``: ``meta`` travels with it (loss, tokens...). The
        answers of the previous step must be in (``end_step``)."""
        if self._step is not None:
            raise RuntimeError(f"{self.name}: the answers of step {self._step} are not in; call end_step() first")
        if self.session:
            meta = dict(meta, session=self.session)
        self._step, self._grads, self._params, self._meta = step, grads, params, meta
        self._unsent = set(range(len(self._chunk_list)))
        self._final, self._fresh, self._answers = [], set(), {}

    def push_final(self, begin: int, end: int):
        """The gradients in ``[begin, end)`` are final: push every chunk that is now wholly
        final (plain BSP; elsewhere a push carries a server's chunks together, at the end).
        Answers that came in meanwhile are read on the way (their parameters are written)."""
        if self._step is None or not self.chunkwise:
            return
        self._final = merge_ranges(self._final + [(begin, end)])
        ready = [i for i in self._unsent
                 if any(b <= self._chunk_list[i][0] and self._chunk_list[i][1] <= e for b, e in self._final)]
        self._push(ready)
        self._receive_ready(0)

    def push_rest(self):
        """Push every chunk not pushed yet."""
        if self._step is not None:
            self._push(sorted(self._unsent))

    def wait_params(self, begin: int, end: int):
        """Return once ``params[begin:end]`` holds this step's answers (at once when no
        step is in progress): the next forward calls this before each layer."""
        if self._step is None or self._unsent:
            return
        need = [i for i, (b, e, _) in enumerate(self._chunk_list) if b < end and begin < e]
        if any(i not in self._fresh for i in need):
            t0 = time.monotonic()
            self._wait(PUSH, self._step, lambda: all(i in self._fresh for i in need))
            self.wait_s += time.monotonic() - t0

    def end_step(self, one_version: bool = True) -> dict:
        """Wait for every answer of the step; returns server 0's answer meta (see
        ``push_pull``). A no-op ({}) when no step is in progress. ``one_version=False``: the
        answers need not bring one version (a step this worker was dropped from: the servers
        answer as each moves on, and the pull after its rejoin brings one version)."""
        if self._step is None:
            return {}
        step, t0 = self._step, time.monotonic()
        self.push_rest()
        self._wait(PUSH, step)
        self.wait_s += time.monotonic() - t0
        self._step = None
        self.pushes += 1
        dropped = any(a.get("dropped") for a in self._answers.values())
        self.dropped += dropped
        if not one_version:
            return dict(self._answers.get(0, {}), dropped=dropped)
        self._check_versions()
        if self.catch_up and len(set(self.versions)) > 1:
            # a late push can come back from one server after it moved on and from another
            # before: wait for the servers that are behind, so the parameters are one version
            target = max(self.versions)
            self.pull(self._params, [s for s, v in enumerate(self.versions) if v < target], min_version=target)
        return dict(self._answers.get(0, {}), dropped=dropped)

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def _push(self, chunk_ids):
        """PUSH the given chunks (compressed if the job says so): in plain BSP one message per
        chunk, so that a server averages, updates and answers one chunk while the next is
        still on the wire (a pipeline); elsewhere one message per server, all its chunks."""
        groups: dict = {}
        for i in chunk_ids:
            groups.setdefault(i if self.chunkwise else self._chunk_list[i][2], []).append(i)
            self._unsent.discard(i)
        g = self._grads
        for key, ids in sorted(groups.items()):
            s = self._chunk_list[ids[0]][2]
            arrays, ranges, encs = [], [], []
            for i in ids:
                b, e, _ = self._chunk_list[i]
                parts = [(None, g[b:e])] if self.encoder is None else self.encoder.encode(b, e, g)
                for enc, a in parts:
                    arrays.append(a)
                    ranges.append((b, e))
                    encs.append(enc)
            meta = dict(self._meta, bytes_pushed=self.bytes_pushed + sum(a.nbytes for a in arrays),
                        bytes_pulled=self.bytes_pulled)
            if self.asynchronous:
                meta["base_version"] = self.versions[s]
            wire = dict(self.encoder.scheme.parts) if self.encoder else {}
            dtypes = [wire.get(enc) for enc in encs]       # bfloat16 words travel as "bfloat16"
            self._send(s, PUSH, self._step, arrays, ranges, encs, dtypes, answers=ids, **meta)

    # --- request/reply plumbing ---------------------------------------------------------
    def _send(self, s: int, cmd: str, step: int, arrays=(), ranges=None, encs=None, dtypes=None,
              answers=(), **meta):
        """Send one request to server ``s``; its answer will bring the parameters of the
        chunks ``answers`` (indices into the job's chunk list)."""
        rid = next(self._rid)
        t = self.tracer.now()
        frames = codec.encode(cmd, self.name, step=step, rid=rid, arrays=arrays, ranges=ranges, encs=encs,
                              dtypes=dtypes, **meta)
        lost = self.links[s].connections()[1]     # read before the send (a resend compares with it)
        self.links[s].send(frames)
        if cmd == PUSH:
            self.bytes_pushed += codec.frames_nbytes(frames[1:])     # the arrays (frame 0: the header)
            self.push_messages += 1
        self._out[rid] = _Request(s, cmd, step, list(answers), frames, lost, time.monotonic())
        self.tracer.add(cmd, t, self.tracer.now(), step=step)

    def _wait(self, cmd: str, step: int, done=None):
        """Read answers until ``done()`` (default: no request outstanding), within the deadline."""
        done = done or (lambda: not self._out)
        if done():
            return
        t_wait = self.tracer.now()
        deadline = time.monotonic() + self.timeout + self.grace
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                servers = sorted({r.server for r in self._out.values()})
                missing = ", ".join(f"server {s} at {self.servers[s]} ({self.links[s].diagnose()})" for s in servers)
                raise DeadlineError(f"{self.name}: no answer to {cmd} (step {step}) within "
                                    f"{self.timeout + self.grace:.0f} s from {missing}; is it running? "
                                    "see its log")
            self._check_job()
            for s in sorted({r.server for r in self._out.values()}):   # a refused handshake never answers
                why = self.links[s].refused()
                if why:
                    raise RemoteError(f"{self.name}: cannot talk to server {s} at {self.servers[s]}: {why}")
            for req in list(self._out.values()):
                self._maybe_resend(self.links[req.server], req, f"{req.cmd} (step {req.step}) to server {req.server}")
            self._receive_ready(min(left, 0.5) * 1000)
        self.tracer.add("wait", t_wait, self.tracer.now(), step=step)

    def _receive_ready(self, timeout_ms: float):
        """Read every answer waiting (after up to ``timeout_ms`` for the first)."""
        for link in self.poller.poll(timeout_ms):
            while link.poll(0):
                t = self.tracer.now()
                frames, placed = link.recv_placed(self._place)
                nbytes = codec.frames_nbytes(frames[1:])             # the arrays (frame 0: the header)
                msg = self._decode(frames, link.endpoint, placed)
                if msg is None or msg.rid not in self._out:
                    continue
                req = self._out.pop(msg.rid)
                if msg.cmd == ERROR:
                    raise RemoteError(f"server {req.server} at {self.servers[req.server]} refused {req.cmd}: "
                                      f"{msg.meta['message']}")
                self._on_answer(req, msg)
                if req.cmd in (PUSH, PULL):     # "pull": reading an answer's parameters into params
                    self.bytes_pulled += nbytes
                    self.tracer.add("pull", t, self.tracer.now(), step=req.step)

    def _place(self, head):
        """Where the arrays of an answer go: straight into ``params`` when the answer is to
        one of our requests and brings exactly the chunks that request asked for."""
        try:
            h = codec.parse_header(head)
        except ProtocolError:
            return None
        self._parsed = (head, h)                  # decoded with it: the header is parsed once
        req, params = self._out.get(h["rid"]), self._params
        if h["cmd"] != OK or req is None or params is None:
            return None
        want = {self._chunk_list[i][:2] for i in req.answers}
        dests = []
        for d in h["arrays"]:
            r = tuple(d.get("range") or ())
            ok = r in want and "enc" not in d and d["dtype"] == params.dtype.name and d["shape"] == [r[1] - r[0]]
            dests.append(memoryview(params[r[0]:r[1]]).cast("B") if ok else None)
        return dests

    def _on_answer(self, req, msg):
        """An OK answer: its parameters into ``params`` (unless already placed there), its
        chunks marked fresh, the server's version and meta recorded."""
        s = req.server
        if req.cmd in (PUSH, PULL):
            want = {self._chunk_list[i][:2]: i for i in req.answers}
            for a, r, placed in zip(msg.arrays, msg.ranges, msg.placed):
                if r not in want or a.ndim != 1:
                    raise ProtocolError(f"server {s} sent parameters for a range {r} it was not asked for")
                if not placed:
                    self._params[r[0]:r[1]] = a
                self._fresh.add(want[r])
            self.versions[s] = msg.meta.get("version", self.versions[s])
            self._answers[s] = dict(self._answers.get(s, {}), **msg.meta)

    def _check_versions(self):
        if len(set(self.versions)) != 1 and not (self.asynchronous or self.catch_up):
            raise RemoteError(f"servers are at different versions {sorted(set(self.versions))}")
        self.version = min(self.versions)

    def _check_job(self):
        """Raise when the heartbeat thread learned that the job is stopping or the coordinator is gone."""
        if self.heartbeat is not None and self.heartbeat.error:
            raise RemoteError(f"{self.name}: {self.heartbeat.error}")

    def _maybe_resend(self, sock, req: _Request, what, periodic=True):
        """Send ``req``'s very same message again when the connection was lost since it was
        sent (it may have been lost with it), or (if ``periodic``) when it waited
        ``resend_s``; the server answers a repeat without applying it twice."""
        lost_now = sock.connections()[1]
        if lost_now > req.lost or (periodic and time.monotonic() - req.sent > self.resend_s):
            log.info("%s: sending %s again (%s)", self.name, what,
                     "its connection was lost" if lost_now > req.lost else f"no answer for {self.resend_s:.0f} s")
            sock.send(req.frames)
            req.lost, req.sent = lost_now, time.monotonic()
            self.resends += 1

    def _wait_one(self, sock, rid, who, what, timeout=None, resend=None):
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        entry = (_Request(-1, what, 0, [], resend, sock.connections()[1], time.monotonic())
                 if resend is not None else None)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineError(f"{self.name}: {who} has not answered {what} within "
                                    f"{timeout:.0f} s ({sock.diagnose()}); is it running?")
            why = sock.refused()                          # a refused handshake never answers
            if why:
                raise RemoteError(f"{self.name}: cannot talk to {who}: {why}")
            self._check_job()
            if entry is not None:                         # registration: only after a lost connection
                self._maybe_resend(sock, entry, what.split(" ")[0], periodic=not what.startswith("registration"))
            if sock.poll(min(left, 0.5) * 1000):
                msg = self._decode(sock.recv(), who)
                if msg is None or msg.rid not in (rid, 0):
                    continue
                if msg.cmd == ERROR:
                    raise RemoteError(f"{who} refused {what.split(' ')[0]}: {msg.meta['message']}")
                return msg

    def _decode(self, frames, who, placed=None):
        head, header = self._parsed
        self._parsed = (None, None)
        try:
            return codec.decode(frames, header=header if frames and frames[0] is head else None, placed=placed)
        except ProtocolError as e:
            log.warning("dropped a malformed answer from %s: %s", who, e)
            return None
