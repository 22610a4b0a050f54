"""What a kernel needs of the GPU, read from the CUBIN that NVRTC makes (no GPU needed).

A CUBIN is an ELF file. Per kernel (by its mangled name):
- ``.nv.shared.<name>``: its static shared memory, the section's size;
- ``.text.<name>``: its code; the section header's ``sh_info`` is the kernel's symbol,
  and the global ``.nv.info`` holds EIATTR_REGCOUNT (0x2f) records (symbol, registers
  per thread ptxas allocated);
- ``.nv.info.<name>``: attribute records (format byte, attribute byte, value), among
  them EIATTR_MAX_THREADS (0x05: x, y, z), what ``__launch_bounds__`` asked for.
``compile_cubin`` compiles some name expressions of a family for one architecture,
as tests/test_kernels_compile.py does, with the loader's options and CuPy's.

And the limits of the architectures the project targets (CUDA C Programming Guide,
"Features and Technical Specifications", compute capability 8.0 and 9.0).
"""
from __future__ import annotations

import struct

from worker.kernels import loader

# per compute capability: what a launch may ask for
LIMITS = {
    "80": dict(threads_per_block=1024, block_x=1024, block_y=1024, block_z=64, grid_x=2**31 - 1,
               grid_y=65535, grid_z=65535, static_shared=48 * 1024, regs_per_block=65536,
               regs_per_thread=255),
    "90": dict(threads_per_block=1024, block_x=1024, block_y=1024, block_z=64, grid_x=2**31 - 1,
               grid_y=65535, grid_z=65535, static_shared=48 * 1024, regs_per_block=65536,
               regs_per_thread=255),
}
EIATTR_MAX_THREADS = 0x05
EIATTR_REGCOUNT = 0x2F


def compile_cubin(nvrtc, family, names, arch):
    """(cubin bytes, {name expression: mangled name})."""
    prog = nvrtc.createProgram(loader.source(family), f"{family}.cu", [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        nvrtc.compileProgram(prog, list(loader.OPTIONS) + [f"-arch=sm_{arch}", "-ftz=true",
                                                          "--device-as-default-execution-space"])
        return nvrtc.getCUBIN(prog), {n: nvrtc.getLoweredName(prog, n) for n in names}
    finally:
        nvrtc.destroyProgram(prog)


def sections(elf: bytes):
    """{section name: (sh_info, contents)} of a 64-bit little-endian ELF file."""
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, "not a 64-bit LE ELF"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    heads = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    str_off, str_size = heads[shstrndx][4], heads[shstrndx][5]
    strtab = elf[str_off:str_off + str_size]
    out = {}
    for name_off, sh_type, _, _, off, size, _, info, _, _ in heads:
        name = strtab[name_off:strtab.index(b"\0", name_off)].decode()
        out[name] = (info, b"" if sh_type == 8 else elf[off:off + size], size)   # 8: NOBITS
    return out


def _attributes(info: bytes):
    """(attribute, value bytes) records of an .nv.info section: EIFMT_SVAL (0x04) has a
    u16 size and that many bytes; the other formats are 4-byte records."""
    i = 0
    while i + 4 <= len(info):
        fmt, attr = info[i], info[i + 1]
        if fmt == 0x04:
            size, = struct.unpack_from("<H", info, i + 2)
            yield attr, info[i + 4:i + 4 + size]
            i += 4 + size
        elif fmt in (0x01, 0x02, 0x03):
            yield attr, info[i + 2:i + 4]
            i += 4
        else:
            raise ValueError(f"unknown .nv.info record format {fmt:#x}")


def _register_counts(secs):
    """{symbol index: registers per thread} from the global .nv.info's EIATTR_REGCOUNT."""
    out = {}
    for attr, value in _attributes(secs.get(".nv.info", (0, b"", 0))[1]):
        if attr == EIATTR_REGCOUNT:
            sym, regs = struct.unpack_from("<II", value)
            out[sym] = regs
    return out


def resources(elf: bytes, mangled: str):
    """{"registers", "shared", "max_threads"} of one kernel of a CUBIN."""
    secs = sections(elf)
    text = secs.get(f".text.{mangled}")
    if text is None:
        raise KeyError(f"{mangled}: no code in the CUBIN")
    shared = secs.get(f".nv.shared.{mangled}", (0, b"", 0))[2]
    max_threads = None
    for attr, value in _attributes(secs.get(f".nv.info.{mangled}", (0, b"", 0))[1]):
        if attr == EIATTR_MAX_THREADS:
            max_threads = struct.unpack_from("<III", value)
    regs = _register_counts(secs).get(text[0] & 0xFFFFFF)   # .text's sh_info: its symbol
    if regs is None:
        raise KeyError(f"{mangled}: no EIATTR_REGCOUNT in the CUBIN")
    return {"registers": regs, "shared": shared, "max_threads": max_threads}


def launch_problems(arch, grid, block, res):
    """What is wrong with launching a kernel of resources ``res`` so, on ``arch``."""
    lim, out = LIMITS[arch], []
    threads = block[0] * block[1] * block[2]
    for what, value, bound in (("threads per block", threads, lim["threads_per_block"]),
                               ("block.x", block[0], lim["block_x"]), ("block.y", block[1], lim["block_y"]),
                               ("block.z", block[2], lim["block_z"]), ("grid.x", grid[0], lim["grid_x"]),
                               ("grid.y", grid[1], lim["grid_y"]), ("grid.z", grid[2], lim["grid_z"]),
                               ("static shared memory", res["shared"], lim["static_shared"]),
                               ("registers per thread", res["registers"], lim["regs_per_thread"])):
        if value > bound:
            out.append(f"{what} {value} > {bound}")
    if min(grid) < 1 or min(block) < 1:
        out.append(f"empty grid or block {grid} {block}")
    bound = res["max_threads"]
    if bound is not None and threads > bound[0] * bound[1] * bound[2]:
        out.append(f"{threads} threads > __launch_bounds__ {bound}")
    warps = -(-threads // 32)
    regs = warps * (-(-res["registers"] * 32 // 256) * 256)          # allocated per warp, 256 at a time
    if regs > lim["regs_per_block"]:
        out.append(f"{regs} registers for the block > {lim['regs_per_block']}")
    return out
