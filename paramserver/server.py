"""The server process: one poll loop that registers, serves pulls and pushes, and stops.

Shape of the loop (the ZeroMQ guide's): poll the sockets with a timeout no longer than
the nearest deadline, handle every waiting message, send a heartbeat when one is due,
then check the deadlines. A message is decoded and validated before any handler sees
it; a bad one is refused with an ERROR reply and a log line, counted (``refused``, in
STATUS and in ``server-S.json``), and the server's state is left as it was.

How a push becomes an update depends on the consistency model (``--mode``):
bsp and local-sgd run synchronous steps (``steps.py``: every worker of the view
pushes, the servers agree on the set of workers, average, step, answer); asp and ssp
apply each push as it arrives (``consistency.AsyncServing``), and ssp holds an answer
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
checkpoint (``checkpoint.py``) every ``--checkpoint-every`` versions and when it stops;
a server restarted with ``--resume`` binds its old address, registers again, loads the
checkpoint of the version the coordinator names, and goes on.

Not here: what a message looks like (``common/protocol.py``, ``common/codec.py``),
sockets (``common/transport.py``), the optimizer (``common/optim.py``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from common import codec
from common.cluster import ClusterConfig, JobConfig, advertised_endpoint, host_name, server_bind
from common.config import to_dict
from common.layout import Layout
from common.optim import OptimConfig
from common.protocol import (
    BARRIER, DONE, ERROR, HEARTBEAT, INIT, JOB, NORM, OK, PULL, PUSH, REGISTER, SHUTDOWN, STATUS, VIEW,
    ProtocolError, session_list,
)
from common.trace import NULL_TRACER
from common.transport import Dealer, Poller, Router
from paramserver import checkpoint
from paramserver.checkpoint import DurabilityConfig
from paramserver.consistency import AsyncRule, AsyncServing, Recorder, make_rule
from paramserver.coordinator import Coordinator
from paramserver.dedupe import Applied
from paramserver.shard import Shard
from paramserver.steps import SyncServing
from paramserver.traffic import Traffic, frames_nbytes

log = logging.getLogger("server")


class ServerError(RuntimeError):
    """The job cannot go on (a deadline passed, the coordinator refused us); the text says why."""


def placement_contiguous(layout: Layout, num_servers: int) -> list:
    """Server s owns one contiguous range of the flat vector, balanced by bytes."""
    return [[b, e, s] for s, (b, e) in enumerate(layout.shard_ranges(num_servers))]


def parse_sender(sender: str, role: str, count: int) -> int:
    """The rank in a header's ``from`` field ``role:rank``, checked against ``count``."""
    r, _, k = sender.partition(":")
    if r != role or not k.isdigit() or int(k) >= count:
        raise ProtocolError(f"expected a sender '{role}:<0..{count - 1}>', got {sender!r}")
    return int(k)


class Server:
    error_type = ServerError
    placement = staticmethod(placement_contiguous)

    def __init__(self, cluster: ClusterConfig, optim: OptimConfig, job: JobConfig, rank: int, out: str = "",
                 durability: DurabilityConfig | None = None):
        if not 0 <= rank < cluster.num_servers:
            raise ValueError(f"server rank {rank} out of range for {cluster.num_servers} server(s)")
        job.check_workers(cluster.num_workers)
        self.cluster, self.optim, self.job, self.rank = cluster, optim, job, rank
        self.out = out                            # folder for server-S.json ('' = none)
        self.name = f"server:{rank}"
        self.durability = durability or DurabilityConfig()
        self.checkpoints = self.durability.folder(out)            # '' = no checkpoints
        self.resumable = checkpoint.versions(self.checkpoints, rank) if self.durability.resume else []
        self.curve = cluster.curve_keys()             # None without --curve
        self.router = Router(self._bind_address(), curve=self.curve)
        self.addr = advertised_endpoint(cluster, self.router.endpoint)
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
        self.snapshot = self.asynchronous is not None or job.backup_workers > 0   # see the module's docstring
        self.waiting_pulls: list[tuple] = []      # (identity, rid, min_version, since)
        self.tracer = NULL_TRACER                 # --trace: spans wait for pushes, store push, average, update, reply
        self.ready_at = 0.0                       # tracer clock: when this step began waiting for pushes
        self.traffic = Traffic(cluster.num_servers, cluster.num_workers)   # per peer, for ps-status

    def _bind_address(self) -> str:
        """Where to listen: a server resuming binds the address in its checkpoint (so the
        connections of workers and peers find it again), unless --bind names a port."""
        bind = server_bind(self.cluster, self.rank)
        if self.resumable and (not self.cluster.bind or bind.rsplit(":", 1)[1] in ("*", "0")):
            try:
                return checkpoint.peek(self.checkpoints, self.rank, self.resumable[-1]).get("bind", bind)
            except (OSError, ValueError, KeyError) as e:
                log.warning("cannot read the address in the newest checkpoint (%s); binding %s", e, bind)
        return bind

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
                     checkpoints_written=self.checkpoints_written, resumed_at=self.resumed_at,
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

    def close(self):
        for s in [self.router, self.coord, *self.peers.values()]:
            if s is not None:
                s.close()

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

    # --- registration -----------------------------------------------------------------
    def _register(self):
        meta = dict(role="server", rank=self.rank, host=host_name(), pid=os.getpid(),
                    addr=self.addr, optim=to_dict(self.optim), job=to_dict(self.job))
        if self.durability.resume:
            meta["versions"] = self.resumable
        if self.rank == 0:
            self.members.register(b"", meta)
            deadline = time.monotonic() + self.cluster.timeout
            while not self.members.started:
                left = deadline - time.monotonic()
                if left <= 0:
                    text = (f"registration timed out after {self.cluster.timeout:.0f} s: still missing "
                            f"{self.members.missing()}; the coordinator is {self.addr}")
                    self._refuse_registered(text)
                    raise ServerError(text)
                if self.router.poll(min(left, 1.0) * 1000):
                    identity, frames = self.router.recv()
                    self._handle(identity, frames)
            return
        frames = codec.encode(REGISTER, self.name, rid=1, **meta)
        self.coord.send(frames)
        sent_on = self.coord.connections()[0]
        deadline = time.monotonic() + self.cluster.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"the coordinator at {self.cluster.coordinator} has not answered this "
                                  f"server's registration for {self.cluster.timeout:.0f} s "
                                  f"({self.coord.diagnose()}); is server 0 running, and are all "
                                  "processes started?")
            why = self.coord.refused()                    # a refused handshake never answers
            if why:
                raise ServerError(f"cannot talk to the coordinator at {self.cluster.coordinator}: {why}")
            if self.coord.connections()[0] > max(sent_on, 1):   # reconnected: the request may be lost
                self.coord.send(frames)
                sent_on = self.coord.connections()[0]
            if self.coord.poll(min(left, 0.5) * 1000):
                msg = self._decode(self.coord.recv(), "the coordinator")
                if msg is None:
                    continue
                if msg.cmd == ERROR:
                    raise ServerError(f"the coordinator refused this server: {msg.meta['message']}")
                if msg.cmd == JOB:
                    self._start(msg.meta)
                    return

    def _refuse_registered(self, text):
        for m in [*self.members.servers.values(), *self.members.workers]:
            if m.identity:
                self.router.send(m.identity, codec.encode(ERROR, self.name, message=text))

    def _start(self, job: dict):
        """Set up the shard from the coordinator's JOB answer (and a checkpoint when it names a version)."""
        layout = Layout.from_table(job["layout"])
        chunks = [(b, e) for b, e, s in job["placement"] if s == self.rank]
        self.shard = Shard(chunks, job["dtype"], self.optim, layout.decay_ranges())
        self.layout_hash = job["layout_hash"]
        self.server_addrs = list(job["servers"])
        self.session = job.get("session", 0)
        self.on_view(job.get("view", 1), job.get("workers", [[r, 0] for r in range(self.num_workers)]))
        if self.sync and self.sync.exchange:            # the step agreement (and norms for clipping)
            for s, addr in enumerate(self.server_addrs):
                if s != self.rank:
                    self.peers[s] = Dealer(addr, identity=self.identity + b"/peer", curve=self.curve)
        version = job.get("version", 0)
        if version:
            self._load_checkpoint(version, job.get("rejoin", False))
        self.coord_heard = time.monotonic()
        log.info("job started: %d worker(s), %d server(s), %d of %d parameters here (%s), %s, version %d",
                 job["num_workers"], job["num_servers"], self.shard.size, layout.size,
                 self.shard.describe_chunks(), job["dtype"], self.shard.version)

    def _load_checkpoint(self, version: int, rejoin: bool):
        if version not in self.resumable:
            raise ServerError(f"the job resumes at version {version}, but this server has no checkpoint of it "
                              f"(it has {self.resumable or 'none'} in {self.checkpoints or '(no folder)'}); "
                              "start it with --resume and its --checkpoint-dir")
        try:
            extra = checkpoint.load(self.checkpoints, self.rank, version, self.shard, self.layout_hash)
        except checkpoint.CheckpointError as e:
            raise ServerError(str(e)) from None
        self.applied.load(extra.get("applied", []))
        if self.sync:
            self.sync.agreement.load(extra.get("agreement", {}))
            self.sync.agreement.begin(version)
        if rejoin:                                 # back into a running job
            self.resumed_at = version
        log.info("loaded the checkpoint of version %d from %s", version, self.checkpoints)
        a = self.sync.agreement if self.sync else None
        if a is not None and a.last is not None and self.peers and self.resumed_at is not None:
            step, mine, sumsq = a.last            # a peer may still wait for our part of our last step
            meta = {"sumsq": sumsq, "echo": True, **({"workers": mine} if a.by_set else {})}
            for peer in self.peers.values():
                peer.send(codec.encode(NORM, self.name, step=step, **meta))

    # --- checkpoints ------------------------------------------------------------------
    def _checkpoint(self):
        if not self.checkpoints or self.shard is None or not self.shard.initialized:
            return
        extra = {"bind": self.router.endpoint, "addr": self.addr, "view": self.view_number,
                 "workers": [[r, s] for r, s in sorted(self.view.items())], "applied": self.applied.state(),
                 "agreement": self.sync.agreement.state() if self.sync else {}}
        t0 = time.perf_counter()
        with self.tracer.span("checkpoint", step=self.shard.version):
            path = checkpoint.save(self.checkpoints, self.rank, self.shard, self.layout_hash, extra)
        self.checkpoints_written += 1
        log.debug("checkpoint %s written in %.3f s", path, time.perf_counter() - t0)

    def after_update(self):
        """An update was applied: a checkpoint when one is due; the fault injection of --die-at-version."""
        version, d = self.shard.version, self.durability
        if d.checkpoint_every and version % d.checkpoint_every == 0:
            self._checkpoint()
        if d.die_at_version and version == d.die_at_version:
            log.warning("--die-at-version %d: killing this server (SIGKILL), as a crash would", version)
            os.kill(os.getpid(), signal.SIGKILL)

    def _final_checkpoint(self):
        """The checkpoint of the version this server stops at (unless it just wrote it)."""
        try:
            if self.shard is not None and checkpoint.versions(self.checkpoints, self.rank)[-1:] != [self.shard.version]:
                self._checkpoint()
        except (OSError, ValueError) as e:
            log.warning("could not write the final checkpoint in %s: %s", self.checkpoints, e)

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

    def on_signal(self, signum, frame):
        """TERM or Ctrl-C: stop, but never in the middle of a change of state (an update half
        applied would go into the checkpoint written on the way out)."""
        if self.busy:
            self.interrupted = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def _critical(self):
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
        if not self.busy and self.interrupted:
            raise KeyboardInterrupt(f"signal {self.interrupted}")

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

    def _handle_control(self, frames):
        """A message from the coordinator (servers s > 0): a heartbeat's answer, a view, the end."""
        msg = self._decode(frames, "the coordinator")
        if msg is None:
            return
        if msg.cmd in (OK, VIEW):
            self.coord_heard = time.monotonic()
            if "workers" in msg.meta and "view" in msg.meta:
                try:
                    self.on_view(msg.meta["view"], msg.meta["workers"])
                except ProtocolError as e:
                    self.refused += 1
                    log.warning("refused a view from the coordinator: %s", e)
        elif msg.cmd == SHUTDOWN and msg.meta.get("failed"):
            self.answer_all_with_error(f"the job is stopping: {msg.meta.get('reason', '')}")
            raise ServerError(f"the coordinator stopped the job: {msg.meta.get('reason', '')}")
        elif msg.cmd == SHUTDOWN:
            log.info("the coordinator asked this server to stop (%s)", msg.meta.get("reason", ""))
            self.stopping = True
        elif msg.cmd == ERROR:
            self.answer_all_with_error(msg.meta["message"])
            raise ServerError(f"the coordinator: {msg.meta['message']}")
        else:
            log.warning("ignored %s from the coordinator", msg.cmd)

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

    def on_view(self, number: int, pairs):
        """The coordinator's view ``number``: the live workers and their sessions."""
        if number <= self.view_number:
            return
        view = session_list(pairs, self.num_workers, "view: workers")
        gone, new = set(self.view) - set(view), set(view) - set(self.view)
        self.view, self.view_number = view, number
        if self.view_number > 1 and (gone or new):
            log.info("view %d: workers %s%s%s", number, sorted(view), f"; dropped {sorted(gone)}" if gone else "",
                     f"; joined {sorted(new)}" if new else "")
        if self.asynchronous:
            for r in gone:
                self.asynchronous.done(r)            # a dead worker holds nobody back (ssp)
            for r in new:
                self.rule.live.add(r)
        elif self.sync and self.shard is not None:
            self.sync.maybe_propose()                # a step may have waited for a worker now gone

    def _heartbeat(self):
        """Servers s > 0: a heartbeat to the coordinator when one is due."""
        if self.coord is None or self.shard is None or self.cluster.heartbeat <= 0:
            return
        now = time.monotonic()
        if now - self.last_beat >= self.cluster.heartbeat:
            self.last_beat = now
            self.coord.send(codec.encode(HEARTBEAT, self.name, step=self.shard.version, session=self.session,
                                         version=self.shard.version))

    def ahead(self, msg, rank: int, session: int):
        """A push for a step this server has not reached: a protocol error, unless this server
        came back from a checkpoint older than the job (then it stops the job, saying why)."""
        if self.resumed_at is not None and self.view.get(rank) == session and self.shard.version == self.resumed_at:
            text = (f"this server came back from its checkpoint of version {self.resumed_at}, but worker {rank} "
                    f"is already at step {msg.step}: the steps in between died with this server's previous "
                    "process. Resume the whole job from the servers' checkpoints (every role with --resume; "
                    "docs/failures.md)")
            if self.coord is not None:
                self.coord.send(codec.encode(HEARTBEAT, self.name, session=self.session, error=text))
            self.answer_all_with_error(text)
            raise ServerError(text)
        raise ProtocolError(f"push for step {msg.step}, but this server is at step {self.shard.version}")

    def answer_all_with_error(self, text: str):
        """Refuse every request this server holds an answer for (the job is stopping)."""
        self.failure = self.failure or text
        held = [(p[0], p[1]) for p in self.waiting_pulls] + [(p[0], p[1]) for p in self.deferred_pulls]
        if self.sync:
            held += self.sync.held()
            self.sync.pending.clear()
            self.sync.late.clear()
        if self.asynchronous:
            held += [(h[0], h[1]) for h in self.asynchronous.held]
            self.asynchronous.held = []
        for identity, rid in held:
            self._reply(identity, ERROR, rid, message=text)
        self.waiting_pulls, self.deferred_pulls = [], []

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

    def _send_params(self, identity, rid, **meta):
        arrays, ranges = self.shard.param_snapshot() if self.snapshot else self.shard.param_views()
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
            else:
                self._send_params(identity, msg.rid, **done["meta"])
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

    def _watch_coordinator(self, now: float):
        """A server s > 0 stops when the coordinator is gone: its heartbeats unanswered for the
        silence of a worker and its connection lost, or unanswered for the job's timeout."""
        if self.cluster.heartbeat <= 0:
            return
        quiet = now - self.coord_heard
        handshakes, _ = self.coord.connections()
        lost = handshakes > 0 and not self.coord.is_up()
        if quiet > self.cluster.timeout or (lost and quiet > self.cluster.silence_s):
            text = (f"the coordinator (server 0 at {self.cluster.coordinator}) has not answered heartbeats for "
                    f"{quiet:.1f} s ({self.coord.diagnose()}): it is dead or cut off, and the job cannot go on "
                    "without it; resume the whole job from the checkpoints (docs/failures.md)")
            self.answer_all_with_error(text)
            raise ServerError(text)
