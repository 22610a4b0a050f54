"""What a server does when others fail, or when it is told to stop.

A mixin of ``server.Server`` (the methods use its sockets and state):

- ``on_signal`` / ``_critical``: TERM or Ctrl-C stops the server, but never in the middle
  of a change of state (an update half applied would go into the checkpoint it writes on
  the way out): the interrupt waits for the end of the message being handled;
- ``_heartbeat``, ``_handle_control``, ``_watch_coordinator`` (servers s > 0): a heartbeat
  to the coordinator every ``--heartbeat`` seconds; its answers and VIEW messages carry the
  view; SHUTDOWN ends the job (``failed``: with an error); a coordinator whose heartbeat
  answers stop while its connection is lost (or for ``--timeout``) is gone, and so is
  the job;
- ``on_view``: the live workers changed: a synchronous step may stop waiting for one; in
  asp/ssp a dropped worker stops holding the others back;
- ``ahead``: a push for a step this server has not reached is a protocol error, unless
  this server came back from a checkpoint older than the job: then it stops the job and
  says how to resume it;
- ``answer_all_with_error``: every held request is answered with the reason the job stops.

Not here: deciding who is dead (``coordinator.py``), the steps (``steps.py``).
"""
from __future__ import annotations

import contextlib
import logging
import time

from common.wire import codec
from common.wire.protocol import ERROR, HEARTBEAT, OK, SHUTDOWN, VIEW, ProtocolError, session_list

log = logging.getLogger("server")


class ServerError(RuntimeError):
    """The job cannot go on (a deadline passed, the coordinator refused us); the text says why."""


class FailureHandling:
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
            self.sync.clear()
        if self.asynchronous:
            held += [(h[0], h[1]) for h in self.asynchronous.held]
            self.asynchronous.held = []
        for identity, rid in held:
            self._reply(identity, ERROR, rid, message=text)
        self.waiting_pulls, self.deferred_pulls = [], []

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
