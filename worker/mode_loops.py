"""What a worker does in each consistency model (the servers' side: paramserver/modes.py).

After computing the gradient of a batch, a worker hands it to its mode's loop:

| mode         | one step of the worker                                      | the job ends when              |
|--------------|-------------------------------------------------------------|--------------------------------|
| bsp          | push(grads, step = version) -> params of version + 1        | version == steps               |
| bsp, backup  | same; a push that came too late is dropped by the servers   | version == steps               |
|              | and answered with their current parameters: the worker goes |                                |
|              | on from that version (the batch it used is skipped)         |                                |
| asp, ssp     | push(grads, clock, base_version) -> the newest parameters   | the servers applied W * steps  |
|              | (ssp: the answer may wait for the slowest worker)           | pushes, whoever made them      |
| local-sgd    | a local optimizer step; every H steps push the change       | steps local steps              |
|              | params_then - params_now -> the averaged parameters         |                                |
| diloco       | the same (the change is the pseudo-gradient); the servers   | steps local steps              |
|              | answer with the parameters after their OUTER step           |                                |

Why asp/ssp count pushes for the whole job: every mode then uses the same number of
gradients (W * steps), and a fast worker makes more of them than a slow one, which is
what asynchrony is for. A worker's clock is its own count of pushes.

Every loop reports a ``Progress``: ``step`` is the job's progress in BSP steps (the
gradients the servers have applied, divided by W), so metrics, progress bars and plots
of every mode share one axis.

Local SGD and DiLoCo build the optimizer the servers were given (the coordinator's JOB
answer carries server 0's OptimConfig): the worker runs it (DiLoCo's inner optimizer, its
state kept across rounds), the servers only average (local-sgd) or take the outer step
(diloco: the same loop here, the difference is on the servers).

Not here: messages (``worker/client.py``), the model's arithmetic, the data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy

from common.config import from_dict
from common.optim import OptimConfig, make_optimizer, sum_of_squares
from worker.train import apply_update           # the single-process step: clip, then the optimizer


@dataclass
class Progress:
    step: int                   # the job's progress in BSP steps: gradients applied / W
    updates: int                # the servers' version: updates applied
    gradients: int              # gradients applied by the servers (local-sgd: computed by the workers)
    tokens: int                 # tokens in those gradients, over every worker (as far as this worker knows)
    synced: bool = True         # the parameters are the servers' (local-sgd: only right after an averaging)
    reply: dict = field(default_factory=dict)     # server 0's answer meta ({} between averagings)


class Loop:
    """What every loop shares: no hooks into the model, nothing to settle."""

    def forward_hooks(self) -> dict:
        """Keyword arguments for ``model.forward`` (overlap: wait for each layer's parameters)."""
        return {}

    def backward_hooks(self, loss: float, tokens: int) -> dict:
        """Keyword arguments for ``model.backward`` (overlap: push each layer's gradients)."""
        return {}

    def settle(self, p: Progress) -> Progress:
        """``p``, once the step's answers are in (overlap: they arrive during the next forward)."""
        return p


class SyncLoop(Loop):
    """bsp, with or without backup workers.

    With ``overlap`` (plain BSP, a model with layer hooks: ``worker/model.py``), a step's
    communication hides under compute, as in BytePS: the backward pushes each layer's
    gradients as soon as they are final while it goes on with the layers below, and the
    next forward waits for each layer's new parameters just before it uses them, while
    the servers are still updating and answering the layers above. ``step`` then returns
    before the answers are in (``synced`` False); ``settle`` waits for them."""

    def __init__(self, client, model, steps: int, num_workers: int, job, optim: dict | None = None,
                 overlap: bool = False):
        self.client, self.model, self.steps = client, model, steps
        self.k = num_workers - job.backup_workers      # gradients in one step
        self.tokens = 0
        self.overlap = overlap and client.chunkwise and getattr(model, "LAYER_HOOKS", False)
        self.reply: dict = {}                          # overlap: the last answers read

    def finished(self) -> bool:
        return self.client.version + self.client.in_step >= self.steps    # (a push out is a step done)

    def forward_hooks(self) -> dict:
        return {"before": self.client.wait_params} if self.overlap else {}

    def backward_hooks(self, loss: float, tokens: int) -> dict:
        if not self.overlap:
            return {}
        self._settle()                                 # the last step's answers: in since the forward
        m = self.model
        self.client.begin_push(m.grads, m.params, self.client.version, loss=loss, tokens=tokens)
        return {"after": self.client.push_final}

    def step(self, loss: float, tokens: int) -> Progress:
        c = self.client
        if self.overlap:                               # the answers come in during the next forward
            c.push_rest()
            v = c.version + 1
            return Progress(v, v, v * self.k, self.tokens + tokens * self.k, synced=False, reply=self.reply)
        reply = c.push_pull(self.model.grads, self.model.params, c.version, loss=loss, tokens=tokens)
        if not reply["dropped"]:
            self.tokens += reply.get("stats", {}).get("tokens", tokens * self.k)
        return Progress(c.version, c.version, c.version * self.k, self.tokens, reply=reply)

    def _settle(self):
        if self.client.in_step:
            self.reply = self.client.end_step()
            self.tokens += self.reply.get("stats", {}).get("tokens", 0)

    def settle(self, p: Progress) -> Progress:
        if p.synced:
            return p
        self._settle()
        c = self.client
        return Progress(c.version, c.version, c.version * self.k, self.tokens, reply=self.reply)

    def finish(self):
        """Called once the job has ended: leave the newest parameters in the model."""
        self._settle()


class AsyncLoop(Loop):
    """asp and ssp: every push is applied alone, as it arrives."""

    def __init__(self, client, model, steps: int, num_workers: int, job, optim: dict | None = None):
        self.client, self.model, self.W = client, model, num_workers
        self.budget = steps * num_workers               # pushes in the whole job
        self.clock = 0

    def finished(self) -> bool:
        return max(self.client.versions) >= self.budget

    def step(self, loss: float, tokens: int) -> Progress:
        c, m = self.client, self.model
        # the whole gradient's squared norm: a server clips this push by it (global-norm clipping)
        reply = c.push_pull(m.grads, m.params, self.clock, loss=loss, tokens=tokens,
                            grad_sumsq=sum_of_squares(m.grads))
        self.clock += 1
        updates = max(c.versions)
        return Progress(min(updates, self.budget) // self.W, updates, updates,
                        reply.get("stats", {}).get("tokens", 0), reply=reply)

    def finish(self):
        self.client.pull(self.model.params)            # the others may have pushed since our last answer


class LocalSGDLoop(Loop):
    """local-sgd and diloco: H local optimizer steps, then the servers average the changes
    (and, diloco, step their outer optimizer with the mean)."""

    def __init__(self, client, model, steps: int, num_workers: int, job, optim: dict | None = None):
        self.client, self.model, self.steps, self.W = client, model, steps, num_workers
        self.H = job.local_steps
        if optim is None:
            raise ValueError("local-sgd needs the job's optimizer settings (the coordinator's JOB answer)")
        self.cfg = from_dict(OptimConfig, optim, "the job's optimizer")
        self.optimizer = make_optimizer(self.cfg, model.num_params(), model.dtype, model.layout.decay_ranges(),
                                        threads=getattr(model, "threads", 1))
        self.anchor = model.params.copy()             # the parameters of the last averaging
        self.round = client.version                   # (> 0 when joining a running or resumed job)
        self.i = self.round * self.H
        self.losses, self.round_tokens, self.tokens = [], 0, 0

    def finished(self) -> bool:
        return self.i >= self.steps

    def step(self, loss: float, tokens: int) -> Progress:
        m, c = self.model, self.client
        apply_update(m, self.optimizer, self.cfg, self.i)
        self.i += 1
        self.losses.append(loss)
        self.round_tokens += tokens
        if self.i % self.H and self.i < self.steps:
            return Progress(self.i, c.version, self.i * self.W, self.tokens + self.round_tokens * self.W,
                            synced=False)
        numpy.subtract(self.anchor, m.params, out=m.grads)     # the change: what the servers average
        reply = c.push_pull(m.grads, m.params, self.round, loss=float(numpy.mean(self.losses)),
                            tokens=self.round_tokens)
        self.anchor[...] = m.params
        self.round += 1
        self.tokens += reply.get("stats", {}).get("tokens", self.round_tokens * self.W)
        self.losses, self.round_tokens = [], 0
        return Progress(self.i, c.version, self.i * self.W, self.tokens, reply=reply)

    def finish(self):
        """The last averaging left the servers' parameters in the model."""


LOOPS = {"bsp": SyncLoop, "asp": AsyncLoop, "ssp": AsyncLoop, "local-sgd": LocalSGDLoop, "diloco": LocalSGDLoop}


def make_loop(job, client, model, steps: int, num_workers: int, optim: dict | None = None, overlap: bool = False):
    """The loop of ``job.mode`` (a ``JobConfig``); ``overlap``: see ``SyncLoop``."""
    if job.mode == "bsp":
        return SyncLoop(client, model, steps, num_workers, job, optim, overlap=overlap)
    return LOOPS[job.mode](client, model, steps, num_workers, job, optim)
