"""``ps-launch --hostfile FILE``: start a job's roles on other hosts over ssh.

For every role the hostfile gives a host (``common/launch/hostfile.py``), ``ps-launch`` runs

    RSH HOST 'cd CWD && exec env PYTHONPATH=REPO ... PYTHON -m common.launch.guard -- PYTHON -m paramserver ...'

(``RSH`` is ``--rsh``, by default ``ssh -o BatchMode=yes``; the tests give a script that
enters a network namespace instead). It prints every line the roles write, prefixed
with ``[HOST role-rank]``, and also writes each role's log to ``OUT/logs/``. When one
role fails, or on Ctrl-C, it stops them all: it closes each session's input, so the
guard on the far side stops its role (``common/launch/guard.py``), then ends the local ssh
processes that are still there. It exits 0 only when every role exited 0.

Assumptions, as on most clusters: the repository and Python live at the same path on
every host (a shared file system or identical installs; ``--python`` and
``--remote-dir`` say otherwise), and the run folder ``--out`` is shared, since worker 0
writes the metrics and the model there.

Addresses: server 0 listens on ``tcp://*:PORT`` and every host's servers advertise the
hostfile's ``addr=`` (or ``--interface``/``--subnet``), so the bind address and the
address peers dial stay separate. ``--preflight`` runs ``ps-preflight`` on the same
hosts first and stops before launching if a server is unreachable.

Not here: the roles; starting processes on this machine only (``ps-local``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from common.launch import hostfile
from common.cluster import ClusterConfig
from common.config import add_arguments, concern_group
from common.launch.options import LaunchConfig, add_job_arguments, role_flags
from common.run import RunConfig

GRACE_S = 8.0
REPO = str(Path(__file__).resolve().parents[2])
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def remote_command(argv: list[str], cwd: str, repo: str, python: str, threads: int, env: dict | None = None,
                   guard: bool = True) -> str:
    """The shell command the remote host runs for one role, under the guard (which
    stops the role when the session's input ends) unless ``guard`` is False."""
    vars_ = {"PYTHONPATH": repo, "PYTHONUNBUFFERED": "1", **{v: str(threads) for v in THREAD_VARS}, **(env or {})}
    assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in vars_.items())
    wrap = f"{shlex.quote(python)} -m common.launch.guard -- " if guard else ""
    return f"cd {shlex.quote(cwd)} && exec env {assign} {wrap}" + " ".join(shlex.quote(a) for a in argv)


def role_commands(hosts, port: int, server_flags, worker_flags, python: str, timeout: float,
                  cluster_flags=()) -> list[tuple[hostfile.Host, str, list[str]]]:
    """[(host, name, argv)] for every role of the job, servers first."""
    S = sum(len(h.servers) for h in hosts)
    W = sum(len(h.workers) for h in hosts)
    coord = hostfile.coordinator(hosts, port)
    common = ["--num-servers", str(S), "--num-workers", str(W), "--coordinator", coord,
              "--timeout", str(timeout), *cluster_flags]
    out = []
    for h in hosts:
        for s in h.servers:
            bind = f"tcp://*:{port}" if s == 0 else "tcp://*:*"
            adv = [] if ("--interface" in cluster_flags or "--subnet" in cluster_flags) else \
                ["--advertise", f"tcp://{h.addr}:*"]
            out.append((h, f"server-{s}", [python, "-m", "paramserver", "--rank", str(s), "--bind", bind, *adv,
                                           *common, *server_flags]))
    for h in hosts:
        for w in h.workers:
            out.append((h, f"worker-{w}", [python, "-m", "worker", "--rank", str(w), *common, *worker_flags,
                                           "--no-progress"]))
    return out


class Remote:
    """One role on one host: the local rsh process, its log, its output thread."""

    def __init__(self, rsh: list[str], host: hostfile.Host, name: str, command: str, logdir: Path, lock):
        self.host, self.name = host, name
        self.prefix = f"[{host.name} {name}] "
        self.log = open(logdir / f"{name}.log", "w")
        self.log.write(f"$ {shlex.join(rsh + [host.name, command])}\n")
        self.log.flush()
        self.proc = subprocess.Popen(rsh + [host.name, command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lock = lock
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.log.write(line + "\n")
            self.log.flush()
            with self.lock:
                print(self.prefix + line, flush=True)

    def hang_up(self):
        """Close the session's input: the remote guard stops the role."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def close(self):
        self.thread.join(timeout=2)
        self.log.close()


def stop_all(remotes: list[Remote], grace: float = GRACE_S):
    for r in remotes:
        r.hang_up()
    deadline = time.monotonic() + grace
    for r in remotes:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.terminate()          # the local ssh client; the remote guard sees its session end
            try:
                r.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-launch", allow_abbrev=False,
        description="Start a parameter-server job on the hosts of a hostfile over ssh, stream their logs "
                    "prefixed by host and role, stop them all on Ctrl-C or when one fails. Flags not listed "
                    "here go to every worker (`python -m worker --help`).")
    g = concern_group(p, "launch")
    g.add_argument("--hostfile", required=True, help="lines 'HOST [servers=N] [workers=N] [addr=IP]' "
                                                     "(see docs/cluster.md)")
    g.add_argument("--rsh", default="ssh -o BatchMode=yes",
                   help="the command that runs a command on a host: RSH HOST 'COMMAND' (default: %(default)s)")
    g.add_argument("--python", default=sys.executable, help="Python on the hosts (default: this one, %(default)s)")
    g.add_argument("--remote-dir", default=os.getcwd(), help="working directory on the hosts (default: this one)")
    g.add_argument("--preflight", action="store_true", help="run ps-preflight on the hosts first; stop if it fails")
    add_arguments(p, LaunchConfig, "launch", only=("port", "threads"), defaults={"port": 5700, "threads": 1})
    add_arguments(p, ClusterConfig, "launch", only=("timeout", "interface", "subnet", "curve"),
                  default_text={"interface": "'': the hostfile's addr=", "subnet": "'': the hostfile's addr="})
    add_arguments(p, RunConfig, "training", only=("out",), default_text={"out": "runs/<timestamp>, shared by the hosts"})
    add_job_arguments(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, worker_args = parser.parse_known_args(argv)
    try:
        hosts = hostfile.read(args.hostfile)
        server_flags, worker_flags = role_flags(args, worker_args)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    out = Path(args.out or time.strftime("runs/%Y%m%d-%H%M%S")).absolute()
    rsh = shlex.split(args.rsh)
    cluster_flags = [f for k in ("interface", "subnet", "curve") if getattr(args, k) for f in (f"--{k}", getattr(args, k))]
    roles = role_commands(hosts, args.port, server_flags, worker_flags + ["--out", str(out)], args.python,
                          args.timeout, cluster_flags)
    if args.preflight:
        from common.launch.preflight import main as preflight
        code = preflight(["--hostfile", args.hostfile, "--rsh", args.rsh, "--port", str(args.port),
                          "--python", args.python])
        if code != 0:
            print("ps-launch: preflight failed; not launching", file=sys.stderr)
            return code
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "launch.json").write_text(json.dumps({
        "hosts": [vars(h) for h in hosts], "coordinator": hostfile.coordinator(hosts, args.port),
        "rsh": args.rsh, "roles": {name: argv for _, name, argv in roles}}, indent=2) + "\n")
    print(f"ps-launch: {sum(len(h.servers) for h in hosts)} server(s), {sum(len(h.workers) for h in hosts)} "
          f"worker(s) on {len(hosts)} host(s); coordinator {hostfile.coordinator(hosts, args.port)}; run folder {out}",
          flush=True)
    lock, remotes = threading.Lock(), []

    def on_term(signum, frame):                 # TERM (a scheduler, kill) stops every role like Ctrl-C
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)       # also where it started ignored (a background job of a script)
    try:
        for h, name, argv_ in roles:
            cmd = remote_command(argv_, args.remote_dir, REPO, args.python, args.threads, {"PS_HOST": h.name})
            remotes.append(Remote(rsh, h, name, cmd, out / "logs", lock))
        return _watch(remotes, out)
    except KeyboardInterrupt:
        print("\nps-launch: interrupted; stopping every role", file=sys.stderr, flush=True)
        return 130
    finally:
        stop_all(remotes)
        for r in remotes:
            r.close()


def _watch(remotes: list[Remote], out: Path) -> int:
    while True:
        codes = {r.name: r.proc.poll() for r in remotes}
        bad = next((r for r in remotes if codes[r.name] not in (None, 0)), None)
        if bad is not None:
            print(f"ps-launch: {bad.name} on {bad.host.name} exited with code {codes[bad.name]}; stopping the "
                  f"job. Its log: {out / 'logs' / (bad.name + '.log')}", file=sys.stderr, flush=True)
            return 1
        if all(c == 0 for c in codes.values()):
            print(f"ps-launch: done; every role exited 0. Run folder: {out}", flush=True)
            return 0
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
