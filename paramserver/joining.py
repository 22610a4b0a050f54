"""How a server joins its job: its address, registration, the JOB answer, checkpoints.

A mixin of ``server.Server`` (the methods use its sockets and state): the part of a
server's life that happens around the loop rather than in it.

- ``_bind_address``: where to listen; a server resuming binds the address written in its
  checkpoint, so the connections of its workers and peers find it again;
- ``_register``: server 0 keeps the book itself and waits for everyone; the others send
  REGISTER to the coordinator (with the versions of their checkpoints when resuming) and
  wait for the JOB answer, sending again if the connection was lost;
- ``_start``: the shard, the view and the peers from the JOB answer; when it names a
  version, the checkpoint of that version is loaded (a server back in its running job,
  or every server of a job resumed as a whole);
- ``_checkpoint``, ``after_update``, ``_final_checkpoint``: when checkpoints are written
  (``shard_checkpoint.py`` says how): every ``--checkpoint-every`` versions, before the answers
  of that version leave, and when the server stops; ``--die-at-version`` kills the
  process right after a chosen one (fault injection).

Not here: the loop and the handlers (``server.py``), what to do when peers fail
(``failure_handling.py``).
"""
from __future__ import annotations

import logging
import os
import signal
import time

from common.wire import codec
from common.cluster import host_name, server_bind
from common.config import to_dict
from common.layout import Layout
from common.wire.protocol import ERROR, JOB, NORM, REGISTER
from common.wire.transport import Dealer, reachable_locally
from paramserver import shard_checkpoint as checkpoint
from paramserver.failure_handling import ServerError

log = logging.getLogger("server")


class Joining:
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

    def _register(self):
        meta = dict(role="server", rank=self.rank, host=host_name(), pid=os.getpid(),
                    addr=self.addr, optim=to_dict(self.optim), job=to_dict(self.job))
        if self.durability.resume:
            meta["versions"] = self.resumable
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
        self.shard = self.make_shard(chunks, job["dtype"], layout)
        if self.sync:
            self.sync.start(self.shard)
        self.layout_hash = job["layout_hash"]
        self.server_addrs = list(job["servers"])
        self.session = job.get("session", 0)
        self.on_view(job.get("view", 1), job.get("workers", [[r, 0] for r in range(self.num_workers)]))
        if self.sync and self.sync.exchange:            # the step agreement (and norms for clipping)
            ipc = job.get("ipc") or [""] * len(self.server_addrs)
            for s, addr in enumerate(self.server_addrs):
                if s != self.rank:      # a server of this host through its Unix socket
                    near = self.cluster.ipc and reachable_locally(ipc[s])
                    self.peers[s] = Dealer(ipc[s] if near else addr, identity=self.identity + b"/peer",
                                           curve=self.curve)
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
            self.sync.wire = {(r, sess): (b, q) for r, sess, b, q in extra.get("wire", [])}
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

    def _checkpoint(self):
        if not self.checkpoints or self.shard is None or not self.shard.initialized:
            return
        extra = {"bind": self.router.endpoint, "addr": self.addr, "view": self.view_number,
                 "workers": [[r, s] for r, s in sorted(self.view.items())], "applied": self.applied.state(),
                 "agreement": self.sync.agreement.state() if self.sync else {},
                 "wire": [[r, sess, b, q] for (r, sess), (b, q) in sorted(self.sync.wire.items())] if self.sync else []}
        t0 = time.perf_counter()
        with self.tracer.span("checkpoint", step=self.shard.version):
            path = checkpoint.save(self.checkpoints, self.rank, self.shard, self.layout_hash, extra)
        took = time.perf_counter() - t0
        self.checkpoints_written += 1
        self.checkpoint_s += took
        log.debug("checkpoint %s written in %.3f s", path, took)

    def answers_wait(self, version: int) -> bool:
        """Must the answers of the update to ``version`` wait for ``after_update`` (a
        checkpoint is due, or the fault injection)? Otherwise they may leave during it."""
        d = self.durability
        return bool((d.checkpoint_every and version % d.checkpoint_every == 0)
                    or (d.die_at_version and version == d.die_at_version))

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

