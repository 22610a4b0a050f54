"""The worker's key-value API to the servers: register, init, pull, push (ps-lite's KVWorker).

The client sees the model only as two flat vectors: it sends ``grads[b:e]`` to the
server that owns ``[b, e)`` and writes the parameters that come back into
``params[b:e]``. Requests to every server leave at once and the client then waits for
all the answers (each request carries an id; a late answer to an old request is
dropped). Every wait has a deadline; when it passes, the error names the servers that
did not answer and their addresses.

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

How the answers are read depends on the consistency model (``--mode``, see
``paramserver/consistency.py``): in bsp and local-sgd every server answers at the same
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

Not here: sockets (``common/transport.py``), bytes (``common/codec.py``), the model.
"""
from __future__ import annotations

import itertools
import logging
import os
import time

from common import codec
from common.cluster import ClusterConfig, JobConfig, host_name
from common.config import to_dict
from common.layout import Layout
from common.protocol import DONE, ERROR, INIT, JOB, OK, PULL, PUSH, REGISTER, ProtocolError
from common.trace import NULL_TRACER
from common.transport import Dealer, Poller
from worker.heartbeat import Heartbeat

log = logging.getLogger("client")


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
        self._model = None                      # (layout, dtype): to register again
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
        self.dropped = 0                        # pushes a server did not apply (backup workers)
        self.wait_s = 0.0                       # seconds spent waiting for answers to push/pull
        self.tracer = NULL_TRACER               # spans: push (send), wait (for every answer), pull (copy in)
        mode = self.job_cfg.mode
        self.asynchronous = mode in ("asp", "ssp")
        self.catch_up = self.job_cfg.backup_workers > 0
        # where a server may hold an answer back (ssp) or wait for a version, its own deadline
        # names the workers it waits for: give it time to say so before ours passes
        self.grace = 0.0 if mode == "bsp" and not self.catch_up else max(2.0, 0.1 * self.timeout)

    @property
    def name(self) -> str:
        return f"{self.role}:{self.rank}"

    # --- the job ------------------------------------------------------------------------
    def register(self, layout: Layout, dtype: str) -> dict:
        """Join the job; returns the coordinator's JOB answer once every process has
        registered. Sets ``self.rank`` (assigned by the coordinator when it was -1)."""
        self._model = (layout, dtype)
        meta = dict(role=self.role, rank=self.rank, host=host_name(), pid=os.getpid(),
                    layout=layout.table(), layout_hash=layout.hash(), dtype=dtype,
                    job=to_dict(self.job_cfg))
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
        self.rank = job["rank"]
        self.session = job.get("session", 0)
        self.joined_at = job.get("version", 0)
        if not self.links:
            self.servers = list(job["servers"])
            self.chunks = [[] for _ in self.servers]
            for b, e, s in job["placement"]:
                self.chunks[s].append((b, e))
            # not the coordinator link's name: server 0 is both, and a name is one connection
            link_id = self.name.encode() + b"/" + self.identity.split(b"/", 1)[1] + b"/data"
            for addr in self.servers:
                link = Dealer(addr, identity=link_id, curve=self.curve)
                self.links.append(link)
                self.poller.add(link)
            self.versions = [0] * len(self.servers)
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

    def rejoin_if_dropped(self) -> bool:
        """If the coordinator dropped this worker (it was silent too long: a stall, a cut
        link), register again under the same rank; True when it did (the caller pulls)."""
        hb = self.heartbeat
        if hb is None or hb.member or hb.error:
            return False
        log.warning("%s was dropped from the job (view %d); registering again", self.name, hb.view)
        self.register(*self._model)
        self.rejoins += 1
        return True

    def done(self):
        """Tell the coordinator this worker has finished (it stops the servers after the last)."""
        if self.asynchronous and len(self.links) > 1:    # ssp: so it stops counting as a live worker
            self._all(DONE, None, step=self.version, servers=range(1, len(self.links)))
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
        self._all(INIT, params, step=0)

    def pull(self, params, servers=None, min_version: int = 0) -> int:
        """params[b:e] = the servers' values for every chunk (of ``servers``: default all),
        once each is at ``min_version`` or later; returns the version."""
        t0 = time.monotonic()
        servers = list(range(len(self.links))) if servers is None else list(servers)
        meta = {"min_version": min_version} if min_version else {}
        replies = self._all(PULL, None, step=self.version, servers=servers, **meta)
        with self.tracer.span("pull", step=self.version):
            self._write_params(replies, params, servers, check=False)
        if not self.asynchronous and len(set(self.versions)) > 1:
            # a server may be one step ahead of another (it finished the step first): wait
            # for the others to reach it, so that the parameters are of one version
            target = max(self.versions)
            behind = [s for s, v in enumerate(self.versions) if v < target]
            replies = self._all(PULL, None, step=self.version, servers=behind, min_version=target)
            self._write_params(replies, params, behind)
        self.wait_s += time.monotonic() - t0
        return self.version

    def push_pull(self, grads, params, step: int, **meta) -> dict:
        """Push ``grads`` for ``step``; each server answers after its update with fresh
        parameters, written into ``params``. Returns server 0's answer meta (it holds the
        step's mean loss over the workers and summed counters under ``stats``; with backup
        workers ``dropped`` is True when this push came too late to count)."""
        t0, waited = time.monotonic(), self.wait_s
        # the counters travel with the push: bytes pushed including this push, bytes pulled
        # until now (server 0 sums them over the workers into the answer's ``stats``)
        self.bytes_pushed += sum(grads[b:e].nbytes for chunks in self.chunks for b, e in chunks)
        meta = dict(meta, bytes_pushed=self.bytes_pushed, bytes_pulled=self.bytes_pulled)
        if self.session:
            meta["session"] = self.session
        per_server = [{"base_version": v} for v in self.versions] if self.asynchronous else None
        replies = self._all(PUSH, grads, step=step, per_server=per_server, **meta)
        self.pushes += 1
        dropped = any(r.meta.get("dropped") for r in replies)
        self.dropped += dropped
        with self.tracer.span("pull", step=step):
            self._write_params(replies, params)
        if self.catch_up and len(set(self.versions)) > 1:
            # a late push can come back from one server after it moved on and from another
            # before: wait for the servers that are behind, so the parameters are one version
            target = max(self.versions)
            self.pull(params, [s for s, v in enumerate(self.versions) if v < target], min_version=target)
        self.wait_s = waited + time.monotonic() - t0
        return dict(replies[0].meta, dropped=dropped)

    def _write_params(self, replies, params, servers=None, check=True):
        servers = range(len(self.links)) if servers is None else servers
        for s, msg in zip(servers, replies):
            for a, r in zip(msg.arrays, msg.ranges):
                if r is None or r[1] > params.shape[0] or a.size != r[1] - r[0]:
                    raise ProtocolError(f"server {s} sent parameters for a bad range {r}")
                params[r[0]:r[1]] = a
                self.bytes_pulled += a.nbytes
            self.versions[s] = msg.meta.get("version")
        if check and len(set(self.versions)) != 1 and not (self.asynchronous or self.catch_up):
            raise RemoteError(f"servers are at different versions {sorted(set(self.versions))}")
        self.version = min(self.versions)

    # --- request/reply plumbing ---------------------------------------------------------
    def _all(self, cmd, vector, step: int, servers=None, per_server=None, **meta) -> list:
        """Send ``cmd`` to every server (or to ``servers``), with its chunks of ``vector``
        if given and ``per_server[s]`` added to the meta, and wait for every answer;
        returns the answers in the order of ``servers``."""
        servers = list(range(len(self.links))) if servers is None else list(servers)
        rids, outbox = {}, {}
        lost = {s: self.links[s].connections()[1] for s in servers}    # read before the sends (a resend
        t_send = self.tracer.now()                                      # compares with it), not between them
        for i, s in enumerate(servers):
            arrays = [vector[b:e] for b, e in self.chunks[s]] if vector is not None else []
            ranges = list(self.chunks[s]) if vector is not None else None
            rid = next(self._rid)
            rids[rid] = (i, s)
            extra = dict(meta, **per_server[s]) if per_server else meta
            frames = codec.encode(cmd, self.name, step=step, rid=rid, arrays=arrays, ranges=ranges, **extra)
            self.links[s].send(frames)
            outbox[rid] = [frames, lost[s], time.monotonic()]
        t_wait = self.tracer.now()
        self.tracer.add(cmd, t_send, t_wait, step=step)
        replies: list = [None] * len(servers)
        deadline = time.monotonic() + self.timeout + self.grace
        while rids:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(f"server {s} at {self.servers[s]} ({self.links[s].diagnose()})"
                                    for _, s in sorted(rids.values()))
                raise DeadlineError(f"{self.name}: no answer to {cmd} (step {step}) within "
                                    f"{self.timeout + self.grace:.0f} s from {missing}; is it running? "
                                    "see its log")
            self._check_job()
            for rid, (_, s) in rids.items():              # a refused handshake never answers
                why = self.links[s].refused()
                if why:
                    raise RemoteError(f"{self.name}: cannot talk to server {s} at {self.servers[s]}: {why}")
                self._maybe_resend(self.links[s], outbox[rid], f"{cmd} (step {step}) to server {s}")
            for link in self.poller.poll(min(left, 0.5) * 1000):
                while link.poll(0):
                    msg = self._decode(link.recv(), link.endpoint)
                    if msg is None or msg.rid not in rids:
                        continue
                    i, s = rids.pop(msg.rid)
                    if msg.cmd == ERROR:
                        raise RemoteError(f"server {s} at {self.servers[s]} refused {cmd}: {msg.meta['message']}")
                    replies[i] = msg
        self.tracer.add("wait", t_wait, self.tracer.now(), step=step)
        return replies

    def _check_job(self):
        """Raise when the heartbeat thread learned that the job is stopping or the coordinator is gone."""
        if self.heartbeat is not None and self.heartbeat.error:
            raise RemoteError(f"{self.name}: {self.heartbeat.error}")

    def _maybe_resend(self, sock, entry, what, periodic=True):
        """``entry`` = [frames, disconnects when sent, when sent]: send the very same message
        again when the connection was lost since (it may have been lost with it), or (if
        ``periodic``) when it waited ``resend_s``; the server answers a repeat without
        applying it twice."""
        frames, lost_before, when = entry
        lost_now = sock.connections()[1]
        if lost_now > lost_before or (periodic and time.monotonic() - when > self.resend_s):
            log.info("%s: sending %s again (%s)", self.name, what,
                     "its connection was lost" if lost_now > lost_before else f"no answer for {self.resend_s:.0f} s")
            sock.send(frames)
            entry[1:] = [lost_now, time.monotonic()]
            self.resends += 1

    def _wait_one(self, sock, rid, who, what, timeout=None, resend=None):
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        entry = [resend, sock.connections()[1], time.monotonic()] if resend is not None else None
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

    def _decode(self, frames, who):
        try:
            return codec.decode(frames)
        except ProtocolError as e:
            log.warning("dropped a malformed answer from %s: %s", who, e)
            return None
