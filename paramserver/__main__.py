"""``python -m paramserver``: start one server (server 0 is also the coordinator).

Example, two servers and two workers by hand on one machine (four terminals):

    python -m paramserver --rank 0 --num-servers 2 --num-workers 2 --coordinator 127.0.0.1:5700
    python -m paramserver --rank 1 --num-servers 2 --num-workers 2 --coordinator 127.0.0.1:5700
    python -m worker --num-servers 2 --num-workers 2 --coordinator 127.0.0.1:5700
    python -m worker --num-servers 2 --num-workers 2 --coordinator 127.0.0.1:5700

A server that died comes back into its job with the same command plus ``--resume``
(it reads its newest checkpoint in ``--checkpoint-dir``); docs/failures.md.
"""
from __future__ import annotations

import argparse
import signal
import sys

from common import log as logsetup
from common.cluster import ClusterConfig, JobConfig, add_cluster_arguments
from common.config import add_arguments, concern_group, describe, from_args, parse_with_config, read_config, sections_argv
from common.log import add_log_level
from common.optim import OptimConfig
from common.run import RunConfig
from common.durability import DurabilityConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m paramserver",
        description="A parameter server: owns a shard of the flat parameter vector and its optimizer "
                    "state, averages the workers' gradients and applies the optimizer. Server 0 is also "
                    "the coordinator every process registers with. Every server of a job must get the "
                    "same optimizer and job flags.",
)
    add_arguments(p, OptimConfig, "optimizer")
    add_arguments(p, JobConfig, "consistency")
    add_arguments(p, DurabilityConfig, "failures")
    add_cluster_arguments(p)
    g = concern_group(p, "training")
    add_arguments(p, RunConfig, "training", only=("out",), default_text={"out": "'': none"})
    g.add_argument("--trace", default="", metavar="DIR",
                   help="write a Chrome trace of this server to DIR/trace-server-RANK.json (ps-local --trace "
                        "passes the run folder)")
    g.add_argument("--config", default="", metavar="FILE",
                   help="take the job's consistency, wire and optimizer settings from a ps-local run_config.json "
                        "(or its run folder), to start the servers of that job again by hand; a flag typed beside "
                        "--config overrides the file's value")
    add_log_level(p)
    return p


# the sections of ps-local's run_config.json, and those a server takes from it
SECTIONS = ("launcher", "job", "optimizer", "worker", "worker_args")
REPLAYED = ("job", "optimizer")


def parse(argv=None) -> argparse.Namespace:
    """The flags typed, over a saved ``--config``'s."""
    parser = build_parser()
    return parse_with_config(parser, list(sys.argv[1:] if argv is None else argv), lambda path: sections_argv(
        parser, read_config(path), REPLAYED, SECTIONS, f"--config {path}"))[0]


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cluster, job, optim = from_args(ClusterConfig, args), from_args(JobConfig, args), from_args(OptimConfig, args)
        durability = from_args(DurabilityConfig, args)
        job.check_workers(cluster.num_workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cluster.rank < 0 and cluster.num_servers > 1:
        print(f"error: with {cluster.num_servers} servers each needs --rank (0..{cluster.num_servers - 1}); "
              "server 0 is the coordinator", file=sys.stderr)
        return 2
    rank = max(cluster.rank, 0)
    log = logsetup.setup(f"server:{rank}", args.log_level)
    log.info("effective configuration:\n%s", describe({"cluster": cluster, "job": job, "optimizer": optim,
                                                      "durability": durability}))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    from paramserver.server import Server, ServerError
    from common.trace import NULL_TRACER, Tracer, trace_file
    from common.wire.transport import TransportError
    tracer = Tracer(f"server {rank}") if args.trace else None
    try:
        server = Server(cluster, optim, job, rank, out=args.out, durability=durability, tracer=tracer or NULL_TRACER)
        signal.signal(signal.SIGTERM, server.on_signal)
        signal.signal(signal.SIGINT, server.on_signal)
        return server.run()
    except (ServerError, TransportError) as e:
        log.error("%s", e)
        return 1
    except ValueError as e:                     # e.g. --interface or --subnet that this host lacks
        log.error("cannot start: %s", e)
        return 1
    except KeyboardInterrupt:
        log.info("interrupted; stopping")
        return 130
    finally:
        if tracer:
            log.info("trace written to %s", tracer.save(trace_file(args.trace, "server", rank)))


if __name__ == "__main__":
    sys.exit(main())
