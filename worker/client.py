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
        self.coord = Dealer(cluster.coordinator, curve=self.curve)
        self.links: list[Dealer] = []           # one per server, in server rank order
        self.servers: list[str] = []
        self.chunks: list[list[tuple[int, int]]] = []   # per server: the ranges it owns
        self.poller = Poller()
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.version = 0                        # the (lowest) version of the parameters held
        self.versions: list[int] = []           # per server: the version of its last answer
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
        meta = dict(role=self.role, rank=self.rank, host=host_name(), pid=os.getpid(),
                    layout=layout.table(), layout_hash=layout.hash(), dtype=dtype,
                    job=to_dict(self.job_cfg))
        rid = next(self._rid)
        self.coord.send(codec.encode(REGISTER, self.name if self.rank >= 0 else f"{self.role}:?",
                                     rid=rid, **meta))
        # wait a little longer than the coordinator does: when registration times out there,
        # the coordinator's answer names who is missing, which this side cannot know
        grace = max(5.0, 0.25 * self.timeout)
        msg = self._wait_one(self.coord, rid, f"the coordinator at {self.coord.endpoint}",
                             "registration (are all the servers and workers of the job started?)",
                             timeout=self.timeout + grace)
        if msg.cmd != JOB:
            raise RemoteError(f"the coordinator answered {msg.cmd} to registration")
        job = msg.meta
        if job["layout_hash"] != layout.hash():
            raise RemoteError(f"the job's layout hash {job['layout_hash']} differs from ours {layout.hash()}")
        self.rank = job["rank"]
        self.servers = list(job["servers"])
        self.chunks = [[] for _ in self.servers]
        for b, e, s in job["placement"]:
            self.chunks[s].append((b, e))
        for addr in self.servers:
            link = Dealer(addr, curve=self.curve)
            self.links.append(link)
            self.poller.add(link)
        self.versions = [0] * len(self.servers)
        log.info("registered as %s; servers %s", self.name, ", ".join(self.servers))
        return job

    def done(self):
        """Tell the coordinator this worker has finished (it stops the servers after the last)."""
        if self.asynchronous and len(self.links) > 1:    # ssp: so it stops counting as a live worker
            self._all(DONE, None, step=self.version, servers=range(1, len(self.links)))
        rid = next(self._rid)
        self.coord.send(codec.encode(DONE, self.name, rid=rid))
        self._wait_one(self.coord, rid, f"the coordinator at {self.coord.endpoint}", "done")

    def close(self):
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
            self._write_params(replies, params, servers)
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

    def _write_params(self, replies, params, servers=None):
        servers = range(len(self.links)) if servers is None else servers
        for s, msg in zip(servers, replies):
            for a, r in zip(msg.arrays, msg.ranges):
                if r is None or r[1] > params.shape[0] or a.size != r[1] - r[0]:
                    raise ProtocolError(f"server {s} sent parameters for a bad range {r}")
                params[r[0]:r[1]] = a
                self.bytes_pulled += a.nbytes
            self.versions[s] = msg.meta.get("version")
        if len(set(self.versions)) != 1 and not (self.asynchronous or self.catch_up):
            raise RemoteError(f"servers are at different versions {sorted(set(self.versions))}")
        self.version = min(self.versions)

    # --- request/reply plumbing ---------------------------------------------------------
    def _all(self, cmd, vector, step: int, servers=None, per_server=None, **meta) -> list:
        """Send ``cmd`` to every server (or to ``servers``), with its chunks of ``vector``
        if given and ``per_server[s]`` added to the meta, and wait for every answer;
        returns the answers in the order of ``servers``."""
        servers = list(range(len(self.links))) if servers is None else list(servers)
        rids = {}
        t_send = self.tracer.now()
        for i, s in enumerate(servers):
            arrays = [vector[b:e] for b, e in self.chunks[s]] if vector is not None else []
            ranges = list(self.chunks[s]) if vector is not None else None
            rid = next(self._rid)
            rids[rid] = (i, s)
            extra = dict(meta, **per_server[s]) if per_server else meta
            self.links[s].send(codec.encode(cmd, self.name, step=step, rid=rid, arrays=arrays, ranges=ranges,
                                            **extra))
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
            for _, s in rids.values():                    # a refused handshake never answers
                why = self.links[s].refused()
                if why:
                    raise RemoteError(f"{self.name}: cannot talk to server {s} at {self.servers[s]}: {why}")
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

    def _wait_one(self, sock, rid, who, what, timeout=None):
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineError(f"{self.name}: {who} has not answered {what} within "
                                    f"{timeout:.0f} s ({sock.diagnose()}); is it running?")
            why = sock.refused()                          # a refused handshake never answers
            if why:
                raise RemoteError(f"{self.name}: cannot talk to {who}: {why}")
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
