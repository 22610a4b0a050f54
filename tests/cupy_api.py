"""The CuPy API the product uses, collected from its source, and CuPy's own signatures.

``used()`` walks the product's Python files (worker/, common/, paramserver/, scripts/)
with ``ast`` and returns every attribute chain rooted at the CuPy module, as the code
spells it: ``cupy.X``, ``xp.X`` (the array module, which is CuPy on a GPU), ``self.xp.X``,
``self._xp.X``, and names bound to such a chain (``cublas = cupy.cuda.cublas`` then
``cublas.gemmEx``); with, for each call, its number of positional arguments and its
keyword names. ``Class(...).method`` is followed to the class's method.

``signature(obj, name)`` is ``inspect.signature`` where CuPy exposes one, else the
signature Cython embeds as the first line of a docstring (``gemmEx(intptr_t handle,
int transa, ...)``), else None. ``resolve(module, chain)`` walks a chain on a module;
``cuda.cublas`` of real CuPy needs the cuBLAS library to import, so without it the
signatures are read from the compiled binding's embedded docstrings instead.
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import pathlib
import re
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRODUCT = ("worker", "common", "paramserver", "scripts")
ROOT_NAMES = {"cupy", "xp", "cp"}
ROOT_ATTRS = {"xp", "_xp"}                    # self.xp, model.xp, self._xp


@dataclass
class Use:
    chain: str                                # e.g. "cuda.runtime.getDeviceCount"
    where: list = field(default_factory=list)  # "file:line"
    calls: list = field(default_factory=list)  # (n positional or None if *args, {keywords} or None)


def _chain(node, aliases):
    """The dotted chain of ``node`` below the CuPy root, or None."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            if node.attr in ROOT_ATTRS and not isinstance(node.value, ast.Attribute):
                return ".".join(reversed(parts)) or None
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call) and parts:      # f(...).attr: see RETURNS
            inner = _chain(node.func, aliases)
            return None if inner is None else ".".join([inner + "()", *reversed(parts)])
        elif isinstance(node, ast.Name):
            if node.id in ROOT_NAMES:
                return ".".join(reversed(parts)) or None
            if node.id in aliases:
                return ".".join([aliases[node.id], *reversed(parts)])
            return None
        else:
            return None


def _file_uses(path, uses):
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):                          # cublas = cupy.cuda.cublas
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Attribute)):
            chain = _chain(node.value, {})
            if chain:
                aliases[node.targets[0].id] = chain
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    outer = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in outer:
            continue                                     # only the longest chain
        chain = _chain(node, aliases)
        if not chain:
            continue
        use = uses.setdefault(chain, Use(chain))
        use.where.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        call = calls.get(id(node))
        if call is not None:
            npos = None if any(isinstance(a, ast.Starred) for a in call.args) else len(call.args)
            kws = None if any(k.arg is None for k in call.keywords) else {k.arg for k in call.keywords}
            use.calls.append((npos, kws))


def used():
    """{chain: Use} for the whole product."""
    uses = {}
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            _file_uses(path, uses)
    return uses


# --------------------------------------------------------------------------------------
# signatures

def _parse_embedded(text):
    """An inspect.Signature from Cython's ``(type a, type b=1, *, c=None)``."""
    params, kind, depth, cur = [], inspect.Parameter.POSITIONAL_OR_KEYWORD, 0, ""
    pieces = []
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            pieces.append(cur)
            cur = ""
        else:
            cur += ch
    pieces.append(cur)
    for p in (p.replace("\\", "").strip() for p in pieces):
        if not p or p == "self":
            continue
        if p == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        if p == "/":                                     # the ones before: positional only
            params = [q.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for q in params]
            continue
        if p.startswith("**"):
            params.append(inspect.Parameter(p[2:].split()[-1], inspect.Parameter.VAR_KEYWORD))
            continue
        if p.startswith("*"):
            params.append(inspect.Parameter(p[1:].split()[-1], inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        head, _, default = p.partition("=")
        name = head.split()[-1]
        params.append(inspect.Parameter(name, kind, default=None if default else inspect.Parameter.empty))
    return inspect.Signature(params)


def signature(obj, name):
    """``obj``'s signature, or None where neither inspect nor a docstring gives one."""
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        pass
    doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
    m = re.match(rf"^(?:\w+\.)?{re.escape(name)}\((.*)\)(?:\s*->.*)?$", doc)
    try:
        return _parse_embedded(m.group(1)) if m else None
    except ValueError:                                   # a docstring that is not a signature
        return None


class Binary:
    """A compiled CuPy binding that cannot be imported here, read as text: the names
    and signatures Cython embedded in it."""

    def __init__(self, module_name):
        spec = importlib.util.find_spec(module_name)
        self.text = pathlib.Path(spec.origin).read_bytes().decode("latin-1")
        self.module_name = module_name

    def member(self, name):
        m = re.search(rf"(?:^|\x00|\n){re.escape(name)}\(([^)\x00\n]*)\)", self.text)
        if m is None:
            raise AttributeError(f"{self.module_name} has no {name}")
        return _Embedded(name, m.group(1))


class _Embedded:
    def __init__(self, name, params):
        self.__name__, self.__doc__ = name, f"{name}({params})"

    def __call__(self, *a, **k):
        raise RuntimeError("read from the binary, not callable")


# where real CuPy keeps a submodule that needs a CUDA library to import
BINARY_FALLBACK = {"cuda.cublas": "cupy_backends.cuda.libs.cublas"}


# what a call returns, where the code goes on with an attribute of it (``f().attr``): a
# class gives its instances; these functions what is named here; any other function or
# ufunc of CuPy an array
RETURNS = {"cuda.get_current_stream": "cuda.Stream", "get_default_memory_pool": "cuda.MemoryPool"}


def resolve(module, chain):
    """The object at ``chain`` of ``module``; AttributeError if absent. ``f().attr`` is
    the attribute of what ``f`` returns (``RETURNS``)."""
    head, sep, rest = chain.partition("().")
    if sep:
        callee = resolve(module, head)
        if inspect.isclass(callee):
            return resolve(callee, rest)
        return resolve(module, f"{RETURNS.get(head, 'ndarray')}.{rest}")
    obj, done = module, []
    for part in chain.split("."):
        try:
            obj = getattr(obj, part)
        except ImportError:
            key = ".".join([*done, part])
            if key not in BINARY_FALLBACK:
                raise
            obj = Binary(BINARY_FALLBACK[key])
        except AttributeError:
            if isinstance(obj, Binary):
                obj = obj.member(part)
            elif inspect.isclass(obj) and re.search(rf"~{obj.__name__}\.{part}\b", obj.__doc__ or ""):
                obj = _Embedded(part, "")               # an instance attribute, documented
            else:
                raise
        done.append(part)
    return obj


def is_ufunc(obj):
    return type(obj).__name__ in ("ufunc", "_GUFunc", "_Ufunc") and hasattr(obj, "nin")


UFUNC_KEYWORDS = {"out", "dtype", "casting"}


def call_problem(obj, name, npos, kws):
    """Why a call with ``npos`` positionals and keywords ``kws`` does not fit ``obj``,
    "" if it fits, None if ``obj`` exposes no signature to check against."""
    if is_ufunc(obj) and name != "matmul":
        if npos is not None and npos > obj.nin + obj.nout:
            return f"{npos} positional arguments for a ufunc of {obj.nin} inputs"
        bad = (kws or set()) - UFUNC_KEYWORDS
        return f"keywords {sorted(bad)} not taken by a ufunc" if bad else ""
    sig = signature(obj, name)
    if sig is None:
        return None
    params = list(sig.parameters.values())
    if params and params[0].name == "self":             # a method reached through its class
        sig = sig.replace(parameters=params[1:])
    try:
        if npos is None:
            sig.bind_partial(**{k: None for k in kws or ()})
        else:
            sig.bind(*range(npos), **{k: None for k in kws or ()})
    except TypeError as e:
        return f"{sig}: {e}"
    return ""
