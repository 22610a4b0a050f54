"""The CuPy stand-in (tests/cuda_emu/fake_cupy.py) held to the real CuPy package.

cupy-cuda13x installs and imports without a GPU. Three checks:
- every CuPy attribute the product uses, collected from its source by ``ast``
  (tests/cupy_api.py), exists in the installed CuPy, and each call of it fits CuPy's
  signature (``inspect.signature``, or the signature Cython embeds in a docstring;
  ufuncs by their number of inputs);
- the stand-in has each of them too (else the emulated tests could not run that code);
- everything the stand-in has, functions, cuda pieces, and the methods of its streams,
  events and arrays, exists in real CuPy, with parameters real CuPy accepts at the same
  places. So a call that passes against the stand-in in an emulated test is one real
  CuPy takes.
And the stand-in's own contract: unknown names raise, host arrays are refused, asarray
copies, streams defer their copies. Skips without CuPy.
"""
import importlib
import inspect

import numpy as np
import pytest

from tests import cupy_api

fc = importlib.import_module("tests.cuda_emu.fake_cupy")   # the module (the package exports its function)

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install cupy-cuda13x)")


@pytest.fixture(scope="module")
def uses():
    return cupy_api.used()


def test_every_cupy_name_the_product_uses_is_in_real_cupy(uses):
    assert len(uses) >= 40 and "cuda.cublas.gemmEx" in uses and "cuda.Stream" in uses, sorted(uses)
    missing, misfit, unchecked = [], [], []
    for chain, use in sorted(uses.items()):
        try:
            obj = cupy_api.resolve(cupy, chain)
        except (AttributeError, ImportError) as e:
            missing.append(f"{chain} ({use.where[0]}): {e}")
            continue
        for npos, kws in use.calls:
            problem = cupy_api.call_problem(obj, chain.split(".")[-1], npos, kws)
            if problem is None:
                unchecked.append(chain)
            elif problem:
                misfit.append(f"{chain} ({use.where[0]}): {problem}")
    calls = sum(len(u.calls) for u in uses.values())
    print(f"\n{len(uses)} CuPy names used by the product, {calls} calls; CuPy {cupy.__version__}; "
          f"calls without a signature to check: {sorted(set(unchecked)) or 'none'}")
    assert not missing, "\n".join(missing)
    assert not misfit, "\n".join(misfit)


# what the stand-in leaves out on purpose, and why
NOT_EMULATED = {"RawModule": "kernels are compiled by tests/cuda_emu with g++ (tests replace loader.function)"}


def test_the_stand_in_has_every_name_the_product_uses(uses):
    fake = fc.fake_cupy()
    absent = []
    for chain in sorted(uses):
        head, call, attr = chain.partition("().")
        if head in NOT_EMULATED:
            continue
        try:
            callee = cupy_api.resolve(fake, head)
            if call and inspect.isclass(callee):
                cupy_api.resolve(callee(), attr)         # an instance: its attributes too
            elif call and head in cupy_api.RETURNS:
                cupy_api.resolve(cupy_api.resolve(fake, cupy_api.RETURNS[head])(), attr)
        except AttributeError as e:
            absent.append(f"{chain}: {e}")
    assert not absent, "\n".join(absent)


def _fake_surface(fake):
    """(chain, stand-in object, real chain) for everything the stand-in provides."""
    out = []
    for name in [*fc.FUNCTIONS, *fc.UFUNCS, *fc.TYPES, *fc.CONSTANTS, "asarray", "array", "asnumpy", "ndarray",
                 "get_default_memory_pool", "__version__"]:
        out.append((name, getattr(fake, name), name))
    for name in ("Stream", "Event", "alloc_pinned_memory", "get_current_stream", "Device", "MemoryPool"):
        out.append((f"cuda.{name}", getattr(fake.cuda, name), f"cuda.{name}"))
    for name in vars(fake.cuda.runtime):
        out.append((f"cuda.runtime.{name}", getattr(fake.cuda.runtime, name), f"cuda.runtime.{name}"))
    for name in vars(fake.cuda.cublas):
        out.append((f"cuda.cublas.{name}", getattr(fake.cuda.cublas, name), f"cuda.cublas.{name}"))
    out.append(("cuda.device.get_cublas_handle", fake.cuda.device.get_cublas_handle,
                "cuda.device.get_cublas_handle"))
    for cls, real in ((fc.streams.Stream, "cuda.Stream"), (fc.streams.Event, "cuda.Event"),
                      (fc.Device, "cuda.Device"), (fc.MemoryPool, "cuda.MemoryPool"), (fc.ndarray, "ndarray")):
        for name, member in vars(cls).items():
            if not name.startswith("_"):
                out.append((f"{real}.{name}", member, f"{real}.{name}"))
    return out


def _positional_names(sig):
    return [p.name for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


def test_everything_the_stand_in_has_is_real_cupy_with_its_parameters():
    fake = fc.fake_cupy()
    problems, checked = [], 0
    for chain, obj, real_chain in _fake_surface(fake):
        try:
            real = cupy_api.resolve(cupy, real_chain)
        except (AttributeError, ImportError) as e:
            problems.append(f"{chain}: not in real CuPy ({e})")
            continue
        if isinstance(obj, property) or not callable(obj) or inspect.isclass(obj) and chain == "ndarray":
            continue
        mine = cupy_api.signature(obj.fget if isinstance(obj, property) else obj, chain.split(".")[-1])
        theirs = cupy_api.signature(real, real_chain.split(".")[-1])
        if mine is None or theirs is None or isinstance(obj, fc._Ufunc):
            continue
        checked += 1
        mp, tp = _positional_names(mine), _positional_names(theirs)
        if tp[:len(mp)] != mp and not any(p.kind == p.VAR_POSITIONAL for p in theirs.parameters.values()):
            problems.append(f"{chain}: positional parameters {mp}, real CuPy {tp}")
        kw = {p.name for p in mine.parameters.values() if p.kind == p.KEYWORD_ONLY}
        if kw - set(theirs.parameters) and not any(p.kind == p.VAR_KEYWORD for p in theirs.parameters.values()):
            problems.append(f"{chain}: keywords {sorted(kw - set(theirs.parameters))} not in real CuPy")
    print(f"\n{checked} signatures of the stand-in compared with CuPy {cupy.__version__}")
    assert checked >= 15
    assert not problems, "\n".join(problems)


def test_the_stand_in_refuses_what_cupy_refuses():
    fake = fc.fake_cupy()
    with pytest.raises(AttributeError, match="stand-in has no 'fft'"):
        fake.fft
    host = np.arange(4.0)
    with pytest.raises(TypeError, match="host memory"):
        fake.exp(host)
    dev = fake.asarray(host)
    with pytest.raises(TypeError, match="host memory"):
        dev + host
    with pytest.raises(TypeError, match="host memory"):
        fake.where(dev > 1, dev, host)
    host[0] = 9.0                                 # asarray copied: the device keeps its 0
    assert dev[0] == 0.0 and fake.asarray(dev) is dev
    assert isinstance(dev + 1, fc.ndarray) and isinstance(fake.exp(dev), fc.ndarray)


def test_streams_defer_copies_until_a_wait():
    fake = fc.fake_cupy()
    dev = fake.zeros(3, np.float32)
    host = np.ones(3, np.float32)
    s = fake.cuda.Stream(non_blocking=True)
    dev.set(host, stream=s)
    assert (dev == 0).all()                       # not landed: nothing waited
    e = s.record()
    assert not e.done
    fake.cuda.get_current_stream().wait_event(e)
    assert (dev == 1).all() and e.done            # the compute stream waited: landed
    out = np.zeros(3, np.float32)
    dev.get(stream=s, out=out, blocking=False)
    assert (out == 0).all()
    s.synchronize()
    assert (out == 1).all()
    dev.get(stream=s, out=out, blocking=False)
    fc.ndarray._launched("a kernel")              # a kernel the copy stream does not wait for
    with pytest.raises(fc.StreamOrderError, match="wait_event"):
        dev.get(stream=s, out=out, blocking=False)
    s.wait_event(fake.cuda.get_current_stream().record())
    dev.get(stream=s, out=out, blocking=False)     # ordered now
    s.synchronize()


def test_the_conformance_check_catches_a_wrong_call(tmp_path, monkeypatch):
    """A name CuPy lacks and a keyword CuPy does not take, in product-like code, are found."""
    src = tmp_path / "worker" / "bad.py"
    src.parent.mkdir()
    src.write_text("def f(xp, x):\n    y = xp.zeros(3, dtyp=xp.float32)\n"
                   "    s = xp.cuda.Stream(non_blocking=True)\n    s.wait_event(None)\n"
                   "    return xp.fancy_new_op(x)\n")
    monkeypatch.setattr(cupy_api, "ROOT", tmp_path)
    monkeypatch.setattr(cupy_api, "PRODUCT", ("worker",))
    uses = cupy_api.used()
    assert {"zeros", "float32", "cuda.Stream", "fancy_new_op"} <= set(uses)
    with pytest.raises(AttributeError):
        cupy_api.resolve(cupy, "fancy_new_op")
    zeros = uses["zeros"]
    assert zeros.calls == [(1, {"dtyp"})] and zeros.where == ["worker/bad.py:2"]
    assert "dtyp" in cupy_api.call_problem(cupy.zeros, "zeros", 1, {"dtyp"})
    assert cupy_api.call_problem(cupy.zeros, "zeros", 1, {"dtype"}) == ""
