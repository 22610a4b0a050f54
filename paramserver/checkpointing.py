"""When a server writes and reads its checkpoints (``shard_checkpoint.py`` says how).

- every ``--checkpoint-every`` versions, before the answers of that version leave (no
  worker ever holds parameters newer than the server could restore): ``answers_wait``
  tells the steps whether the answers of a version must wait, ``after_update`` writes;
- when the server stops (``final``), unless it just wrote that version;
- ``--die-at-version`` kills the process right after a chosen version (fault injection);
- a server resuming binds the address written in its newest checkpoint (``bind_address``),
  so the connections of its workers and peers find it again, and loads the checkpoint of
  the version the coordinator names (``load``).

What goes into a checkpoint besides the shard comes from ``state``, a function the
server gives at ``start`` (its address, view, exactly-once records, the steps' agreement).

Not here: the file format (``shard_checkpoint.py``), the loop (``server.py``).
"""
from __future__ import annotations

import logging
import os
import signal
import time

from common.trace import NULL_TRACER
from paramserver import shard_checkpoint
from paramserver.errors import ServerError
from common.durability import DurabilityConfig

log = logging.getLogger("server")


class Checkpointer:
    def __init__(self, durability: DurabilityConfig, out: str, rank: int, tracer=NULL_TRACER):
        self.durability = durability
        self.folder = durability.folder(out)         # '' = no checkpoints
        self.rank = rank
        self.tracer = tracer
        self.resumable = shard_checkpoint.versions(self.folder, rank) if durability.resume else []
        self.shard = None
        self.layout_hash = ""
        self.state = dict                            # () -> what a checkpoint holds besides the shard
        self.written = 0
        self.seconds = 0.0                           # time spent writing them (lesson 7: the cost C of a save)

    def bind_address(self, bind: str, bind_given: bool) -> str:
        """Where to listen: a server resuming binds the address in its checkpoint, unless
        --bind names a port (``bind_given``)."""
        if self.resumable and (not bind_given or bind.rsplit(":", 1)[1] in ("*", "0")):
            try:
                return shard_checkpoint.peek(self.folder, self.rank, self.resumable[-1]).get("bind", bind)
            except (OSError, ValueError, KeyError) as e:
                log.warning("cannot read the address in the newest checkpoint (%s); binding %s", e, bind)
        return bind

    def start(self, shard, layout_hash: str, state):
        self.shard, self.layout_hash, self.state = shard, layout_hash, state

    def load(self, version: int) -> dict:
        """Load the checkpoint of ``version`` into the shard; returns what else it holds."""
        if version not in self.resumable:
            raise ServerError(f"the job resumes at version {version}, but this server has no checkpoint of it "
                              f"(it has {self.resumable or 'none'} in {self.folder or '(no folder)'}); "
                              "start it with --resume and its --checkpoint-dir")
        try:
            extra = shard_checkpoint.load(self.folder, self.rank, version, self.shard, self.layout_hash)
        except shard_checkpoint.CheckpointError as e:
            raise ServerError(str(e)) from None
        log.info("loaded the checkpoint of version %d from %s", version, self.folder)
        return extra

    def save(self):
        if not self.folder or self.shard is None or not self.shard.initialized:
            return
        t0 = time.perf_counter()
        with self.tracer.span("checkpoint", step=self.shard.version):
            path = shard_checkpoint.save(self.folder, self.rank, self.shard, self.layout_hash, self.state())
        took = time.perf_counter() - t0
        self.written += 1
        self.seconds += took
        log.debug("checkpoint %s written in %.3f s", path, took)

    def answers_wait(self, version: int) -> bool:
        """Must the answers of the update to ``version`` wait for ``after_update`` (a
        checkpoint is due, or the fault injection)? Otherwise they may leave during it."""
        d = self.durability
        return bool((d.checkpoint_every and version % d.checkpoint_every == 0)
                    or (d.die_at_version and version == d.die_at_version))

    def after_update(self, version: int):
        """An update to ``version`` was applied: a checkpoint when one is due; the fault
        injection of --die-at-version."""
        d = self.durability
        if d.checkpoint_every and version % d.checkpoint_every == 0:
            self.save()
        if d.die_at_version and version == d.die_at_version:
            log.warning("--die-at-version %d: killing this server (SIGKILL), as a crash would", version)
            os.kill(os.getpid(), signal.SIGKILL)

    def final(self):
        """The checkpoint of the version this server stops at (unless it just wrote it)."""
        try:
            if self.shard is not None and shard_checkpoint.versions(self.folder, self.rank)[-1:] != [self.shard.version]:
                self.save()
        except (OSError, ValueError) as e:
            log.warning("could not write the final checkpoint in %s: %s", self.folder, e)
