"""Every command's flags: each defined once, grouped by concern, new fields appear by themselves.

What a user relies on: a flag means the same in every command that takes it (its help
is the same text: it comes from one dataclass field); ``--help`` lists the flags under
the same concerns in the same order everywhere (model, data, training, optimizer,
consistency, wire, failures, launch); a setting another developer adds as a field of a
config class appears as a flag in every command that takes that class, launchers
included, with nothing else to write.
"""
import dataclasses
import re

import pytest

from common.config import CONCERNS


def parsers():
    from common.launch import local, role, ssh
    from paramserver import __main__ as server_main
    from worker import __main__ as worker_main, train
    return {"ps-local": local.build_parser(), "ps-launch": ssh.build_parser(), "ps-role": role.build_parser(),
            "python -m worker": worker_main.build_parser(), "python -m paramserver": server_main.build_parser(),
            "ps-train": train.build_parser()}


def flags_by_group(parser):
    """[(group title, [(flag, help less its default)])]: argparse keeps these only in its
    own tables, read here and nowhere else."""
    out = []
    for group in parser._action_groups:
        flags = [(s, re.sub(r"\s*\(default: .*\)$", "", a.help or "", flags=re.S))
                 for a in group._group_actions for s in a.option_strings if s.startswith("--")]
        if flags:
            out.append((group.title, flags))
    return out


# Flags one name stands for two things under, on purpose or kept from before; each says why.
SAME_NAME_OTHER_MEANING = {
    "--config": "each command names the sections of the file it reads",
    "--progress": "ps-local's bar is the job's, ps-train's its own",
    "--no-progress": "the worker only accepts it from launchers (it logs lines)",
    "--trace": "ps-local: every process; a worker: itself; a server: --trace DIR",
    "--no-trace": "ps-local: every process; a worker: itself",
    "--resume": "ps-local and the servers: from the servers' checkpoints; ps-train --resume DIR",
    "--threads": "the launchers' BLAS threads per process; ps-train's and a worker's compute threads",
}


def test_a_flag_reads_the_same_in_every_command_that_takes_it():
    texts = {}
    for command, parser in parsers().items():
        for _, flags in flags_by_group(parser):
            for flag, text in flags:
                texts.setdefault(flag, {}).setdefault(text, []).append(command)
    differ = {flag: t for flag, t in texts.items() if len(t) > 1}
    assert set(differ) == set(SAME_NAME_OTHER_MEANING), {f: t for f, t in differ.items()
                                                        if f not in SAME_NAME_OTHER_MEANING}
    shared = [f for f, t in texts.items() if len(t) == 1 and len(next(iter(t.values()))) > 2]
    assert {"--steps", "--out", "--timeout", "--mode", "--lr", "--chunk-mb", "--curve"} <= set(shared)


@pytest.mark.parametrize("command", ["ps-local", "ps-launch", "ps-role", "python -m worker", "python -m paramserver",
                                     "ps-train"])
def test_help_lists_the_concerns_in_one_order(command):
    titles = [title for title, _ in flags_by_group(parsers()[command]) if title != "options"]
    order = list(CONCERNS.values())
    assert all(t in order for t in titles), titles
    assert titles == sorted(titles, key=order.index)
    assert len(titles) >= 3


def test_a_field_added_to_a_config_class_appears_in_every_command_that_takes_it(monkeypatch):
    """What another developer does for a new wire setting: a field of JobConfig (here
    --push-order, made on the fly) and nothing else; every launcher and role then has the
    flag, in its group."""
    import common.cluster
    import common.launch.options
    import paramserver.__main__
    import worker.__main__
    from common.cluster import JobConfig
    wider = dataclasses.make_dataclass("JobConfig", [("push_order", str, "forward")], bases=(JobConfig,))
    wider.FLAG_GROUPS = {"wire": JobConfig.FLAG_GROUPS["wire"] + ("push_order",)}
    for module in (common.cluster, common.launch.options, paramserver.__main__, worker.__main__):
        monkeypatch.setattr(module, "JobConfig", wider)
    for command, parser in parsers().items():
        if command == "ps-train":
            continue                                # one process: no consistency model, no wire
        groups = {flag: title for title, flags in flags_by_group(parser) for flag, _ in flags}
        assert groups.get("--push-order") == CONCERNS["wire"], command
        args = parser.parse_known_args(["--push-order", "backward", "--hostfile", "h"])[0]
        assert args.push_order == "backward", command
