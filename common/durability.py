"""When servers checkpoint, and how one comes back: the settings of failure recovery.

Here, in ``common/``, rather than beside the checkpoint format
(``paramserver/shard_checkpoint.py``), because the launchers (``ps-local``) take
``--checkpoint-every`` from these fields and may not import a role. docs/failures.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class DurabilityConfig:
    """Server checkpoints (docs/failures.md)."""
    checkpoint_dir: str = ""          # folder of this job's server checkpoints ('' = <--out>/checkpoints, none without --out)
    checkpoint_every: int = 50        # write a checkpoint every this many versions, and when stopping (0 = only when stopping)
    resume: bool = False              # start from the newest checkpoint in --checkpoint-dir (ps-local: the job in --out, with the same flags): a server that died rejoins its job; every server: the whole job goes on, its loss curve continued
    die_at_version: int = 0           # fault injection for tests and lessons: right after writing the checkpoint of this version, the server kills itself with SIGKILL (0 = never)

    def __post_init__(self):
        if self.checkpoint_every < 0 or self.die_at_version < 0:
            raise ValueError(f"checkpoint_every and die_at_version must be >= 0, got {self.checkpoint_every}, "
                             f"{self.die_at_version}")

    def folder(self, out: str) -> str:
        return self.checkpoint_dir or (os.path.join(out, "checkpoints") if out else "")
