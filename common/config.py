"""Typed, loud configuration: dataclasses become command-line flags and back.

Every concern has its own ``@dataclass`` with a comment per field (``GPTConfig`` in
``worker/model.py``, ``OptimConfig`` in ``common/optim.py``, ...). This module turns
such a class into argparse flags (the field's trailing comment is its ``--help``), and
builds instances from flags or from dicts (a saved ``config.json``, a registration
message) refusing unknown keys and wrong types with the accepted names.

What it does not do: define the fields of any concern, or read files.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from pathlib import Path
import re
import typing
import weakref

_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.*)$")


def field_help(cls) -> dict[str, str]:
    """field name -> the comment on its line in the class body (empty where none); a field
    a dataclass inherits keeps the comment of the class that declares it."""
    out = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = _COMMENT.match(line)
            if m:
                out.setdefault(m.group(1), m.group(2).strip())
    return out


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The concerns every command's --help is grouped by, in this order; ``add_arguments`` puts
# each flag in its concern's group (a dataclass's FLAG_GROUPS moves single fields to
# another concern than the class's), so a flag reads under the same title everywhere.
CONCERNS = {
    "model": "model (the network's shape; identical on every worker)",
    "data": "data",
    "training": "training (the run: steps, batches, evaluation, the run folder, where it computes)",
    "optimizer": "optimizer (in a job: on the servers, identical on every server)",
    "consistency": "consistency (identical on every process)",
    "wire": "wire (chunks, compression, sockets; identical on every process)",
    "failures": "failures (deadlines, heartbeats, checkpoints, restarts)",
    "launch": "launch (where each process sits and how it starts; flags or PS_* variables)",
}
_GROUPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def concern_group(parser: argparse.ArgumentParser, concern: str):
    """The argument group of ``concern`` (a key of CONCERNS, or any other title) on
    ``parser``, made on first use; the first call makes every concern's group, in the
    order of CONCERNS, so that --help lists them in that order (empty ones are not shown)."""
    groups = _GROUPS.get(parser)
    if groups is None:
        groups = _GROUPS[parser] = {key: parser.add_argument_group(title) for key, title in CONCERNS.items()}
    if concern not in groups:
        groups[concern] = parser.add_argument_group(concern)
    return groups[concern]


def add_arguments(parser: argparse.ArgumentParser, cls, concern: str | None = None, skip=(), defaults=None,
                  default_text=None, only=None):
    """Add one flag per field of dataclass ``cls`` (``n_layer`` -> ``--n-layer``), help from
    its comments, defaults from the class unless ``defaults`` (field -> value) overrides
    them for this command; ``default_text`` (field -> words) replaces the "(default: X)"
    of a field whose default the command computes. Fields in ``skip`` are left out; with
    ``only``, every field not in it. Each flag goes to the group of ``concern`` (a key of
    CONCERNS; default the class name), or of the concern ``cls.FLAG_GROUPS`` names for it.
    This is the one way a flag is made: a field added to a dataclass appears in every
    command that adds that class."""
    defaults, default_text = defaults or {}, default_text or {}
    helps, types = field_help(cls), _field_types(cls)
    choices = getattr(cls, "CHOICES", {})          # optional class attribute: field -> allowed values
    moved = {name: key for key, names in getattr(cls, "FLAG_GROUPS", {}).items() for name in names}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        group = concern_group(parser, moved.get(f.name, concern or cls.__name__))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name, default)
        typ = types[f.name]
        text = helps.get(f.name, "").replace("%", "%%")   # argparse formats help with %
        if typ is bool:
            group.add_argument(_flag(f.name), dest=f.name, default=default,
                               action=argparse.BooleanOptionalAction, help=text)
        else:
            conv = typ if typ in (int, float, str) else str
            group.add_argument(_flag(f.name), dest=f.name, type=conv, default=default,
                               choices=choices.get(f.name),
                               metavar=None if f.name in choices else typ.__name__.upper(),
                               help=f"{text} (default: {default_text.get(f.name, repr(default))})")


def from_args(cls, args: argparse.Namespace):
    """An instance of ``cls`` from the parsed flags that ``add_arguments`` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def from_dict(cls, d: dict, where: str = "config"):
    """An instance of ``cls`` from a plain dict; unknown keys and wrong types raise
    ``ValueError`` naming the accepted keys or the expected type. Ints are accepted
    for float fields; nothing else is converted."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {type(d).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(d) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; "
                         f"accepted: {sorted(types)}")
    kwargs = {}
    for k, v in d.items():
        typ = types[k]
        ok = (isinstance(v, typ) and not (typ is int and isinstance(v, bool))) or \
             (typ is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ValueError(f"{where}: {cls.__name__}.{k} must be {typ.__name__}, "
                             f"got {type(v).__name__} {v!r}")
        kwargs[k] = float(v) if typ is float else v
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def describe(configs: dict) -> str:
    """The effective configuration as readable text, one concern per line group."""
    lines = []
    for title, obj in configs.items():
        lines.append(f"{title}:")
        for k, v in to_dict(obj).items():
            lines.append(f"  {k} = {v!r}")
    return "\n".join(lines)


def dump_json(configs: dict) -> str:
    """The effective configuration as JSON: ``{title: {field: value}}``."""
    return json.dumps({title: to_dict(obj) for title, obj in configs.items()}, indent=2)


def given_flags(build_parser, argv) -> set:
    """The dests of the flags typed on ``argv`` (not those left at their defaults), by
    parsing ``argv`` twice with the parser ``build_parser()`` makes: once to learn every
    dest, once with every default replaced by a marker."""
    marker = object()
    probe = build_parser()
    dests = vars(probe.parse_known_args(argv)[0])
    probe.set_defaults(**{dest: marker for dest in dests})
    return {k for k, v in vars(probe.parse_known_args(argv)[0]).items() if v is not marker}


def to_flags(obj, skip=()) -> list[str]:
    """The flags that give dataclass ``obj``'s values back (the inverse of ``add_arguments``
    and ``from_args``): a bool field is ``--x`` or ``--no-x``; fields in ``skip`` left out."""
    out = []
    for k, v in to_dict(obj).items():
        if k in skip:
            continue
        out += ([_flag(k)] if v else ["--no-" + k.replace("_", "-")]) if isinstance(v, bool) else [_flag(k), str(v)]
    return out


def read_config(path) -> dict:
    """The JSON mapping of a saved configuration (a run folder's ``run_config.json``, or
    its folder); ``ValueError`` saying why it cannot be read."""
    path = Path(path)
    if path.is_dir():
        path = path / "run_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--config {path}: expected a JSON object of sections, got {type(saved).__name__}")
    return saved


def config_argv(parser: argparse.ArgumentParser, section: dict, where: str, ignore=()) -> list[str]:
    """The command line that gives ``parser`` the values of a saved ``section`` (field ->
    value): put it BEFORE the flags typed, so that a flag typed beside ``--config`` wins.
    A key the parser has no flag for is refused, naming it; keys in ``ignore`` are skipped
    (what is never taken from a file: the run folder, a process's place in the job)."""
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(section).__name__}")
    dests = set(vars(parser.parse_known_args([])[0]))
    unknown = sorted(k for k in section if k not in dests and k not in ignore)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; this command accepts "
                         f"{sorted(dests - {'config'})}")
    argv = []
    for key, value in section.items():
        if key in ignore:
            continue
        if isinstance(value, bool):                   # add_arguments made --x / --no-x
            argv.append(_flag(key) if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (int, float, str)):
            argv.append(f"{_flag(key)}={value}")
        else:
            raise ValueError(f"{where}: {key} must be a number, a string or true/false, got {value!r}")
    return argv


def sections_argv(parser: argparse.ArgumentParser, saved: dict, replayed, known, where: str,
                  ignore=()) -> list[str]:
    """``config_argv`` of each section of ``saved`` named in ``replayed``, in that order; a
    section not in ``known`` (those a file of this kind may hold) is refused, naming it."""
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown section(s) {unknown}; expected {sorted(known)}")
    argv = []
    for key in replayed:
        argv += config_argv(parser, saved.get(key, {}), f"{where} [{key}]", ignore=ignore)
    return argv


def parse_with_config(parser: argparse.ArgumentParser, argv, replay):
    """(args, the full argv): ``argv`` parsed; with ``--config FILE`` among them, parsed
    again with ``replay(FILE)`` (the file's settings as flags) before them, so that a flag
    typed wins over the file. A file that cannot be replayed is a parser error."""
    args = parser.parse_args(argv)
    if getattr(args, "config", ""):
        try:
            argv = replay(args.config) + list(argv)
        except ValueError as e:
            parser.error(str(e))
        args = parser.parse_args(argv)
    return args, argv
