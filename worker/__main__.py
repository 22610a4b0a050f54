"""``python -m worker``: start one worker of a parameter-server job.

It registers with the coordinator (server 0), trains on its shard of the data, pushes
its gradients to the servers and pulls the parameters back, step after step. See
``worker/distributed.py`` for the loop and ``python -m worker --help`` for the flags;
``ps-local`` starts a whole job on one machine.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys

from common import log as logsetup
from common.cluster import ClusterConfig, JobConfig, add_cluster_arguments
from common.config import (add_arguments, concern_group, describe, from_args, given_flags, parse_with_config,
                           read_config, sections_argv, to_dict)
from common.log import add_log_level
from common.placement import add_show_placement
from worker.data import DataConfig, data_tokenizer
from worker.distributed import WorkerConfig
from worker.model import GPTConfig
from worker.pretrained import resolve_shape
from worker.train import TRAIN_DEFAULTS

CONCERNS = {"cluster": ClusterConfig, "job": JobConfig, "model": GPTConfig, "data": DataConfig,
            "worker": WorkerConfig}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m worker",
        description="A parameter-server worker: computes the GPT's gradients on its shard of the data, "
                    "pushes them to the servers, pulls the updated parameters back. Every worker of a job "
                    "should get the same model, data and worker flags; the optimizer lives on the servers.")
    add_arguments(p, GPTConfig, "model", defaults=TRAIN_DEFAULTS, default_text={"vocab_size": "0: the tokenizer's"})
    add_arguments(p, DataConfig, "data")
    add_arguments(p, WorkerConfig, "training")
    add_arguments(p, JobConfig, "consistency")
    add_cluster_arguments(p)
    run = concern_group(p, "training")
    run.add_argument("--config", default="", metavar="FILE",
                     help="start from the model, data, training and job settings of a saved run_config.json "
                          "(ps-local's, or what --dry-run prints) to repeat a run exactly; a flag typed beside "
                          "--config overrides the file's value. Neither the run folder (--out) nor where this "
                          "process sits in the job (the launch flags) is taken from the file")
    run.add_argument("--no-progress", action="store_true", help="(accepted for launchers; workers log lines)")
    run.add_argument("--dry-run", action="store_true",
                     help="check the flags (and that --device can be used here), print the effective "
                          "configuration as JSON, and exit")
    add_show_placement(concern_group(p, "wire"))
    add_log_level(p)
    return p


# the sections of a saved configuration a worker takes, and the keys it never takes from one
REPLAYED = ("job", "model", "data", "worker")
NOT_REPLAYED = ("out",)


def saved_argv(parser, path: str) -> list[str]:
    """The flags that give a saved configuration's settings (``path``: ps-local's
    run_config.json, whose "worker" section is what ``--dry-run`` printed, or that print
    itself), to go before the flags typed; ``ValueError`` naming what it does not know."""
    saved = read_config(path)
    if "launcher" in saved:                       # ps-local's: the workers' part
        saved = saved.get("worker", {})
    return sections_argv(parser, saved, REPLAYED, CONCERNS, f"--config {path}", ignore=NOT_REPLAYED)


def parse(argv=None):
    """(parser, args, argv): the flags typed, over a saved ``--config``'s."""
    parser = build_parser()
    args, argv = parse_with_config(parser, list(sys.argv[1:] if argv is None else argv),
                                   lambda path: saved_argv(parser, path))
    return parser, args, argv


def main(argv=None) -> int:
    parser, args, argv = parse(argv)
    try:
        resolve_shape(args, given_flags(build_parser, argv), data_tokenizer(from_args(DataConfig, args)).vocab_size)
        configs = {k: from_args(cls, args) for k, cls in CONCERNS.items()}
    except ValueError as e:
        parser.error(str(e))
    from worker import backend
    try:
        backend.probe(configs["worker"].device)     # --device cuda where it cannot run: say why, now
    except backend.BackendError as e:
        print(f"python -m worker: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({k: to_dict(v) for k, v in configs.items()}))
        return 0
    if args.show_placement:
        from common import placement
        from worker.tasks import make_task
        layout = make_task(configs["worker"].model, configs["model"]).model.layout
        S = configs["cluster"].num_servers
        print(placement.describe(layout, placement.place_chunks(layout, S, configs["job"].chunk_mb), S))
        return 0
    log = logsetup.setup(f"worker:{configs['cluster'].rank if configs['cluster'].rank >= 0 else '?'}",
                         args.log_level)
    log.info("effective configuration:\n%s", describe(configs))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)       # also where it started ignored (a background job of a script)

    from common.wire.transport import TransportError
    from worker.client import DeadlineError, RemoteError
    from worker.distributed import run
    try:
        run(configs["cluster"], configs["job"], configs["model"], configs["data"], configs["worker"])
        return 0
    except (DeadlineError, RemoteError, TransportError) as e:
        log.error("%s", e)
        return 1
    except (ValueError, OSError) as e:          # bad data path, data too small for the shard...
        log.error("cannot train: %s", e)
        return 1
    except KeyboardInterrupt:
        log.info("interrupted; stopping")
        return 130


if __name__ == "__main__":
    sys.exit(main())
