"""Every CUDA kernel of worker/kernels/ compiles with NVRTC for sm_80 and sm_90.

No GPU is needed: NVRTC is a library, and this test calls it the way CuPy's
``RawModule`` does (same source text from ``worker.kernels.loader``, same options,
plus the ones CuPy adds: ``-arch=sm_XX``, ``-ftz=true``,
``--device-as-default-execution-space``), with the name expressions each family is
loaded with, and asks for the CUBIN, so that ptxas runs too (register and shared-memory
limits are checked, not only the C++). It fails on any compile error, on a ``.cu`` file
that the loader does not know (it would never be compiled), and on a name expression
that does not resolve to a kernel.

It skips, saying why, only where CuPy's NVRTC binding cannot be imported or cannot
load the NVRTC library. CI installs both: ``pip install cupy-cuda13x nvidia-cuda-nvrtc``.
"""
import pytest

from worker.kernels import loader

ARCHS = ("80", "90")


def _nvrtc():
    try:
        from cupy.cuda import nvrtc
    except Exception as e:  # ImportError, or CuPy failing to load its own libraries
        pytest.skip(f"cupy.cuda.nvrtc not importable ({type(e).__name__}: {e}); "
                    "pip install cupy-cuda13x nvidia-cuda-nvrtc")
    try:
        nvrtc.getVersion()
    except Exception as e:
        pytest.skip(f"NVRTC library not loadable ({type(e).__name__}: {e}); "
                    "pip install nvidia-cuda-nvrtc")
    return nvrtc


def compile_family(nvrtc, family, arch):
    """(cubin bytes, {name expression: lowered name}); raises with NVRTC's log."""
    names = loader.name_expressions(family)
    prog = nvrtc.createProgram(loader.source(family), f"{family}.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        options = list(loader.OPTIONS) + [f"-arch=sm_{arch}", "-ftz=true",
                                          "--device-as-default-execution-space"]
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            pytest.fail(f"{family}.cu does not compile for sm_{arch}: {e}\n"
                        f"{nvrtc.getProgramLog(prog)}")
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        return nvrtc.getCUBIN(prog), lowered, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_every_cu_file_is_a_known_family():
    on_disk = {p.stem for p in loader.KERNEL_DIR.glob("*.cu")}
    assert on_disk == set(loader.FAMILIES), (
        f"on disk but never loaded: {sorted(on_disk - set(loader.FAMILIES))}; "
        f"declared but missing: {sorted(set(loader.FAMILIES) - on_disk)}")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", sorted(loader.FAMILIES))
def test_family_compiles(family, arch):
    nvrtc = _nvrtc()
    cubin, lowered, log = compile_family(nvrtc, family, arch)
    assert len(cubin) > 0
    for name, mangled in lowered.items():
        base = name.split("<")[0]
        assert mangled.startswith("_Z") and base in mangled, (name, mangled)
    # a warning is not an error, but it should be read: keep the log in the output
    assert "error" not in log.lower(), log
