"""What server 0 does as the coordinator: registration, heartbeats, views, the job's end.

Server 0 runs the coordinator beside its shard (ps-lite's scheduler, folded into a
server so that one address is all a job needs). This module is that second hat: it
keeps the book of members (``membership.py``) and their heartbeats (``liveness.py``),
answers REGISTER, HEARTBEAT and DONE, and decides what a silence means:

| who is silent (no heartbeat)       | after                      | then                                   |
|------------------------------------|----------------------------|----------------------------------------|
| a worker                           | --heartbeat-misses beats   | dropped from the view; the steps go on |
|                                    |                            | without it; it may register again      |
| a server                           | --timeout                  | the job stops, naming it (it may come  |
|                                    |                            | back first: restarted with --resume)   |
| every worker of the view           | --timeout                  | the job stops, naming them             |

A view change goes to every server at once (VIEW) and with every heartbeat answer.
When the job must stop with an error, the coordinator tells the servers (SHUTDOWN with
``failed``), answers heartbeats with the reason for a moment so the workers learn it,
and exits non-zero. If the coordinator itself dies, the others notice (their
heartbeats go unanswered, their link to it drops) and stop naming it; the whole job
can then be resumed from the servers' checkpoints (docs/failures.md).

The coordinator is given the replier (the only sender) and a few functions of the
server's (``ServerHooks``), never the server itself.

Not here: sockets (the replier sends what this module decides), the steps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from common.wire.protocol import JOB, OK, SHUTDOWN, VIEW, ProtocolError
from paramserver.errors import ServerError
from paramserver.liveness import Liveness
from paramserver.membership import Membership

log = logging.getLogger("coordinator")

LINGER_BEATS = 3          # heartbeats during which a failing coordinator still tells callers why


@dataclass
class ServerHooks:
    """What the coordinator asks of server 0, as functions."""
    placement: Callable            # (layout, num_servers) -> the job's chunk placement
    start_job: Callable            # (job) -> server 0 starts its own shard from the JOB answer
    version: Callable              # () -> server 0's version (a returning server is checked against it)
    on_view: Callable              # (number, pairs) -> server 0 takes a new view
    fail_all: Callable             # (text) -> every request server 0 holds is refused with text
    servers_rejoin: bool           # may a restarted server come back into the running job (not asp/ssp)?
    mode: str
    on_servers: Callable = lambda addrs: None   # (addrs) -> server 0's links to its peers follow a moved server
    restart_from: Callable = lambda: None       # () -> (version, membership snapshot) of server 0's newest
                                                # checkpoint when it resumes (None: it does not, or has none)


class Coordinator:
    def __init__(self, cluster, optim: dict, job: dict, replier, hooks: ServerHooks):
        self.replier, self.hooks = replier, hooks
        c = cluster
        self.cluster = c
        self.finished = False                   # every worker is done: the servers stop
        self.members = Membership(c.num_servers, c.num_workers, optim, job)
        self.liveness = Liveness()
        self.failure = ""                       # why the job is stopping with an error
        self.stop_at: float | None = None
        self.warned: set[int] = set()           # servers reported silent (once each)
        self.empty_since: float | None = None   # when the view became empty

    # --- registration -------------------------------------------------------------------
    def on_register(self, identity, msg):
        m = self.members
        if m.started:
            return self._join_running(identity, msg)
        m.register(identity, msg.meta)
        log.info("registered %s %s from %s (pid %s); still missing: %s", msg.meta["role"],
                 msg.meta["rank"] if msg.meta["rank"] >= 0 else "(rank to assign)",
                 msg.meta["host"], msg.meta["pid"], m.missing())
        if m.complete():
            self.start()

    def start(self):
        """Everyone is here: answer every member with the job (or refuse them all)."""
        m = self.members
        try:
            replies = m.start(self.hooks.placement)
        except ProtocolError as e:                  # e.g. no checkpoint version common to every server
            self.refuse_registered(str(e))
            raise ServerError(str(e)) from None
        log.info("the job's address table:\n%s", m.describe_table())
        if m.version:
            log.info("the job resumes from the servers' checkpoints at version %d", m.version)
        now = time.monotonic()
        self.liveness.start([("server", r) for r in m.servers if r != 0] + [("worker", w.rank) for w in m.workers],
                            now)
        for ident, job in replies:
            if ident == b"":
                self.hooks.start_job(job)
            else:
                self.replier.reply(ident, JOB, 0, **job)

    def refuse_registered(self, text: str):
        """Every member registered so far gets ``text`` as an ERROR (the job cannot start)."""
        m = self.members
        for member in [*m.servers.values(), *m.workers]:
            if member.identity:
                self.replier.error(member.identity, 0, text)

    def _join_running(self, identity, msg):
        m, meta = self.members, msg.meta
        if meta["role"] == "worker":
            again = next((w for w in m.workers if w.identity == identity and w.pid == meta["pid"]
                          and m.live.get(w.rank) == m.sessions.get(("worker", w.rank))), None)
            if again is not None:                    # the same process asking again (a resent request)
                self.replier.reply(identity, JOB, msg.rid, **m.job_reply("worker", again.rank, m.version, rejoin=True))
                return
            job = m.rejoin(identity, meta, self._alive_elsewhere(meta))
            rank = job["rank"]
            self.liveness.beat("worker", rank)
            log.warning("worker %d joined the running job (pid %s on %s, session %d): view %d, workers %s",
                        rank, meta["pid"], meta["host"], job["session"], m.view, sorted(m.live))
            self.broadcast_view()
            self.replier.reply(identity, JOB, msg.rid, **job)
            return
        if meta["role"] != "server" or meta["rank"] == 0:
            raise ProtocolError(f"the job has started; a {meta['role']} {meta['rank']} cannot join it")
        if not self.hooks.servers_rejoin:
            text = (f"server {meta['rank']} came back into a running {self.hooks.mode} job: in asp/ssp each "
                    "server counts every worker's pushes (its clocks), and those died with it. Resume the whole "
                    "job from the servers' checkpoints (every role with --resume; docs/failures.md)")
            self.replier.error(identity, msg.rid, text)
            self.fail(text)
            return
        before = m.servers[meta["rank"]].addr if meta["rank"] in m.servers else ""
        member = m.returning_server(identity, meta)
        rank, mine = member.rank, self.hooks.version()
        version = max(m.versions[rank])
        if version < mine - 1:
            text = (f"server {rank} came back from its checkpoint of version {version}, but the job is at version "
                    f"{mine}: the steps it applied in between died with it. Resume the whole job from the "
                    "servers' checkpoints (every role with --resume; docs/failures.md)")
            self.replier.error(identity, msg.rid, text)
            self.fail(text)
            return
        if version > mine + 1:
            raise ProtocolError(f"server {rank}'s newest checkpoint is of version {version}, ahead of the job "
                                f"(version {mine}): is its --checkpoint-dir another job's?")
        self.liveness.beat("server", rank)
        self.warned.discard(rank)
        log.warning("server %d came back (pid %s on %s) from its checkpoint of version %d; the job is at %d",
                    rank, meta["pid"], meta["host"], version, mine)
        if member.addr != before:
            self.servers_moved(rank, before)
        self.replier.reply(identity, JOB, msg.rid, **m.job_reply("server", rank, version, rejoin=True))

    def _alive_elsewhere(self, meta):
        """A rank's current process counts as alive (so a newcomer may not take its rank)
        when it sent a heartbeat within 1.5 beats, from another host: on the same host a
        process registering with a live rank is taken for its restart."""
        h = self.cluster.heartbeat

        def alive(rank):
            age = self.liveness.age("worker", rank)
            old = next((w for w in self.members.workers if w.rank == rank), None)
            return (h > 0 and age is not None and age < 1.5 * h and old is not None
                    and old.host != meta["host"])
        return alive

    # --- heartbeats -------------------------------------------------------------------
    def on_heartbeat(self, identity, msg):
        m = self.members
        role, _, k = msg.sender.partition(":")
        count = {"worker": m.num_workers, "server": m.num_servers}.get(role)
        if count is None or not k.isdigit() or int(k) >= count:
            raise ProtocolError(f"heartbeat from {msg.sender!r}: not a member of this job")
        rank = int(k)
        if self.failure:
            self.replier.error(identity, msg.rid, f"the job is stopping: {self.failure}")
            return
        if not m.started and not self.rejoin_running(role, rank, msg.meta.get("version", 0)):
            raise ProtocolError("heartbeat before the job started")
        if role == "server":
            member = m.servers.get(rank)
            if member is None or member.identity != identity:
                raise ProtocolError(f"heartbeat from {msg.sender} on a connection that did not register it")
            if msg.meta.get("error"):                  # it cannot go on: neither can the job
                self.fail(f"server {rank} at {member.addr}: {msg.meta['error']}")
                return
            self.liveness.beat("server", rank)
            if rank in self.warned:
                self.warned.discard(rank)
                log.info("server %d is heard from again", rank)
            self.replier.reply(identity, OK, msg.rid, view=m.view, workers=m.view_pairs(), servers=m.addresses())
            return
        self.liveness.beat("worker", rank)
        member = rank in m.live and m.live[rank] == msg.meta.get("session")
        silent = [[r, m.servers[r].addr, round(self.liveness.age("server", r) or 0.0, 1)] for r in sorted(self.warned)]
        self.replier.reply(identity, OK, msg.rid, view=m.view, member=member, silent=silent,
                           servers=m.addresses())

    def rejoin_running(self, role: str, rank: int, their_version: int) -> bool:
        """A heartbeat of a running job reached this coordinator before its job started: the
        coordinator died and was restarted with --resume while the others lived on. If its
        checkpoint holds the job's book (and is recent enough), take it back and rejoin:
        True. The live processes then correct the book with their heartbeats (a worker
        dropped meanwhile is dropped again, one that rejoined registers again)."""
        found = self.hooks.restart_from()
        if not found or not found[1]:
            return False
        version, snap = found
        if not self.hooks.servers_rejoin:
            text = (f"the coordinator came back into a running {self.hooks.mode} job: in asp/ssp each server counts "
                    "every worker's pushes (its clocks), and those died with it. Resume the whole job from the "
                    "servers' checkpoints (every role with --resume; docs/failures.md)")
            self.refuse_registered(text)
            raise ServerError(text)
        if version < their_version - 1:
            text = (f"the coordinator came back from its checkpoint of version {version}, but {role} {rank} is at "
                    f"version {their_version}: the steps it applied in between died with it. Resume the whole job "
                    "from the servers' checkpoints (every role with --resume; docs/failures.md)")
            self.refuse_registered(text)
            raise ServerError(text)
        m = self.members
        m.restore(snap)
        now = time.monotonic()
        self.liveness.start([("server", r) for r in m.servers if r != 0] + [("worker", r) for r in m.live], now)
        log.warning("the coordinator came back from its checkpoint of version %d into the running job (%s %d "
                    "is at version %d): %d server(s), workers %s, view %d", version, role, rank, their_version,
                    len(m.servers), sorted(m.live), m.view)
        self.hooks.start_job(m.job_reply("server", 0, version, rejoin=True))
        self.broadcast_view()
        return True

    def servers_moved(self, rank: int, before: str):
        """Server ``rank`` came back at a new address: server 0's peer link follows it now, the
        other servers get it in a VIEW, the workers with their next heartbeat's answer."""
        m = self.members
        addrs = m.addresses()
        log.warning("server %d moved from %s to %s: the other servers and the workers are told", rank, before,
                    addrs[rank])
        self.hooks.on_servers(addrs)
        for r, member in m.servers.items():
            if r not in (0, rank):
                self.replier.reply(member.identity, VIEW, 0, view=m.view, workers=m.view_pairs(), servers=addrs)

    def broadcast_view(self):
        """The new view to this server and the others."""
        m = self.members
        pairs = m.view_pairs()
        self.hooks.on_view(m.view, pairs)
        for r, member in m.servers.items():
            if r != 0:
                self.replier.reply(member.identity, VIEW, 0, view=m.view, workers=pairs)

    def tick(self, now: float):
        """Drop silent workers; give up on a silent server or an empty view; end a failing job."""
        m, c = self.members, self.cluster
        if self.failure:
            if now >= self.stop_at:
                raise ServerError(self.failure)
            return
        if not m.started or c.heartbeat <= 0:
            return
        gone = self.liveness.silent("worker", [r for r in m.live if r not in m.done], c.silence_s, now)
        for r in gone:
            age = self.liveness.age("worker", r, now)
            who = next((w.describe() for w in m.workers if w.rank == r), f"worker {r}")
            m.drop(r, f"no heartbeat for {age:.1f} s")
            log.warning("dropped %s: no heartbeat for %.1f s (%d missed); the steps go on with workers %s "
                        "(view %d)", who, age, c.heartbeat_misses, sorted(m.live), m.view)
        if gone:
            self.broadcast_view()
            if m.all_done():
                self.finish("every remaining worker is done")
                return
        for r in self.liveness.silent("server", [s for s in m.servers if s != 0], c.silence_s, now):
            age = self.liveness.age("server", r, now)
            if age > c.timeout:
                self.fail(f"server {r} at {m.servers[r].addr} has sent no heartbeat for {age:.0f} s: it is dead or "
                          "cut off, and its shard has no replacement. Restart it with --resume within "
                          "--timeout, or resume the whole job from the checkpoints (docs/failures.md)")
                return
            if r not in self.warned:
                self.warned.add(r)
                log.warning("server %d at %s has sent no heartbeat for %.1f s (dead, or its link cut?); waiting up "
                            "to %.0f s (--timeout) for it (a dead one: restart it with --resume)", r,
                            m.servers[r].addr, age, c.timeout)
        if m.live:
            self.empty_since = None
        elif self.empty_since is None:
            self.empty_since = now
        elif now - self.empty_since > c.timeout:
            lost = ", ".join(f"worker {d['rank']} ({d['why']})" for d in m.dropped[-m.num_workers:])
            self.fail(f"every worker is gone ({lost}) and none came back within {c.timeout:.0f} s")

    # --- the end ----------------------------------------------------------------------
    def on_done(self, rank: int) -> bool:
        """Worker ``rank`` finished; True (and the servers told to stop) once every worker of the view has."""
        if self.members.mark_done(rank):
            self.finish("every worker is done")
            return True
        return False

    def finish(self, reason: str):
        for s, member in self.members.servers.items():
            if s != 0:
                self.replier.reply(member.identity, SHUTDOWN, 0, reason=reason)
        self.finished = True

    def fail(self, reason: str):
        """Stop the job with an error: tell the servers, keep telling callers for a moment, then exit."""
        if self.failure:
            return
        log.error("stopping the job: %s", reason)
        self.failure = reason
        for s, member in self.members.servers.items():
            if s != 0:
                self.replier.reply(member.identity, SHUTDOWN, 0, reason=reason, failed=True)
        self.hooks.fail_all(f"the job is stopping: {reason}")
        beat = self.cluster.heartbeat or 0.5
        self.stop_at = time.monotonic() + min(5.0, LINGER_BEATS * beat)

    def status(self) -> dict:
        m = self.members
        return dict(members=m.table(), started=m.started, done=sorted(m.done), missing=m.missing(),
                    view=m.view, live=sorted(m.live), dropped=m.dropped[-64:], rejoined=m.rejoined[-64:],
                    heartbeats=self.liveness.table(), failure=self.failure)

    def metrics(self) -> dict:
        m = self.members
        return {"view": m.view, "dropped_workers": m.dropped, "rejoined_workers": m.rejoined}
