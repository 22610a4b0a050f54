"""``ps-local``: a whole job on this machine with one command.

Starts S servers and W workers as separate processes (exactly the commands a user
would type by hand, see README), shows one progress bar for the job, and writes the
run folder:

    runs/<timestamp>/
        run_config.json    the effective configuration of the job
        metrics.jsonl      one line per step: loss, val_loss, tokens/s, bytes on the wire
        logs/server-0.log  one log per process
        server-S.json      what the consistency model cost on server S: staleness, updates/s, drops
        worker-R.json      worker R's pushes, dropped pushes, time computing and waiting
        model.safetensors  the final weights (GPT-2 names) + config.json for GPT-2 tooling
        sample.txt         text sampled from the final model

If a process fails (exits non-zero), the others are stopped and the command exits
non-zero, naming the process and its log. A process killed by a signal from outside
(``kill -9``: a crash) is left to the job's own failure handling: a worker is dropped
and the steps go on, a server is waited for until ``--timeout``; with ``--respawn``
ps-local starts it again (a server with ``--resume``, from its checkpoint) and the job
goes on; when the job ends, ps-local removes the shared-memory segments such a process
left behind (``common/wire/shm.py``). ``--resume`` restarts a whole job from the
servers' checkpoints in its run folder (docs/failures.md). Ctrl-C or TERM stops every
process (TERM, then KILL after a grace period); none is left behind.

This module starts processes; it imports neither role. Flags for the optimizer and
the consistency model go to the servers (and the job flags to the workers too); every
other flag goes to the workers, which check them before anything starts. No flag is
written here by hand: each is a field of a dataclass (``common/launch/options.py``
says which), so ps-local's and the roles' flags cannot drift apart.

``--config RUN/run_config.json`` runs that job again: ps-local puts the file's
launcher, job and optimizer settings before the flags typed (which therefore win) and
passes ``--config`` on to the workers, which read their model, data and training
settings from the same file the same way (``common/config.py`` ``config_argv``).

Devices: ``--device cuda`` (a worker flag) puts every worker on the GPU; ``--devices
cuda:0,cpu,cpu`` gives each worker rank its own (``worker_flags``), e.g. one CuPy
worker beside CPU workers; the servers hold float32 vectors and do not care. A
``--precision`` other than fp32 then goes to the GPU workers only. Each distinct
device is checked (``python -m worker --dry-run``) before anything starts, so a GPU
asked for where there is none fails in a second with the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.cluster import ClusterConfig, JobConfig
from common.config import add_arguments, concern_group, config_argv, from_args, from_dict, read_config, to_dict, to_flags
from common.durability import DurabilityConfig
from common.launch.options import LaunchConfig, add_job_arguments
from common.optim import OptimConfig
from common.placement import add_show_placement
from common.run import RunConfig
from common.trace import merge_traces
from common.wire.shm import remove_job_segments
from common.wire.transport import free_port

GRACE_S = 5.0      # after TERM, how long a process gets before KILL
CLUSTER_FLAGS = ("timeout", "curve", "heartbeat", "heartbeat_misses", "shm")    # ClusterConfig's, given to every role


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-local", allow_abbrev=False,
        description="Run a parameter-server job on this machine: S servers and W workers as separate "
                    "processes, one progress bar, a run folder with config, metrics, logs, final weights "
                    "and a text sample. Flags not listed here go to every worker: see "
                    "`python -m worker --help` for the model, data and training flags "
                    "(e.g. --n-layer, --batch-size, --data PATH).")
    add_arguments(p, RunConfig, "training", only=("out",))
    add_job_arguments(p)
    add_arguments(p, ClusterConfig, "launch", only=CLUSTER_FLAGS)
    add_arguments(p, DurabilityConfig, "failures",
                  only=("checkpoint_every", "resume", "resume_from", "on_checkpoint_error"))
    add_arguments(p, LaunchConfig, "launch")
    add_show_placement(concern_group(p, "wire"))
    concern_group(p, "launch").add_argument(
        "--config", default="", metavar="FILE",
        help="run the job of a saved run_config.json (or of its run folder) again, exactly: the same "
             "processes, model, data, optimizer and consistency settings, hence the same losses and weights. "
             "A flag typed beside --config overrides the file's value (a worker flag too); the run folder is "
             "not taken from the file (--out, default runs/<timestamp>)")
    return p


def describe_mode(job: JobConfig) -> str:
    """``bsp``, ``ssp(s=2)``, ``local-sgd(H=4)``, ``bsp(backup workers=1)``..."""
    extra = {"ssp": f"s={job.staleness}", "local-sgd": f"H={job.local_steps}",
             "diloco": f"H={job.local_steps}, outer {job.outer_optimizer} lr={job.outer_lr}"}.get(job.mode)
    if job.backup_workers:
        extra = f"backup workers={job.backup_workers}"
    return f"{job.mode}({extra})" if extra else job.mode


def worker_flags(devices: str, workers: int, worker_args: list[str]) -> list[list[str]]:
    """The flags added to each worker rank's command for ``--devices``: ``--device D``, and
    the job's ``--precision`` only where D is a GPU (a CPU worker computes in float32).
    ``devices`` '' adds nothing; a single device applies to every rank."""
    if not devices:
        return [[] for _ in range(workers)]
    if any(a == "--device" or a.startswith("--device=") for a in worker_args):
        raise ValueError("give --devices (one device per worker) or --device (all workers), not both")
    listed = [d.strip() for d in devices.split(",")]
    if len(listed) == 1:
        listed *= workers
    if len(listed) != workers or not all(listed):
        raise ValueError(f"--devices lists {len(listed)} device(s) for {workers} worker(s): give one per "
                         "worker rank, or one for all (e.g. --devices cuda:0,cpu,cpu)")
    precision = [a for i, a in enumerate(worker_args)
                 if a.startswith("--precision") or (i and worker_args[i - 1] == "--precision")]
    return [["--device", d] + (precision if d != "cpu" else []) for d in listed]


def _without_precision(args: list[str]) -> list[str]:
    """``args`` less any ``--precision X`` / ``--precision=X`` (added back per rank)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--precision":
            skip = True
        elif not a.startswith("--precision="):
            out.append(a)
    return out


class Job:
    """The processes of one local job, and how to stop them."""

    def __init__(self, out: Path, threads: int):
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                        MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        self.procs: dict[str, subprocess.Popen] = {}
        self.cmds: dict[str, list[str]] = {}
        self.crashed: dict[str, int] = {}       # name -> signal, for processes killed from outside
        self.starting = False                   # inside Popen: a Ctrl-C/TERM waits (else the child is orphaned)
        self.interrupted = 0

    def start(self, name: str, cmd: list[str], mode: str = "w"):
        log = open(self.logs / f"{name}.log", mode)
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        self.cmds[name] = cmd
        self.starting = True
        try:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)   # our signals, not the terminal's
        finally:
            self.starting = False
        if self.interrupted:
            raise KeyboardInterrupt(f"signal {self.interrupted}")

    def on_signal(self, signum, frame):
        """Ctrl-C or TERM: stop (a KeyboardInterrupt), but not in the middle of starting a process."""
        if self.starting:
            self.interrupted = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def failed(self):
        """(name, exit code) of the first process that exited with an error, or None (a process
        killed by a signal from outside is a crash, see ``crashes``)."""
        for name, p in self.procs.items():
            code = p.poll()
            if code is not None and code > 0:
                return name, code
        return None

    def crashes(self) -> list[tuple[str, int]]:
        """(name, signal) of the processes newly found killed by a signal."""
        new = [(n, -p.poll()) for n, p in self.procs.items()
               if p.poll() is not None and p.poll() < 0 and n not in self.crashed]
        self.crashed.update(new)
        return new

    def restart(self, name: str):
        self.crashed.pop(name, None)
        self.start(name, command_again(name, self.cmds[name]), mode="a")

    def running(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def stop(self):
        """TERM every running process, then KILL what is left after the grace period."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def tail(self, name: str, lines: int = 15) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join("    " + line for line in text[-lines:])


def _read_new_metrics(path: Path, pos):
    """New complete JSON lines of metrics.jsonl since ``pos`` = (file, byte offset): a file
    replaced (worker 0 joining a running or resumed job rewrites it) is read again whole."""
    if not path.exists():
        return [], pos
    ident, offset = pos if isinstance(pos, tuple) else (None, pos)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) != ident or st.st_size < offset:
            offset = 0
        f.seek(offset)
        chunk = f.read()
    chunk = chunk[:chunk.rfind(b"\n") + 1]
    records = []
    for line in chunk.decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass                               # not a line of ours: skip it rather than stop the watch
    return records, ((st.st_dev, st.st_ino), offset + len(chunk))


# the sections of ps-local's run_config.json; "worker" is what the workers' --dry-run printed
# (they read it back themselves), "worker_args" the worker flags as typed (for the record)
SECTIONS = ("launcher", "job", "optimizer", "worker", "worker_args")
NOT_REPLAYED = ("coordinator", "out", "resume")     # launcher keys written for the record only


def saved_argv(parser, saved: dict, where: str) -> list[str]:
    """ps-local's flags that repeat a saved run_config.json (to go before the flags typed);
    ``ValueError`` naming a section or key that ps-local does not know."""
    unknown = sorted(set(saved) - set(SECTIONS))
    if unknown or "launcher" not in saved:
        raise ValueError(f"{where}: unknown section(s) {unknown}; ps-local's run_config.json has {list(SECTIONS)}"
                         if unknown else f"{where}: no 'launcher' section: not a ps-local run_config.json "
                                         "(a ps-train run repeats with ps-train --config)")
    launcher, optimizer = dict(saved["launcher"]), dict(saved.get("optimizer", {}))
    if isinstance(launcher.get("devices"), list):         # written before --devices was saved as typed
        launcher["devices"] = ",".join(launcher["devices"]) if any(launcher["devices"]) else ""
    if optimizer.get("lr_decay_steps") == launcher.get("steps"):
        optimizer.pop("lr_decay_steps")                    # the cosine follows --steps, typed or saved
    argv = config_argv(parser, launcher, f"{where} [launcher]", ignore=NOT_REPLAYED)
    for key, cls, section in (("job", JobConfig, saved.get("job", {})), ("optimizer", OptimConfig, optimizer)):
        from_dict(cls, section, f"{where} [{key}]")         # unknown keys and wrong types, named
        argv += config_argv(parser, section, f"{where} [{key}]")
    return argv


def parse(argv=None):
    """(parser, args, worker args): the flags typed, over a saved ``--config``'s; the workers
    get ``--config`` too, before the worker flags typed, and read their part of the file."""
    typed = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, worker_args = parser.parse_known_args(typed)
    if args.config:
        try:
            args, worker_args = parser.parse_known_args(saved_argv(parser, read_config(args.config), args.config)
                                                        + typed)
        except ValueError as e:
            parser.error(str(e))
        worker_args = ["--config", str(Path(args.config).resolve()), *worker_args]
    return parser, args, worker_args


def main(argv=None) -> int:
    parser, args, worker_args = parse(argv)
    job, optim, out = _checked(parser, args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.servers + args.workers))
    port = args.port or free_port()
    coord = f"127.0.0.1:{port}"
    cluster = [f for k in CLUSTER_FLAGS if k != "curve" or args.curve           # (no --curve: plain TCP)
               for f in ("--" + k.replace("_", "-"), str(getattr(args, k)))]
    common = ["--num-servers", str(args.servers), "--num-workers", str(args.workers), "--coordinator", coord,
              *cluster, *to_flags(job)]
    try:
        per_rank = worker_flags(args.devices, args.workers, worker_args)
    except ValueError as e:
        parser.error(str(e))
    shared_args = _without_precision(worker_args) if args.devices else worker_args
    worker_cmd = [sys.executable, "-m", "worker", *common, "--steps", str(args.steps), "--out", str(out),
                  *shared_args]
    if args.show_placement:
        return subprocess.run(worker_cmd + ["--show-placement"]).returncode
    # the workers' flags (and devices) are checked before anything starts, so a typo fails in a second
    for extra in dict.fromkeys(tuple(f) for f in per_rank):
        check = subprocess.run(worker_cmd + list(extra) + ["--dry-run"], capture_output=True, text=True)
        if check.returncode != 0:
            sys.stderr.write(check.stderr or check.stdout)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    config_name = "run_config.json" if not args.resume else f"run_config.resumed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    launcher = {k: getattr(args, k) for k in ("servers", "workers", "steps", "port", "progress", "trace", "devices",
                                              "respawn", *CLUSTER_FLAGS, "checkpoint_every")}
    (out / config_name).write_text(json.dumps({
        "launcher": dict(launcher, threads=threads, coordinator=coord, out=str(out)),
        "job": to_dict(job), "optimizer": to_dict(optim), "worker_args": worker_args,
        "worker": json.loads(check.stdout) if check.stdout.strip().startswith("{") else {},
    }, indent=2) + "\n")
    print(f"ps-local: {args.servers} server(s), {args.workers} worker(s), {args.steps} steps, "
          f"mode {describe_mode(job)}, {threads} BLAS thread(s) per process; run folder {out}")
    server_cmds = [[sys.executable, "-m", "paramserver", "--rank", str(s),
                    "--bind", f"tcp://127.0.0.1:{port if s == 0 else '*'}",   # a local job stays on loopback
                    *common, *to_flags(optim), "--out", str(out), "--checkpoint-every", str(args.checkpoint_every),
                    *(["--resume"] if args.resume else []), *(["--trace", str(out)] if args.trace else []),
                    *(["--resume-from", str(args.resume_from)] if args.resume_from >= 0 else []),
                    "--on-checkpoint-error", args.on_checkpoint_error]
                   for s in range(args.servers)]
    trace = ["--trace"] if args.trace else []
    worker_cmds = [worker_cmd + per_rank[r] + ["--rank", str(r), "--no-progress", *trace] for r in range(args.workers)]
    return _run_job(Job(out, threads), server_cmds, worker_cmds, out, args, coord)


def _checked(parser, args):
    """The job and optimizer configs and the run folder from ``args``, or a parser error."""
    if args.lr_decay_steps is None:              # the cosine ends with the run
        args.lr_decay_steps = args.steps
    try:
        job, optim = from_args(JobConfig, args), from_args(OptimConfig, args)
        from_args(LaunchConfig, args), RunConfig(steps=args.steps, out=args.out)     # their checks
        job.check_workers(args.workers)
        if job.compress_momentum and optim.optimizer != "sgd":
            raise ValueError(f"--compress-momentum applies momentum on the workers: use --optimizer sgd, "
                             f"not {optim.optimizer}")
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    if args.resume_from >= 0:
        args.resume = True                       # --resume-from VERSION is a --resume
    elif args.resume_from < -1:
        parser.error(f"--resume-from must be a checkpoint version >= 0, got {args.resume_from}")
    if args.resume and not (out / "checkpoints").is_dir():
        parser.error(f"--resume: {out / 'checkpoints'} does not exist; give the --out of the job to resume")
    if not args.resume and out.exists() and any(out.iterdir()):
        parser.error(f"run folder {out} already exists and is not empty; choose another --out (or --resume it)")
    return job, optim, out


def _run_job(run: Job, server_cmds: list, worker_cmds: list, out: Path, args, coordinator: str) -> int:
    """Start the servers, then the workers; watch them to the end (``_watch``); stop them all,
    and remove the shared-memory segments a killed process left behind (``--shm``)."""
    interrupted = False
    signal.signal(signal.SIGTERM, run.on_signal)
    signal.signal(signal.SIGINT, run.on_signal)
    try:
        for s, cmd in enumerate(server_cmds):
            run.start(f"server-{s}", cmd)
        for r, cmd in enumerate(worker_cmds):
            run.start(f"worker-{r}", cmd)
        code = _watch(run, out, args)
        if args.trace:
            run.stop()                        # the servers write their traces as they exit
            merged = merge_traces(out)
            print(f"ps-local: timeline of every process in {merged}: open it at https://ui.perfetto.dev"
                  if merged else "ps-local: no trace was written", file=sys.stdout if merged else sys.stderr)
        return code
    except KeyboardInterrupt:
        interrupted = True
        print("\nps-local: interrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        run.stop()
        left = remove_job_segments(coordinator)
        if left:
            print(f"ps-local: removed {len(left)} shared-memory segment(s) left by killed processes: "
                  f"{', '.join(left)}", file=sys.stderr)
        if interrupted:
            left = [n for n, p in run.procs.items() if p.poll() is None]
            print(f"ps-local: stopped ({'all processes ended' if not left else 'still running: ' + ', '.join(left)})",
                  file=sys.stderr)


def command_again(name: str, cmd: list) -> list:
    """The command that starts a crashed process again: a server resumes from its newest
    checkpoint (--resume, never the --resume-from VERSION the job may have started with)."""
    if not name.startswith("server-"):
        return list(cmd)
    if "--resume-from" in cmd:
        i = cmd.index("--resume-from")
        cmd = cmd[:i] + cmd[i + 2:]
    return list(cmd) + ([] if "--resume" in cmd else ["--resume"])


def _crashed(run: Job, name: str, sig: int, args):
    """A process was killed from outside: start it again (--respawn), or say what happens now."""
    if args.respawn:
        print(f"\nps-local: {name} was killed by signal {sig}; starting it again"
              + (" from its checkpoint (--resume)" if name.startswith("server-") else ""), file=sys.stderr)
        run.restart(name)
        return
    again = shlex.join(command_again(name, run.cmds[name]))
    what = ("the job goes on without it (the coordinator drops it from the view)" if name.startswith("worker-")
            else f"the job waits up to --timeout ({args.timeout:g} s) for it to come back")
    print(f"\nps-local: {name} was killed by signal {sig}; {what}. To start it again:\n    {again}",
          file=sys.stderr)


def _watch(run: Job, out: Path, args) -> int:
    from tqdm import tqdm
    metrics, pos, last = out / "metrics.jsonl", 0, {}
    bar = None if not args.progress else tqdm(total=args.steps, unit="step", dynamic_ncols=True)
    try:
        while True:
            for name, sig in run.crashes():
                _crashed(run, name, sig, args)
            if not run.running():
                break
            dead = run.failed()
            if dead:
                name, code = dead
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                print(f"\nps-local: {name} {how}; stopping the job. Its log is {run.logs / (name + '.log')}; "
                      f"the end of it:\n{run.tail(name)}", file=sys.stderr)
                return 1
            records, pos = _read_new_metrics(metrics, pos)
            for rec in records:
                last.update({k: v for k, v in rec.items() if v is not None})
                if bar is not None:
                    bar.n = rec.get("step", bar.n)
                    post = {"loss": f"{last.get('loss', float('nan')):.3f}",
                            "tok/s": f"{last.get('tokens_per_s', 0):,.0f}"}
                    if "val_loss" in last:
                        post["val"] = f"{last['val_loss']:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.refresh()
                elif rec.get("val_loss") is not None:
                    print(f"step {rec['step']}: loss {rec.get('loss', float('nan')):.4f} "
                          f"val_loss {rec['val_loss']:.4f}")
            time.sleep(0.2)
    finally:
        if bar is not None:
            bar.close()
    dead = run.failed()
    if dead:
        name, code = dead
        print(f"ps-local: {name} exited with code {code}; its log is {run.logs / (name + '.log')}:\n"
              f"{run.tail(name)}", file=sys.stderr)
        return 1
    records, pos = _read_new_metrics(metrics, pos)
    for rec in records:
        last.update({k: v for k, v in rec.items() if v is not None})
    print(f"ps-local: done. final loss {last.get('loss', float('nan')):.4f}, "
          f"validation loss {last.get('val_loss', float('nan')):.4f}")
    sample = out / "sample.txt"
    if sample.exists():
        print("sample from the final model:\n" + "-" * 60 + "\n" + sample.read_text(errors="replace")
              + "\n" + "-" * 60)
    print(f"run folder: {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
