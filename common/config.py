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
import re
import typing

_COMMENT = re.compile(r"^\s*(\w+)\s*:[^#]*#\s*(.*)$")


def field_help(cls) -> dict[str, str]:
    """field name -> the comment on its line in the class body (empty where none)."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
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


def add_arguments(parser: argparse.ArgumentParser, cls, title: str | None = None, skip=(), defaults=None,
                  default_text=None):
    """Add one flag per field of dataclass ``cls`` (``n_layer`` -> ``--n-layer``), help from
    its comments, defaults from the class unless ``defaults`` (field -> value) overrides
    them for this command; ``default_text`` (field -> words) replaces the "(default: X)"
    of a field whose default the command computes. Fields in ``skip`` are left out."""
    defaults, default_text = defaults or {}, default_text or {}
    group = parser.add_argument_group(title or cls.__name__)
    helps, types = field_help(cls), _field_types(cls)
    choices = getattr(cls, "CHOICES", {})          # optional class attribute: field -> allowed values
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
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
    return group


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
