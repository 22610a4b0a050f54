"""Synchronous steps on one server: bsp (with or without backup workers), local-sgd and diloco.

Step t, as this server runs it (its ``version`` is t):
    1. each worker's PUSH of step t lands in that worker's slot; its answer is held back;
    2. once every worker of the view has pushed (or a peer's proposal shows a missing
       one cannot count), the server proposes the set of workers it holds, averages
       their slots in rank order, and with S > 1 exchanges its proposal with the other
       servers (NORM, which also carries its share of the squared norm of the averaged
       gradient, so each server clips by the norm of the WHOLE gradient): the servers
       agree on one set (``agreement.py``);
    3. the optimizer steps (local-sgd: the averaged parameter change is subtracted;
       diloco: it is the gradient of the outer optimizer, the shard's optimizer),
       ``version`` becomes t + 1, the applied pushes are recorded (``dedupe.py``), a
       checkpoint is written when one is due (before any answer leaves: no worker ever
       holds parameters newer than the server could restore), and every held push is
       answered with the fresh parameters of this shard (a push is also a pull); a push
       left out of the set is answered ``dropped``.
In plain BSP a worker may push a step in several messages, a few chunks each, as its
backward produces them (``--overlap``; ``assembly.py``): a worker counts as having
pushed once all this server's chunks are in from it, and step 3 updates chunk by chunk,
in the order of the flat vector, answering each message as soon as its chunks are
updated (unless a checkpoint is due at the new version: then every answer waits for it).
Backup workers change step 2 to "the first W - b pushes" and answer a push that comes
after those with ``dropped``. A resent push (same worker, session and request id) is
never stored twice: while its step is open its answer just goes to the connection it
came from last, and once applied it is answered again from the record.

The serving object is given what a step needs and nothing else: the shard, the replier
(the only sender), the view, the records of applied pushes, the checkpoints (which may
hold the answers of a version back), the pulls waiting for a version, and a clock; it
never sees the server.

Not here: sockets and message decoding (``server.py``), asp/ssp (``modes.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from common.wire.protocol import ProtocolError, session_list
from paramserver.agreement import Agreement
from paramserver.assembly import StepAssembly
from paramserver.modes import COUNT, LATE, LATE_WAIT, WIRE_COUNTERS, Recorder, ServingParts, SyncRule


@dataclass
class HeldPush:
    """A push of this step whose answer waits for the step (all its chunks, when chunk-wise)."""
    identity: bytes
    rid: int
    meta: dict
    session: int


@dataclass
class LatePush:
    """A push this step does not count, answered ``dropped`` once the step is over."""
    identity: bytes
    rid: int
    rank: int
    session: int
    chunks: list | None


class SyncServing:
    def __init__(self, shard, parts: ServingParts, rank: int, server_addrs: list, mode: str, num_workers: int,
                 backup_workers: int, clip: bool, clock=time.monotonic):
        """``server_addrs``: every server's address (for deadline errors); ``clip``: clip by the
        norm of the whole averaged gradient (bsp with --grad-clip; local-sgd clips on the workers)."""
        self.shard, self.parts, self.clock = shard, parts, clock
        self.replier, self.view, self.tracer = parts.replier, parts.view, parts.tracer
        self.applied, self.checkpoints, self.pulls = parts.applied, parts.checkpoints, parts.pulls
        self.server_addrs, self.mode, self.num_workers = list(server_addrs), mode, num_workers
        self.rule = SyncRule(num_workers, backup_workers)
        self.recorder = Recorder(mode, num_workers)
        S = len(self.server_addrs)
        self.pending: dict[int, HeldPush] = {}  # worker rank -> its push of this step
        self.late: list[LatePush] = []          # answered ``dropped`` after the step
        self.step_started = 0.0                 # when the first push of this step arrived
        self.ready_at = 0.0                     # tracer clock: when this step began waiting for pushes
        self.agreement = Agreement(rank, S, by_set=backup_workers == 0)
        self.exchange = S > 1
        self.clip = clip
        self.sent_at = 0.0                      # when this step's proposal was last sent
        self.sent_links: dict[int, int] = {}    # peer -> its link's handshakes when we last sent it our proposal
        # (rank, session) -> its counters (WIRE_COUNTERS): the last of every worker process whose
        # push was applied, so a worker that died or restarted stays in the job's totals
        self.wire: dict[tuple[int, int], tuple] = {}
        # plain BSP: pushes arrive chunk by chunk (worker --overlap) and are answered chunk by chunk
        self.asm = StepAssembly(len(shard.chunks)) if mode == "bsp" and backup_workers == 0 else None

    @property
    def started(self) -> bool:
        """Some push of this step arrived."""
        return bool(self.pending) or (self.asm is not None and self.asm.started)

    @property
    def busy(self) -> bool:
        """A step is open: pushes arrived, or a proposal is out."""
        return self.started or self.agreement.mine is not None

    # --- pushes -----------------------------------------------------------------------
    def push(self, identity, msg, rank: int, session: int):
        if self.asm is not None:
            return self._push_chunks(identity, msg, rank, session)
        shard = self.shard
        held = self.pending.get(rank)
        if held is not None and held.rid == msg.rid and held.session == session:
            held.identity = identity                            # a resend: answer where it came from
            return
        if self._resent_late(identity, msg.rid, rank, session):
            return
        if msg.step > shard.version:
            self.parts.ahead(msg, rank, session)                       # raises: a protocol error, or this server is behind
        if msg.step < shard.version:
            kind = LATE                                         # its step went on without it
        elif held is not None or self.agreement.mine is not None:
            if held is not None and held.session == session:
                raise ProtocolError(f"worker {rank} already pushed for step {msg.step}")
            kind = LATE_WAIT                                    # proposed already / a new incarnation of a pusher
        else:
            kind = self.rule.classify(msg.step, shard.version, self.pending, rank)
        shard.check_full_cover(msg.ranges, "push")
        if kind != COUNT:
            self._not_counted(kind, identity, msg, rank, session, None)
            return
        with self.tracer.span("store push", step=msg.step, worker=rank):
            shard.store_gradient(rank, msg)         # decodes (--compress) and checks, or refuses
        if not self.pending:
            self.step_started = self.clock()
        self.pending[rank] = HeldPush(identity, msg.rid, msg.meta, session)
        self.maybe_propose()

    def _resent_late(self, identity, rid, rank, session) -> bool:
        """A resend of a push held for a ``dropped`` answer: answer where it came from."""
        for late in self.late:
            if (late.rid, late.rank, late.session) == (rid, rank, session):
                late.identity = identity
                return True
        return False

    def _not_counted(self, kind, identity, msg, rank, session, chunks):
        """A push this step does not count (late, or after the proposal): checked, then
        answered ``dropped`` now (its step is over) or after the step (it is being decided)."""
        shard = self.shard
        plain = [i for i, e in enumerate(msg.encs or [None] * len(msg.arrays)) if e is None]
        shard.check_arrays([msg.arrays[i] for i in plain], [msg.ranges[i] for i in plain],
                           [msg.dtypes[i] for i in plain], "push")
        self.recorder.dropped(rank, shard.version - msg.step)
        if kind == LATE:
            self.replier.params(identity, msg.rid, chunks=chunks, dropped=True)
        elif len(self.late) < self.num_workers * len(shard.chunks):
            self.late.append(LatePush(identity, msg.rid, rank, session, chunks))
        else:
            raise ProtocolError(f"too many late pushes for step {msg.step}")

    def _push_chunks(self, identity, msg, rank: int, session: int):
        """Plain BSP: a push message with some of this server's chunks (``assembly.py``)."""
        shard, asm = self.shard, self.asm
        waiting = asm.find(rank, session, msg.rid)
        if waiting is not None:                                 # a resend: answer where it came from
            waiting.identity = identity
            return
        if self._resent_late(identity, msg.rid, rank, session):
            return
        if msg.step > shard.version:
            self.parts.ahead(msg, rank, session)                       # raises: a protocol error, or this server is behind
        if not msg.arrays or None in msg.ranges:
            raise ProtocolError("a push carries whole chunks, each with its range in the flat vector")
        chunks = sorted({shard.chunk_index(*r) for r in msg.ranges})
        other = asm.session.get(rank)
        if msg.step < shard.version:
            kind = LATE                                         # its step went on without it
        elif self.agreement.mine is not None or (other is not None and other != session):
            kind = LATE_WAIT                                    # proposed already / a new incarnation of a pusher
        else:
            kind = COUNT
        if kind != COUNT:
            self._not_counted(kind, identity, msg, rank, session, chunks)
            return
        asm.check(rank, chunks)              # before anything is written: a chunk twice changes nothing
        with self.tracer.span("store push", step=msg.step, worker=rank):
            shard.store_gradient(rank, msg, hold=True)          # decodes and checks, or refuses
        if not self.started:
            self.step_started = self.clock()
        asm.add(identity, msg.rid, rank, session, chunks, msg.meta)
        if asm.rank_done(rank):
            self.pending[rank] = HeldPush(identity, msg.rid, asm.meta[rank], session)
            self.maybe_propose()

    def maybe_propose(self):
        """Propose once the pushes this step waits for are in (see the module's docstring)."""
        if self.agreement.mine is not None or not self.pending:
            return
        if self.agreement.by_set:
            ready = self.agreement.complete(self._pushed(), self.view.workers)
        else:
            ready = self.rule.complete(self.pending)
        if not ready:
            return
        self.tracer.add("wait for pushes", self.ready_at, self.tracer.now(), step=self.shard.version)
        self.agreement.propose(self._pushed())
        self._average()
        if self.exchange:
            self._send_proposal(self.agreement.peers)
            self._maybe_finish()
        else:
            self._finish(self.agreement.sumsq if self.clip else None)

    def _pushed(self):
        return [(r, p.session) for r, p in self.pending.items()]

    def _average(self):
        shard = self.shard
        mine = self.agreement.ranks()
        if mine:
            with self.tracer.span("average", step=shard.version):
                if self.asm is not None:             # the chunks as received, summed in rank order
                    for c in range(len(shard.chunks)):
                        shard.average_chunk(c, mine)
                else:
                    shard.average(mine)
        self.agreement.sumsq = shard.local_sumsq() if (self.clip and mine) else 0.0
        self.ready_at = self.tracer.now()          # (the exchange, if any, runs from here)

    # --- the exchange -----------------------------------------------------------------
    def _send_proposal(self, peers, echo: bool = False, fresh: bool | None = None):
        a = self.agreement
        meta = {"sumsq": a.sumsq}
        if a.by_set:
            meta["workers"] = [list(p) for p in sorted(a.mine)]
        fresh = a.fresh if fresh is None else fresh
        if echo:
            meta["echo"] = True
        elif fresh:
            meta["fresh"] = True
        self.replier.norm(peers, a.step, **meta)
        for p in peers:
            self.sent_links[p] = self.replier.peer_link(p)
        if not echo:
            self.sent_at = self.clock()

    def on_norm(self, peer: int, msg):
        a = self.agreement
        workers = msg.meta.get("workers")
        if workers is not None:
            session_list(workers, self.num_workers, "norm: workers")
        echo = msg.meta.get("echo", False)
        if msg.step == self.shard.version:
            shrunk = a.receive(peer, workers, msg.meta["sumsq"])
            if a.mine is None:
                self.maybe_propose()                 # its proposal may show we wait in vain
            elif shrunk:
                self._average()                      # over the smaller set; tell everyone
                self._send_proposal(a.peers)
            elif msg.meta.get("fresh"):
                self._send_proposal([peer], echo=True)   # it restarted: it may have lost ours
            self._maybe_finish()
        elif msg.step == self.shard.version - 1 and a.last is not None and a.last[0] == msg.step:
            if not echo:                             # a peer still at our last step: answer with it
                step, mine, sumsq = a.last
                meta = {"sumsq": sumsq, "echo": True, **({"workers": mine} if a.by_set else {})}
                self.replier.norm([peer], step, **meta)
        elif not echo:
            raise ProtocolError(f"norm for step {msg.step}, but this server is at step {self.shard.version}")

    def _maybe_finish(self):
        if self.agreement.done():
            self.tracer.add("norm exchange", self.ready_at, self.tracer.now(),
                                step=self.shard.version)
            self._finish(self.agreement.global_sumsq() if self.clip else None)

    def _resend(self, now: float, resend_s: float):
        """Resend our proposal to the peers that have not agreed yet, when their link came
        back (a restarted peer lost it) or every ``resend_s`` seconds."""
        a = self.agreement
        if not self.exchange or a.mine is None or a.done():
            return
        due = now - self.sent_at > resend_s
        redo = [p for p in a.waiting_for()
                if due or self.replier.peer_link(p) > self.sent_links.get(p, 0)]
        if redo:
            self._send_proposal(redo, fresh=True)

    # --- the update -------------------------------------------------------------------
    def _finish(self, global_sumsq):
        shard, a = self.shard, self.agreement
        step, mine = shard.version, a.ranks()
        left_out = [r for r in sorted(self.pending) if r not in mine]
        answer = {}
        if mine:
            metas = [self.pending[r].meta for r in mine]
            losses = [m["loss"] for m in metas if "loss" in m]
            for r in mine:
                meta, session = self.pending[r].meta, self.pending[r].session
                self.wire[(r, session)] = tuple(meta.get(k, 0) for k in WIRE_COUNTERS)
            stats = {"tokens": sum(m.get("tokens", 0) for m in metas),
                     **{k: sum(c[i] for c in self.wire.values()) for i, k in enumerate(WIRE_COUNTERS)}}
            self.recorder.step(mine, step)
            answer = dict(stats=stats, **({"loss": sum(losses) / len(losses)} if losses else {}))
            with self.tracer.span("update", step=step):
                if self.mode == "local-sgd":
                    shard.apply_delta()
                elif self.asm is not None:
                    stream = not self.checkpoints.answers_wait(step + 1)
                    self._update_chunks(global_sumsq, set(mine), stream=stream, **answer)
                else:
                    shard.apply(global_sumsq)
            for r in mine:
                rid, session = self.pending[r].rid, self.pending[r].session
                rids = self.asm.rids.get(r) if self.asm is not None else None
                self.applied.record(r, session, rid, step, shard.version, answer, rids=rids)
            a.finish()
            self.checkpoints.after_update(shard.version)     # checkpoint (before any answer leaves)
        for r in left_out:
            self.recorder.dropped(r, 0)
        with self.tracer.span("reply", step=step):
            if self.asm is not None:                 # every message not answered yet
                self._answer(self.asm.answerable(set(mine)), version=shard.version, **answer)
                for m in self.asm.waiting:           # not every server had it: not applied anywhere
                    self.replier.params(m.identity, m.rid, chunks=m.chunks, dropped=True)
                self.asm.reset()
            else:
                for r in mine:
                    self.replier.params(self.pending[r].identity, self.pending[r].rid, **answer)
                for r in left_out:                   # not every server had it: not applied anywhere
                    self.replier.params(self.pending[r].identity, self.pending[r].rid, dropped=True)
            for late in self.late:
                self.replier.params(late.identity, late.rid, chunks=late.chunks, dropped=True)
        self.pending.clear()
        self.late.clear()
        a.begin(shard.version)
        self.pulls.reached(shard.version)
        self.ready_at = self.tracer.now()

    def _update_chunks(self, global_sumsq, mine: set, stream: bool, **answer):
        """The optimizer step chunk by chunk, in the order of the flat vector; with
        ``stream``, each message of ``mine`` answered as soon as its chunks are updated."""
        shard, asm = self.shard, self.asm
        shard.begin_update(global_sumsq)
        for c in range(len(shard.chunks)):
            shard.update_chunk(c)
            asm.updated.add(c)
            if stream:
                self._answer(asm.answerable(mine), version=shard.version + 1, **answer)
        shard.end_update()

    def _answer(self, messages, version: int, **answer):
        for m in messages:
            self.replier.chunks(m.identity, m.rid, m.chunks, version=version, **answer)

    # --- deadlines and failures -------------------------------------------------------
    def tick(self, now: float, timeout: float, resend_s: float) -> str | None:
        """Resend proposals that may be lost; why this step is past its deadline, or None."""
        self._resend(now, resend_s)
        return self._overdue(now, timeout)

    def oldest(self) -> float | None:
        """When the open step's deadline started (None: no step is open)."""
        return self.step_started if self.busy else None

    def _overdue(self, now: float, timeout: float) -> str | None:
        """Why this step is past its deadline, or None."""
        if not self.busy or now - self.step_started <= timeout or not self.started:
            return None
        step = self.shard.version
        if self.agreement.mine is not None:
            missing = [f"server {s} at {self.server_addrs[s]}" for s in self.agreement.waiting_for()]
            return (f"step {step}: no agreeing proposal (norm) from {', '.join(missing)} within "
                    f"{timeout:.0f} s; is that server alive?")
        missing = sorted(set(self.view.workers) - set(self.pending))
        return (f"step {step}: worker(s) {missing} have not pushed (all of it) within {timeout:.0f} s of the "
                f"first push (workers {sorted(self.pending)} did); are they alive? see their logs")

    def take_held(self) -> list[tuple[bytes, int]]:
        """(identity, rid) of every request held for this step, forgotten (the job stops:
        the caller answers them with the error)."""
        if self.asm is not None:
            held = [(m.identity, m.rid) for m in self.asm.waiting]
            self.asm.reset()
        else:
            held = [(p.identity, p.rid) for p in self.pending.values()]
        held += [(late.identity, late.rid) for late in self.late]
        self.pending.clear()
        self.late.clear()
        return held

    # --- what the server asks of every serving object ---------------------------------
    def read(self, identity: bytes, rid: int, rank: int | None):
        """A pull: the parameters of this version (a step cannot move before it is answered)."""
        self.replier.params(identity, rid)

    def repeat(self, identity: bytes, msg, rank: int, meta: dict):
        """A resent push this server applied already: answered again (its chunks), not applied."""
        chunks = sorted({self.shard.chunk_index(*r) for r in msg.ranges if r}) if self.asm is not None else None
        self.replier.params(identity, msg.rid, chunks=chunks, **meta)

    def initialized(self):
        """The parameters arrived: the first step starts waiting for pushes."""
        self.ready_at = self.tracer.now()

    def view_changed(self, gone: set, new: set):
        self.maybe_propose()                     # a step may have waited for a worker now gone

    def worker_done(self, rank: int):
        """A worker finished (the coordinator ends the job when all have)."""

    def status(self) -> dict:
        return {"waiting_for": sorted(set(self.view.workers) - set(self.pending)) if self.started else []}

    def checkpoint_state(self) -> dict:
        return {"agreement": self.agreement.state(),
                "wire": [[r, sess, *c] for (r, sess), c in sorted(self.wire.items())]}

    def load_checkpoint(self, extra: dict, version: int, rejoined: bool):
        """Go on from a checkpoint of ``version``; ``rejoined``: back into a running job,
        where a peer may still wait for our part of our last step."""
        self.agreement.load(extra.get("agreement", {}))
        self.wire = {(r, sess): tuple(c) + (0,) * (len(WIRE_COUNTERS) - len(c)) for r, sess, *c in extra.get("wire", [])}
        self.agreement.begin(version)
        a = self.agreement
        if a.last is not None and self.exchange and rejoined:
            step, mine, sumsq = a.last
            self.replier.norm(a.peers, step, sumsq=sumsq, echo=True, **({"workers": mine} if a.by_set else {}))
