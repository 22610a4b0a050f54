"""Measure what issue 17 asks of the code: mixins, private access, long functions, big classes.

    python scripts/code_metrics.py                  # the table for paramserver/, worker/, common/
    python scripts/code_metrics.py --json           # the same, as JSON (tests/test_code_metrics.py)

Each measure, as this script takes it (from the syntax tree, nothing is imported):

- **mixin classes**: a class with two or more bases defined in the measured packages,
  or a class that reads ``self.NAME`` where NAME is neither set, defined nor inherited
  from a measured base in that class (the state comes from whoever mixes it in);
- **private access across objects**: ``obj._name`` where ``obj`` is not ``self`` or
  ``cls`` and ``_name`` is not defined in the same module (a module's own helpers may
  touch each other's privates; another module's may not);
- **functions over 60 lines**: from ``def`` to the last line of the body, docstring
  and comments included;
- **attributes** of ``Server`` and ``PSClient``: the distinct ``self.NAME = ...``
  targets anywhere in the class;
- **imports against the map** (docs/architecture.md): each package imports only the
  packages ``ALLOWED`` names, and ``zmq`` only in ``common/wire/transport.py``;
- **unresolved imports**: an import of a module of this repository that has no file in
  it. (An editable install of another checkout answers for a module a checkout lacks,
  so such an import can run, silently, on someone else's code.)

Not here: style (line length, names), the duplicates between modules (``duplicates``).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("paramserver", "worker", "common")
MAX_LINES = 60
BIG_CLASSES = ("Server", "PSClient")
ALLOWED = {                                      # package -> what it may import (docs/architecture.md)
    "common.wire": {"common.wire"},
    "common": {"common", "common.wire"},
    "common.launch": {"common.launch", "common", "common.wire"},
    "paramserver": {"paramserver", "common", "common.wire"},
    "worker": {"worker", "common", "common.wire"},
}
ZMQ_USER = "common.wire.transport"


def python_files(root: Path, packages=PACKAGES) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))


def _self_attrs_set(cls: ast.ClassDef) -> set[str]:
    out = set()
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self":
                    out.add(el.attr)
    return out


def _defined_in_class(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _self_attrs_read(cls: ast.ClassDef) -> set[str]:
    return {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self" and isinstance(n.ctx, ast.Load)}


def classes_of(trees: dict) -> dict[str, ast.ClassDef]:
    return {node.name: node for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _ancestors(cls: ast.ClassDef, classes: dict) -> list[ast.ClassDef]:
    """Every measured class ``cls`` inherits from, nearest first."""
    out, todo = [], [cls]
    while todo:
        for b in todo.pop(0).bases:
            if isinstance(b, ast.Name) and b.id in classes and classes[b.id] not in out and classes[b.id] is not cls:
                out.append(classes[b.id])
                todo.append(classes[b.id])
    return out


def mixins(trees: dict) -> list[str]:
    """Classes that are mixins or are made of them (see the module's docstring)."""
    classes = classes_of(trees)
    found = []
    for path, tree in trees.items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            bases = [b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
            known = _self_attrs_set(cls) | _defined_in_class(cls)
            for b in _ancestors(cls, classes):
                known |= _self_attrs_set(b) | _defined_in_class(b)
            foreign = sorted(_self_attrs_read(cls) - known)
            if len(bases) >= 2:
                found.append(f"{path}:{cls.lineno} {cls.name}({', '.join(bases)})")
            elif foreign and not any(isinstance(b, ast.Attribute) or (isinstance(b, ast.Name) and b.id not in classes
                                                                   and b.id != "object") for b in cls.bases):
                found.append(f"{path}:{cls.lineno} {cls.name} reads self.{', self.'.join(foreign[:5])} it never sets")
    return found


def private_access(trees: dict) -> list[str]:
    """``obj._name`` on another object, where ``_name`` is not this module's own."""
    found = []
    for path, tree in trees.items():
        own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
        own |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
        own |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        for n in ast.walk(tree):
            if (isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
                    and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
                    and n.attr not in own):
                found.append(f"{path}:{n.lineno} .{n.attr}")
    return found


def long_functions(trees: dict, limit: int = MAX_LINES) -> list[str]:
    found = []
    for path, tree in trees.items():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = n.end_lineno - n.lineno + 1
                if lines > limit:
                    found.append(f"{path}:{n.lineno} {n.name} ({lines} lines)")
    return found


def attributes(trees: dict, names=BIG_CLASSES) -> dict[str, int]:
    classes = classes_of(trees)
    return {name: len(_self_attrs_set(classes[name])) for name in names if name in classes}


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "common" and len(parts) >= 2 and parts[1] in ("wire", "launch"):
        return "common." + parts[1]
    return parts[0]


def _imports(tree):
    """(line, module, name) of every absolute import (name: None for ``import module``)."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            yield from ((n.lineno, a.name, None) for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            yield from ((n.lineno, n.module, a.name) for a in n.names)


def _resolves(root: Path, module: str, name: str | None) -> bool:
    """Is ``module`` a file of the tree at ``root``, and ``name`` (if any) a submodule of
    it or a name its ``__init__.py`` defines?"""
    p = root / module.replace(".", "/")
    if p.with_suffix(".py").exists():
        return True
    if not (p / "__init__.py").exists():
        return False
    if name is None or (p / f"{name}.py").exists() or (p / name / "__init__.py").exists():
        return True
    init = ast.parse((p / "__init__.py").read_text())
    defined = {n.name for n in init.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {t.id for n in init.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in init.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    return name in defined


def import_rules(trees: dict, root: Path, packages=PACKAGES) -> tuple[list[str], list[str]]:
    """(imports against the map, imports of this repository's modules with no file)."""
    against, unresolved = [], []
    for path, tree in trees.items():
        here = package_of(".".join(Path(path).with_suffix("").parts))
        for line, module, name in _imports(tree):
            top = module.split(".")[0]
            if top == "zmq" and ".".join(Path(path).with_suffix("").parts) != ZMQ_USER:
                against.append(f"{path}:{line} imports zmq")
            if top not in packages:
                continue
            full = module if name is None or module not in ("common", "worker", "paramserver") else f"{module}.{name}"
            if package_of(full) not in ALLOWED.get(here, {package_of(full)}):
                against.append(f"{path}:{line} ({here}) imports {full}")
            if not _resolves(root, module, name):
                unresolved.append(f"{path}:{line} {module}{'.' + name if name else ''}")
    return against, unresolved


def measure(root: Path = REPO, packages=PACKAGES) -> dict:
    trees = {str(p.relative_to(root)): ast.parse(p.read_text(), str(p)) for p in python_files(root, packages)}
    against, unresolved = import_rules(trees, root, packages)
    return {"files": len(trees), "mixins": mixins(trees), "private_access": private_access(trees),
            "long_functions": long_functions(trees), "attributes": attributes(trees),
            "imports_against_map": against, "unresolved_imports": unresolved}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO), help="the repository to measure (default: this one)")
    p.add_argument("--json", action="store_true", help="print the measures as JSON")
    args = p.parse_args(argv)
    m = measure(Path(args.root))
    if args.json:
        print(json.dumps(m, indent=1))
        return 0
    print(f"{m['files']} files in {', '.join(PACKAGES)}")
    for key, title in (("mixins", "mixin classes"), ("private_access", "private access across objects"),
                       ("long_functions", f"functions over {MAX_LINES} lines"),
                       ("imports_against_map", "imports against the map"), ("unresolved_imports", "unresolved imports")):
        print(f"{title}: {len(m[key])}")
        for line in m[key]:
            print(f"  {line}")
    for name, count in m["attributes"].items():
        print(f"attributes of {name}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
