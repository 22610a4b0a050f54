"""The server process: one poll loop that registers, serves pulls and pushes, and stops.

Shape of the loop (the ZeroMQ guide's): poll the sockets with a timeout no longer than
the nearest deadline, handle every waiting message, then check the deadlines. A
message is decoded and validated before any handler sees it; a bad one is refused
with an ERROR reply and a log line, and the server's state is left as it was.

Bulk synchronous SGD (BSP), as this server runs it for step t (its ``version``):
    1. each worker's PUSH of step t lands in that worker's slot; its reply is held back;
    2. when every worker has pushed, the slots are averaged in rank order;
    3. with clipping on, the servers swap the squared norms of their shares of the
       averaged gradient (NORM) so each clips by the norm of the WHOLE gradient;
    4. the optimizer steps, ``version`` becomes t + 1, and every held push is answered
       with the fresh parameters of this shard (a push is also a pull).
Server 0 is also the coordinator (``membership.py``): it registers every process,
hands out the job, and shuts the servers down when every worker is done.

The other consistency models (``--mode``; their rules are in ``consistency.py``) use
the same loop: backup workers change step 2 to "the first W - b workers" and answer a
late push at once; local SGD's pushes are parameter changes, averaged and subtracted
in step 4 (no optimizer, no clipping here); asp and ssp apply each push as it arrives
(``consistency.AsyncServing``), and ssp holds an answer back while its worker is too
far ahead.
Replies are sent without a copy: in BSP the parameters cannot change before every
answer has left (the next update needs every worker's next push, which needs its
answer); in the other modes an update can come first, so answers are sent from a
per-version copy (``Shard.param_snapshot``). With ``out``, the server writes what the
consistency model cost (staleness, dropped pushes, updates/s) to ``server-S.json``.

Not here: what a message looks like (``common/protocol.py``, ``common/codec.py``),
sockets (``common/transport.py``), the optimizer (``common/optim.py``).
"""
from __future__ import annotations

import logging
import os
import time

from common import codec
from common.compress import make_scheme
from common.cluster import ClusterConfig, JobConfig, advertised_endpoint, host_name, server_bind
from common.config import to_dict
from common.layout import Layout
from common.optim import OptimConfig
from common.placement import place_chunks, place_contiguous
from common.protocol import (
    BARRIER, DONE, ERROR, INIT, JOB, NORM, OK, PULL, PUSH, REGISTER, SHUTDOWN, STATUS,
    ProtocolError,
)
from common.trace import NULL_TRACER
from common.transport import Dealer, Poller, Router, local_endpoint, reachable_locally
from paramserver.assembly import StepAssembly
from paramserver.consistency import COUNT, LATE, AsyncRule, AsyncServing, Recorder, make_rule
from paramserver.membership import Membership
from paramserver.shard import Shard
from paramserver.traffic import Traffic, frames_nbytes

log = logging.getLogger("server")


class ServerError(RuntimeError):
    """The job cannot go on (a deadline passed, the coordinator refused us); the text says why."""


placement_contiguous = place_contiguous      # the placement before chunks (common/placement.py)


def parse_sender(sender: str, role: str, count: int) -> int:
    """The rank in a header's ``from`` field ``role:rank``, checked against ``count``."""
    r, _, k = sender.partition(":")
    if r != role or not k.isdigit() or int(k) >= count:
        raise ProtocolError(f"expected a sender '{role}:<0..{count - 1}>', got {sender!r}")
    return int(k)


class Server:
    def __init__(self, cluster: ClusterConfig, optim: OptimConfig, job: JobConfig, rank: int, out: str = ""):
        if not 0 <= rank < cluster.num_servers:
            raise ValueError(f"server rank {rank} out of range for {cluster.num_servers} server(s)")
        job.check_workers(cluster.num_workers)
        if job.compress_momentum and optim.optimizer != "sgd":
            raise ValueError(f"--compress-momentum {job.compress_momentum} applies momentum on the workers: run "
                             f"the servers with --optimizer sgd, not {optim.optimizer}")
        self.cluster, self.optim, self.job, self.rank = cluster, optim, job, rank
        self.out = out                            # folder for server-S.json ('' = none)
        self.name = f"server:{rank}"
        self.curve = cluster.curve_keys()             # None without --curve
        self.router = Router(server_bind(cluster, rank), curve=self.curve)
        self.addr = advertised_endpoint(cluster, self.router.endpoint)
        self.ipc = local_endpoint(self.addr, host_name()) if cluster.ipc else ""
        if self.ipc and not self.router.bind_also(self.ipc):
            self.ipc = ""
        self.poller = Poller([self.router])
        self.coord = None if rank == 0 else Dealer(cluster.coordinator, curve=self.curve)
        if self.coord:
            self.poller.add(self.coord)
        self.members = (Membership(cluster.num_servers, cluster.num_workers, to_dict(optim), to_dict(job))
                        if rank == 0 else None)
        self.shard: Shard | None = None
        self.num_workers = cluster.num_workers
        self.peers: dict[int, Dealer] = {}        # other servers, for the norm exchange
        self.server_addrs: list[str] = []
        self.pending: dict[int, tuple] = {}       # worker rank -> (identity, rid, meta) of this step's push
        self.step_started = 0.0
        self.norms: dict[int, dict[int, float]] = {}   # step -> {server rank: its sumsq}
        self.awaiting_norms = False
        self.deferred_pulls: list[tuple] = []     # (identity, rid, since) of pulls before init
        self.stopping = False
        self.refused = 0                          # messages refused at the door
        self.started = time.monotonic()
        self.rule = make_rule(job.mode, cluster.num_workers, job.staleness, job.backup_workers)
        self.recorder = Recorder(job.mode, cluster.num_workers)
        self.asynchronous = None                  # asp/ssp: the AsyncServing that applies pushes
        if isinstance(self.rule, AsyncRule):
            self.asynchronous = AsyncServing(self.rule, self.recorder, self._send_params,
                                             lambda ident, rid, text: self._reply(ident, ERROR, rid, message=text),
                                             job.mode, optim.grad_clip, cluster.timeout)
        self.snapshot = self.asynchronous is not None or job.backup_workers > 0   # see the module's docstring
        self.late: list[tuple] = []               # (identity, rid) of pushes late for a step being applied
        self.waiting_pulls: list[tuple] = []      # (identity, rid, min_version, since)
        self.tracer = NULL_TRACER                 # --trace: spans wait for pushes, store push, average, update, reply
        self.ready_at = 0.0                       # tracer clock: when this step began waiting for pushes
        self.traffic = Traffic(cluster.num_servers, cluster.num_workers)   # per peer, for ps-status
        # plain BSP: pushes arrive chunk by chunk, each chunk averaged and updated as soon as it
        # may be, each push answered as soon as its chunks are updated (assembly.py)
        self.chunkwise = job.mode == "bsp" and job.backup_workers == 0
        self.assembly: StepAssembly | None = None

    # --- the loop -------------------------------------------------------------------
    def run(self) -> int:
        log.info("listening on %s, advertised as %s", self.router.endpoint, self.addr)
        try:
            self._register()
            while not self.stopping:
                for sock in self.poller.poll(self._poll_timeout_ms()):
                    while sock.poll(0) and not self.stopping:
                        if sock is self.router:
                            identity, frames = self.router.recv()
                            self._handle(identity, frames)
                        else:
                            self._handle_control(sock.recv())
                self._check_deadlines()
            log.info("stopped cleanly at version %s", self.shard.version if self.shard else 0)
            return 0
        finally:
            self._write_metrics()
            self.close()

    def _write_metrics(self):
        if not self.out or self.shard is None:
            return
        try:
            self.recorder.write(self.out, f"server-{self.rank}.json", self.shard.version, rank=self.rank,
                                staleness_bound=self.job.staleness if self.job.mode == "ssp" else None,
                                backup_workers=self.job.backup_workers, num_workers=self.num_workers,
                                wall_s=time.monotonic() - self.started)
        except OSError as e:
            log.warning("could not write server-%d.json in %s: %s", self.rank, self.out, e)

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
        if self.pending or self.awaiting_norms or (self.assembly and self.assembly.started):
            starts.append(self.step_started)
        if starts:
            return max(1.0, (min(starts) + self.cluster.timeout - time.monotonic()) * 1000)
        return 1000.0

    # --- registration -----------------------------------------------------------------
    def _register(self):
        meta = dict(role="server", rank=self.rank, host=host_name(), pid=os.getpid(),
                    addr=self.addr, optim=to_dict(self.optim), job=to_dict(self.job))
        if self.ipc:
            meta["ipc"] = self.ipc
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
        self.coord.send(codec.encode(REGISTER, self.name, **meta))
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
        """Set up the shard from the coordinator's JOB answer."""
        layout = Layout.from_table(job["layout"])
        chunks = [(b, e) for b, e, s in job["placement"] if s == self.rank]
        scheme = make_scheme(self.job.compress, self.job.compress_ratio, self.job.error_feedback == "on")
        self.shard = Shard(chunks, job["dtype"], self.optim, layout.decay_ranges(), scheme)
        if self.chunkwise:
            self.assembly = StepAssembly(len(chunks), self.num_workers)

        self.server_addrs = list(job["servers"])
        if self.optim.grad_clip > 0 and self.job.mode == "bsp":     # see _average_step
            ipc = job.get("ipc") or [""] * len(self.server_addrs)
            for s, addr in enumerate(self.server_addrs):
                if s != self.rank:
                    near = self.cluster.ipc and reachable_locally(ipc[s])
                    self.peers[s] = Dealer(ipc[s] if near else addr, curve=self.curve)
        log.info("job started: %d worker(s), %d server(s), %d of %d parameters here (%s), %s",
                 job["num_workers"], job["num_servers"], self.shard.size, layout.size,
                 self.shard.describe_chunks(), job["dtype"])

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
            log.warning("could not answer %s: the peer is gone or not reading", identity[:16])

    def _handle(self, identity: bytes, frames):
        msg = self._decode(frames, f"peer {identity[:16]!r}")
        if msg is None:
            self._reply(identity, ERROR, 0, message="malformed message refused (see the server's log)")
            return
        self.traffic.received(identity, msg.sender, frames_nbytes(frames), msg.step, msg.cmd, self.router.last_peer)
        handler = {REGISTER: self._on_register, INIT: self._on_init, PULL: self._on_pull,
                   PUSH: self._on_push, NORM: self._on_norm, DONE: self._on_done,
                   STATUS: self._on_status, BARRIER: self._unsupported,
                   SHUTDOWN: self._unsupported}.get(msg.cmd, self._unsupported)
        try:
            handler(identity, msg)
        except ProtocolError as e:
            self.refused += 1
            log.warning("refused %s from %s: %s", msg.cmd, msg.sender, e)
            if msg.cmd != NORM:
                self._reply(identity, ERROR, msg.rid, message=str(e))

    def _handle_control(self, frames):
        msg = self._decode(frames, "the coordinator")
        if msg is not None and msg.cmd == SHUTDOWN:
            log.info("the coordinator asked this server to stop (%s)", msg.meta.get("reason", ""))
            self.stopping = True
        elif msg is not None:
            log.warning("ignored %s from the coordinator", msg.cmd)

    def _unsupported(self, identity, msg):
        raise ProtocolError(f"{msg.cmd} is not a request this server ({self.name}) serves")

    def _need_shard(self, msg):
        if self.shard is None:
            raise ProtocolError(f"{msg.cmd} before the job started")

    # --- handlers -----------------------------------------------------------------------
    def _on_register(self, identity, msg):
        if self.members is None:
            raise ProtocolError(f"register with the coordinator, not with {self.name}")
        self.members.register(identity, msg.meta)
        log.info("registered %s %s from %s (pid %s); still missing: %s", msg.meta["role"],
                 msg.meta["rank"] if msg.meta["rank"] >= 0 else "(rank to assign)",
                 msg.meta["host"], msg.meta["pid"], self.members.missing())
        if self.members.complete():
            replies = self.members.start(lambda layout, S: place_chunks(layout, S, self.job.chunk_mb))
            log.info("the job's address table:\n%s", self.members.describe_table())
            for ident, job in replies:
                if ident == b"":
                    self._start(job)
                else:
                    self._reply(ident, JOB, 0, **job)

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
        if self.asynchronous:
            self.asynchronous.push(shard, identity, msg, rank)
            self._release_pulls()
            return
        kind = self.rule.classify(msg.step, shard.version, self.pending, rank)
        if self.chunkwise:
            self._on_chunks(identity, msg, rank)
            return
        shard.check_full_cover(msg.ranges, "push")
        with self.tracer.span("store push", step=msg.step, worker=rank):
            shard.store_gradient(rank, msg)     # decodes and checks; a late push's slot is not averaged
        if kind != COUNT:                   # backup workers: this step went on without it
            self.recorder.dropped(rank, shard.version - msg.step)
            if kind == LATE:
                self._send_params(identity, msg.rid, dropped=True)
            elif len(self.late) < self.num_workers:     # its step is being applied: answer after
                self.late.append((identity, msg.rid))
            else:
                raise ProtocolError(f"too many late pushes for step {msg.step}")
            return
        if not self.pending:
            self.step_started = time.monotonic()
        self.pending[rank] = (identity, msg.rid, msg.meta)
        if self.rule.complete(self.pending):
            self.tracer.add("wait for pushes", self.ready_at, self.tracer.now(), step=msg.step)
            self._average_step()

    def _on_chunks(self, identity, msg, rank):
        """Plain BSP: a push of some of this server's chunks (``assembly.py``). Each chunk is
        averaged once every worker has pushed it and, without clipping, updated at once;
        a push is answered once its chunks are updated. The last push of the step runs
        the step's end (``_average_step``), which updates what is left in the order of the
        flat vector and answers with the step's mean loss and counters."""
        shard, asm = self.shard, self.assembly
        if not msg.arrays or None in msg.ranges:
            raise ProtocolError("a push carries whole chunks, each with its range in the flat vector")
        chunks = [shard.chunk_index(*r) for r in dict.fromkeys(msg.ranges)]
        asm.check(rank, chunks)              # before anything is written: a resent chunk changes nothing
        with self.tracer.span("store push", step=msg.step, worker=rank):
            shard.store_gradient(rank, msg, hold=True)
        if not asm.started:
            self.step_started = time.monotonic()
        complete = asm.add(identity, msg.rid, rank, chunks, msg.meta)
        if complete:
            with self.tracer.span("average", step=msg.step):
                for c in complete:
                    shard.average_chunk(c, range(self.num_workers))
        if asm.rank_done(rank):
            self.pending[rank] = (identity, msg.rid, asm.meta[rank])
        if self.rule.complete(self.pending):
            self.tracer.add("wait for pushes", self.ready_at, self.tracer.now(), step=msg.step)
            self._average_step()
        elif self.optim.grad_clip == 0:       # no global norm to wait for: update what is complete now
            with self.tracer.span("update", step=shard.version):
                self._update_chunks(None)

    def _update_chunks(self, global_sumsq, **meta):
        """Update the complete chunks not yet updated, in the order of the flat vector, and
        answer each push as soon as every chunk it carried is updated (with ``meta``)."""
        shard, asm = self.shard, self.assembly
        for c in asm.to_update():
            if not shard.updating:
                shard.begin_update(global_sumsq)
            shard.update_chunk(c)
            asm.updated.add(c)
            for m in asm.answerable():
                chunks = sorted(m.chunks)
                with self.tracer.span("reply", step=shard.version):
                    self._reply(m.identity, OK, m.rid, arrays=[shard.params[shard.chunk_slice(c)] for c in chunks],
                                ranges=[shard.chunks[c] for c in chunks], version=shard.version + 1, **meta)

    def _average_step(self):
        shard = self.shard
        if not self.chunkwise:              # (chunkwise: each chunk was averaged as it completed)
            with self.tracer.span("average", step=shard.version):
                shard.average(self.pending)
        self.ready_at = self.tracer.now()          # (norm exchange, if any, runs from here)
        if self.job.mode == "local-sgd":        # the workers clipped their own steps
            self._finish_step(None)
        elif self.optim.grad_clip > 0 and self.peers:
            step = shard.version
            mine = shard.local_sumsq()
            self.norms.setdefault(step, {})[self.rank] = mine
            for peer in self.peers.values():
                peer.send(codec.encode(NORM, self.name, step=step, sumsq=mine))
            self.awaiting_norms = True
            self._maybe_finish_norms()
        else:
            self._finish_step(shard.local_sumsq() if self.optim.grad_clip > 0 else None)

    def _on_norm(self, identity, msg):
        self._need_shard(msg)
        if not self.peers:
            raise ProtocolError("this server exchanges no gradient norms (clipping off, or a single server)")
        peer = parse_sender(msg.sender, "server", len(self.server_addrs))
        if peer == self.rank:
            raise ProtocolError("a norm from this server's own rank")
        # a peer can only be at this server's step: it cannot finish the step without our norm,
        # and the workers cannot push the next step before we answered this one
        if msg.step != self.shard.version:
            raise ProtocolError(f"norm for step {msg.step}, but this server is at step {self.shard.version}")
        self.norms.setdefault(msg.step, {})[peer] = float(msg.meta["sumsq"])
        self._maybe_finish_norms()

    def _maybe_finish_norms(self):
        got = self.norms.get(self.shard.version, {})
        if self.awaiting_norms and len(got) == len(self.server_addrs):
            self.awaiting_norms = False
            self.tracer.add("norm exchange", self.ready_at, self.tracer.now(), step=self.shard.version)
            self._finish_step(sum(got[s] for s in sorted(got)))
            self.norms.pop(self.shard.version - 1, None)

    def _finish_step(self, global_sumsq):
        shard = self.shard
        metas = [self.pending[r][2] for r in sorted(self.pending)]
        losses = [m["loss"] for m in metas if "loss" in m]
        stats = {k: sum(m.get(k, 0) for m in metas) for k in ("tokens", "bytes_pushed", "bytes_pulled")}
        self.recorder.step(self.pending, shard.version)
        extra = {"loss": sum(losses) / len(losses)} if losses else {}
        with self.tracer.span("update", step=shard.version):
            if self.job.mode == "local-sgd":
                shard.apply_delta()
            elif self.chunkwise:            # update and answer chunk by chunk, in forward order
                self._update_chunks(global_sumsq, stats=stats, **extra)
                shard.end_update()
                self.assembly.reset()
            else:
                shard.apply(global_sumsq)
        if not self.chunkwise:
            with self.tracer.span("reply", step=shard.version - 1):
                for r in sorted(self.pending):
                    identity, rid, _ = self.pending[r]
                    self._send_params(identity, rid, stats=stats, **extra)
        self.pending.clear()
        for identity, rid in self.late:
            self._send_params(identity, rid, dropped=True)
        self.late.clear()
        self._release_pulls()
        self.ready_at = self.tracer.now()

    def _on_done(self, identity, msg):
        rank = parse_sender(msg.sender, "worker", self.num_workers)
        self.recorder.done(rank, self.shard.version if self.shard else 0)
        if self.asynchronous:               # ssp: a finished worker no longer holds anyone back
            self.asynchronous.done(rank)
        if self.members is None:            # asp/ssp workers tell every server, not only server 0
            if not self.asynchronous:
                raise ProtocolError(f"done goes to the coordinator, not to {self.name}")
            self._reply(identity, OK, msg.rid)
            return
        all_done = self.members.mark_done(rank)
        self._reply(identity, OK, msg.rid)
        log.info("worker %d is done (%d of %d)", rank, len(self.members.done), self.num_workers)
        if all_done:
            for s, m in self.members.servers.items():
                if s != 0:
                    self._reply(m.identity, SHUTDOWN, 0, reason="every worker is done")
            self.stopping = True

    def _on_status(self, identity, msg):
        """What this server knows, for ``ps-status``; the coordinator adds the address table."""
        status = {"rank": self.rank, "addr": self.addr, "version": self.shard.version if self.shard else -1,
                  "uptime_s": round(time.monotonic() - self.started, 3), "refused": self.refused,
                  "waiting_for": sorted(set(range(self.num_workers)) - set(self.pending)) if self.pending else [],
                  "host": host_name(), "pid": os.getpid(), "time": time.time(),
                  "bytes_in": self.traffic.bytes_in, "bytes_out": self.traffic.bytes_out,
                  "peers": self.traffic.table(), "mode": self.job.mode}
        if self.members is not None:
            status.update(members=self.members.table(), started=self.members.started,
                          done=sorted(self.members.done), missing=self.members.missing())
        if self.asynchronous:
            status.update(clocks=list(self.rule.clocks), held=sorted(h[2] for h in self.asynchronous.held))
        self._reply(identity, OK, msg.rid, status=status)

    # --- deadlines ----------------------------------------------------------------------
    def _check_deadlines(self):
        now = time.monotonic()
        started = self.pending or self.awaiting_norms or (self.assembly and self.assembly.started)
        if started and now - self.step_started > self.cluster.timeout:
            step = self.shard.version
            if self.awaiting_norms:
                got = self.norms.get(step, {})
                missing = [f"server {s} at {self.server_addrs[s]}" for s in range(len(self.server_addrs)) if s not in got]
                raise ServerError(f"step {step}: no gradient norm from {', '.join(missing)} within "
                                  f"{self.cluster.timeout:.0f} s; is that server alive?")
            missing = sorted(set(range(self.num_workers)) - set(self.pending))
            raise ServerError(f"step {step}: worker(s) {missing} have not pushed within "
                              f"{self.cluster.timeout:.0f} s of the first push (workers "
                              f"{sorted(self.pending)} did); are they alive? see their logs")
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
