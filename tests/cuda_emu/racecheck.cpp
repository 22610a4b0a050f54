// The emulator's race checker, in the spirit of compute-sanitizer's racecheck.
//
// The kernels are compiled with GCC's -fsanitize=thread instrumentation: every load
// and store calls __tsan_readN / __tsan_writeN with its address. This file defines
// those hooks itself (no ThreadSanitizer runtime is linked) and is compiled without
// instrumentation. An access counts only while a kernel's fiber runs, and only to
// memory the checker was told about: the block's __shared__ arrays (registered by
// EMU_SHARED when their declaration runs) and the kernel's array arguments (registered
// by the launcher: tests/cuda_emu/__init__.py). Locals and the emulator's own state are
// ignored.
//
// Two tables, keyed by the address of each access:
// - per barrier interval of a block (cleared when a __syncthreads is released or a
//   block starts), shared and global: two different threads touching the same address,
//   at least one writing, is a race (write after write, read after write, write after
//   read): without a barrier between them the GPU does not order them;
// - per launch, global only: two different blocks touching the same address, at least
//   one writing (blocks of one grid are never ordered; the kernels use no atomics).
// The first race is kept, with both accesses' code addresses (offsets into the
// library; tests/cuda_emu/__init__.py turns them into file:line) and fails the launch.
// An access is its start address and size: two accesses that overlap without starting
// at the same address are not compared (the kernels index arrays by element).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

struct Cell {
    uintptr_t addr = 0;
    unsigned epoch = 0;                    // the cell is empty unless epoch == table's
    int writer = -1, reader = -1;          // thread (interval table) or block (launch table)
    bool many_readers = false;
    const void* wpc = nullptr;
    const void* rpc = nullptr;
};

struct Table {
    std::vector<Cell> cells = std::vector<Cell>(1 << 12);
    unsigned epoch = 1;
    size_t live = 0;

    void clear() { epoch++, live = 0; }

    Cell* find(uintptr_t a) {
        if (2 * (live + 1) > cells.size()) grow();
        const size_t mask = cells.size() - 1;
        for (size_t i = (a * 0x9E3779B97F4A7C15ull >> 20) & mask;; i = (i + 1) & mask) {
            Cell& c = cells[i];
            if (c.epoch != epoch) {
                c = Cell();
                c.addr = a, c.epoch = epoch;
                live++;
                return &c;
            }
            if (c.addr == a) return &c;
        }
    }

    void grow() {
        std::vector<Cell> old;
        old.swap(cells);
        cells.assign(old.size() * 2, Cell());
        live = 0;
        for (const Cell& c : old)
            if (c.epoch == epoch) *find(c.addr) = c;
    }
};

struct Region {
    uintptr_t lo, hi;
    int arg;                               // -1 for __shared__
    const char* name;
};

bool g_on = false;
int g_thread = -1;                         // the running fiber, -1: the scheduler
unsigned g_block[3], g_dim[2], g_grid[2];
unsigned g_block_linear = 0;
std::vector<Region> g_shared, g_global;
Table g_interval, g_launch;
bool g_failed = false;
char g_report[2048];

const char* op_name(bool write) { return write ? "write" : "read"; }

uintptr_t offset_in_library(const void* pc) {
    Dl_info info;
    if (pc && dladdr(pc, &info) && info.dli_fbase) return (uintptr_t)pc - (uintptr_t)info.dli_fbase;
    return 0;
}

void thread_xyz(int t, char* out, size_t n) {
    const unsigned x = t % g_dim[0], y = (t / g_dim[0]) % g_dim[1], z = t / (g_dim[0] * g_dim[1]);
    std::snprintf(out, n, "(%u,%u,%u)", x, y, z);
}

void where(const Region& r, uintptr_t a, char* out, size_t n) {
    if (r.arg < 0) std::snprintf(out, n, "__shared__ %s, byte %lu", r.name, (unsigned long)(a - r.lo));
    else std::snprintf(out, n, "global memory, argument %d, byte %lu", r.arg, (unsigned long)(a - r.lo));
}

// Compares one access with what its cell holds; who = thread or block id.
bool conflicts(const Cell& c, int who, bool write, bool* other_write, int* other,
               const void** other_pc) {
    if (c.writer >= 0 && c.writer != who) {
        *other_write = true, *other = c.writer, *other_pc = c.wpc;
        return true;
    }
    if (write && c.reader >= 0 && (c.reader != who || c.many_readers)) {
        *other_write = false, *other = c.reader != who ? c.reader : -2, *other_pc = c.rpc;
        return true;
    }
    return false;
}

void record(Cell& c, int who, bool write, const void* pc) {
    if (write) {
        c.writer = who, c.wpc = pc;
    } else if (c.reader < 0) {
        c.reader = who, c.rpc = pc;
    } else if (c.reader != who) {
        c.many_readers = true;
    }
}

void report(const char* scope, const Region& r, uintptr_t a, bool write, const void* pc,
            bool other_write, int other, const void* other_pc, bool between_blocks) {
    char loc[256], me[64], them[64];
    where(r, a, loc, sizeof loc);
    const char* kind = write ? (other_write ? "write-after-write" : "write-after-read")
                             : "read-after-write";
    if (between_blocks) {
        std::snprintf(me, sizeof me, "block (%u,%u,%u)", g_block[0], g_block[1], g_block[2]);
        std::snprintf(them, sizeof them, "block (%u,%u,%u)", other % g_grid[0],
                      (other / g_grid[0]) % g_grid[1], other / (g_grid[0] * g_grid[1]));
    } else {
        char t[32];
        thread_xyz(g_thread, t, sizeof t);
        std::snprintf(me, sizeof me, "thread %s", t);
        if (other >= 0) thread_xyz(other, t, sizeof t);
        else std::snprintf(t, sizeof t, "(another reader)");
        std::snprintf(them, sizeof them, "thread %s", t);
    }
    std::snprintf(g_report, sizeof g_report,
                  "%s race %s on %s: %s %s {pc:0x%lx}, %s %s {pc:0x%lx} (block (%u,%u,%u))",
                  kind, scope, loc, me, op_name(write), (unsigned long)offset_in_library(pc), them,
                  op_name(other_write), (unsigned long)offset_in_library(other_pc), g_block[0],
                  g_block[1], g_block[2]);
    g_failed = true;
}

void access(const void* p, bool write, const void* pc) {
    if (!g_on || g_thread < 0 || g_failed) return;
    const uintptr_t a = (uintptr_t)p;
    const Region* r = nullptr;
    for (const Region& s : g_shared)
        if (a >= s.lo && a < s.hi) { r = &s; break; }
    if (!r)
        for (const Region& g : g_global)
            if (a >= g.lo && a < g.hi) { r = &g; break; }
    if (!r) return;
    bool ow;
    int other;
    const void* opc;
    Cell& c = *g_interval.find(a);
    if (conflicts(c, g_thread, write, &ow, &other, &opc)) {
        report("between threads of one barrier interval", *r, a, write, pc, ow, other, opc, false);
        return;
    }
    record(c, g_thread, write, pc);
    if (r->arg < 0) return;
    Cell& l = *g_launch.find(a);
    if (conflicts(l, (int)g_block_linear, write, &ow, &other, &opc)) {
        report("between blocks of one launch", *r, a, write, pc, ow, other, opc, true);
        return;
    }
    record(l, (int)g_block_linear, write, pc);
}

}  // namespace

extern "C" {
// ---- the launcher's side (ctypes) ---------------------------------------------------
void emu_rc_begin(int enabled) {
    g_on = enabled != 0;
    g_failed = false;
    g_report[0] = '\0';
    g_shared.clear();
    g_global.clear();
    g_interval.clear();
    g_launch.clear();
}

void emu_rc_global(const void* p, unsigned long nbytes, int arg) {
    g_global.push_back({(uintptr_t)p, (uintptr_t)p + nbytes, arg, nullptr});
}

// ---- the emulator's side (emu.h) ----------------------------------------------------
void emu_rc_shared(const void* p, unsigned long n, const char* name) {
    if (!g_on) return;
    for (const Region& s : g_shared)
        if (s.lo == (uintptr_t)p) return;
    g_shared.push_back({(uintptr_t)p, (uintptr_t)p + n, -1, name});
}

void emu_rc_block(unsigned bx, unsigned by, unsigned bz, unsigned dx, unsigned dy, unsigned gx,
                  unsigned gy) {
    g_block[0] = bx, g_block[1] = by, g_block[2] = bz;
    g_dim[0] = dx, g_dim[1] = dy;
    g_grid[0] = gx, g_grid[1] = gy;
    g_block_linear = bx + gx * (by + gy * bz);
    g_interval.clear();
}

void emu_rc_interval() { g_interval.clear(); }
void emu_rc_thread(int linear) { g_thread = linear; }
int emu_rc_failed() { return g_failed; }
const char* emu_rc_report() { return g_report; }

// ---- the instrumentation's hooks ----------------------------------------------------
#define EMU_PC __builtin_return_address(0)
#define EMU_HOOKS(n)                                                                   \
    void __tsan_read##n(void* p) { access(p, false, EMU_PC); }                         \
    void __tsan_write##n(void* p) { access(p, true, EMU_PC); }                         \
    void __tsan_unaligned_read##n(void* p) { access(p, false, EMU_PC); }               \
    void __tsan_unaligned_write##n(void* p) { access(p, true, EMU_PC); }               \
    void __tsan_volatile_read##n(void* p) { access(p, false, EMU_PC); }                \
    void __tsan_volatile_write##n(void* p) { access(p, true, EMU_PC); }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
void __tsan_read_range(void* p, unsigned long) { access(p, false, EMU_PC); }
void __tsan_write_range(void* p, unsigned long) { access(p, true, EMU_PC); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}
