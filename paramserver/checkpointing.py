"""When a server writes and reads its checkpoints (``shard_checkpoint.py`` says how).

- every ``--checkpoint-every`` versions, before the answers of that version leave (no
  worker ever holds parameters newer than the server could restore): ``answers_wait``
  tells the steps whether the answers of a version must wait, ``after_update`` writes;
- when the server stops (``final``), unless it just wrote that version;
- a save that fails (a full disk, a read-only folder) leaves the older checkpoints whole
  and is reported with the file and the errno; then ``failure`` holds why the job must
  stop, or, with ``--on-checkpoint-error continue``, the server goes on without it
  (a warning at each failed save);
- ``--die-at-version`` kills the process right after a chosen version (fault injection);
- a server resuming binds the address written in its newest checkpoint (``bind_address``),
  so the connections of its workers and peers find it again, and loads the checkpoint of
  the version the coordinator names (``load``).

What goes into a checkpoint besides the shard comes from ``state``, a function the
server gives at ``start`` (its address, view, exactly-once records, the steps' agreement).

Not here: the file format (``shard_checkpoint.py``), the loop (``server.py``).
"""
from __future__ import annotations

import errno
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
        self.resumable = self._resumable(durability)
        self.shard = None
        self.layout_hash = ""
        self.tokenizer = ""                          # sha256 of the workers' tokenizer, kept in each checkpoint
        self.state = dict                            # () -> what a checkpoint holds besides the shard
        self.written = 0
        self.failed_saves = 0                        # saves that could not be written (a full disk)
        self.failure = ""                            # why the job must stop: a save failed ('' = none did)
        self.seconds = 0.0                           # time spent writing them (lesson 7: the cost C of a save)

    def _resumable(self, durability: DurabilityConfig) -> list:
        """The versions this server offers the coordinator: every checkpoint it holds, or
        only the one --resume-from names (refused here if it lacks it)."""
        if not durability.resume:
            return []
        held = shard_checkpoint.versions(self.folder, self.rank)
        if durability.resume_from < 0:
            return held
        if durability.resume_from not in held:
            raise ServerError(f"--resume-from {durability.resume_from}: server {self.rank} has no checkpoint of "
                              f"that version in {self.folder or '(no folder)'} (it has {held or 'none'})")
        return [durability.resume_from]

    def bind_address(self, bind: str, bind_given: bool) -> str:
        """Where to listen: a server resuming binds the address in its checkpoint, unless
        --bind names a port (``bind_given``)."""
        if self.resumable and (not bind_given or bind.rsplit(":", 1)[1] in ("*", "0")):
            try:
                return shard_checkpoint.peek(self.folder, self.rank, self.resumable[-1]).get("bind", bind)
            except (OSError, ValueError, KeyError) as e:
                log.warning("cannot read the address in the newest checkpoint (%s); binding %s", e, bind)
        return bind

    def newest_membership(self):
        """(version, the job's book) of this server's newest checkpoint when it resumes
        (server 0: a restarted coordinator rejoins its running job with it), else None."""
        if not self.resumable:
            return None
        try:
            return self.resumable[-1], shard_checkpoint.peek(self.folder, self.rank, self.resumable[-1]).get("membership")
        except (OSError, ValueError, KeyError) as e:
            log.warning("cannot read the job's book in the newest checkpoint: %s", e)
            return None

    def start(self, shard, layout_hash: str, state, tokenizer: str = ""):
        self.shard, self.layout_hash, self.state, self.tokenizer = shard, layout_hash, state, tokenizer

    def load(self, version: int) -> dict:
        """Load the checkpoint of ``version`` into the shard; returns what else it holds."""
        if version not in self.resumable:
            raise ServerError(f"the job resumes at version {version}, but this server has no checkpoint of it "
                              f"(it has {self.resumable or 'none'} in {self.folder or '(no folder)'}); "
                              "start it with --resume and its --checkpoint-dir")
        try:
            extra = shard_checkpoint.load(self.folder, self.rank, version, self.shard, self.layout_hash,
                                          self.tokenizer)
        except shard_checkpoint.CheckpointError as e:
            raise ServerError(str(e)) from None
        log.info("loaded the checkpoint of version %d from %s", version, self.folder)
        for path in shard_checkpoint.set_aside_newer(self.folder, self.rank, version):
            log.warning("the job goes on from version %d: moved the newer checkpoint %s aside", version, path)
        return extra

    def save(self) -> bool:
        """Write the checkpoint of the shard's version; False when it could not be written."""
        if not self.folder or self.shard is None or not self.shard.initialized:
            return True
        t0 = time.perf_counter()
        path = shard_checkpoint.path_of(self.folder, self.rank, self.shard.version)
        try:
            with self.tracer.span("checkpoint", step=self.shard.version):
                shard_checkpoint.save(self.folder, self.rank, self.shard, self.layout_hash, self.state(),
                                      tokenizer=self.tokenizer)
        except OSError as e:
            self._failed(path, e)
            return False
        took = time.perf_counter() - t0
        self.written += 1
        self.seconds += took
        log.debug("checkpoint %s written in %.3f s", path, took)
        return True

    def _failed(self, path, e: OSError):
        """A save failed (the older checkpoints are whole: it went to a temporary file): say
        where and why, then stop the job or, if the user asked, go on without it."""
        self.failed_saves += 1
        good = shard_checkpoint.versions(self.folder, self.rank)
        code = f"errno {e.errno} {errno.errorcode.get(e.errno, '')}".strip() if e.errno else "no errno"
        text = (f"server {self.rank} could not write its checkpoint of version {self.shard.version} to {path}: "
                f"{e.strerror or e} ({code}); its newest whole checkpoint is "
                + (f"version {good[-1]}" if good else "none"))
        if self.durability.on_checkpoint_error == "continue":
            log.warning("%s. Going on without it (--on-checkpoint-error continue): a crash now loses the steps "
                        "since then", text)
        elif not self.failure:
            self.failure = (f"{text}. Free space in {self.folder}, then resume the job from its checkpoints "
                            "(every role with --resume; docs/failures.md), or run with --on-checkpoint-error "
                            "continue")
            log.error("%s", self.failure)

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
        """The checkpoint of the version this server stops at (unless it just wrote it, or
        the job stops because a save failed: the folder is full)."""
        if self.shard is not None and not self.failure and \
                shard_checkpoint.versions(self.folder, self.rank)[-1:] != [self.shard.version]:
            self.save()
