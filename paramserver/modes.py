"""The consistency models, as a server enforces them: when a push is applied, and when
a worker may read the parameters again.

| mode          | a push is applied ...                          | its answer (the next read) leaves ...        |
|---------------|------------------------------------------------|----------------------------------------------|
| bsp           | with every worker's push of the step, averaged | when the step is applied                     |
| bsp, b backup | with the first W - b pushes of the step        | then; a later push of that step is dropped   |
|               |                                                | (not applied, counted) and answered at once  |
| asp           | at once, alone: one optimizer step per push    | at once                                      |
| ssp(s)        | at once, alone                                 | once every live worker's clock >= c - s      |
| local-sgd     | with every worker's push of the round: the     | when the round is applied                    |
|               | parameter CHANGES after H local steps averaged |                                              |
| diloco        | the same, the averaged change (pseudo-         | when the round is applied                    |
|               | gradient) fed to the OUTER optimizer           |                                              |

A worker's clock is the number of pushes it has made; ``c`` in the table is the clock
of the worker that asks to read. ``SyncRule`` and ``AsyncRule`` below hold these rules
and nothing else; ``AsyncServing`` applies asp/ssp pushes and holds answers for the
server (whose own loop runs the synchronous modes; ``server.py`` does the messages). References: Ho et al., "More
Effective Distributed ML via a Stale Synchronous Parallel Parameter Server" (NIPS 2013)
for SSP; Chen et al., "Revisiting Distributed Synchronous SGD" (2016) for backup
workers; Stich, "Local SGD Converges Fast and Communicates Little" (ICLR 2019) and
McMahan et al., FedAvg (2017) for local SGD / model averaging.

Choices made here (docs/consistency.md explains them):
- asp/ssp: each push is one optimizer step with that worker's gradient alone, at
  learning rate lr / W: W workers make W updates per "round", and a round moves the
  parameters about as far as one BSP step at lr (which averages W gradients). So
  ``--lr`` means the same in every mode, and with SGD ssp(0) IS bsp, one gradient at a
  time (a test checks it). The schedule advances once per W updates (``lr_step =
  version // W``): it spans the same number of gradients as a BSP run of the same
  ``--steps``. Clipping uses the norm of the worker's whole gradient, which the worker
  sends with the push (``grad_sumsq``). (With the full lr per push, the experiment's
  asp and ssp runs ended 0.1-0.2 nats worse: W times the step size per round.)
- local-sgd: the optimizer runs on the workers; the servers' update is plain model
  averaging, params -= mean(change), i.e. an outer SGD step with learning rate 1.
- diloco (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language
  Models", 2023): the same rounds, but the mean change is the gradient of the shard's
  OUTER optimizer (``JobConfig.outer_optim``: Nesterov momentum at --outer-lr, or SGD),
  whose state is the shard's optimizer state (checkpointed like any other). Outer SGD
  at lr 1 is local-sgd (a test keeps the identity).
- ``Recorder`` measures every mode the same way: the staleness of each applied update
  (server version at apply - the version its gradient was computed on), the clock
  staleness of asp/ssp (the pusher's clock - the slowest live worker's clock when it
  read), dropped pushes, and how long answers were held; the server writes them to
  ``server-S.json`` in its ``--out`` folder.

Not here: sockets, message bytes, the optimizer's arithmetic (``shard.py``).
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

from common.files import atomic_write
from common.wire.protocol import ProtocolError

COUNT, LATE, LATE_WAIT = "count", "late", "late-wait"
# what each worker's push says it moved (worker/client.py), summed into the answers' ``stats``:
# arrays pushed and pulled, and every frame sent and received, headers included
WIRE_COUNTERS = ("bytes_pushed", "bytes_pulled", "bytes_sent", "bytes_received")


@dataclass
class ServingParts:
    """What a serving object uses besides the shard: the server's other plain objects."""
    replier: object                             # the only sender (``replier.py``)
    view: object                                # the live workers (``view.py``)
    applied: object                             # exactly once (``dedupe.py``)
    checkpoints: object                         # answers_wait / after_update (``checkpointing.py``)
    pulls: object                               # pulls waiting for a version (``pulls.py``)
    tracer: object                              # spans of the step (``common/trace.py``)
    ahead: object                               # ahead(msg, rank, session): a push for a step not reached


class SyncRule:
    """bsp (optionally with backup workers), local-sgd and diloco: steps taken together.

    A step needs ``quorum = W - backup_workers`` pushes. Without backup workers a push
    for a past step is a protocol error (it cannot happen in BSP); with them it is late:
    dropped, counted, and answered with the current parameters."""

    def __init__(self, num_workers: int, backup_workers: int = 0):
        if not 0 <= backup_workers < num_workers:
            raise ValueError(f"backup workers must be in [0, {num_workers}), got {backup_workers}")
        self.num_workers = num_workers
        self.quorum = num_workers - backup_workers
        self.backup = backup_workers > 0

    def classify(self, step: int, version: int, pending: dict, rank: int) -> str:
        """COUNT: the push joins this step; LATE: its step is over, answer now;
        LATE_WAIT: its step is complete but not yet applied (norm exchange), answer after."""
        if step > version:
            raise ProtocolError(f"push for step {step}, but this server is at step {version}")
        if step < version:
            if not self.backup:
                raise ProtocolError(f"push for step {step}, but this server is at step {version} (BSP)")
            return LATE
        if rank in pending:
            raise ProtocolError(f"worker {rank} already pushed for step {step}")
        return LATE_WAIT if len(pending) >= self.quorum else COUNT

    def complete(self, pending: dict) -> bool:
        return len(pending) >= self.quorum


class AsyncRule:
    """asp and ssp: every push is applied as it arrives; ssp holds a worker's next read
    while it is more than ``staleness`` clocks ahead of the slowest live worker.
    ``staleness=None`` is asp (no bound)."""

    def __init__(self, num_workers: int, staleness: int | None):
        self.staleness = staleness
        self.clocks = [0] * num_workers          # pushes received from each worker
        self.live = set(range(num_workers))      # workers not yet done
        self.read_min = [0] * num_workers        # the slowest live clock when each worker last read

    def check_push(self, rank: int, clock: int):
        """A worker's pushes carry its clocks 0, 1, 2, ... in order: a resent or skipped
        push is refused (it would be applied twice, or hide a lost one)."""
        if clock != self.clocks[rank]:
            raise ProtocolError(f"worker {rank} pushed clock {clock}, expected {self.clocks[rank]} "
                                "(each push carries the worker's count of earlier pushes)")

    def pushed(self, rank: int):
        self.clocks[rank] += 1

    def done(self, rank: int):
        self.live.discard(rank)

    def slowest(self) -> int:
        """The smallest clock among live workers (every clock once all are done)."""
        return min((self.clocks[r] for r in self.live), default=max(self.clocks))

    def may_read(self, rank: int) -> bool:
        """SSP's condition: the worker at clock c reads once slowest live clock >= c - s."""
        return self.staleness is None or self.slowest() >= self.clocks[rank] - self.staleness

    def read(self, rank: int):
        self.read_min[rank] = self.slowest()

    def clock_staleness(self, rank: int, clock: int) -> int:
        """How many clocks the slowest live worker was behind this push's clock when the
        pushing worker read the parameters it computed on (ssp: at most s)."""
        return clock - self.read_min[rank]

    def blockers(self, rank: int) -> list[int]:
        """The live workers whose clocks hold ``rank`` back (for deadline messages)."""
        need = self.clocks[rank] - (self.staleness or 0)
        return sorted(r for r in self.live if self.clocks[r] < need)


class Recorder:
    """What consistency cost on one server: staleness of applied updates, dropped
    pushes, time answers were held, updates per second."""

    LOG_LIMIT = 200_000                          # applied updates kept in the log (a few MB of JSON)

    def __init__(self, mode: str, num_workers: int):
        self.mode = mode
        self.num_workers = num_workers
        self.staleness = Counter()               # version staleness -> applied updates
        self.clock_staleness = Counter()         # clock staleness -> applied updates (asp/ssp)
        self.applied_by_worker = Counter()       # gradients (or parameter changes) applied
        self.dropped_by_worker = Counter()       # late pushes not applied (backup workers)
        self.dropped_staleness = Counter()
        self.held_s = Counter()                  # seconds each worker's answers were held back
        self.log: list[list[int]] = []           # [rank, clock, base_version, version at apply]
        self.done_at: dict[int, int] = {}        # worker -> version when it said it was done
        self.updates = 0
        self.first = self.last = None            # time of the first and last update

    def _tick(self):
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        self.last = now

    def step(self, ranks, version: int):
        """A synchronous step at ``version`` applied the pushes of ``ranks`` (staleness 0)."""
        self._tick()
        self.updates += 1
        for r in sorted(ranks):
            self.staleness[0] += 1
            self.applied_by_worker[r] += 1
            if len(self.log) < self.LOG_LIMIT:
                self.log.append([r, version, version, version])

    def push(self, rank: int, clock: int, base_version: int, version: int, clock_staleness: int):
        """An asynchronous push of ``rank`` at ``clock``, computed on ``base_version``,
        applied at ``version``."""
        self._tick()
        self.updates += 1
        self.staleness[version - base_version] += 1
        self.clock_staleness[clock_staleness] += 1
        self.applied_by_worker[rank] += 1
        if len(self.log) < self.LOG_LIMIT:
            self.log.append([rank, clock, base_version, version])

    def dropped(self, rank: int, staleness: int):
        self.dropped_by_worker[rank] += 1
        self.dropped_staleness[staleness] += 1

    def done(self, rank: int, version: int):
        self.done_at.setdefault(rank, version)

    def held(self, rank: int, seconds: float):
        self.held_s[rank] += seconds

    def summary(self, version: int) -> dict:
        span = (self.last - self.first) if self.first is not None else 0.0

        def hist(c):
            return {str(k): c[k] for k in sorted(c)}
        return {
            "mode": self.mode, "version": version, "updates": self.updates,
            "updates_per_s": self.updates / span if span > 0 else None, "update_span_s": span,
            "applied": sum(self.applied_by_worker.values()),
            "applied_by_worker": {str(r): self.applied_by_worker[r] for r in range(self.num_workers)},
            "dropped": sum(self.dropped_by_worker.values()),
            "dropped_by_worker": {str(r): self.dropped_by_worker[r] for r in range(self.num_workers)},
            "dropped_staleness_hist": hist(self.dropped_staleness),
            "staleness_hist": hist(self.staleness),
            "clock_staleness_hist": hist(self.clock_staleness),
            "max_staleness": max(self.staleness, default=0),
            "max_clock_staleness": max(self.clock_staleness, default=0),
            "held_s_by_worker": {str(r): round(self.held_s[r], 6) for r in range(self.num_workers)},
            "done_at_version": {str(r): v for r, v in sorted(self.done_at.items())},
            "log_fields": ["rank", "clock", "base_version", "version"],
            "log": self.log,
        }

    def write(self, folder: str, name: str, version: int, **extra):
        """The summary, plus ``extra``, as JSON in ``folder/name`` (written whole or not at all)."""
        os.makedirs(folder, exist_ok=True)
        atomic_write(os.path.join(folder, name), json.dumps(dict(extra, **self.summary(version))).encode())


@dataclass
class HeldRead:
    """A read (a pull, or the answer to a push) that ssp holds until its worker may read."""
    identity: bytes
    rid: int
    rank: int
    since: float
    meta: dict


class AsyncServing:
    """asp/ssp on a server: apply each push at once, answer when the rule lets its
    worker read. Answers are sent by the replier from a per-version copy (see
    ``Shard.param_snapshot``); a held answer has a deadline of ``timeout`` seconds."""

    def __init__(self, shard, parts: ServingParts, mode: str, num_workers: int, staleness: int | None,
                 grad_clip: float, timeout: float, clock=time.monotonic):
        self.shard, self.parts, self.clock = shard, parts, clock
        self.replier, self.applied = parts.replier, parts.applied
        self.rule = AsyncRule(num_workers, staleness)
        self.recorder = Recorder(mode, num_workers)
        self.mode, self.grad_clip, self.timeout = mode, grad_clip, timeout
        self.num_workers = num_workers
        self.exchange = False                    # the servers agree on nothing: no NORM
        self.held: list[HeldRead] = []           # answers not yet sent
        self.totals: dict[int, dict] = {}        # each worker's counters, summed into the answers' ``stats``

    def push(self, identity, msg, rank: int, session: int):
        """Apply the push at once (one optimizer step), then answer when its worker may read."""
        shard, rule = self.shard, self.rule
        rule.check_push(rank, msg.step)
        if len(self.held) >= 4 * self.num_workers:       # refuse before anything changes
            raise ProtocolError("too many reads are waiting (ssp)")
        base = msg.meta.get("base_version")
        if base is None or not 0 <= base <= shard.version:
            raise ProtocolError(f"{self.mode} push needs base_version in [0, {shard.version}] (the "
                                f"version its gradient was computed on), got {base!r}")
        sumsq = msg.meta.get("grad_sumsq")
        if self.grad_clip > 0 and sumsq is None:
            raise ProtocolError(f"{self.mode} with clipping: the push must carry grad_sumsq, the "
                                "squared norm of the worker's whole gradient")
        shard.check_full_cover(msg.ranges, "push")
        version = shard.version
        clock_staleness = rule.clock_staleness(rank, msg.step)
        shard.set_update(msg)                   # decodes, checks, may refuse: avg is scratch
        W = self.num_workers                    # W pushes: one step of the schedule, and of BSP's size
        shard.apply(sumsq, lr_step=version // W, lr_scale=1.0 / W)
        rule.pushed(rank)
        self.recorder.push(rank, msg.step, base, version, clock_staleness)
        self._answer_push(identity, msg, rank)
        self.applied.record(rank, session, msg.rid, msg.step, shard.version, {})
        if shard.version > version:
            self.parts.checkpoints.after_update(shard.version)
        self.parts.pulls.reached(shard.version)

    def _answer_push(self, identity, msg, rank: int):
        meta = msg.meta
        total = self.totals.setdefault(rank, {"tokens": 0})
        total.update(tokens=total["tokens"] + meta.get("tokens", 0), **{k: meta.get(k, 0) for k in WIRE_COUNTERS})
        stats = {k: sum(t.get(k, 0) for t in self.totals.values()) for k in ("tokens", *WIRE_COUNTERS)}
        extra = {"loss": meta["loss"]} if "loss" in meta else {}
        self._hold(identity, msg.rid, rank, stats=stats, **extra)

    def read(self, identity, rid, rank: int | None, **meta):
        """A pull: a worker's may wait (ssp); anyone else's is answered at once."""
        if rank is None:
            self.replier.params(identity, rid, **meta)
        else:
            self._hold(identity, rid, rank, **meta)

    def repeat(self, identity: bytes, msg, rank: int, meta: dict):
        """A resent push this server applied already: answered again (as a read), not applied."""
        self._hold(identity, msg.rid, rank, **meta)

    def _hold(self, identity, rid, rank: int, **meta):
        if len(self.held) >= 4 * self.num_workers:       # bounded, whatever peers send
            raise ProtocolError("too many reads are waiting (ssp)")
        self.held.append(HeldRead(identity, rid, rank, self.clock(), meta))
        self.release()

    def worker_done(self, rank: int):
        self.rule.done(rank)                     # it no longer holds anyone back
        self.release()

    def view_changed(self, gone: set, new: set):
        for r in gone:
            self.worker_done(r)                  # a dead worker holds nobody back (ssp)
        for r in new:
            self.rule.live.add(r)

    def release(self):
        """Answer every held read whose worker may now read, in arrival order."""
        now, keep = self.clock(), []
        for h in self.held:
            if self.rule.may_read(h.rank):
                self.rule.read(h.rank)
                self.recorder.held(h.rank, now - h.since)
                self.replier.params(h.identity, h.rid, **h.meta)
            else:
                keep.append(h)
        self.held = keep

    def oldest(self) -> float | None:
        """When the longest-held answer started waiting (None: nothing held)."""
        return min((h.since for h in self.held), default=None)

    def tick(self, now: float, timeout: float, resend_s: float) -> None:
        """Refuse the reads held longer than the deadline, naming the workers they wait for."""
        rule = self.rule
        for h in [h for h in self.held if now - h.since > self.timeout]:
            behind = ", ".join(f"worker {r} at clock {rule.clocks[r]}" for r in rule.blockers(h.rank))
            self.replier.error(h.identity, h.rid, f"ssp(s={rule.staleness}): worker {h.rank} at clock "
                                                  f"{rule.clocks[h.rank]} waited {self.timeout:.0f} s for "
                                                  f"{behind or 'slower workers'}; are they alive? see their logs")
        self.held = [h for h in self.held if now - h.since <= self.timeout]
        return None

    def take_held(self) -> list[tuple[bytes, int]]:
        held = [(h.identity, h.rid) for h in self.held]
        self.held = []
        return held

    def initialized(self):
        """The parameters arrived (nothing waits for them here)."""

    def on_norm(self, peer: int, msg):
        raise ProtocolError(f"this server exchanges no proposals ({self.mode})")

    def status(self) -> dict:
        return {"waiting_for": [], "clocks": list(self.rule.clocks), "held": sorted(h.rank for h in self.held)}

    def checkpoint_state(self) -> dict:
        return {"agreement": {}, "wire": []}

    def load_checkpoint(self, extra: dict, version: int, rejoined: bool):
        """Nothing of asp/ssp's own is in a checkpoint (the clocks die with the job)."""
