"""Fuzz every port of a live BSP job, then check that training was not changed by one bit.

    python scripts/fuzz_job.py                              # 100,000 frames, seed 0
    python scripts/fuzz_job.py --frames 1000000 --steps 2000

Runs a small ``ps-local`` job (2 servers, 2 workers, BSP, fixed seeds) twice: once left
alone, once while this script sends malformed and out-of-order messages to every endpoint
its servers listen on (TCP and the Unix-socket twins that local jobs use): every kind of
scripts/fuzz_server.py (random bytes and msgpack, fields replaced, truncated or flipped
headers, frames of the wrong size or number, absurd shapes, NaN, wrong dtypes, unowned
ranges, unknown versions and commands) and, between them, forgeries that look like the
job's own traffic: pushes, pulls, inits, norms, heartbeats and DONEs in a worker's or a
server's name, for the step the job is at, the one before and the one after, with
foreign sessions and request ids. It checks that every process of the fuzzed job exits 0,
that the servers' memory stays bounded, and that the final parameters equal the
undisturbed run's bit for bit. Exit 0 when all hold. tests/test_fuzz.py runs it small.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                 # run from a clone without installing
sys.path.insert(0, str(ROOT / "scripts"))
import msgpack  # noqa: E402  (forged headers bypass the codec's checks on purpose)
import zmq  # noqa: E402  (raw frames, not the project's transport: the point is to send garbage)

import fuzz_server  # noqa: E402  (its generator of malformed messages)
from common.cluster import host_name  # noqa: E402
from common.wire.protocol import PROTOCOL_VERSION  # noqa: E402
from common.wire.transport import free_port, local_endpoint  # noqa: E402

MODEL = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "8",
         "--eval-interval", "100000", "--eval-batches", "2", "--sample-bytes", "0", "--log-interval", "1"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
COMMANDS = ["push", "pull", "init", "norm", "heartbeat", "done", "register", "status"]


def start_job(out: Path, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "common.launch.local", "--servers", "2", "--workers", "2", "--steps", str(steps),
           "--out", str(out), "--port", str(free_port()), "--no-progress", "--timeout", "60", *MODEL]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []        # complete lines: one may be half written
    return max((json.loads(ln).get("step", 0) for ln in lines if ln.strip()), default=-1)


def endpoints(out: Path, servers: int, proc, timeout=120.0) -> list[str]:
    """Every endpoint the job's servers listen on, read from their logs as a user would."""
    deadline, found = time.monotonic() + timeout, {}
    while len(found) < servers:
        for s in range(servers):
            log = out / "logs" / f"server-{s}.log"
            for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
                if " listening on " in line:
                    found[s] = line.split(" listening on ")[1].split(",")[0]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the job's servers did not start listening within {timeout:.0f} s")
        time.sleep(0.05)
    twins = [local_endpoint(tcp, host_name()) for tcp in found.values()]
    return list(found.values()) + [t for t in twins if t and Path(t[len("ipc://"):]).exists()]


def forged(rng: random.Random, step: int) -> list[bytes]:
    """A message shaped like the job's own traffic, in a member's name, that must change nothing:
    its session and request id are not the member's, or its step is not the job's."""
    cmd = rng.choice(COMMANDS)
    sender = rng.choice(["worker:0", "worker:1", "server:0", "server:1", "worker:2", "tool:0"])
    n = rng.choice([8, 64, 1024])
    arrays = [{"dtype": "float32", "shape": [n], "range": [0, n]}] if cmd in ("push", "init") else []
    meta = {"session": rng.randrange(1 << 62), "loss": 1.0, "sumsq": 1.0, "version": step, "rids": [1, 2]}
    header = {"v": PROTOCOL_VERSION, "cmd": cmd, "from": sender, "step": step + rng.choice([-1, 0, 1]),
              "rid": rng.choice([1, 2, 3, rng.randrange(1 << 30)]), "arrays": arrays, "meta": meta}
    return [msgpack.packb(header, use_bin_type=True)] + [bytes(4 * n) for _ in arrays]


def server_pids(proc) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == proc.pid and b"paramserver" in argv:
            pids.append(int(stat.parent.name))
    return pids


def fuzz(out: Path, proc, frames: int, seed: int) -> dict:
    """Send ``frames`` messages round-robin to every endpoint of the running job in ``out``."""
    targets = endpoints(out, 2, proc)
    ctx = zmq.Context.instance()
    socks = []
    for ep in targets:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 1000)
        s.connect(ep)
        socks.append(s)
    rng, junk = random.Random(seed), fuzz_server.messages(random.Random(seed + 1), 1 << 62)
    sent = answered = 0
    rss = {pid: fuzz_server.rss_mib(pid) for pid in server_pids(proc)}
    peak = dict(rss)
    step = max(job_step(out), 0)
    while sent < frames and proc.poll() is None:
        msg = forged(rng, step) if rng.random() < 0.3 else next(junk)
        sock = socks[sent % len(socks)]
        try:
            sock.send_multipart(msg, flags=zmq.NOBLOCK)
            sent += 1
        except zmq.Again:                              # the server's queue is full: let it catch up
            time.sleep(0.001)
        for s in socks:                               # keep our own queues short
            while s.poll(0):
                s.recv_multipart()
                answered += 1
        if sent % 2000 == 0:
            step = max(job_step(out), step)
            for pid in peak:
                try:
                    peak[pid] = max(peak[pid], fuzz_server.rss_mib(pid))
                except OSError:
                    pass
    for s in socks:
        s.close()
    return {"frames": sent, "answered": answered, "endpoints": targets, "at_step": step,
            "rss_start_mib": [round(v, 1) for v in rss.values()], "rss_peak_mib": [round(v, 1) for v in peak.values()]}


def params_digest(out: Path) -> str:
    from safetensors.numpy import load_file
    tensors = load_file(str(out / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].tobytes())
    return h.hexdigest()


def run(frames: int, seed: int, folder: Path, steps: int, say=print) -> dict:
    """The undisturbed run, then the fuzzed one; raises AssertionError if anything differs."""
    plain = start_job(folder / "undisturbed", steps)
    text, _ = plain.communicate(timeout=1800)
    assert plain.returncode == 0, f"the undisturbed job failed:\n{text[-3000:]}"
    t0 = time.monotonic()
    job = start_job(folder / "fuzzed", steps)
    try:
        findings = fuzz(folder / "fuzzed", job, frames, seed)
        text, _ = job.communicate(timeout=1800)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    findings["seconds"] = round(time.monotonic() - t0, 1)
    assert job.returncode == 0, f"the fuzzed job failed (exit {job.returncode}):\n{text[-3000:]}"
    logs = {p.name: p.read_text(errors="replace") for p in (folder / "fuzzed" / "logs").glob("*.log")}
    crashed = [name for name, log in logs.items() if "Traceback" in log]
    assert not crashed, f"a traceback in {crashed}"
    findings["identical"] = params_digest(folder / "fuzzed") == params_digest(folder / "undisturbed")
    say(f"fuzz_job: {findings['frames']} frames to {len(findings['endpoints'])} endpoints of a live BSP job "
        f"({findings['answered']} answered) in {findings['seconds']} s, through step {findings['at_step']} of "
        f"{steps}; server RSS {findings['rss_start_mib']} -> peak {findings['rss_peak_mib']} MiB; every process "
        f"exited 0; final parameters {'bit-identical to' if findings['identical'] else 'DIFFERENT from'} "
        "the undisturbed run's")
    assert findings["identical"], "the fuzz changed the training"
    return findings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=100_000, help="messages to send (default: 100000)")
    ap.add_argument("--steps", type=int, default=400, help="steps of the job (default: 400); the fuzz stops "
                                                           "when the job ends")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generators (default: 0)")
    ap.add_argument("--out", default="runs/fuzz_job", help="folder of the two run folders (default: runs/fuzz_job)")
    args = ap.parse_args(argv)
    folder = Path(args.out)
    if folder.exists() and any(folder.iterdir()):
        ap.error(f"{folder} is not empty: give a new --out")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        findings = run(args.frames, args.seed, folder, args.steps)
    except AssertionError as e:
        print(f"fuzz_job: FAILED: {e}", file=sys.stderr)
        return 1
    grew = max(p - s for p, s in zip(findings["rss_peak_mib"], findings["rss_start_mib"]))
    if grew > 64:
        print(f"fuzz_job: a server's memory grew by {grew:.0f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
