"""The server process: one poll loop that registers, serves pulls and pushes, and stops.

Shape of the loop (the ZeroMQ guide's): poll the sockets with a timeout no longer than
the nearest deadline, handle every waiting message, send a heartbeat when one is due,
then check the deadlines. A message is decoded and validated before any handler sees
it; a bad one is refused with an ERROR reply and a log line, counted (``refused``, in
STATUS and in ``server-S.json``), and the server's state is left as it was.

How a push becomes an update depends on the consistency model (``--mode``):
bsp and local-sgd run synchronous steps (``steps.py``: every worker of the view
pushes, the servers agree on the set of workers, average, step, answer); asp and ssp
apply each push as it arrives (``modes.AsyncServing``), and ssp holds an answer
back while its worker is too far ahead. Server 0 is also the coordinator
(``coordinator.py``): it registers every process, watches the heartbeats, changes the
view when a worker dies or joins, and shuts the servers down when every worker is
done.
Replies are sent without a copy: in BSP the parameters cannot change before every
answer has left (the next update needs every worker's next push, which needs its
answer); in the other modes an update can come first, so answers are sent from a
per-version copy (``Shard.param_snapshot``). With ``out``, the server writes what the
consistency model cost (staleness, dropped pushes, updates/s) and what it refused and
survived to ``server-S.json``.

Failures (docs/failures.md): every push carries the worker's session and request id,
and a resent one is applied at most once (``dedupe.py``); the server writes a
checkpoint (``shard_checkpoint.py``) every ``--checkpoint-every`` versions and when it stops;
a server restarted with ``--resume`` binds its old address, registers again, loads the
checkpoint of the version the coordinator names, and goes on.

The server is cut in three: this module (the loop, dispatch and request handlers),
``joining.py`` (address, registration, the JOB answer, checkpoints) and ``failure_handling.py``
(signals, heartbeats, views, stopping with an error), joined as mixins.

Not here: what a message looks like (``common/wire/protocol.py``, ``common/wire/codec.py``),
sockets (``common/wire/transport.py``), the optimizer (``common/optim.py``).
"""
from __future__ import annotations

import logging
import os
import time

from common.wire import codec
from common.wire.compress import make_scheme
from common.cluster import ClusterConfig, JobConfig, advertised_endpoint, host_name
from common.config import to_dict
from common.layout import Layout
from common.optim import OptimConfig
from common.placement import place_chunks
from common.wire.protocol import (
    BARRIER, DONE, ERROR, HEARTBEAT, INIT, NORM, OK, PULL, PUSH, REGISTER, SHUTDOWN, STATUS, VIEW, ProtocolError,
)
from common.trace import NULL_TRACER
from common.wire.transport import Dealer, Poller, Router, local_endpoint
from paramserver import shard_checkpoint as checkpoint
from paramserver.shard_checkpoint import DurabilityConfig
from paramserver.modes import AsyncRule, AsyncServing, Recorder, make_rule
from paramserver.coordinator import Coordinator
from paramserver.dedupe import Applied
from paramserver.failure_handling import FailureHandling, ServerError
from paramserver.joining import Joining
from paramserver.shard import Shard
from paramserver.steps import SyncServing
from paramserver.traffic import Traffic, frames_nbytes

log = logging.getLogger("server")



def parse_sender(sender: str, role: str, count: int) -> int:
    """The rank in a header's ``from`` field ``role:rank``, checked against ``count``."""
    r, _, k = sender.partition(":")
    if r != role or not k.isdigit() or int(k) >= count:
        raise ProtocolError(f"expected a sender '{role}:<0..{count - 1}>', got {sender!r}")
    return int(k)


class Server(Joining, FailureHandling):
    error_type = ServerError

    def __init__(self, cluster: ClusterConfig, optim: OptimConfig, job: JobConfig, rank: int, out: str = "",
                 durability: DurabilityConfig | None = None):
        if not 0 <= rank < cluster.num_servers:
            raise ValueError(f"server rank {rank} out of range for {cluster.num_servers} server(s)")
        job.check_workers(cluster.num_workers)
        if job.compress_momentum and optim.optimizer != "sgd":
            raise ValueError(f"--compress-momentum {job.compress_momentum} applies momentum on the workers: run "
                             f"the servers with --optimizer sgd, not {optim.optimizer}")
        self.cluster, self.optim, self.job, self.rank = cluster, optim, job, rank
        self.out = out                            # folder for server-S.json ('' = none)
        self.name = f"server:{rank}"
        self.durability = durability or DurabilityConfig()
        self.checkpoints = self.durability.folder(out)            # '' = no checkpoints
        self.resumable = checkpoint.versions(self.checkpoints, rank) if self.durability.resume else []
        self.curve = cluster.curve_keys()             # None without --curve
        self.router = Router(self._bind_address(), curve=self.curve)
        self.addr = advertised_endpoint(cluster, self.router.endpoint)
        # a server advertised on 127.0.0.1 also listens on a Unix socket (processes of its host use it)
        self.ipc = local_endpoint(self.addr, host_name()) if cluster.ipc else ""
        if self.ipc and not self.router.bind_also(self.ipc):
            self.ipc = ""
        self.poller = Poller([self.router])
        self.identity = f"{self.name}/{os.getpid()}".encode()    # kept across reconnects (ROUTER_HANDOVER)
        self.coord = None if rank == 0 else Dealer(cluster.coordinator, identity=self.identity, curve=self.curve)
        if self.coord:
            self.poller.add(self.coord)
        self.coordinator = Coordinator(self, to_dict(optim), to_dict(job)) if rank == 0 else None
        self.members = self.coordinator.members if self.coordinator else None
        self.shard: Shard | None = None
        self.num_workers = cluster.num_workers
        self.peers: dict[int, Dealer] = {}        # other servers, for the step agreement (NORM)
        self.server_addrs: list[str] = []
        self.view: dict[int, int] = {}            # live worker rank -> session: whom the steps wait for
        self.view_number = 0
        self.session = 0                          # this process's incarnation, from the coordinator
        self.applied = Applied()                  # exactly once: the last push applied per worker
        self.resumed_at: int | None = None        # the version this server came back at (into a running job)
        self.deferred_pulls: list[tuple] = []     # (identity, rid, since) of pulls before init
        self.stopping = False
        self.failure = ""                         # why this server stops with an error (answers get it)
        self.refused = 0                          # messages refused at the door
        self.started = time.monotonic()
        self.last_beat = 0.0                      # when this server last sent a heartbeat (s > 0)
        self.coord_heard = time.monotonic()       # when the coordinator last answered one
        self.checkpoints_written = 0
        self.checkpoint_s = 0.0                   # time spent writing them (lesson 7: the cost C of a save)
        self.busy = 0                             # > 0 while state changes: a TERM waits for the end of it
        self.interrupted = 0
        self.rule = make_rule(job.mode, cluster.num_workers, job.staleness, job.backup_workers)
        self.recorder = Recorder(job.mode, cluster.num_workers)
        self.asynchronous = None                  # asp/ssp: the AsyncServing that applies pushes
        self.sync = None                          # bsp/local-sgd: the SyncServing that runs the steps
        if isinstance(self.rule, AsyncRule):
            self.asynchronous = AsyncServing(self.rule, self.recorder, self._send_params,
                                             lambda ident, rid, text: self._reply(ident, ERROR, rid, message=text),
                                             job.mode, optim.grad_clip, cluster.timeout)
        else:
            self.sync = SyncServing(self)
        # plain BSP: pushes arrive chunk by chunk (worker --overlap), answered chunk by chunk (steps.py)
        self.chunkwise = job.mode == "bsp" and job.backup_workers == 0
        self.snapshot = self.asynchronous is not None or job.backup_workers > 0   # see the module's docstring
        self.waiting_pulls: list[tuple] = []      # (identity, rid, min_version, since)
        self.tracer = NULL_TRACER                 # --trace: spans wait for pushes, store push, average, update, reply
        self.ready_at = 0.0                       # tracer clock: when this step began waiting for pushes
        self.traffic = Traffic(cluster.num_servers, cluster.num_workers)   # per peer, for ps-status

    # --- the loop -------------------------------------------------------------------
    def run(self) -> int:
        log.info("listening on %s, advertised as %s", self.router.endpoint, self.addr)
        if self.durability.resume:
            log.info("resuming: checkpoints of versions %s in %s", self.resumable or "(none)", self.checkpoints)
        try:
            self._register()
            while not self.stopping:
                ready = self.poller.poll(self._poll_timeout_ms())
                with self._critical():
                    for sock in ready:
                        while sock.poll(0) and not self.stopping:
                            if sock is self.router:
                                identity, frames = self.router.recv()
                                self._handle(identity, frames)
                            else:
                                self._handle_control(sock.recv())
                    self._heartbeat()
                    self._check_deadlines()
            log.info("stopped cleanly at version %s", self.shard.version if self.shard else 0)
            return 0
        finally:
            self._final_checkpoint()
            self._write_metrics()
            self.close()

    def _write_metrics(self):
        if not self.out or self.shard is None:
            return
        extra = dict(refused=self.refused, repeated_pushes=self.applied.repeats,
                     checkpoints_written=self.checkpoints_written, checkpoint_s=self.checkpoint_s,
                     resumed_at=self.resumed_at,
                     failure=self.failure or None)
        if self.coordinator:
            extra.update(self.coordinator.metrics())
        try:
            self.recorder.write(self.out, f"server-{self.rank}.json", self.shard.version, rank=self.rank,
                                staleness_bound=self.job.staleness if self.job.mode == "ssp" else None,
                                backup_workers=self.job.backup_workers, num_workers=self.num_workers,
                                wall_s=time.monotonic() - self.started, **extra)
        except OSError as e:
            log.warning("could not write server-%d.json in %s: %s", self.rank, self.out, e)

    def placement(self, layout: Layout, num_servers: int) -> list:
        """The coordinator's cut of the flat vector into chunks dealt over the servers."""
        return place_chunks(layout, num_servers, self.job.chunk_mb)

    def make_shard(self, chunks, dtype: str, layout: Layout) -> Shard:
        scheme = make_scheme(self.job.compress, self.job.compress_ratio, self.job.error_feedback == "on")
        return Shard(chunks, dtype, self.optim, layout.decay_ranges(), scheme)

    def close(self):
        for s in [self.router, self.coord, *self.peers.values()]:
            if s is not None:
                s.close()
        if self.ipc:                        # the Unix socket's file, if libzmq left it
            try:
                os.unlink(self.ipc[len("ipc://"):])
            except OSError:
                pass

    def _poll_timeout_ms(self) -> float:
        starts = [p[3] for p in self.waiting_pulls]
        if self.asynchronous and self.asynchronous.held:
            starts.append(self.asynchronous.oldest())
        if self.sync and self.sync.busy:
            starts.append(self.sync.step_started)
        wait = 1.0
        if starts:
            wait = min(wait, min(starts) + self.cluster.timeout - time.monotonic())
        if self.cluster.heartbeat > 0:       # heartbeats to send or to watch
            wait = min(wait, self.cluster.heartbeat / 2)
        return max(1.0, wait * 1000)

    # --- dispatch -----------------------------------------------------------------------
    def _decode(self, frames, who):
        try:
            return codec.decode(frames)
        except ProtocolError as e:
            self.refused += 1
            log.warning("refused a malformed message from %s: %s", who, e)
            return None

    def _reply(self, identity, cmd, rid, arrays=(), ranges=None, **meta):
        frames = codec.encode(cmd, self.name, rid=rid, arrays=arrays, ranges=ranges, **meta)
        sent = self.router.send(identity, frames)
        self.traffic.sent(identity, frames_nbytes(frames))
        if not sent:
            log.warning("could not answer %s: the peer is gone or not reading", identity[:24])

    def _handle(self, identity: bytes, frames):
        with self._critical():
            self._handle_message(identity, frames)

    def _handle_message(self, identity: bytes, frames):
        msg = self._decode(frames, f"peer {identity[:24]!r}")
        if msg is None:
            self._reply(identity, ERROR, 0, message="malformed message refused (see the server's log)")
            return
        self.traffic.received(identity, msg.sender, frames_nbytes(frames), msg.step, msg.cmd, self.router.last_peer)
        if self.failure and msg.cmd not in (STATUS, HEARTBEAT, NORM):
            self._reply(identity, ERROR, msg.rid, message=f"the job is stopping: {self.failure}")
            return
        handler = {REGISTER: self._on_register, INIT: self._on_init, PULL: self._on_pull,
                   PUSH: self._on_push, NORM: self._on_norm, DONE: self._on_done,
                   STATUS: self._on_status, HEARTBEAT: self._on_heartbeat, BARRIER: self._unsupported,
                   SHUTDOWN: self._unsupported, VIEW: self._unsupported}.get(msg.cmd, self._unsupported)
        try:
            handler(identity, msg)
        except ProtocolError as e:
            self.refused += 1
            log.warning("refused %s from %s: %s", msg.cmd, msg.sender, e)
            if msg.cmd != NORM:
                self._reply(identity, ERROR, msg.rid, message=str(e))

    def _unsupported(self, identity, msg):
        raise ProtocolError(f"{msg.cmd} is not a request this server ({self.name}) serves")

    def _need_shard(self, msg):
        if self.shard is None:
            raise ProtocolError(f"{msg.cmd} before the job started")

    # --- membership -------------------------------------------------------------------
    def _on_register(self, identity, msg):
        if self.coordinator is None:
            raise ProtocolError(f"register with the coordinator, not with {self.name}")
        self.coordinator.on_register(identity, msg)

    def _on_heartbeat(self, identity, msg):
        if self.coordinator is None:
            raise ProtocolError(f"heartbeats go to the coordinator, not to {self.name}")
        self.coordinator.on_heartbeat(identity, msg)

    # --- handlers -----------------------------------------------------------------------
    def _on_init(self, identity, msg):
        self._need_shard(msg)
        parse_sender(msg.sender, "worker", self.num_workers)
        if self.shard.initialized:
            self._reply(identity, OK, msg.rid, version=self.shard.version, message="already initialized")
            return
        self.shard.check_full_cover(msg.ranges, "init")
        self.shard.check_arrays(msg.arrays, msg.ranges, msg.dtypes, "init")
        self.shard.set_params(msg.arrays, msg.ranges)
        self.ready_at = self.tracer.now()
        log.info("parameters initialized by %s", msg.sender)
        self._reply(identity, OK, msg.rid, version=self.shard.version)
        for ident, rid, _ in self.deferred_pulls:
            self._send_params(ident, rid)
        self.deferred_pulls.clear()

    def _send_params(self, identity, rid, chunks=None, **meta):
        """Answer with this shard's parameters (or those of the chunk indices ``chunks``)."""
        arrays, ranges = self.shard.param_snapshot() if self.snapshot else self.shard.param_views()
        if chunks is not None:
            arrays, ranges = [arrays[c] for c in chunks], [ranges[c] for c in chunks]
        self._reply(identity, OK, rid, arrays=arrays, ranges=ranges, version=self.shard.version, **meta)

    def _on_pull(self, identity, msg):
        self._need_shard(msg)
        if not self.shard.initialized:
            if len(self.deferred_pulls) >= 4 * self.num_workers:      # bounded, whatever peers send
                raise ProtocolError("too many pulls are waiting for the initial parameters")
            self.deferred_pulls.append((identity, msg.rid, time.monotonic()))
            return
        if msg.meta.get("min_version", 0) > self.shard.version:     # wait for that version
            if len(self.waiting_pulls) >= 4 * self.num_workers:      # bounded, whatever peers send
                raise ProtocolError("too many pulls are waiting for a version")
            self.waiting_pulls.append((identity, msg.rid, msg.meta["min_version"], time.monotonic()))
            return
        if self.asynchronous and msg.sender.startswith("worker:"):  # ssp: a read may have to wait
            self.asynchronous.read(identity, msg.rid, parse_sender(msg.sender, "worker", self.num_workers))
            return
        self._send_params(identity, msg.rid)

    def _release_pulls(self):
        """Answer the pulls that waited for a version this server has now reached."""
        ready = [p for p in self.waiting_pulls if p[2] <= self.shard.version]
        self.waiting_pulls = [p for p in self.waiting_pulls if p[2] > self.shard.version]
        for identity, rid, _, _ in ready:
            self._send_params(identity, rid)

    def _on_push(self, identity, msg):
        self._need_shard(msg)
        rank = parse_sender(msg.sender, "worker", self.num_workers)
        shard = self.shard
        if not shard.initialized:
            raise ProtocolError("push before the parameters were initialized (worker 0 sends init first)")
        session = msg.meta.get("session", 0)
        known = self.view.get(rank)
        if known is not None and session < known:
            raise ProtocolError(f"push from an earlier process of worker {rank} (session {session}; the "
                                f"current one is {known}): refused")
        done = self.applied.find(rank, session, msg.rid)
        if done is not None:                        # a resent push this server applied already
            log.info("worker %d resent its push of step %d (request %d): answered again, not applied",
                     rank, done["step"], msg.rid)
            if self.asynchronous:
                self.asynchronous.read(identity, msg.rid, rank, **done["meta"])
            else:               # (a chunk of a step: the chunks it carried)
                chunks = sorted({shard.chunk_index(*r) for r in msg.ranges if r}) if self.chunkwise else None
                self._send_params(identity, msg.rid, chunks=chunks, **done["meta"])
            return
        if self.asynchronous:
            version = shard.version
            self.asynchronous.push(shard, identity, msg, rank)
            self.applied.record(rank, session, msg.rid, msg.step, shard.version, {})
            if shard.version > version:
                self.after_update()
            self._release_pulls()
            return
        self.sync.push(identity, msg, rank, session)

    def _on_norm(self, identity, msg):
        self._need_shard(msg)
        if not self.peers:
            raise ProtocolError("this server exchanges no proposals (asp/ssp, or a single server)")
        peer = parse_sender(msg.sender, "server", len(self.server_addrs))
        if peer == self.rank:
            raise ProtocolError("a norm from this server's own rank")
        self.sync.on_norm(peer, msg)

    def _on_done(self, identity, msg):
        rank = parse_sender(msg.sender, "worker", self.num_workers)
        self.recorder.done(rank, self.shard.version if self.shard else 0)
        if self.asynchronous:               # ssp: a finished worker no longer holds anyone back
            self.asynchronous.done(rank)
        if self.coordinator is None:        # asp/ssp workers tell every server, not only server 0
            if not self.asynchronous:
                raise ProtocolError(f"done goes to the coordinator, not to {self.name}")
            self._reply(identity, OK, msg.rid)
            return
        self._reply(identity, OK, msg.rid)
        if rank not in self.members.done:
            log.info("worker %d is done (%d of %d)", rank, len(self.members.done) + 1, len(self.members.live))
        self.coordinator.on_done(rank)

    def _on_status(self, identity, msg):
        """What this server knows, for ``ps-status``; the coordinator adds the address table."""
        status = {"rank": self.rank, "addr": self.addr, "version": self.shard.version if self.shard else -1,
                  "uptime_s": round(time.monotonic() - self.started, 3), "refused": self.refused,
                  "waiting_for": self.sync.waiting_for() if self.sync else [],
                  "host": host_name(), "pid": os.getpid(), "time": time.time(),
                  "bytes_in": self.traffic.bytes_in, "bytes_out": self.traffic.bytes_out,
                  "peers": self.traffic.table(), "mode": self.job.mode, "view": self.view_number,
                  "repeated_pushes": self.applied.repeats}
        if self.coordinator is not None:
            status.update(self.coordinator.status())
        if self.asynchronous:
            status.update(clocks=list(self.rule.clocks), held=sorted(h[2] for h in self.asynchronous.held))
        self._reply(identity, OK, msg.rid, status=status)

    # --- deadlines ----------------------------------------------------------------------
    def _check_deadlines(self):
        now = time.monotonic()
        if self.coordinator is not None:
            self.coordinator.tick(now)
        elif self.shard is not None:
            self._watch_coordinator(now)
        if self.sync:
            self.sync.tick(now, max(1.0, self.cluster.silence_s if self.cluster.heartbeat > 0 else 5.0))
            why = self.sync.overdue(now, self.cluster.timeout)
            if why:
                self.answer_all_with_error(why)
                raise ServerError(why)
        if self.asynchronous:
            self.asynchronous.expire(now)
        for identity, rid, want, _ in [p for p in self.waiting_pulls if now - p[3] > self.cluster.timeout]:
            self._reply(identity, ERROR, rid, message=f"version {want} not reached within "
                                                      f"{self.cluster.timeout:.0f} s (at {self.shard.version})")
        self.waiting_pulls = [p for p in self.waiting_pulls if now - p[3] <= self.cluster.timeout]
        expired = [p for p in self.deferred_pulls if now - p[2] > self.cluster.timeout]
        for ident, rid, _ in expired:
            self._reply(ident, ERROR, rid, message=f"the parameters were not initialized within "
                                                   f"{self.cluster.timeout:.0f} s (worker 0 sends them)")
        self.deferred_pulls = [p for p in self.deferred_pulls if p not in expired]

