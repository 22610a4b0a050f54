"""The servers' checkpoint settings (``--checkpoint-every``, ``--resume``, ``--resume-from``,
``--on-checkpoint-error``): one typed config that the servers (``paramserver/``) act on and
the local launcher (``ps-local``) passes on, so it lives in ``common/`` like the optimizer's.

Not here: the file format (``paramserver/shard_checkpoint.py``), when a server writes and
reads (``paramserver/checkpointing.py``); docs/failures.md tells the whole story.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DurabilityConfig:
    """Server checkpoints (docs/failures.md)."""
    checkpoint_dir: str = ""          # folder of this job's server checkpoints ('' = <--out>/checkpoints, none without --out)
    checkpoint_every: int = 50        # write a checkpoint every this many versions, and when stopping (0 = only when stopping)
    resume: bool = False              # start from the newest checkpoint in --checkpoint-dir (ps-local: the job in --out, with the same flags): a server that died rejoins its job; every server: the whole job goes on
    resume_from: int = -1             # resume (as --resume) from the checkpoints of this version instead of the newest, e.g. the last good one when the newest is damaged; newer ones are moved to <checkpoint-dir>/superseded (-1 = the newest every server holds)
    on_checkpoint_error: str = "stop"  # when a checkpoint cannot be written (a full disk): 'stop' the job cleanly (resume it later from the last checkpoint written), or 'continue' without it, with a warning each time
    die_at_version: int = 0           # fault injection for tests and lessons: right after writing the checkpoint of this version, the server kills itself with SIGKILL (0 = never)

    CHOICES = {"on_checkpoint_error": ("stop", "continue")}

    def __post_init__(self):
        if self.on_checkpoint_error not in self.CHOICES["on_checkpoint_error"]:
            raise ValueError(f"on_checkpoint_error must be one of {self.CHOICES['on_checkpoint_error']}, "
                             f"got {self.on_checkpoint_error!r}")
        if self.checkpoint_every < 0 or self.die_at_version < 0:
            raise ValueError(f"checkpoint_every and die_at_version must be >= 0, got {self.checkpoint_every}, "
                             f"{self.die_at_version}")
        if self.resume_from < -1:
            raise ValueError(f"resume_from must be a checkpoint version >= 0 (or -1: the newest), got {self.resume_from}")
        if self.resume_from >= 0:
            self.resume = True

    def folder(self, out: str) -> str:
        return self.checkpoint_dir or (os.path.join(out, "checkpoints") if out else "")
