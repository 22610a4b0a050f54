"""The server process: one poll loop that registers, dispatches requests, and stops.

Shape of the loop (the ZeroMQ guide's): poll the sockets with a timeout no longer than
the nearest deadline, handle every waiting message, send a heartbeat when one is due,
then check the deadlines. A message is decoded and validated before any handler sees
it; a bad one is refused with an ERROR reply and a log line, counted (``refused``, in
STATUS and in ``server-S.json``), and the server's state is left as it was.

The server is the loop and the dispatch; everything else is a plain object beside it
(ps-lite's KVServer with its request handler; composition, not mixins):

| part                    | module              | what it does                                        |
|-------------------------|---------------------|-----------------------------------------------------|
| ``endpoints``           | endpoints.py        | the sockets: ROUTER, Unix socket, DEALERs to peers; |
|                         |                     | shared memory with the workers of its host (--shm)  |
| ``replier``             | replier.py          | the only code that encodes and sends                |
| ``serving``             | steps.py / modes.py | the consistency model: one object, chosen once      |
| ``coordinator``         | coordinator.py      | server 0: registration, heartbeats, views, the end  |
| ``link``                | coordinator_link.py | servers s > 0: registration, heartbeats to server 0 |
| ``checkpoints``         | checkpointing.py    | when checkpoints are written and read               |
| ``view``, ``pulls``,    | view.py, pulls.py,  | the live workers; pulls waiting for a version;      |
| ``applied``             | dedupe.py           | exactly-once pushes                                 |

How a push becomes an update depends on the consistency model (``--mode``), chosen
once in ``serving_for``: bsp, local-sgd and diloco run synchronous steps (``steps.SyncServing``:
every worker of the view pushes, the servers agree on the set of workers, average,
step, answer); asp and ssp apply each push as it arrives (``modes.AsyncServing``), and
ssp holds an answer back while its worker is too far ahead. Server 0 is also the
coordinator. With ``out``, the server writes what the consistency model cost
(staleness, dropped pushes, updates/s) and what it refused and survived to
``server-S.json``.

Failures (docs/failures.md): every push carries the worker's session and request id,
and a resent one is applied at most once (``dedupe.py``); the server writes a
checkpoint every ``--checkpoint-every`` versions and when it stops; a server restarted
with ``--resume`` binds its old address, registers again, loads the checkpoint of the
version the coordinator names, and goes on. TERM or Ctrl-C stops the server, but never
in the middle of a change of state (``Interrupts``).

Not here: what a message looks like (``common/wire/protocol.py``, ``common/wire/codec.py``),
sockets (``common/wire/transport.py``), the optimizer (``common/optim.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy

from common.cluster import ClusterConfig, JobConfig, host_name, server_bind
from common.config import to_dict
from common.layout import Layout
from common.optim import OptimConfig
from common.placement import place_chunks
from common.trace import NULL_TRACER
from common.wire import codec
from common.wire.compress import make_scheme
from common.wire.pull_compress import pull_scheme
from common.wire.memory import keep_freed_memory
from common.wire.protocol import (
    BARRIER, DONE, HEARTBEAT, INIT, NORM, OK, PULL, PUSH, REGISTER, SHUTDOWN, STATUS, VIEW, ProtocolError,
)
from common.wire.transport import TransportError
from paramserver.checkpointing import Checkpointer
from paramserver.coordinator import Coordinator, ServerHooks
from paramserver.coordinator_link import CoordinatorLink
from paramserver.dedupe import Applied
from paramserver.endpoints import ServerEndpoints
from paramserver.errors import ServerError
from paramserver.modes import AsyncServing, ServingParts, SyncRule
from paramserver.pulls import PullQueue
from paramserver.replier import Replier
from paramserver.shard import Shard
from common.durability import DurabilityConfig
from paramserver.steps import SyncServing
from paramserver.traffic import Traffic, frames_nbytes
from paramserver.view import WorkerView

log = logging.getLogger("server")

__all__ = ["Server", "ServerError", "parse_sender", "serving_for"]


def parse_sender(sender: str, role: str, count: int) -> int:
    """The rank in a header's ``from`` field ``role:rank``, checked against ``count``."""
    r, _, k = sender.partition(":")
    if r != role or not k.isdigit() or int(k) >= count:
        raise ProtocolError(f"expected a sender '{role}:<0..{count - 1}>', got {sender!r}")
    return int(k)


def serving_for(cluster: ClusterConfig, optim: OptimConfig, job: JobConfig, rank: int):
    """The consistency model, chosen once: a function ``(shard, parts, server_addrs) ->``
    its serving object. Raises ValueError for a mode or a setting it cannot serve."""
    W = cluster.num_workers
    if job.synchronous:
        SyncRule(W, job.backup_workers)                    # checks --backup-workers now, not at the first step
        clip = optim.grad_clip > 0 and job.mode == "bsp"   # local-sgd and diloco clip on the workers
        return lambda shard, parts, addrs: SyncServing(shard, parts, rank, addrs, job.mode, W,
                                                       job.backup_workers, clip)
    if job.mode in ("asp", "ssp"):
        staleness = job.staleness if job.mode == "ssp" else None
        return lambda shard, parts, addrs: AsyncServing(shard, parts, job.mode, W, staleness,
                                                        optim.grad_clip, cluster.timeout)
    raise ValueError(f"unknown consistency mode {job.mode!r}")


def answers_from_copy(job: JobConfig) -> bool:
    """Must answers be sent from a per-version copy of the parameters? Yes where an update
    can come before an answer has left (asp, ssp, late pushes of backup workers); in
    plain BSP the next update needs every worker's next push, which needs its answer."""
    return job.mode in ("asp", "ssp") or job.backup_workers > 0


@dataclass
class ServerConfig:
    cluster: ClusterConfig
    optim: OptimConfig
    job: JobConfig
    rank: int
    out: str = ""                                # folder for server-S.json ('' = none)

    @property
    def name(self) -> str:
        return f"server:{self.rank}"


@dataclass
class ServerState:
    """What the loop knows about this process's life in the job."""
    session: int = 0                             # this process's incarnation, from the coordinator
    resumed_at: int | None = None                # the version this server came back at (into a running job)
    refused: int = 0                             # messages refused at the door
    failure: str = ""                            # why this server stops with an error (answers get it)
    stopping: bool = False
    started: float = field(default_factory=time.monotonic)


class Interrupts:
    """TERM or Ctrl-C stops the server, but never in the middle of a change of state (an
    update half applied would go into the checkpoint written on the way out): the
    interrupt waits for the end of the message being handled."""

    def __init__(self):
        self.busy = 0                            # > 0 while state changes
        self.pending = 0                         # the signal that waits for the end of it

    def on_signal(self, signum, frame):
        if self.busy:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def critical(self):
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
        if not self.busy and self.pending:
            raise KeyboardInterrupt(f"signal {self.pending}")


class Server:
    def __init__(self, cluster: ClusterConfig, optim: OptimConfig, job: JobConfig, rank: int, out: str = "",
                 durability: DurabilityConfig | None = None, tracer=NULL_TRACER):
        if not 0 <= rank < cluster.num_servers:
            raise ValueError(f"server rank {rank} out of range for {cluster.num_servers} server(s)")
        keep_freed_memory()                           # before any socket: receive buffers stay mapped
        job.check_workers(cluster.num_workers)
        if job.compress_momentum and optim.optimizer != "sgd":
            raise ValueError(f"--compress-momentum {job.compress_momentum} applies momentum on the workers: run "
                             f"the servers with --optimizer sgd, not {optim.optimizer}")
        self.cfg = ServerConfig(cluster, optim, job, rank, out)
        serving_for(cluster, optim, job, rank)        # checks the mode and its settings now, not at the start
        self.tracer = tracer          # --trace: spans wait for pushes, store push, average, update, reply
        self.checkpoints = Checkpointer(durability or DurabilityConfig(), out, rank, tracer)
        self.endpoints = self._listen(cluster, rank)
        self.replier = Replier(self.cfg.name, self.endpoints.router, Traffic(cluster.num_servers, cluster.num_workers),
                               self.endpoints.coordinator, snapshot=answers_from_copy(job))
        self.link = CoordinatorLink(cluster, self.endpoints.coordinator, self.replier) if rank else None
        self.coordinator = Coordinator(cluster, to_dict(optim), to_dict(job), self.replier, ServerHooks(
            self.placement, self._start, lambda: self.shard.version, self._take_view, self.answer_all_with_error,
            servers_rejoin=job.mode not in ("asp", "ssp"), mode=job.mode,
            on_servers=self._servers_moved, restart_from=self.checkpoints.newest_membership)) if rank == 0 else None
        self.view = WorkerView(cluster.num_workers)
        self.pulls = PullQueue(self.replier, cluster.num_workers, cluster.timeout)
        self.applied = Applied()                  # exactly once: the last push applied per worker
        self.state = ServerState()
        self.interrupts = Interrupts()
        self.shard: Shard | None = None           # and its serving object, once the job started
        self.serving = None

    def _listen(self, cluster, rank: int) -> ServerEndpoints:
        """Bind where the workers and peers find this server: a resuming server binds the
        address of its checkpoint; if that is not one of this host's (restarted on another
        host), it binds --bind (or the default) and the coordinator tells the others."""
        bind = server_bind(cluster, rank)
        old = self.checkpoints.bind_address(bind, bool(cluster.bind))
        if old == bind:
            return ServerEndpoints(cluster, rank, bind)
        try:
            return ServerEndpoints(cluster, rank, old)
        except TransportError as e:
            log.warning("cannot bind the address of the checkpoint (%s); binding %s instead: this server moved, "
                        "and the coordinator will tell the workers and the other servers", e, bind)
            return ServerEndpoints(cluster, rank, bind)

    # --- the loop -------------------------------------------------------------------
    def run(self) -> int:
        log.info("listening on %s, advertised as %s", self.endpoints.router.endpoint, self.endpoints.addr)
        if self.checkpoints.durability.resume:
            log.info("resuming: checkpoints of versions %s in %s", self.checkpoints.resumable or "(none)",
                     self.checkpoints.folder)
        try:
            self._register()
            while not self.state.stopping:
                ready = self.endpoints.poller.poll(self._poll_timeout_ms())
                with self.interrupts.critical():
                    for sock in ready:
                        self._drain(sock)
                    if self.checkpoints.failure:
                        self._stop_job(self.checkpoints.failure)
                    if self.link and self.shard is not None:
                        self.link.heartbeat(self.shard.version, self.state.session)
                    self._check_deadlines()
            log.info("stopped cleanly at version %s", self.shard.version if self.shard else 0)
            return 0
        finally:
            self.checkpoints.final()
            self._write_metrics()
            self.endpoints.close()

    def on_signal(self, signum, frame):
        self.interrupts.on_signal(signum, frame)

    def _drain(self, sock):
        while sock.poll(0) and not self.state.stopping:
            if sock is self.endpoints.router:
                identity, frames = sock.recv()
                self._handle(identity, frames)
            else:
                self._handle_control(sock.recv())

    def _write_metrics(self):
        if not self.cfg.out or self.serving is None:
            return
        c = self.checkpoints
        extra = dict(refused=self.state.refused, repeated_pushes=self.applied.repeats,
                     checkpoints_written=c.written, checkpoint_s=c.seconds, checkpoints_failed=c.failed_saves,
                     resumed_at=self.state.resumed_at, failure=self.state.failure or None,
                     bytes_in=self.replier.traffic.bytes_in, bytes_out=self.replier.traffic.bytes_out,
                     peers=self.replier.traffic.table())
        if self.coordinator:
            extra.update(self.coordinator.metrics())
        job = self.cfg.job
        try:
            self.serving.recorder.write(self.cfg.out, f"server-{self.cfg.rank}.json", self.shard.version,
                                        rank=self.cfg.rank, staleness_bound=job.staleness if job.mode == "ssp" else None,
                                        backup_workers=job.backup_workers, num_workers=self.cfg.cluster.num_workers,
                                        wall_s=time.monotonic() - self.state.started, **extra)
        except OSError as e:
            log.warning("could not write server-%d.json in %s: %s", self.cfg.rank, self.cfg.out, e)

    def placement(self, layout: Layout, num_servers: int) -> list:
        """The coordinator's cut of the flat vector into chunks dealt over the servers."""
        return place_chunks(layout, num_servers, self.cfg.job.chunk_mb)

    def _poll_timeout_ms(self) -> float:
        starts = [t for t in (self.pulls.oldest(), self.serving.oldest() if self.serving else None) if t is not None]
        wait = 1.0
        if starts:
            wait = min(wait, min(starts) + self.cfg.cluster.timeout - time.monotonic())
        if self.cfg.cluster.heartbeat > 0:       # heartbeats to send or to watch
            wait = min(wait, self.cfg.cluster.heartbeat / 2)
        return max(1.0, wait * 1000)

    # --- joining the job ----------------------------------------------------------------
    def _register(self):
        """Server 0 keeps the book itself and waits for everyone; the others register
        with it and start from its JOB answer."""
        cfg, e = self.cfg, self.endpoints
        meta = dict(role="server", rank=cfg.rank, host=host_name(), pid=os.getpid(),
                    addr=e.addr, optim=to_dict(cfg.optim), job=to_dict(cfg.job))
        if self.checkpoints.durability.resume:
            meta["versions"] = self.checkpoints.resumable
        if e.ipc:
            meta["ipc"] = e.ipc
        if self.link:
            self._start(self.link.register(meta, self._decode))
            return
        self.coordinator.members.register(b"", meta)
        deadline = time.monotonic() + cfg.cluster.timeout
        while not self.coordinator.members.started:
            left = deadline - time.monotonic()
            if left <= 0:
                text = (f"registration timed out after {cfg.cluster.timeout:.0f} s: still missing "
                        f"{self.coordinator.members.missing()}; the coordinator is {e.addr}")
                self.coordinator.refuse_registered(text)
                raise ServerError(text)
            if e.router.poll(min(left, 1.0) * 1000):
                identity, frames = e.router.recv()
                self._handle(identity, frames)

    def _make_shard(self, chunks, dtype: str, layout: Layout) -> Shard:
        job = self.cfg.job
        scheme = make_scheme(job.compress, job.compress_ratio, job.error_feedback == "on")
        optim = job.outer_optim() if job.mode == "diloco" else self.cfg.optim   # diloco: --optim* is the workers'
        return Shard(chunks, dtype, optim, layout.decay_ranges(), scheme,
                     pull_scheme(job.compress_pull, job.compress_pull_ratio),
                     params=self._shared_params(sum(e - b for b, e in chunks), dtype, layout))

    def _shared_params(self, size: int, dtype: str, layout: Layout):
        """--shm auto: the shard's parameters in a segment the workers of this host read
        (not where answers go from a per-version copy: asp, ssp, backup workers); None: none."""
        if answers_from_copy(self.cfg.job):
            return None
        itemsize = numpy.dtype(dtype).itemsize
        shm = self.endpoints.share_memory(self.cfg.rank, size * itemsize, layout.size * itemsize, itemsize)
        return shm.segment.array(dtype, size) if shm else None

    def _start(self, job: dict):
        """Set up the shard and its serving object from the coordinator's JOB answer (and a
        checkpoint when it names a version)."""
        cfg = self.cfg
        layout = Layout.from_table(job["layout"])
        chunks = [(b, e) for b, e, s in job["placement"] if s == cfg.rank]
        self.shard = self._make_shard(chunks, job["dtype"], layout)
        addrs = list(job["servers"])
        parts = ServingParts(self.replier, self.view, self.applied, self.checkpoints, self.pulls, self.tracer,
                             self._ahead)
        self.serving = serving_for(cfg.cluster, cfg.optim, cfg.job, cfg.rank)(self.shard, parts, addrs)
        self.checkpoints.start(self.shard, job["layout_hash"], self._checkpoint_state, job.get("tokenizer", ""))
        self.state.session = job.get("session", 0)
        self._take_view(job.get("view", 1), job.get("workers", [[r, 0] for r in range(cfg.cluster.num_workers)]))
        peers = {}
        if self.serving.exchange:                   # the step agreement (and norms for clipping)
            peers = self.endpoints.connect_peers(cfg.rank, addrs, job.get("ipc") or [""] * len(addrs))
        self.replier.serve(self.shard, peers, self.endpoints.shm)
        version = job.get("version", 0)
        if version:
            self._load_checkpoint(version, job.get("rejoin", False))
        if self.link:
            self.link.heard = time.monotonic()
        log.info("job started: %d worker(s), %d server(s), %d of %d parameters here (%s), %s, version %d",
                 job["num_workers"], job["num_servers"], self.shard.size, layout.size,
                 self.shard.describe_chunks(), job["dtype"], self.shard.version)

    def _load_checkpoint(self, version: int, rejoin: bool):
        extra = self.checkpoints.load(version)
        self.applied.load(extra.get("applied", []))
        if rejoin:                                 # back into a running job
            self.state.resumed_at = version
        self.serving.load_checkpoint(extra, version, rejoined=rejoin)

    def _checkpoint_state(self) -> dict:
        """What a checkpoint holds besides the shard."""
        state = {"bind": self.endpoints.router.endpoint, "addr": self.endpoints.addr, "view": self.view.number,
                 "workers": self.view.pairs(), "applied": self.applied.state(), **self.serving.checkpoint_state()}
        if self.coordinator is not None:         # the job's book: a restarted coordinator rejoins with it
            state["membership"] = self.coordinator.members.snapshot()
        return state

    def _servers_moved(self, addrs):
        """The coordinator's table of the servers' addresses: follow a peer that moved."""
        S = self.cfg.cluster.num_servers
        if not (isinstance(addrs, list) and len(addrs) == S and all(isinstance(a, str) and a.startswith("tcp://")
                                                                    for a in addrs)):
            raise ProtocolError(f"the servers' addresses must be {S} tcp:// endpoints, got {str(addrs)[:200]}")
        for rank, old, new in self.endpoints.move_peers(addrs):
            log.warning("server %d moved from %s to %s: this server's link to it follows", rank, old, new)

    def _take_view(self, number: int, pairs):
        """The coordinator's view ``number``: the live workers and their sessions."""
        changed = self.view.update(number, pairs)
        if changed and self.serving is not None:
            self.serving.view_changed(*changed)

    # --- dispatch -----------------------------------------------------------------------
    def _decode(self, frames, who, identity: bytes | None = None):
        try:
            shm = self.endpoints.shm
            if shm is not None and identity is not None:    # --shm: arrays may lie in a worker's segment
                return shm.peers.decode(frames, identity=identity)
            return codec.decode(frames)
        except ProtocolError as e:
            self.state.refused += 1
            log.warning("refused a malformed message from %s: %s", who, e)
            return None

    def _handle(self, identity: bytes, frames):
        with self.interrupts.critical():
            self._handle_message(identity, frames)

    def _handle_message(self, identity: bytes, frames):
        msg = self._decode(frames, f"peer {identity[:24]!r}", identity)
        if msg is None:
            self.replier.error(identity, 0, "malformed message refused (see the server's log)")
            return
        self.replier.traffic.received(identity, msg.sender, frames_nbytes(frames), msg.step, msg.cmd,
                                      self.endpoints.router.last_peer)
        if self.coordinator is not None and not self.coordinator.members.started and msg.cmd in (PUSH, PULL, NORM):
            self._running_job_calls(msg)
        if self.state.failure and msg.cmd not in (STATUS, HEARTBEAT, NORM):
            self.replier.error(identity, msg.rid, f"the job is stopping: {self.state.failure}")
            return
        handler = {REGISTER: self._on_register, INIT: self._on_init, PULL: self._on_pull,
                   PUSH: self._on_push, NORM: self._on_norm, DONE: self._on_done,
                   STATUS: self._on_status, HEARTBEAT: self._on_heartbeat, BARRIER: self._unsupported,
                   SHUTDOWN: self._unsupported, VIEW: self._unsupported}.get(msg.cmd, self._unsupported)
        try:
            if msg.cmd in (PULL, PUSH):
                self.replier.note_request(identity, msg.meta)     # --compress-pull: what it holds
            handler(identity, msg)
        except ProtocolError as e:
            self.state.refused += 1
            log.warning("refused %s from %s: %s", msg.cmd, msg.sender, e)
            if msg.cmd != NORM:
                self.replier.error(identity, msg.rid, str(e))
        if self.coordinator and self.coordinator.finished:
            self.state.stopping = True

    def _handle_control(self, frames):
        """A message from the coordinator (servers s > 0): a heartbeat's answer, a view, the end."""
        msg = self._decode(frames, "the coordinator")
        self.replier.traffic.received(b"", "link:coordinator", frames_nbytes(frames), -1, "")   # (totals only)
        if msg is None:
            return
        ctl = self.link.control(msg)
        if ctl.kind == "view":
            try:
                self._take_view(ctl.number, ctl.pairs)
                if ctl.servers is not None:
                    self._servers_moved(ctl.servers)
            except ProtocolError as e:
                self.state.refused += 1
                log.warning("refused a view from the coordinator: %s", e)
        elif ctl.kind == "fail":
            self.answer_all_with_error(f"the job is stopping: {ctl.text}")
            raise ServerError(f"the coordinator stopped the job: {ctl.text}")
        elif ctl.kind == "error":
            self.answer_all_with_error(ctl.text)
            raise ServerError(f"the coordinator: {ctl.text}")
        elif ctl.kind == "stop":
            log.info("the coordinator asked this server to stop (%s)", ctl.text)
            self.state.stopping = True
        elif ctl.text:
            log.warning("%s", ctl.text)

    def _running_job_calls(self, msg):
        """A request of a running job reached server 0 before its job started: the coordinator
        was restarted while the others lived on; it rejoins them now if its checkpoint can
        (``Coordinator.rejoin_running``; otherwise the request is refused as usual)."""
        role, _, rank = msg.sender.partition(":")
        if role in ("worker", "server") and rank.isdigit():
            self.coordinator.rejoin_running(role, int(rank), msg.step)

    def _unsupported(self, identity, msg):
        raise ProtocolError(f"{msg.cmd} is not a request this server ({self.cfg.name}) serves")

    def _need_shard(self, msg):
        if self.shard is None:
            raise ProtocolError(f"{msg.cmd} before the job started")

    def _worker_rank(self, msg) -> int:
        return parse_sender(msg.sender, "worker", self.cfg.cluster.num_workers)

    # --- membership (server 0) ----------------------------------------------------------
    def _on_register(self, identity, msg):
        if self.coordinator is None:
            raise ProtocolError(f"register with the coordinator, not with {self.cfg.name}")
        self.coordinator.on_register(identity, msg)

    def _on_heartbeat(self, identity, msg):
        if self.coordinator is None:
            raise ProtocolError(f"heartbeats go to the coordinator, not to {self.cfg.name}")
        self.coordinator.on_heartbeat(identity, msg)

    # --- requests -----------------------------------------------------------------------
    def _on_init(self, identity, msg):
        self._need_shard(msg)
        self._worker_rank(msg)
        if self.shard.initialized:
            self.replier.reply(identity, OK, msg.rid, version=self.shard.version, message="already initialized")
            return
        self.shard.check_full_cover(msg.ranges, "init")
        self.shard.check_arrays(msg.arrays, msg.ranges, msg.dtypes, "init")
        self.shard.set_params(msg.arrays, msg.ranges)
        self.serving.initialized()
        log.info("parameters initialized by %s", msg.sender)
        self.replier.reply(identity, OK, msg.rid, version=self.shard.version)
        self.pulls.initialized()

    def _on_pull(self, identity, msg):
        self._need_shard(msg)
        now = time.monotonic()
        if not self.shard.initialized:
            self.pulls.wait_for_init(identity, msg.rid, now)
            return
        if msg.meta.get("min_version", 0) > self.shard.version:     # wait for that version
            self.pulls.wait_for_version(identity, msg.rid, msg.meta["min_version"], now)
            return
        rank = self._worker_rank(msg) if msg.sender.startswith("worker:") else None
        self.serving.read(identity, msg.rid, rank)                  # ssp: a worker's read may have to wait

    def _on_push(self, identity, msg):
        self._need_shard(msg)
        rank = self._worker_rank(msg)
        if not self.shard.initialized:
            raise ProtocolError("push before the parameters were initialized (worker 0 sends init first)")
        session = msg.meta.get("session", 0)
        known = self.view.session(rank)
        if known is not None and session < known:
            raise ProtocolError(f"push from an earlier process of worker {rank} (session {session}; the "
                                f"current one is {known}): refused")
        done = self.applied.find(rank, session, msg.rid)
        if done is not None:                        # a resent push this server applied already
            log.info("worker %d resent its push of step %d (request %d): answered again, not applied",
                     rank, done["step"], msg.rid)
            self.serving.repeat(identity, msg, rank, done["meta"])
            return
        self.serving.push(identity, msg, rank, session)

    def _on_norm(self, identity, msg):
        self._need_shard(msg)
        if not self.replier.peers:
            raise ProtocolError("this server exchanges no proposals (asp/ssp, or a single server)")
        peer = parse_sender(msg.sender, "server", self.cfg.cluster.num_servers)
        if peer == self.cfg.rank:
            raise ProtocolError("a norm from this server's own rank")
        self.serving.on_norm(peer, msg)

    def _on_done(self, identity, msg):
        rank = self._worker_rank(msg)
        if self.serving is not None:
            self.serving.recorder.done(rank, self.shard.version)
            self.serving.worker_done(rank)  # ssp: a finished worker no longer holds anyone back
        if self.coordinator is None:        # asp/ssp workers tell every server, not only server 0
            if self.cfg.job.mode not in ("asp", "ssp"):
                raise ProtocolError(f"done goes to the coordinator, not to {self.cfg.name}")
            self.replier.reply(identity, OK, msg.rid)
            return
        self.replier.reply(identity, OK, msg.rid)
        members = self.coordinator.members
        if rank not in members.done:
            log.info("worker %d is done (%d of %d)", rank, len(members.done) + 1, len(members.live))
        self.coordinator.on_done(rank)

    def _on_status(self, identity, msg):
        """What this server knows, for ``ps-status``; the coordinator adds the address table."""
        traffic = self.replier.traffic
        status = {"rank": self.cfg.rank, "addr": self.endpoints.addr,
                  "version": self.shard.version if self.shard else -1,
                  "uptime_s": round(time.monotonic() - self.state.started, 3), "refused": self.state.refused,
                  "waiting_for": [], "host": host_name(), "pid": os.getpid(), "time": time.time(),
                  "bytes_in": traffic.bytes_in, "bytes_out": traffic.bytes_out,
                  "peers": traffic.table(), "mode": self.cfg.job.mode, "view": self.view.number,
                  "repeated_pushes": self.applied.repeats}
        if self.coordinator is not None:
            status.update(self.coordinator.status())
        if self.serving is not None:
            status.update(self.serving.status())
        self.replier.reply(identity, OK, msg.rid, status=status)

    # --- deadlines and failures -----------------------------------------------------------
    def _check_deadlines(self):
        now, c = time.monotonic(), self.cfg.cluster
        if self.coordinator is not None:
            self.coordinator.tick(now)
            self.state.stopping = self.state.stopping or self.coordinator.finished
        elif self.shard is not None:
            why = self.link.watch(now)
            if why:
                self.answer_all_with_error(why)
                raise ServerError(why)
        if self.serving is not None:
            why = self.serving.tick(now, c.timeout, max(1.0, c.silence_s if c.heartbeat > 0 else 5.0))
            if why:
                self.answer_all_with_error(why)
                raise ServerError(why)
        self.pulls.expire(now, self.shard.version if self.shard else 0)

    def _ahead(self, msg, rank: int, session: int):
        """A push for a step this server has not reached: a protocol error, unless this server
        came back from a checkpoint older than the job (then it stops the job, saying why)."""
        resumed_at = self.state.resumed_at
        if resumed_at is not None and self.view.session(rank) == session and self.shard.version == resumed_at:
            text = (f"this server came back from its checkpoint of version {resumed_at}, but worker {rank} "
                    f"is already at step {msg.step}: the steps in between died with this server's previous "
                    "process. Resume the whole job from the servers' checkpoints (every role with --resume; "
                    "docs/failures.md)")
            if self.link is not None:
                self.link.report(self.state.session, text)
            self.answer_all_with_error(text)
            raise ServerError(text)
        raise ProtocolError(f"push for step {msg.step}, but this server is at step {self.shard.version}")

    def _stop_job(self, text: str):
        """This server cannot go on (a checkpoint could not be written): the coordinator stops
        the job, telling every process why; another server tells the coordinator and exits."""
        if self.coordinator is not None:
            self.coordinator.fail(text)
            return
        self.link.report(self.state.session, text)
        self.answer_all_with_error(text)
        raise ServerError(text)

    def answer_all_with_error(self, text: str):
        """Refuse every request this server holds an answer for (the job is stopping)."""
        self.state.failure = self.state.failure or text
        held = self.pulls.take_all()
        if self.serving is not None:
            held += self.serving.take_held()
        for identity, rid in held:
            self.replier.error(identity, rid, text)
